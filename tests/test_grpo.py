"""GRPO end to end on `tiny`: the rollout engine's log-probs and routing against the training
forward, the objective on real rollouts (zero loss with a gradient at mu = 1), routing replay,
reward-function errors through the job, and GRPO raising the reward of a planted easy task."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.infer.rollout import rollout
from dsv3_jax.train import grpo
from dsv3_jax.train.grpo_objective import group_advantages
from dsv3_jax.train.rewards import RewardError

PROMPTS = [[1, 80, 90, 100], [1, 70], [1, 60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def tiny():
    cfg = dsv3_jax.get_config("tiny")
    return cfg, dsv3_jax.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def sampled(tiny):
    cfg, params = tiny
    return rollout(params, cfg, PROMPTS, 6, prompt_len=8, temperature=1.0, seed=3,
                   record_routing=True, stop_tokens=[2])


def _rows(roll):
    n, p = roll.prompt_tokens.shape
    rows = np.zeros((n, p + roll.tokens.shape[1]), np.int32)
    for i in range(n):
        lp, lc = roll.prompt_lengths[i], roll.n_tokens[i]
        rows[i, :lp] = roll.prompt_tokens[i, :lp]
        rows[i, lp:lp + lc] = roll.tokens[i, :lc]
    return rows


def test_rollout_logprobs_and_routing_match_the_training_forward(tiny, sampled):
    cfg, params = tiny
    roll = sampled
    rows = _rows(roll)
    logits, aux = dsv3_jax.forward(params, jnp.asarray(rows), cfg)
    lsm = np.asarray(jax.nn.log_softmax(logits, -1))
    idx = np.asarray(aux["indices"]["moe_layers"])
    for i in range(len(PROMPTS)):
        lp, n = int(roll.prompt_lengths[i]), int(roll.n_tokens[i])
        forced = np.array([lsm[i, lp - 1 + j, rows[i, lp + j]] for j in range(n)])
        # absorbed decode vs expanded training path, fp32: summation order only
        np.testing.assert_allclose(roll.logprobs[i, :n], forced, atol=2e-5)
        fed = lp + n - 1  # every token fed to the engine (the last sampled one never is)
        assert np.array_equal(np.sort(roll.routing[:, i, :fed], -1),
                              np.sort(idx[:, i, :fed], -1))
    # greedy rollouts are `generate`'s greedy output
    greedy = rollout(params, cfg, PROMPTS, 5, temperature=0.0)
    assert greedy.completions() == dsv3_jax.generate(params, cfg, PROMPTS, 5)


def _batch(roll, adv, s):
    return {k: jnp.asarray(v) for k, v in grpo.train_batch(roll, adv, s).items()}


def test_objective_at_one_iteration_is_zero_with_a_gradient(tiny, sampled):
    cfg, params = tiny
    s = grpo.GRPOSettings(loss_type="grpo", routing_replay=True, balance_alpha=0.0,
                          num_generations=3, max_completion_length=6, temperature=1.0)
    adv, _ = group_advantages(jnp.asarray([1.0, 0.0, 0.5]), 3, "group")
    batch = _batch(sampled, np.asarray(adv), s)
    rt = dsv3_jax.resolve_runtime(cfg)

    def loss(w):
        return grpo.grpo_loss({"weights": w, "router_state": params["router_state"]}, batch,
                              cfg=cfg, rt=rt, s=s)

    (value, m), g = jax.value_and_grad(loss, has_aux=True)(params["weights"])
    assert abs(float(value)) < 1e-6  # ratio 1, group-centred advantages, per-sequence means
    assert float(jnp.sqrt(sum((x ** 2).sum() for x in jax.tree.leaves(g)))) > 1e-3
    assert float(m["logprob_gap"]) < 2e-5 and float(m["clip_frac"]) == 0.0
    assert float(m["completion_tokens"]) == float(sampled.n_tokens.sum())


def test_routing_replay_forces_the_rollouts_experts(tiny, sampled):
    """With replay, the training forward routes as the rollout did, even where its own router
    would not: overwrite the recorded choice with other experts and the log-probs move."""
    cfg, params = tiny
    rt = dsv3_jax.resolve_runtime(cfg)
    s = grpo.GRPOSettings(routing_replay=True, num_generations=3, max_completion_length=6)
    batch = _batch(sampled, np.zeros(3, np.float32), s)
    lp_same = grpo.completion_logprobs(params, batch, cfg, rt, 1.0, True)[0]
    lp_free = grpo.completion_logprobs(params, batch, cfg, rt, 1.0, False)[0]
    mask = np.asarray(batch["mask"]) > 0
    np.testing.assert_allclose(np.asarray(lp_same)[mask], np.asarray(lp_free)[mask], atol=2e-5)
    moved = dict(batch, routing=(batch["routing"] + 1) % cfg.n_routed_experts)
    lp_moved = grpo.completion_logprobs(params, moved, cfg, rt, 1.0, True)[0]
    assert np.abs(np.asarray(lp_moved) - np.asarray(lp_free))[mask].max() > 1e-3


PLANTED = '''
def lowercase_share(prompts, completions, **columns):
    """The planted task: the share of lowercase ASCII letters in the completion."""
    return [sum(c.islower() and c.isascii() for c in x) / max(len(x), 1) for x in completions]
'''


def _lowercase_mass(params, cfg, prompts):
    """Probability of a lowercase-letter token as each prompt's first completion token, over
    the ids the byte tokenizer can decode (what the rollouts sample from)."""
    from dsv3_jax.infer.sampling import limit_vocab

    logits, _ = dsv3_jax.forward(params, jnp.asarray([p for p in prompts]), cfg)
    probs = np.asarray(jax.nn.softmax(limit_vocab(logits[:, -1], 259), -1))
    return probs[:, 97 + 3:123 + 3].sum(-1).mean()


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_planted_task(tmp_path):
    (tmp_path / "planted.py").write_text(PLANTED)
    data = tmp_path / "prompts.jsonl"
    texts = ["abc", "hello", "xyz", "qq"]
    data.write_text("\n".join(json.dumps({"prompt": t}) for t in texts) + "\n")
    s = grpo.GRPOSettings(data=[str(data)], chat=False, reward=[f"{tmp_path}/planted.py:"
                                                                "lowercase_share"],
                          steps=10, global_batch=4, num_generations=8, max_completion_length=4,
                          seq_len=8, lr=1e-2, warmup_steps=0, bias_gamma=1e-3,
                          eval_prompts=0, progress=False, log_every=1,
                          metrics_file=str(tmp_path / "m.jsonl"))
    out = grpo.run(s)
    cfg = out["config"]
    start = dsv3_jax.init_params(cfg, jax.random.key(0))
    tok = [[b + 3 for b in t.encode()] for t in texts]
    before = _lowercase_mass(start, cfg, [tok[1]])
    after = _lowercase_mass(out["state"]["params"], cfg, [tok[1]])
    assert after > 2 * before, (before, after)
    recs = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    for key in ("reward_mean", "reward_std", "frac_reward_zero_std", "clip_frac", "entropy",
                "completion_length", "rollout_tokens_per_s", "rollout_seconds",
                "train_seconds", "logprob_gap"):
        assert all(key in r for r in recs), key
    assert np.mean([r["reward_mean"] for r in recs[-2:]]) > recs[0]["reward_mean"]


def test_a_broken_reward_is_an_error_naming_it(tmp_path, tiny):
    (tmp_path / "bad.py").write_text("def short(prompts, completions, **kw):\n    return [1.0]\n")
    s = grpo.GRPOSettings(reward=[f"{tmp_path}/bad.py:short"], steps=1, global_batch=2,
                          num_generations=2, max_completion_length=2, eval_prompts=0,
                          progress=False)
    with pytest.raises(RewardError, match="short"):
        grpo.run(s)


def test_settings_errors_name_the_flag():
    with pytest.raises(ValueError, match="--num_generations"):
        grpo.GRPOSettings(num_generations=1)
    with pytest.raises(ValueError, match="--mesh"):
        grpo.GRPOSettings(mesh="fsdp=2")


def test_both_scripts_document_every_flag():
    from dsv3_jax.train import sft
    from dsv3_jax.train.settings import settings_parser

    for cls, flags in ((grpo.GRPOSettings, ("--reward", "--loss_type", "--routing_replay",
                                            "--rollout_is", "--init_checkpoint", "--hf")),
                       (sft.SFTSettings, ("--teacher", "--kd_beta", "--packing", "--export_hf"))):
        ap = settings_parser("x", cls)
        text = ap.format_help()
        assert all(f in text for f in flags)
        assert all(a.help for a in ap._actions)
    s = grpo.parse_settings(["--reward", "exact_answer", "--reward", "format",
                             "--reward_weights", "1", "0.5"], cls=grpo.GRPOSettings)
    assert s.reward == ["exact_answer", "format"] and s.reward_weights == [1.0, 0.5]
