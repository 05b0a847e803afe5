"""Supervised fine-tuning (SFT) as a `loop.Job`, with optional logit-level distillation.

`experiments/sft.py` is its command line (`SFTSettings`: every field a flag). The run:
1. the model and tokenizer from `--init_checkpoint`, `--hf` or a random `--preset`
   (`sources.load_source`);
2. conversations from `--data` JSONL files (`sft_data`: messages or prompt/completion
   records), or the embedded arithmetic task's training split; rendered with the tokenizer's
   chat template, the loss on assistant tokens only, packed with segment ids and positions;
3. the step: the mean cross-entropy over assistant tokens (`loss.loss_fn` with the batch's
   mask, segment ids and positions; MTP and the balance loss by their weights), plus, with
   `--teacher DIR`, `--kd_weight` x a divergence from the teacher's token distributions
   (`distill.kd_loss`: forward KL, reverse KL or generalized JSD by `--kd_beta`, computed
   over chunks of positions so that neither model's full-vocabulary logits exist beyond one
   chunk for the teacher; the teacher is frozen and passed to the compiled step as an
   argument);
4. the shared loop: checkpoints (kill and resume bitwise), failed steps, metrics (`loss`,
   `main_loss`, `assistant_tokens`, `tokens_per_s`, `lr`, `kd_loss`), a greedy sample of
   `--sample_prompt` through the chat template at the end, and `--export_hf`.
"""

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import Config
from dsv3_jax.infer.generate import generate
from dsv3_jax.io import chat
from dsv3_jax.model import compute_weights, forward
from dsv3_jax.placement import place
from dsv3_jax.runtime import Runtime
from dsv3_jax.train import loop, pretrain, sources, step as train_step, tasks
from dsv3_jax.train.data import DataError
from dsv3_jax.train.distill import kd_loss
from dsv3_jax.train.loss import LossWeights, loss_fn
from dsv3_jax.train.settings import DATA, OUTPUT, FinetuneSettings, _field, parse_settings
from dsv3_jax.train.sft_data import ROW_KEYS, SFTDataset, encode, read_jsonl, to_messages

log = logging.getLogger("dsv3_jax.train")
KD = "distillation"


@dataclasses.dataclass
class SFTSettings(FinetuneSettings):
    # --- data ---
    data: list[str] | None = _field(None, "JSONL files of {\"messages\": [{\"role\", "
                                    "\"content\"}, ...]} or {\"prompt\", \"completion\"} "
                                    "records (default: the embedded arithmetic task's training "
                                    "split as chat)", DATA, nargs="*")
    packing: bool = _field(True, "pack several conversations per row (segment ids keep "
                           "attention within each, positions restart per conversation); "
                           "--no-packing: one conversation per row", DATA)
    seq_len: int = _field(256, "tokens per row (longer conversations are cut; the run says how "
                          "many)", DATA)
    steps: int = _field(400, "optimizer steps in the whole run (a resume continues to this)",
                        "optimisation")
    lr: float = _field(3e-3, "peak learning rate (a pretrained model wants far less, e.g. 1e-5)",
                       "optimisation")
    # --- distillation ---
    teacher: str | None = _field(None, "distil from this teacher (a Hugging Face folder or one "
                                 "of our checkpoints; same vocabulary): adds --kd_weight x a "
                                 "divergence to its token distributions on assistant tokens",
                                 KD)
    kd_weight: float = _field(1.0, "weight of the distillation term", KD)
    kd_beta: float = _field(0.0, "0: forward KL(teacher || student); 1: reverse KL; between: "
                            "generalized JSD (TRL GKD's convention)", KD)
    kd_temperature: float = _field(1.0, "softmax temperature of both models in the distillation "
                                   "term", KD)
    kd_chunk: int = _field(512, "token positions per chunk of the distillation term (bounds "
                           "the logits held at once)", KD)
    # --- output ---
    sample_tokens: int = _field(16, "greedy tokens to sample at the end (0: none)", OUTPUT)
    sample_prompt: str = _field("12+35=", "user message of the final greedy sample (rendered "
                                "with the chat template)", OUTPUT)

    def __post_init__(self):
        super().__post_init__()
        if self.sample_tokens < 0:
            raise ValueError(f"--sample_tokens must be >= 0, got {self.sample_tokens}")
        if not 0 <= self.kd_beta <= 1:
            raise ValueError(f"--kd_beta must be in [0, 1], got {self.kd_beta}")
        if not self.kd_temperature > 0 or self.kd_weight < 0 or self.kd_chunk < 1:
            raise ValueError("--kd_temperature must be > 0, --kd_weight >= 0 and --kd_chunk >= 1")


