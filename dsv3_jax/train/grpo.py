"""GRPO (group relative policy optimization) as a `loop.Job`: rollouts on our own latent-cache
engine inside the same JAX process, Python rewards, the clipped surrogate of TRL's variants.

`experiments/grpo.py` is its command line (`GRPOSettings`). One step of the loop:
1. Rollout: each of the step's `--global_batch` prompts (rendered with the chat template) is
   sampled `--num_generations` (G) times by `infer.rollout` (prefill on the expanded MLA path,
   decode over the latent cache, one jitted program of fixed shape), which also keeps the
   engine's log-prob of every sampled token and, with `--routing_replay`, the experts every
   token was routed to.
2. Rewards: `--reward` functions with TRL's signature on the decoded completions
   (`rewards.score`), weighted and summed; advantages normalised per group
   (`--scale_rewards`).
3. Update(s): `--num_iterations` (mu) optimizer steps on the same rollouts. The training
   forward runs the expanded path over [prompt, completion] rows (and replays the rollout's
   expert choices with `--routing_replay`); the loss is `grpo_objective.policy_loss` with
   `--loss_type`, `--epsilon`/`--epsilon_high`, `--importance_sampling_level`, `--beta` x k3
   KL to the frozen starting model (kept only when beta > 0), and the rollout-mismatch
   correction (`--rollout_is`, capped at `--rollout_is_cap`): the old policy's log-probs (the
   training forward's, before the first update) over the engine's.
The batch of step i is the prompts of step i (a pure function of i) and the rollout's seed is
drawn from (seed, i), so a run killed and resumed from a checkpoint replays the same steps.
"""

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import Config
from dsv3_jax.infer.rollout import Rollout, rollout
from dsv3_jax.infer.sampling import limit_vocab
from dsv3_jax.io import chat
from dsv3_jax.model import forward
from dsv3_jax.runtime import Runtime
from dsv3_jax.train import loop, pretrain, rewards as rewards_lib, sources, step as train_step
from dsv3_jax.train import tasks
from dsv3_jax.train.data import DataError
from dsv3_jax.train.grpo_objective import group_advantages, policy_loss, rollout_is_weights
from dsv3_jax.train.settings import (DATA, GUARD, MODEL, OPTIM, OUTPUT, FinetuneSettings, _field,
                                     parse_settings)
from dsv3_jax.train.sft_data import read_jsonl

log = logging.getLogger("dsv3_jax.train")
ROLL, OBJ, REWARD = "rollouts", "objective", "rewards"


