"""The generation engine (dsv3_jax/infer/): greedy against teacher forcing, batching,
stop tokens, sampling, speculative decoding, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.infer import speculative
from dsv3_jax.infer.generate import generate
from dsv3_jax.infer.sampling import nucleus_keep, probs, sample

CFG = get_config("tiny")
RT = dsv3_jax.Runtime()


@pytest.fixture(scope="module")
def params():
    # a larger init spread so greedy choices are far from ties
    return dsv3_jax.init_params(CFG.replace(init_std=0.1), jax.random.key(0))


PROMPTS = [[5, 17, 3, 99, 41, 7, 2], [300, 12], [8, 8, 8, 1, 250]]
N_NEW = 9  # every greedy run on PROMPTS generates this many tokens: one compiled program


@pytest.fixture(scope="module")
def plain(params):
    """The greedy output on PROMPTS with default arguments, shared by the tests that compare
    with it: the cache follows the compute dtype (float32 for `tiny`), so greedy decoding is
    the teacher-forced argmax (a bf16 cache, the former default, flipped a routing decision)."""
    return generate(params, CFG, PROMPTS, N_NEW)


@pytest.fixture(scope="module")
def teacher(params, plain):
    """Logits [3, T, V] of the full forward over each prompt + its greedy output, the rows
    padded at the end into one batch (a causal model's earlier positions cannot see it)."""
    seqs = [prompt + out for prompt, out in zip(PROMPTS, plain)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        batch[i, :len(seq)] = seq
    return np.asarray(dsv3_jax.forward(params, batch, CFG)[0])


def test_greedy_equals_teacher_forced_argmax(plain, teacher):
    """Every generated token is the argmax of the full forward over prompt + generation."""
    pred = teacher.argmax(-1)
    for i, (prompt, out) in enumerate(zip(PROMPTS, plain)):
        assert len(out) == N_NEW
        chex.assert_trees_all_equal(pred[i, len(prompt) - 1:len(prompt) + N_NEW - 1],
                                    np.array(out, pred.dtype))


def test_batched_equals_one_by_one(params, plain):
    for prompt, out in zip(PROMPTS, plain):
        assert generate(params, CFG, [prompt], N_NEW, cache_dtype=jnp.float32)[0] == out


def test_stacked_and_per_layer_decode_layouts_agree(params, plain):
    """The default decode layout (per-layer weights and caches, unrolled) and the stacked,
    scanned one give the same greedy tokens, plain and speculative, and the same logits to
    float32 rounding; a stack split into layers with a stacked cache is an error."""
    stacked = dsv3_jax.Runtime(scan_layers=True)
    assert generate(params, CFG, PROMPTS, N_NEW, runtime=stacked) == plain
    assert generate(params, CFG, PROMPTS, N_NEW, runtime=stacked, speculative=True) == plain
    tokens = jnp.asarray([PROMPTS[0]])
    outs = {}
    for split in (False, True):
        rt = dsv3_jax.Runtime(scan_layers=not split)
        p = dsv3_jax.model.decode_layout(params, rt)
        assert isinstance(p["weights"]["moe_layers"], list) == split
        cache = dsv3_jax.model.init_cache(CFG, 1, 64, per_layer=split)
        outs[split] = dsv3_jax.model.forward_cached(p, tokens, cache, CFG, rt, absorbed=True)
    chex.assert_trees_all_close(outs[True][0], outs[False][0], atol=1e-5, rtol=1e-5)
    for key in ("c_kv", "k_rope"):
        chex.assert_trees_all_close(jnp.stack([c[key] for c in outs[True][1]["moe_layers"]]),
                                    outs[False][1]["moe_layers"][key], atol=1e-5, rtol=1e-5)
    split_params = dsv3_jax.model.decode_layout(params, dsv3_jax.Runtime(scan_layers=False))
    with pytest.raises(ValueError, match="need a per-layer cache"):
        dsv3_jax.model.forward_cached(split_params, tokens,
                                      dsv3_jax.model.init_cache(CFG, 1, 64), CFG, RT)


def test_stop_tokens_end_rows_independently(params, plain):
    stop = plain[0][2]  # the third token of row 0 becomes a stop token
    outs = generate(params, CFG, PROMPTS, N_NEW, stop_tokens=[stop], cache_dtype=jnp.float32)
    for f, o in zip(plain, outs):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:cut]  # the stop token is kept, nothing after it
    assert len(outs[0]) == 3


def test_sampling_is_seeded_and_respects_top_k(params):
    a = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=3)
    b = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=3)
    c = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=4)
    assert a == b and a != c
    logits = jax.random.normal(jax.random.key(1), (4, 50)) * 3
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for s in range(20):
        tok = sample(logits, jax.random.key(s), 1.0, 3, None)
        assert all(int(t) in top3[i] for i, t in enumerate(tok))
    # top_p tiny: only the most likely token survives
    tok = sample(logits, jax.random.key(0), 1.0, None, 1e-6)
    chex.assert_trees_all_equal(tok, jnp.argmax(logits, -1).astype(tok.dtype))