# ----------------------------------------------------------------------------- data


def conversations(s: SFTSettings) -> tuple[list[list[dict]], list[str], str]:
    """(conversations, a name for each (file:line), what they are)."""
    if not s.data:
        recs = tasks.sft_records(tasks.arithmetic("train"))
        return ([to_messages(r) for r in recs], [f"arithmetic[{i}]" for i in range(len(recs))],
                "the embedded arithmetic task (training split)")
    convs, names = [], []
    for path in pretrain.data_files(s.data):
        for n, rec in read_jsonl(path):
            convs.append(to_messages(rec, f"{path}:{n}"))
            names.append(f"{path}:{n}")
    return convs, names, f"{len(s.data)} data path(s)"


def build_dataset(s: SFTSettings, tokenizer) -> tuple[SFTDataset, str]:
    convs, names, what = conversations(s)
    enc = encode(convs, tokenizer, s.seq_len, names)
    ds = SFTDataset(enc, s.seq_len, s.global_batch, s.seed, packing=s.packing)
    about = (f"{len(enc.ids):,} conversations from {what}, {ds.assistant_tokens:,} assistant "
             f"tokens, {ds.rows_per_epoch:,} rows of {s.seq_len} per epoch "
             f"({'packed' if s.packing else 'one per row'})")
    if enc.truncated:
        dropped = (f", {enc.dropped} of them dropped (no assistant token left)"
                   if enc.dropped else "")
        about += f"; {enc.truncated} cut to --seq_len {s.seq_len} + 1 tokens{dropped}"
    return ds, about


# ----------------------------------------------------------------------------- objective


def sft_objective(cfg: Config, rt: Runtime, shard, weights: LossWeights, teacher=None,
                  s: SFTSettings | None = None):
    """(params, batch[, teacher params]) -> (loss, metrics): the assistant-token cross-entropy
    (+ MTP and balance by `weights`), + the distillation term with a teacher."""
    if teacher is None:  # the pretraining objective: the rows' mask makes it SFT's
        return train_step.pretraining_objective(cfg, rt, shard, weights=weights)
    t_cfg = teacher.cfg
    return functools.partial(_sft_kd_loss, cfg=cfg, rt=rt, shard=shard, weights=weights,
                             t_cfg=t_cfg, t_rt=rt.for_model(t_cfg), kd_weight=s.kd_weight,
                             beta=s.kd_beta, temperature=s.kd_temperature, chunk=s.kd_chunk)


def assistant_tokens(batch) -> dict:
    """The step's count of loss tokens (`make_train_step(batch_metrics=)`: the whole batch's,
    whatever its split into micro-batches or pipeline microbatches)."""
    return {"assistant_tokens": batch["mask"].sum()}


def _sft_kd_loss(params, batch, teacher_params, *, cfg, rt, shard, weights, t_cfg, t_rt,
                 kd_weight, beta, temperature, chunk):
    loss, m = loss_fn(params, batch, cfg, rt, weights=weights, shard=shard, keep_hidden=True)
    t_hidden, t_head = _teacher(teacher_params, batch, t_cfg, t_rt, shard)
    kd, _ = kd_loss(m.pop("hidden"), _head(params, cfg, rt), t_hidden, t_head, batch["mask"],
                    beta=beta, temperature=temperature, chunk=chunk)
    loss = loss + kd_weight * kd
    m.update(loss=loss, kd_loss=kd)
    return loss, m


def _head(params, cfg: Config, rt: Runtime):
    return compute_weights({"head": params["weights"]["head"]}, cfg, rt)["head"]