@dataclasses.dataclass
class GRPOSettings(FinetuneSettings):
    # --- data ---
    data: list[str] | None = _field(None, "JSONL files of {\"prompt\": text or messages, "
                                    "<columns>} records; the other fields reach the reward "
                                    "functions (default: the embedded arithmetic task's "
                                    "training split)", DATA, nargs="*")
    chat: bool = _field(True, "render prompts with the chat template (a text prompt becomes "
                        "one user message); --no-chat feeds text prompts as they are", DATA)
    global_batch: int = _field(8, "prompts per step (each sampled --num_generations times)",
                               OPTIM)
    seq_len: int = _field(32, "prompt length in tokens: prompts are padded to it (one "
                          "compiled shape); a longer prompt is an error", DATA)
    eval_prompts: int = _field(200, "held-out prompts scored greedily before and after the run "
                               "(and every --eval_every steps): the embedded task's test split, "
                               "or --eval_data (0: no evaluation)", DATA)
    eval_data: str | None = _field(None, "JSONL of held-out prompts (as --data) for the "
                                   "evaluation", DATA)
    eval_every: int = _field(0, "also evaluate every N steps (0: only before and after)", DATA)
    eval_samples: int = _field(4, "sampled completions per held-out prompt (at --temperature) "
                               "for eval_sampled_accuracy; 0: greedy only", DATA)
    # --- rollouts ---
    num_generations: int = _field(8, "G: completions per prompt (>= 2)", ROLL)
    max_completion_length: int = _field(16, "tokens per completion at most (a completion that "
                                        "reaches it without a stop token is truncated)", ROLL)
    temperature: float = _field(1.0, "sampling temperature of the rollouts (also the "
                                "temperature of the policy's log-probs, as TRL)", ROLL)
    top_p: float = _field(1.0, "nucleus sampling mass of the rollouts", ROLL)
    top_k: int | None = _field(None, "sample among the k most likely tokens", ROLL)
    cache_dtype: str = _field("auto", "the rollout's latent cache: auto (the compute dtype), "
                              "bfloat16, float32, float8_e4m3fn", ROLL,
                              choices=("auto", "bfloat16", "float32", "float8_e4m3fn"))
    routing_replay: bool = _field(False, "replay the experts chosen at rollout in the training "
                                  "forward (R3), so routing flips between the two do not "
                                  "pollute the policy ratio", ROLL)
    # --- objective ---
    loss_type: str = _field("dapo", "dapo (token sum / all completion tokens of the step), "
                            "grpo (per-sequence mean), dr_grpo (/ N x max length), bnpo "
                            "(/ completion tokens of the micro-batch)", OBJ,
                            choices=("dapo", "grpo", "dr_grpo", "bnpo"))
    scale_rewards: str = _field("group", "advantage = reward - group mean, divided by the "
                                "group's std (group), the batch's (batch) or not (none: "
                                "Dr. GRPO)", OBJ, choices=("group", "batch", "none"))
    epsilon: float = _field(0.2, "lower clip: ratio >= 1 - epsilon", OBJ)
    epsilon_high: float | None = _field(None, "upper clip: ratio <= 1 + epsilon_high (default "
                                        "--epsilon; DAPO: 0.28)", OBJ)
    importance_sampling_level: str = _field("token", "token ratios, or one ratio per sequence "
                                            "(the geometric mean: GSPO)", OBJ,
                                            choices=("token", "sequence"))
    beta: float = _field(0.0, "weight of the k3 KL to the starting model (0: no reference "
                         "copy is kept)", OBJ)
    num_iterations: int = _field(1, "mu: optimizer steps on each batch of rollouts", OBJ)
    mask_truncated_completions: bool = _field(False, "leave completions that hit "
                                              "--max_completion_length without a stop token "
                                              "out of the loss (DAPO)", OBJ)
    rollout_is: str = _field("token_truncate", "correction of the rollout engine's log-probs "
                             "(absorbed decode, cache dtype) against the training forward's: "
                             "importance weights old/rollout truncated at --rollout_is_cap per "
                             "token or sequence, or masked above it; off", OBJ,
                             choices=("token_truncate", "token_mask", "sequence_truncate",
                                      "sequence_mask", "off"))
    rollout_is_cap: float = _field(3.0, "cap of the rollout importance weights", OBJ)
    # --- rewards ---
    reward: list[str] | None = _field(None, "a reward function: a built-in (exact_answer, "
                                      "format) or path/to/file.py:function with TRL's "
                                      "signature fn(prompts, completions, **columns) -> "
                                      "list[float | None]; repeat the flag for several "
                                      "(default: exact_answer and format)", REWARD,
                                      action="append")
    reward_weights: list[float] | None = _field(None, "one weight per --reward (default: 1 "
                                                "each; with the default rewards 1 and 0.2)",
                                                REWARD, nargs="*")
    # --- overrides of the shared flags ---
    steps: int = _field(60, "GRPO steps in the whole run (a resume continues to this)", OPTIM)
    lr: float = _field(2e-5, "peak learning rate (tiny; DeepSeekMath's 7B used 1e-6)", OPTIM)
    warmup_steps: int | None = _field(None, "linear warmup steps (default: a quarter of --steps, "
                                      "at most 10): a fresh Adam's first updates are about lr "
                                      "x sign(gradient) in every weight, and a rollout batch's "
                                      "gradient is mostly noise", OPTIM)
    bias_gamma: float = _field(0.0, "router-bias update speed; 0 (the GRPO default) keeps the "
                               "routing the policy was trained with: moving it changes the "
                               "policy outside the objective", MODEL)
    spike_loss_factor: float = _field(0.0, "fail a step whose loss exceeds this many times the "
                                      "recent median (0: off, the GRPO default: its loss sits "
                                      "near 0 and changes sign)", GUARD)
    log_every: int = _field(5, "print a line every N steps", OUTPUT)
    mesh: str = _field("none", "GRPO runs on one device in this version: none", "devices and "
                       "processes")
    precision: str = _field("preset", "preset, fp32 or bf16 (rollouts and training)", MODEL,
                            choices=("preset", "fp32", "bf16"))

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"--num_generations must be >= 2 (advantages compare completions "
                             f"of one prompt), got {self.num_generations}")
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 for rollouts, got {self.temperature}")
        if self.beta < 0 or not 0 < self.epsilon < 1 or not self.rollout_is_cap >= 1:
            raise ValueError("--beta must be >= 0, --epsilon in (0, 1), --rollout_is_cap >= 1")
        if (self.global_batch * self.num_generations) % self.grad_accum:
            raise ValueError(f"--grad_accum {self.grad_accum} must divide the step's "
                             f"{self.global_batch * self.num_generations} completions")
        if self.mesh != "none":
            raise ValueError("--mesh: GRPO runs on one device in this version (--mesh none)")
        if self.eval_prompts < 0 or self.eval_every < 0 or self.eval_samples < 0:
            raise ValueError("--eval_prompts, --eval_every and --eval_samples must be >= 0")


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class Prompts:
    records: list[dict]  # {"prompt", <columns>}
    ids: list[list[int]]  # the rendered prompt tokens
    what: str


