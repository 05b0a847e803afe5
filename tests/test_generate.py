"""The generation engine (dsv3_jax/infer/): greedy against teacher forcing, batching,
stop tokens, sampling, speculative decoding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.infer import speculative
from dsv3_jax.infer.generate import generate
from dsv3_jax.infer.sampling import sample

CFG = get_config("tiny")
RT = dsv3_jax.Runtime()


@pytest.fixture(scope="module")
def params():
    # a larger init spread so greedy choices are far from ties
    return dsv3_jax.init_params(CFG.replace(init_std=0.1), jax.random.key(0))


PROMPTS = [[5, 17, 3, 99, 41, 7, 2], [300, 12], [8, 8, 8, 1, 250]]


def test_greedy_equals_teacher_forced_argmax(params):
    """Every generated token is the argmax of the full forward over prompt + generation."""
    outs = generate(params, CFG, PROMPTS, 9, cache_dtype=jnp.float32)
    for prompt, out in zip(PROMPTS, outs):
        assert len(out) == 9
        seq = np.array([prompt + out])
        logits, _ = dsv3_jax.forward(params, seq, CFG)
        pred = np.asarray(jnp.argmax(logits[0], -1))
        np.testing.assert_array_equal(pred[len(prompt) - 1:-1], out)


def test_batched_equals_one_by_one(params):
    batched = generate(params, CFG, PROMPTS, 6, cache_dtype=jnp.float32)
    for prompt, out in zip(PROMPTS, batched):
        assert generate(params, CFG, [prompt], 6, cache_dtype=jnp.float32)[0] == out


def test_stop_tokens_end_rows_independently(params):
    full = generate(params, CFG, PROMPTS, 8, cache_dtype=jnp.float32)
    stop = full[0][2]  # the third token of row 0 becomes a stop token
    outs = generate(params, CFG, PROMPTS, 8, stop_tokens=[stop], cache_dtype=jnp.float32)
    for f, o in zip(full, outs):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:cut]  # the stop token is kept, nothing after it
    assert len(outs[0]) == 3


def test_sampling_is_seeded_and_respects_top_k(params):
    a = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=3)
    b = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=3)
    c = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=4)
    assert a == b and a != c
    logits = jax.random.normal(jax.random.key(1), (4, 50)) * 3
    for s in range(20):
        tok = sample(logits, jax.random.key(s), 1.0, 3, None)
        top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
        assert all(int(t) in top3[i] for i, t in enumerate(tok))
    # top_p tiny: only the most likely token survives
    tok = sample(logits, jax.random.key(0), 1.0, None, 1e-6)
    np.testing.assert_array_equal(tok, jnp.argmax(logits, -1))


@pytest.mark.parametrize("prompts, kw, message", [
    ([[]], {}, r"prompts\[0\] must be a non-empty"),
    ([[1, 2], [3, 512]], {}, r"prompts\[1\]\[1\] = 512 is outside the vocabulary"),
    ([[1] * 10], {"max_len": 12}, "exceed the cache length max_len=12"),
    ([[1]], {"max_len": 1000}, "exceeds Config.max_seq_len=256"),
    ([[1] * 250, [2]], {}, r"prompts\[0\] \(250 tokens\) \+ max_new_tokens \(5\) = 255"),
    ([[2], [1] * 254], {}, r"prompts\[1\] \(254 tokens\).*exceed the model's max_seq_len=256"),
    ([[1]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1]], {"top_p": 0.0}, "top_p must be in"),
    ([], {}, "non-empty list"),
])
def test_bad_input_is_a_clear_error(params, prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        generate(params, CFG, prompts, 5, **kw)


def test_generate_script_from_a_pretrain_checkpoint(tmp_path):
    """experiments/generate.py restores the newest pretrain checkpoint and continues a text
    prompt; with --prompt_ids on a random init it prints ids."""
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "experiments"))
    import generate as script
    from dsv3_jax.train import pretrain

    ck = tmp_path / "ck"
    assert pretrain.main(["--steps", "2", "--checkpoint_dir", str(ck), "--checkpoint_every", "2",
                          "--sample_tokens", "0", "--no-progress"]) == 0
    rec = script.main(["--checkpoint_dir", str(ck), "--prompt", "def ", "--max_new_tokens", "5",
                       "--repeats", "1", "--json", str(tmp_path / "g.json")])
    assert len(rec["outputs"]) == 1 and len(rec["outputs"][0]) == 5 and rec["tokens_per_s"] > 0
    rec = script.main(["--preset", "tiny", "--prompt_ids", "5,6,7", "--batch_size", "3",
                       "--max_new_tokens", "4", "--repeats", "1", "--compare_speculative"])
    assert [len(o) for o in rec["outputs"]] == [4, 4, 4]
    cmp = rec["comparison"]  # plain first, then speculative on the same prompts
    assert cmp["identical_outputs"] and cmp["speculative_tokens_per_s"] > 0
    assert cmp["speedup"] == cmp["speculative_tokens_per_s"] / cmp["plain_tokens_per_s"]
    assert cmp["speculative"]["drafted"] > 0 and 0 <= cmp["speculative"]["acceptance_rate"] <= 1
    # tiny: 4 layers x (32 + 16) numbers x 2 bytes, against 4 x 4 heads x (32 + 12) x 2
    assert (rec["cache_bytes_per_token"], rec["expanded_bytes_per_token"]) == (384, 1408)
    assert rec["outputs"][0] == rec["outputs"][1]  # the same prompt, greedy
    with pytest.raises(SystemExit, match="not comma-separated integers"):
        script.main(["--prompt_ids", "5,x"])


def _force_drafts(monkeypatch, drafts):
    """Test hook: speculative decoding drafts these tokens [B, >= max_new + 2] instead of the
    MTP module's (`speculative.decode`'s forced_drafts)."""
    decode = speculative.decode

    def forced(*args, **kw):
        return decode(*args[:-1], jnp.asarray(drafts, jnp.int32), **kw)

    monkeypatch.setattr(speculative, "decode", forced)


@pytest.mark.parametrize("drafter", ["mtp", "oracle", "wrong"])
def test_speculative_greedy_equals_plain_greedy(params, drafter, monkeypatch):
    """MTP drafts (mostly rejected at random init), an oracle that drafts the true greedy token
    (every draft accepted: two tokens per step) and one that is always wrong (every draft
    rejected, the cache rolled back): the output is the plain greedy output each time."""
    n = 9
    plain = generate(params, CFG, PROMPTS, n, cache_dtype=jnp.float32)
    if drafter != "mtp":
        oracle = np.array([row + [0] * 4 for row in plain])
        _force_drafts(monkeypatch, oracle if drafter == "oracle" else (oracle + 1) % CFG.vocab_size)
    spec, stats = generate(params, CFG, PROMPTS, n, speculative=True, cache_dtype=jnp.float32,
                           return_stats=True)
    assert spec == plain
    if drafter == "oracle":
        assert stats["accepted"] == stats["drafted"] > 0
        assert stats["steps"] <= (n + 1) // 2  # two tokens per verification step
    if drafter == "wrong":
        assert stats["accepted"] == 0 and stats["steps"] == n - 1


def test_speculative_stops_and_samples(params, monkeypatch):
    plain = generate(params, CFG, PROMPTS, 8, cache_dtype=jnp.float32)
    stop = plain[0][2]
    want = generate(params, CFG, PROMPTS, 8, stop_tokens=[stop], cache_dtype=jnp.float32)
    with monkeypatch.context() as m:
        _force_drafts(m, np.array([row + [0] * 4 for row in plain]))
        spec = generate(params, CFG, PROMPTS, 8, speculative=True, stop_tokens=[stop],
                        cache_dtype=jnp.float32)
    assert spec == want
    a = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=2, speculative=True)
    b = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=2, speculative=True)
    assert a == b and all(len(r) == 6 for r in a)
    with pytest.raises(ValueError, match="mtp_depth is 0"):
        generate(dsv3_jax.init_params(CFG.replace(mtp_depth=0), jax.random.key(0)),
                 CFG.replace(mtp_depth=0), PROMPTS, 4, speculative=True)


def test_compare_speculative_tells_a_near_tie_from_a_fork(params):
    """generate.py's greedy check: a fork to the model's worst token is a bug at any sane
    tolerance, a fork to its runner-up only if the tolerance is below their logit gap; a row
    that stops early is always a bug."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import generate as script

    plain = generate(params, CFG, PROMPTS, 6, cache_dtype=jnp.float32)
    logits, _ = dsv3_jax.forward(params, np.array([PROMPTS[1] + plain[1][:3]]), CFG)
    order = np.argsort(np.asarray(logits[0, -1]))
    worst, second = int(order[0]), int(order[-2])
    assert int(order[-1]) == plain[1][3]  # the teacher-forced argmax is the greedy token
    gap = float(logits[0, -1, order[-1]] - logits[0, -1, second])
    top = abs(float(logits[0, -1, order[-1]]))

    def fork(token, rel_tol):
        spec = [list(o) for o in plain]
        spec[1][3] = token
        return script._divergence(params, CFG, RT, PROMPTS, plain, spec, rel_tol)

    d = fork(worst, 1e-2)
    assert (d["row"], d["position"]) == (1, 3)
    assert (d["plain_token"], d["speculative_token"]) == (plain[1][3], worst)
    assert not d["near_tie"] and d["gap"] > d["tolerance"]
    assert fork(second, 1.01 * gap / max(1.0, top))["near_tie"]
    assert not fork(second, 0.99 * gap / max(1.0, top))["near_tie"]
    short = [list(o) for o in plain]
    short[2] = short[2][:4]
    d = script._divergence(params, CFG, RT, PROMPTS, plain, short, 1.0)
    assert (d["row"], d["position"], d["near_tie"]) == (2, 4, False)