def _teacher(teacher_params, batch, t_cfg: Config, t_rt: Runtime, shard):
    """The frozen teacher's final-normed hidden states over the batch and its head."""
    _, aux = forward(teacher_params, batch["inputs"], t_cfg, t_rt, positions=batch["positions"],
                     segment_ids=batch["segment_ids"], shard=shard)  # its logits are unused
    return aux["hidden"], _head(teacher_params, t_cfg, t_rt)


@dataclasses.dataclass(frozen=True)
class PipelinedKD:
    """Distillation as a term of the pipeline's last stage (`make_train_step(pipeline_extra=)`):
    the teacher's forward runs on the whole batch before the schedule (its final-normed hidden
    states travel with the microbatches; on a pipeline mesh it is computed without the
    pipeline axis, by XLA's partitioner, on every pipeline rank's batch rows), and each
    microbatch adds its part of `kd_loss`, scaled to the batch's assistant-token count."""
    t_cfg: Config
    t_rt: Runtime
    kd_weight: float
    beta: float
    temperature: float
    chunk: int

    def prepare(self, batch, teacher_params):
        hidden, head = _teacher(teacher_params, batch, self.t_cfg, self.t_rt, None)
        return {**batch, "teacher_hidden": hidden}, {"teacher_head": head}

    def loss(self, hidden, head, mb, frozen):
        kd, _ = kd_loss(hidden, head, mb["teacher_hidden"], frozen["teacher_head"], mb["mask"],
                        beta=self.beta, temperature=self.temperature, chunk=self.chunk)
        # kd_loss is this microbatch's token mean: rescale it to a share of the batch's
        kd = kd * jnp.maximum(mb["mask"].sum(), 1.0) / mb["n_targets"]
        return self.kd_weight * kd, {"kd_loss": kd}


# ----------------------------------------------------------------------------- the job


def load_teacher(s: SFTSettings, cfg: Config) -> sources.Source:
    path = s.teacher
    hf = os.path.exists(os.path.join(path, "config.json"))
    t = sources.load_source(preset=s.preset, seed=s.seed, hf=path if hf else None,
                            init_checkpoint=None if hf else path, flag="--teacher")
    if t.cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"--teacher {path}: vocabulary of {t.cfg.vocab_size} ids, the student's "
                         f"has {cfg.vocab_size}: distillation compares distributions over the "
                         "same tokens")
    return t


def chat_sample(params, cfg: Config, rt: Runtime, tokenizer, user: str, n: int) -> str:
    """The greedy reply to one user message, through the chat template."""
    prompt = chat.tokenize_prompt(tokenizer, [{"role": "user", "content": user}]).tolist()
    n = min(n, cfg.max_seq_len - len(prompt))
    params = jax.tree.map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, params)
    out = generate(params, cfg, [prompt], n, stop_tokens=tokenizer.stop_ids, runtime=rt,
                   vocab_limit=tokenizer.vocab_size)[0]
    return tokenizer.decode(out)


def _sampler(s: SFTSettings, cfg: Config, rt: Runtime, tokenizer):
    if not s.sample_tokens:
        return None

    def sample(state) -> str:
        params = state["params"]
        params = params if jax.process_count() == 1 else pretrain.gather_params(params)
        if jax.process_index() != 0:
            return ""
        reply = chat_sample(params, cfg, rt, tokenizer, s.sample_prompt, s.sample_tokens)
        return f"greedy reply to {s.sample_prompt!r}: {reply!r}"

    return sample