def load_prompts(paths, tokenizer, use_chat: bool, prompt_len: int, *, split: str = "train",
                 limit: int | None = None, seed: int = 0) -> Prompts:
    if paths:
        recs, what = [], f"{len(paths)} file(s)"
        for path in pretrain.data_files(paths):
            for n, rec in read_jsonl(path):
                if "prompt" not in rec:
                    raise DataError(f"{path}:{n}: a GRPO record needs a \"prompt\" field")
                recs.append(rec)
        if limit is not None:
            recs = recs[:limit]
    else:
        recs = tasks.arithmetic(split, limit, seed)
        what = f"the embedded arithmetic task ({split} split)"
    ids = []
    for i, rec in enumerate(recs):
        p = rec["prompt"]
        if use_chat:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            x = chat.tokenize_prompt(tokenizer, msgs)
        elif isinstance(p, str):
            x = tokenizer.encode(p)
        else:
            raise DataError(f"prompt {i}: a list of messages needs the chat template (drop "
                            "--no-chat)")
        if len(x) > prompt_len:
            raise DataError(f"prompt {i} ({what}) has {len(x)} tokens, above --seq_len "
                            f"{prompt_len}: raise --seq_len")
        ids.append(np.asarray(x).tolist())
    return Prompts(recs, ids, what)