# Upper 0.1% points of the chi-square distribution, chi2.ppf(0.999, df) for df = 1..7 (NIST/
# SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.4, "Critical Values of the
# Chi-Square Distribution"); checked against the regularized incomplete gamma function below.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
# 8 tokens, not in order of likelihood (so that the top-k / top-p sorting is exercised)
LOGITS = np.array([0.7, -1.5, 2.0, 0.2, 1.1, -0.3, 1.6, -0.9])
N_DRAWS = 20_000


def _expected(temperature, top_k, top_p):
    """softmax(logits / T), restricted to the top_k tokens, then to the smallest set of the
    most likely whose mass reaches top_p, renormalised (float64, from the definitions)."""
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    keep[order[:top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    if top_p is not None:
        mass, kept = 0.0, np.zeros(len(p), bool)
        for i in order:
            if mass >= top_p or p[i] == 0:
                break
            kept[i], mass = True, mass + p[i]
        p = np.where(kept, p, 0.0) / p[kept].sum()
    return p


def test_chi_square_quantiles_are_right():
    for df, x in CHI2_999.items():
        cdf = float(jax.scipy.special.gammainc(df / 2, x / 2))  # the chi-square CDF
        assert abs(cdf - 0.999) < 2e-5, (df, cdf)


@pytest.mark.parametrize("temperature, top_k, top_p, n_kept", [
    (0.7, None, None, 8),
    (1.5, 4, None, 4),
    (1.0, None, 0.8, 4),  # sorted masses .37 .25 .15 | .10 (before it: .77 < .8) | .06 (.87)
    (0.7, 6, 0.9, 4),
])
def test_sampling_draws_from_the_filtered_softmax(temperature, top_k, top_p, n_kept):
    """20,000 draws of `sample` against softmax(logits / T) restricted by top-k and top-p:
    tokens outside the set are never drawn, and Pearson's chi-square statistic over the kept
    tokens is below its 0.1% critical value (fixed key: deterministic). A wrong temperature,
    or a top-p set one token too small or too large, gives a statistic in the hundreds or a
    drawn token of probability 0. `probs` (speculative sampling's distribution) is the same."""
    want = _expected(temperature, top_k, top_p)
    assert int((want > 0).sum()) == n_kept
    logits = jnp.asarray(np.tile(LOGITS, (N_DRAWS, 1)), jnp.float32)
    draws = np.asarray(sample(logits, jax.random.key(42), temperature, top_k, top_p))
    counts = np.bincount(draws, minlength=len(LOGITS))
    assert counts[want == 0].sum() == 0, counts
    expected = N_DRAWS * want[want > 0]
    assert expected.min() >= 5  # the chi-square approximation holds
    stat = float(((counts[want > 0] - expected) ** 2 / expected).sum())
    assert stat < CHI2_999[n_kept - 1], (stat, counts, expected.round())
    chex.assert_trees_all_close(probs(logits[:1], temperature, top_k, top_p)[0],
                                want.astype(np.float32), atol=1e-6, rtol=1e-5)


def test_nucleus_set_without_a_sort_matches_the_sorted_definition():
    """`nucleus_keep` (a search over float keys, no sort) keeps exactly the tokens whose mass
    strictly above them, summed in float64 over the sorted row, is below top_p, on rows of
    2 to 5,000 logits at spreads from flat to peaked; ties at the cut all stay (a sort would
    keep an arbitrary part of them)."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        v = int(rng.integers(2, 5000))
        x = (rng.normal(size=(4, v)) * rng.uniform(0.1, 8.0)).astype(np.float32)
        top_p = float(rng.uniform(0.05, 0.99))
        got = np.asarray(nucleus_keep(jnp.asarray(x), top_p))
        p = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        for row in range(4):
            order = np.argsort(-p[row], kind="stable")
            before = np.cumsum(p[row, order]) - p[row, order]
            margin = np.abs(before - top_p).min()
            if margin < 1e-5:  # a float32 sum may land either side of top_p: not a test
                continue
            want = np.zeros(v, bool)
            want[order] = before < top_p
            np.testing.assert_array_equal(got[row], want)
            checked += 1
    assert checked > 100
    tied = jnp.asarray([[1.0, 1.0, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(nucleus_keep(tied, 0.3),
                                  [[True, True, True, False], [True] * 4])


@pytest.mark.parametrize("prompts, kw, message", [
    ([[]], {}, r"prompts\[0\] must be a non-empty"),
    ([[1, 2], [3, 512]], {}, r"prompts\[1\]\[1\] = 512 is outside the vocabulary"),
    ([[1] * 10], {"max_len": 12}, "exceed the cache length max_len=12"),
    ([[1]], {"max_len": 1000}, "exceeds Config.max_seq_len=256"),
    ([[1] * 250, [2]], {"max_len": 254}, r"prompts\[0\] \(250 tokens\) \+ max_new_tokens \(5\) = "
                                         r"255 positions exceed the cache length max_len=254"),
    ([[2], [1] * 254], {}, r"prompts\[1\] \(254 tokens\).*exceed the model's max_seq_len=256"),
    ([[1]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1]], {"top_p": 0.0}, "top_p must be in"),
    ([], {}, "non-empty list"),
])
def test_bad_input_is_a_clear_error(params, prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        generate(params, CFG, prompts, 5, **kw)


@pytest.mark.slow
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
    # tiny: 4 layers x (32 + 16) numbers in the compute dtype (the cache's default: float32
    # for tiny), against 4 layers x 4 heads x (32 + 12) x 2 bytes of bf16 keys and values
    assert rec["resolved"]["cache_dtype"] == "float32"
    assert (rec["cache_bytes_per_token"], rec["expanded_bytes_per_token"]) == (4 * 48 * 4, 1408)
    assert rec["outputs"][0] == rec["outputs"][1]  # the same prompt, greedy
    with pytest.raises(SystemExit, match="not comma-separated integers"):
        script.main(["--prompt_ids", "5,x"])
    # sequence-level distillation: a model's completions for prompt records, as SFT data
    import json

    from dsv3_jax.train.sft_data import read_jsonl, to_messages

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+2=", "answer": "3"}\n'
                       '{"prompt": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "d.jsonl"
    rec = script.main(["--checkpoint_dir", str(ck), "--prompts", str(prompts), "--out", str(out),
                       "--max_new_tokens", "3"])
    rows = [r for _, r in read_jsonl(out)]
    assert rec["records"] == 2 and rows[0]["answer"] == "3"
    assert all(isinstance(r["completion"], str) for r in rows)
    assert to_messages(rows[1])[-1] == {"role": "assistant", "content": rows[1]["completion"]}
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == "1+2="


def _force_drafts(monkeypatch, drafts):
    """Test hook: speculative decoding drafts these tokens [B, >= max_new + 2] instead of the
    MTP module's (`speculative.decode`'s forced_drafts)."""
    decode = speculative.decode

    def forced(*args, **kw):
        return decode(*args[:-1], jnp.asarray(drafts, jnp.int32), **kw)

    monkeypatch.setattr(speculative, "decode", forced)


@pytest.mark.parametrize("drafter", ["mtp", "oracle", "wrong"])
def test_speculative_greedy_equals_plain_greedy(params, plain, drafter, monkeypatch):
    """MTP drafts (mostly rejected at random init), an oracle that drafts the true greedy token
    (every draft accepted: two tokens per step) and one that is always wrong (every draft
    rejected, the cache rolled back): the output is the plain greedy output each time."""
    n = N_NEW
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


def test_speculative_stops_and_samples(params, plain, monkeypatch):
    stop = plain[0][2]
    want = [row[:row.index(stop) + 1] if stop in row else row for row in plain]
    with monkeypatch.context() as m:
        _force_drafts(m, np.array([row + [0] * 4 for row in plain]))
        spec = generate(params, CFG, PROMPTS, N_NEW, speculative=True, stop_tokens=[stop],
                        cache_dtype=jnp.float32)
    assert spec == want and len(spec[0]) == 3
    a = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=2, speculative=True)
    b = generate(params, CFG, PROMPTS, 6, temperature=1.0, seed=2, speculative=True)
    assert a == b and all(len(r) == 6 for r in a)
    with pytest.raises(ValueError, match="speculative=True drafts with the MTP module: "
                                         "Config.mtp_depth is 0"):  # checked before any weight
        generate(params, CFG.replace(mtp_depth=0), PROMPTS, 4, speculative=True)


def test_compare_speculative_tells_a_near_tie_from_a_fork(params, plain, teacher):
    """generate.py's greedy check: a fork to the model's worst token is a bug at any sane
    tolerance, a fork to its runner-up only if the tolerance is below their logit gap; a row
    that stops early is always a bug."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import generate as script

    logits = teacher[1, len(PROMPTS[1]) + 2]  # after PROMPTS[1] + plain[1][:3]
    order = np.argsort(logits)
    worst, second = int(order[0]), int(order[-2])
    assert int(order[-1]) == plain[1][3]  # the teacher-forced argmax is the greedy token
    gap = float(logits[order[-1]] - logits[second])
    top = abs(float(logits[order[-1]]))

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


def test_text_prompts_through_a_tokenizer():
    from dsv3_jax.io.tokenizer import ByteTokenizer

    params = dsv3_jax.init_params(CFG, jax.random.key(0))
    tok = ByteTokenizer()
    texts = generate(params, CFG, ["ab", "xyz"], 4, tokenizer=tok)
    ids = generate(params, CFG, [tok.encode("ab").tolist(), tok.encode("xyz").tolist()], 4,
                   vocab_limit=tok.vocab_size)  # what tokenizer= implies: only decodable ids
    assert texts == [tok.decode(o) for o in ids]
    with pytest.raises(ValueError, match="tokenizer="):
        generate(params, CFG, ["ab"], 4)
    with pytest.raises(ValueError, match="mix"):
        generate(params, CFG, ["ab", [5, 6]], 4, tokenizer=tok)


def test_vocab_limit_masks_ids_the_tokenizer_lacks():
    params = dsv3_jax.init_params(CFG, jax.random.key(0))
    prompts = [[5, 6, 7], [9]]
    free = generate(params, CFG, prompts, 12, temperature=1.5, seed=3)
    assert max(max(o) for o in free) >= 259  # a random model draws padded ids
    capped = generate(params, CFG, prompts, 12, temperature=1.5, seed=3, vocab_limit=259)
    assert max(max(o) for o in capped) < 259
    greedy = generate(params, CFG, prompts, 6, vocab_limit=259)
    from dsv3_jax.infer.sampling import limit_vocab
    logits, _ = dsv3_jax.forward(params, jnp.asarray([prompts[0]]), CFG)
    assert greedy[0][0] == int(jnp.argmax(limit_vocab(logits[0, -1:], 259)))
    with pytest.raises(ValueError, match="vocab_limit"):
        generate(params, CFG, prompts, 4, vocab_limit=259, speculative=True)