def sft_job(s: SFTSettings, source: sources.Source, rt: Runtime, shard, dataset: SFTDataset,
            teacher: sources.Source | None = None) -> loop.Job:
    cfg = source.cfg
    weights = LossWeights(mtp=s.mtp_weight, balance=s.balance_alpha)
    # SFT is the pretraining objective over masked, packed rows: a pipeline schedule runs it
    # as it runs pretraining's (the executor takes mask, segments, positions), distillation's
    # term on its last stage
    plan = pretrain.build_pipeline(s, cfg, shard)
    schedule, optimizer = pretrain.build_optimizer(s, cfg)
    objective = None if plan else sft_objective(cfg, rt, shard, weights, teacher, s)
    kd = None
    if plan and teacher is not None:
        kd = PipelinedKD(teacher.cfg, rt.for_model(teacher.cfg), s.kd_weight, s.kd_beta,
                         s.kd_temperature, s.kd_chunk)
    frozen = None
    if teacher is not None:
        # on a mesh the teacher is whole on every device (replicated: the plan's choice for a
        # frozen model, which neither trains nor saves), placed from the host copy
        frozen = (jax.tree.map(jnp.asarray, teacher.params) if shard is None else
                  jax.tree.map(lambda a: place(a, shard.named(P())), teacher.params))
    extra = ("assistant_tokens",) + (("kd_loss",) if teacher is not None else ())
    step_fn = train_step.make_train_step(cfg, optimizer, schedule, shard, objective=objective,
                                         rt=rt, bias_gamma=s.bias_gamma, grad_accum=s.grad_accum,
                                         extra_metrics=extra, frozen=frozen, pipeline=plan,
                                         loss_weights=weights, pipeline_extra=kd,
                                         batch_metrics=assistant_tokens)
    about = pretrain.run_meta(cfg, rt, s, source=source.description)
    key = jax.random.key(s.seed)
    return loop.Job(
        name="SFT",
        init_state=lambda: train_step.state_from_params(cfg, source.params, key, optimizer,
                                                        shard),
        abstract_state=lambda: train_step.abstract_state(cfg, optimizer, shard),
        step=step_fn,
        batch=lambda i: pretrain.place_batch(pretrain.Rows(dataset, i, ROW_KEYS), shard),
        meta=lambda i: {"data": dataset.state(i), **about},
        check_resume=lambda meta: check_resume(meta, dataset, cfg),
        tokens_per_step=s.global_batch * s.seq_len,
        flops_per_token=cfg.flops_per_token(s.seq_len),
        log_fields=(("main_loss", "main"), ("kd_loss", "kd")),
        sample=_sampler(s, cfg, rt, source.tokenizer))


def check_resume(meta: dict, dataset: SFTDataset, cfg: Config) -> None:
    """A checkpoint of another model or other data is an error naming the field and flag."""
    pretrain.check_model(meta, cfg)
    pretrain.check_data(meta, dataset.state(0), {
        "fingerprint": "--data", "seq_len": "--seq_len", "global_batch": "--global_batch",
        "seed": "--seed", "packing": "--packing"})


def run(s: SFTSettings) -> dict:
    """Fine-tune; returns a summary (steps run, start step, per-step losses, final state)."""
    pretrain.init_distributed(s)
    source = sources.load_source(preset=s.preset, seed=s.seed, init_checkpoint=s.init_checkpoint,
                                 hf=s.hf, mtp_depth=s.mtp_depth)
    cfg = source.cfg
    if s.seq_len > cfg.max_seq_len:
        raise DataError(f"--seq_len {s.seq_len} is above the model's {cfg.max_seq_len} positions")
    shard = pretrain.build_sharding(s)
    pretrain.check_batch_split(s, shard)
    rt = pretrain.build_runtime(s, cfg)
    dataset, about = build_dataset(s, source.tokenizer)
    teacher = load_teacher(s, cfg) if s.teacher else None
    if jax.process_index() == 0:
        print(f"SFT of {source.description} ({rt.describe()}) on {about}"
              f"{f'; distilling from {teacher.description}' if teacher else ''}", flush=True)
    out = loop.run(sft_job(s, source, rt, shard, dataset, teacher), pretrain.loop_options(s))
    if s.export_hf and jax.process_index() == 0:
        params = pretrain.gather_params(out.state["params"])
        folder = sources.export_hf(params, cfg, s.export_hf, source)
        print(f"exported a Hugging Face folder: {folder}", flush=True)
    return {"steps_run": out.steps_run, "start_step": out.start_step, "history": out.history,
            "state": out.state, "config": cfg, "runtime": rt, "tokenizer": source.tokenizer}


def main(argv=None, description: str = "") -> int:
    return pretrain.cli(run, parse_settings(argv, description, SFTSettings), "sft")