def step_prompts(prompts: Prompts, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step`: epoch e visits them in a permutation from (seed, e)."""
    n = len(prompts.ids)
    idx = np.arange(per_step) + step * per_step
    epochs, pos = np.divmod(idx, n)
    return [int(np.random.default_rng([seed, int(e)]).permutation(n)[p])
            for e, p in zip(epochs, pos)]


# ----------------------------------------------------------------------------- objective


def completion_logprobs(params, batch, cfg: Config, rt: Runtime, temperature: float,
                        replay: bool, vocab_limit: int | None = None):
    """Log-probs [N, M] of the completion tokens under `params` (the training forward, expanded
    MLA path, over [prompt, completion] rows), the logits' entropy [N, M] and the forward's
    aux. With `replay` the rollout's experts are forced; `vocab_limit` masks the ids the
    tokenizer does not have, as the rollout did."""
    forced = {"moe_layers": jnp.moveaxis(batch["routing"], 0, 1)} if replay else None
    logits, aux = forward(params, batch["tokens"], cfg, rt, segment_ids=batch["segment_ids"],
                          forced_experts=forced)
    m = batch["completion_tokens"].shape[1]
    pos = batch["prompt_len"][:, None] + jnp.arange(m)[None] - 1  # logits that predict them
    z = limit_vocab(jnp.take_along_axis(logits, pos[..., None], axis=1), vocab_limit)
    z = z / temperature  # [N, M, V]
    logz = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logz, batch["completion_tokens"][..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logz) * logz).sum(-1)
    return logp, entropy, aux


def grpo_loss(params, batch, *, cfg, rt, s: GRPOSettings, vocab_limit: int | None = None):
    """The GRPO objective on one (micro-)batch of rollouts (see the module docstring)."""
    logp, entropy, aux = completion_logprobs(params, batch, cfg, rt, s.temperature,
                                             s.routing_replay, vocab_limit)
    mask = batch["mask"]
    old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    is_w = None
    if s.rollout_is != "off":
        is_w = rollout_is_weights(old, batch["rollout_logp"], mask, s.rollout_is,
                                  s.rollout_is_cap)
    loss, m = policy_loss(logp, old, batch["advantages"], mask, loss_type=s.loss_type,
                          epsilon=s.epsilon, epsilon_high=s.epsilon_high,
                          importance_sampling_level=s.importance_sampling_level, beta=s.beta,
                          ref_logp=batch.get("ref_logp"), is_weights=is_w,
                          max_completion_length=s.max_completion_length,
                          num_items=batch["num_items"][0])
    count = jnp.maximum(mask.sum(), 1.0)
    gap = jnp.abs(old - batch["rollout_logp"])
    total = loss + s.balance_alpha * aux["balance"]
    metrics = {**m, "main_loss": loss, "balance_loss": aux["balance"], "load": aux["load"],
               "loss": total, "entropy": (entropy * mask).sum() / count,
               "logprob_gap": (gap * mask).sum() / count,
               "logprob_gap_max": jnp.where(mask > 0, gap, 0.0).max(),
               "completion_tokens": mask.sum()}
    return total, metrics


EXTRA = ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_std", "entropy",
         "logprob_gap", "logprob_gap_max", "completion_tokens")


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Engine:
    """What a GRPO step uses besides the state."""
    s: GRPOSettings
    cfg: Config
    rt: Runtime
    tokenizer: object
    rewards: list
    prompts: Prompts
    eval_prompts: Prompts | None
    update: object  # the jitted train step
    logprobs: object  # jitted completion_logprobs(params, batch) -> logp
    ref_params: dict | None


def train_batch(roll: Rollout, adv: np.ndarray, s: GRPOSettings) -> dict:
    """The update's batch from a rollout: [prompt, completion, padding] rows and the
    completion-token arrays (see `completion_logprobs`)."""
    n, p = roll.prompt_tokens.shape
    m = roll.tokens.shape[1]
    tokens = np.zeros((n, p + m), np.int32)
    seg = np.zeros((n, p + m), np.int32)
    mask = np.zeros((n, m), np.float32)
    for i in range(n):
        lp, lc = int(roll.prompt_lengths[i]), int(roll.n_tokens[i])
        tokens[i, :lp] = roll.prompt_tokens[i, :lp]
        tokens[i, lp:lp + lc] = roll.tokens[i, :lc]
        seg[i, :lp + lc] = 1
        mask[i, :lc] = 1.0
    if s.mask_truncated_completions:
        mask[~roll.stopped] = 0.0
    batch = {"tokens": tokens, "segment_ids": seg, "prompt_len": roll.prompt_lengths,
             "completion_tokens": roll.tokens, "mask": mask, "rollout_logp": roll.logprobs,
             "advantages": adv.astype(np.float32),
             "num_items": np.full((n,), max(mask.sum(), 1.0), np.float32)}
    if roll.routing is not None:
        batch["routing"] = np.moveaxis(roll.routing, 1, 0)  # [N, L, T, A]: rows first
    return batch


def evaluate(params, e: Engine) -> dict:
    """The held-out prompts, greedy: mean total reward (`eval_reward`) and, with an `answer`
    column, the fraction answered exactly (`eval_accuracy`); and `--eval_samples` completions
    per prompt at the rollout temperature: the mean exact fraction (`eval_sampled_accuracy`,
    pass@1 of the policy GRPO trains), from a fixed seed."""
    ev, s = e.eval_prompts, e.s
    has_answer = all("answer" in r for r in ev.records)
    prompts = [r["prompt"] for r in ev.records]

    def completions(ids, temperature, seed=0):
        roll = rollout(params, e.cfg, ids, s.max_completion_length, prompt_len=s.seq_len,
                       temperature=temperature, top_p=s.top_p, top_k=s.top_k, seed=seed,
                       stop_tokens=e.tokenizer.stop_ids, runtime=e.rt,
                       vocab_limit=e.tokenizer.vocab_size)
        return [e.tokenizer.decode(c) for c in roll.completions()]

    greedy = completions(ev.ids, 0.0)
    out = {}
    if has_answer:
        right = rewards_lib.exact_answer(prompts, greedy, answer=[r["answer"] for r in ev.records])
        out["eval_accuracy"] = float(np.mean(right))
    total, _ = rewards_lib.score(e.rewards, prompts, greedy, _columns(ev.records, 1))
    out["eval_reward"] = float(np.mean(total))
    if has_answer and s.eval_samples:
        k = s.eval_samples
        sampled = completions([x for x in ev.ids for _ in range(k)], s.temperature, seed=1)
        right = rewards_lib.exact_answer([p for p in prompts for _ in range(k)], sampled,
                                         answer=[r["answer"] for r in ev.records for _ in range(k)])
        out["eval_sampled_accuracy"] = float(np.mean(right))
    return out


def _columns(records: list[dict], g: int) -> dict:
    keys = [k for k in records[0] if k != "prompt"]
    return {k: [r.get(k) for r in records for _ in range(g)] for k in keys}


def grpo_step(e: Engine, state, batch, guard):
    """One GRPO step (see the module docstring); a Python function around jitted parts."""
    s, i = e.s, batch["step"]
    recs = [e.prompts.records[j] for j in batch["indices"]]
    ids = [e.prompts.ids[j] for j in batch["indices"] for _ in range(s.num_generations)]
    t0 = time.perf_counter()
    roll = rollout(state["params"], e.cfg, ids, s.max_completion_length, prompt_len=s.seq_len,
                   temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                   seed=int(np.random.default_rng([s.seed, i]).integers(2**31)),
                   stop_tokens=e.tokenizer.stop_ids, record_routing=s.routing_replay,
                   vocab_limit=e.tokenizer.vocab_size,
                   cache_dtype=None if s.cache_dtype == "auto" else jnp.dtype(s.cache_dtype),
                   runtime=e.rt)
    t_roll = time.perf_counter() - t0
    completions = [e.tokenizer.decode(c) for c in roll.completions()]
    prompts = [r["prompt"] for r in recs for _ in range(s.num_generations)]
    total, per_fn = rewards_lib.score(e.rewards, prompts, completions,
                                      _columns(recs, s.num_generations))
    adv, stats = group_advantages(jnp.asarray(total), s.num_generations, s.scale_rewards)
    tb = {k: jnp.asarray(v) for k, v in train_batch(roll, np.asarray(adv), s).items()}
    if s.num_iterations > 1:  # the old policy's log-probs, before the first update
        tb["old_logp"] = e.logprobs(state["params"], tb)
    if e.ref_params is not None:
        tb["ref_logp"] = e.logprobs(e.ref_params, tb)
    t1 = time.perf_counter()
    applied = True
    for _ in range(s.num_iterations):
        state, m = e.update(state, tb, guard)
        applied = applied and bool(m["applied"])
    m = dict(m)
    m["applied"] = np.bool_(applied)
    m["loss"] = jax.device_get(m["loss"])  # waits for the update: the time split below is real
    t_train = time.perf_counter() - t1
    n_tok = int(roll.n_tokens.sum())
    m.update({k: float(v) for k, v in stats.items()})
    m.update({f"reward_{name}": float(np.nanmean(v)) for name, v in per_fn.items()})
    m.update(completion_length=float(roll.n_tokens.mean()),
             truncated_frac=float((~roll.stopped).mean()), rollout_seconds=t_roll,
             train_seconds=t_train, rollout_share=t_roll / (t_roll + t_train),
             rollout_tokens_per_s=n_tok / t_roll)
    if s.eval_every and e.eval_prompts is not None and (i + 1) % s.eval_every == 0:
        m.update(evaluate(state["params"], e))
    return state, m


def build_engine(s: GRPOSettings, source: sources.Source, rt: Runtime, optimizer,
                 schedule) -> Engine:
    cfg, tok = source.cfg, source.tokenizer
    specs = s.reward or ["exact_answer", "format"]
    weights = s.reward_weights or ([1.0, 0.2] if not s.reward else None)
    rewards = rewards_lib.build_rewards(specs, weights)
    prompts = load_prompts(s.data, tok, s.chat, s.seq_len, seed=s.seed)
    ev = None
    if s.eval_prompts:
        ev = load_prompts([s.eval_data] if s.eval_data else None, tok, s.chat, s.seq_len,
                          split="test", limit=s.eval_prompts, seed=0)
    limit = tok.vocab_size if tok.vocab_size < cfg.vocab_size else None
    objective = functools.partial(grpo_loss, cfg=cfg, rt=rt, s=s, vocab_limit=limit)
    update = train_step.make_train_step(cfg, optimizer, schedule, None, objective=objective,
                                        rt=rt, bias_gamma=s.bias_gamma, grad_accum=s.grad_accum,
                                        extra_metrics=EXTRA + (("kl",) if s.beta else ())
                                        + (("is_weight_mean",) if s.rollout_is != "off" else ()))

    @functools.partial(jax.jit, compiler_options=rt.compiler_options())
    def logprobs(params, batch):
        return completion_logprobs(params, batch, cfg, rt, s.temperature, s.routing_replay,
                                   limit)[0]

    ref = jax.tree.map(jnp.asarray, source.params) if s.beta > 0 else None
    return Engine(s, cfg, rt, tok, rewards, prompts, ev, update, logprobs, ref)


def grpo_job(s: GRPOSettings, source: sources.Source, rt: Runtime) -> tuple[loop.Job, Engine]:
    pretrain.refuse_pipeline(s, None, "GRPO")
    cfg = source.cfg
    schedule, optimizer = pretrain.build_optimizer(s, cfg, min(10, s.steps // 4))
    e = build_engine(s, source, rt, optimizer, schedule)
    about = pretrain.run_meta(cfg, rt, s, source=source.description)
    key = jax.random.key(s.seed)
    job = loop.Job(
        name="GRPO",
        init_state=lambda: train_step.state_from_params(cfg, source.params, key, optimizer),
        abstract_state=lambda: train_step.abstract_state(cfg, optimizer),
        step=functools.partial(grpo_step, e),
        batch=lambda i: {"step": i, "indices": step_prompts(e.prompts, i, s.global_batch,
                                                             s.seed)},
        meta=lambda i: {"data": {"step": i, "prompts": len(e.prompts.ids), "seed": s.seed},
                        **about},
        check_resume=lambda meta: pretrain.check_model(meta, cfg),
        log_fields=(("reward_mean", "reward"), ("reward_std", "std"), ("clip_frac", "clip"),
                    ("completion_length", "length"), ("rollout_share", "rollout share"),
                    ("rollout_tokens_per_s", "rollout tok/s")))
    return job, e


def run(s: GRPOSettings) -> dict:
    """GRPO; returns a summary with the evaluation before and after."""
    source = sources.load_source(preset=s.preset, seed=s.seed, init_checkpoint=s.init_checkpoint,
                                 hf=s.hf, mtp_depth=s.mtp_depth)
    cfg = source.cfg
    rt = pretrain.build_runtime(s, cfg)
    job, e = grpo_job(s, source, rt)
    print(f"GRPO of {source.description} ({rt.describe()}): {len(e.prompts.ids):,} prompts from "
          f"{e.prompts.what}, {s.global_batch} x {s.num_generations} completions of <= "
          f"{s.max_completion_length} tokens per step, rewards "
          f"{', '.join(f'{r.name} x {r.weight:g}' for r in e.rewards)}", flush=True)
    before = after = None
    if e.eval_prompts is not None:
        params = source.params
        before = evaluate(params, e)
        print(f"held-out before: {_fmt(before)} ({len(e.eval_prompts.ids)} prompts of "
              f"{e.eval_prompts.what}, greedy)", flush=True)
    out = loop.run(job, pretrain.loop_options(s))
    if e.eval_prompts is not None:
        after = evaluate(out.state["params"], e)
        print(f"held-out after:  {_fmt(after)}", flush=True)
    if s.export_hf:
        print(f"exported a Hugging Face folder: "
              f"{sources.export_hf(out.state['params'], cfg, s.export_hf, source)}", flush=True)
    return {"steps_run": out.steps_run, "start_step": out.start_step, "history": out.history,
            "state": out.state, "config": cfg, "runtime": rt, "eval_before": before,
            "eval_after": after}


def _fmt(ev: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in ev.items())


def main(argv=None, description: str = "") -> int:
    return pretrain.cli(run, parse_settings(argv, description, GRPOSettings), "grpo")
