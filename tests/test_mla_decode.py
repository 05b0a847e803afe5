"""The MLA decode kernel (pallas_kernels/mla_decode.py) against its references.

CPU: the Mosaic GPU kernel in Pallas' GPU interpret mode (wgmma in exact fp32, fresh SMEM full
of NaNs, barrier phases checked) against the float32 reference at small shapes: Tq 1, 2 and 3,
16 to 128 heads, ragged lengths (not multiples of the block, a full cache, an empty row, a
first token with an empty causal window), several split counts and both block sizes. The
cache past each row's length is filled with large values so that a key leaking through the
mask moves the output by far more than the tolerance. The GPU code path itself is lowered for
CUDA on the CPU (Mosaic GPU's layout inference and SMEM check run there) at FlashMLA's shapes.
The reference is checked against dsv3_jax.mla.attend_absorbed and against a float64 loop.

GPU (marker `gpu`, DSV3_TEST_GPU=1): the compiled kernel at FlashMLA's shapes (batch 128,
varlen caches of 4-8K, 16 and 128 heads, Tq 1 and 2) against the reference.
"""

import math
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mla_decode as md

ROOT = pathlib.Path(__file__).resolve().parents[1]
D = md.D_K
# Scores of about 3 standard deviations: a few keys dominate each row, so outputs are of unit
# scale and a key or block missed or added changes them by O(1).
SCALE = 3.0 / math.sqrt(D)
# bf16 output: its rounding (2^-9 relative) plus bf16 probabilities in P @ V; observed max
# errors are ~8e-3 at |o| ~ 3. LSE is computed in fp32 throughout (observed ~3e-6).
O_ATOL, O_RTOL, LSE_ATOL = 2e-2, 1e-2, 1e-4
POISON = 4.0  # cache value past each row's length (finite, as the kernel requires)


def _inputs(b, tq, h, s, lengths, seed=0, dtype=jnp.bfloat16):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (b, tq, h, D), jnp.float32)
    kv = jax.random.normal(kk, (b, s, D), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    beyond = jnp.arange(s)[None, :, None] >= lengths[:, None, None]
    kv = jnp.where(beyond, POISON, kv)
    return q.astype(dtype), kv.astype(dtype), lengths


# The reference, jitted: one compile per shape instead of one per op and shape.
_reference = jax.jit(md.mla_decode_reference, static_argnames=("scale", "v_dim"))


def _assert_matches_reference(o, lse, q, kv, lengths, scale=SCALE, v_dim=md.V_DIM):
    """o and lse equal the float32 reference: o to bf16 rounding, lse to float32 sums, and an
    empty window (no key) gives lse = -inf exactly where the reference's does."""
    ro, rl = _reference(q, kv, lengths, scale=scale, v_dim=v_dim)
    o, lse, ro, rl = (np.asarray(a, np.float32) for a in (o, lse, ro, rl))
    chex.assert_tree_all_finite(o)
    assert not np.isnan(lse).any()
    chex.assert_trees_all_close(o, ro, atol=O_ATOL, rtol=O_RTOL)
    chex.assert_trees_all_equal(np.isneginf(lse), np.isneginf(rl))
    finite = np.isfinite(rl)
    chex.assert_trees_all_close(lse[finite], rl[finite], atol=LSE_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------


def _float64_loop(q, kv, lengths, scale, v_dim):
    """The definition written out one (b, t, h) at a time in float64."""
    q, kv, lengths = (np.asarray(a, np.float64) for a in (q, kv, lengths))
    b, tq, h, _ = q.shape
    o = np.zeros((b, tq, h, v_dim))
    lse = np.full((b, tq, h), -np.inf)
    for i in range(b):
        for t in range(tq):
            limit = int(lengths[i]) - tq + t + 1
            if limit <= 0:
                continue
            keys = kv[i, :limit]
            for j in range(h):
                s = keys @ q[i, t, j] * scale
                e = np.exp(s - s.max())
                o[i, t, j] = e @ keys[:, :v_dim] / e.sum()
                lse[i, t, j] = s.max() + np.log(e.sum())
    return o, lse


def test_reference_equals_a_float64_loop_including_empty_windows():
    # row 0: Tq = 2 with length 1, so token 0 sees nothing; row 1 empty; row 2 a full cache
    q, kv, lengths = _inputs(3, 2, 4, 40, [1, 0, 40], seed=1, dtype=jnp.float32)
    o, lse = _reference(q, kv, lengths, scale=SCALE, v_dim=24)
    o, lse = np.asarray(o, np.float64), np.asarray(lse, np.float64)
    want_o, want_lse = _float64_loop(q, kv, lengths, SCALE, 24)
    chex.assert_trees_all_close(o, want_o, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(np.isneginf(lse), np.isneginf(want_lse))
    assert np.isneginf(lse[0, 0]).all() and np.isneginf(lse[1]).all()
    assert not np.isneginf(lse[0, 1]).any()
    chex.assert_trees_all_close(lse[np.isfinite(want_lse)], want_lse[np.isfinite(want_lse)],
                                atol=1e-5, rtol=0)
    assert float(jnp.abs(o[1]).max()) == 0.0 and float(jnp.abs(o[0, 0]).max()) == 0.0


def test_reference_equals_attend_absorbed():
    """Our q / kv layout is MLA's absorbed form: with q = [q_nope W^UK | q_rope], kv =
    [c_kv | k_rope] and the output taken through W^UV and W^O, the reference reproduces
    dsv3_jax.mla.attend_absorbed (tiny config, fp32) under the causal decode mask."""
    from dsv3_jax.config import get_config
    from dsv3_jax.mla import attend_absorbed

    cfg = get_config("tiny")
    n, k, r, c, hv = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                      cfg.kv_lora_rank, cfg.v_head_dim)
    b, tq, s = 2, 2, 24
    keys = jax.random.split(jax.random.key(3), 7)
    p = {"w_uk": jax.random.normal(keys[0], (c, n, k)) / math.sqrt(c),
         "w_uv": jax.random.normal(keys[1], (c, n, hv)) / math.sqrt(c),
         "w_o": jax.random.normal(keys[2], (n, hv, cfg.dim)) / math.sqrt(n * hv)}
    q_nope = jax.random.normal(keys[3], (b, tq, n, k))
    q_rope = jax.random.normal(keys[4], (b, tq, n, r))
    c_kv = jax.random.normal(keys[5], (b, s, c))
    k_rope = jax.random.normal(keys[6], (b, s, r))
    lengths = jnp.array([24, 9], jnp.int32)

    @jax.jit  # one compile, not one per op
    def both(p, q_nope, q_rope, c_kv, k_rope, lengths):
        positions = lengths[:, None] - tq + jnp.arange(tq)[None, :]  # [B, Tq]
        mask = jnp.arange(s)[None, None, :] <= positions[:, :, None]
        want = attend_absorbed(p, q_nope, q_rope, c_kv, k_rope, mask, cfg)
        q = jnp.concatenate([jnp.einsum("btnk,cnk->btnc", q_nope, p["w_uk"]), q_rope], -1)
        kv = jnp.concatenate([c_kv, k_rope], -1)
        o_lat, _ = md.mla_decode_reference(q, kv, lengths, cfg.softmax_scale, v_dim=c)
        o = jnp.einsum("btnc,cnh->btnh", o_lat, p["w_uv"])
        return jnp.einsum("btnh,nhd->btd", o, p["w_o"]), want

    with jax.default_matmul_precision("highest"):
        got, want = both(p, q_nope, q_rope, c_kv, k_rope, lengths)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_xla_impl_is_the_reference_in_bf16():
    q, kv, lengths = _inputs(2, 2, 16, 96, [96, 13], seed=2)
    o, lse = md.mla_decode(q, kv, lengths, scale=SCALE, impl="xla", return_lse=True)
    assert o.dtype == jnp.bfloat16 and o.shape == (2, 2, 16, 512) and lse.shape == (2, 2, 16)
    _assert_matches_reference(o, lse, q, kv, lengths)


# ------------------------------------------------------------------------------------------
# Split schedule and combine
# ------------------------------------------------------------------------------------------


def test_split_schedule_covers_each_rows_blocks_once():
    lengths = jnp.array([0, 1, 64, 65, 1000, 1024], jnp.int32)
    start, count = md.split_schedule(lengths, 1024, 64, 5)
    for i, length in enumerate(np.asarray(lengths)):
        covered = np.concatenate([np.arange(a, a + n) for a, n in
                                  zip(np.asarray(start[i]), np.asarray(count[i]))])
        chex.assert_trees_all_equal(covered, np.arange(-(-length // 64)), strict=False)


def test_combine_splits_equals_one_softmax():
    """Per-split normalised outputs and LSEs, merged, equal the softmax over all keys; a split
    with no keys (lse = -inf, o = 0) weighs nothing; a row with none anywhere stays 0/-inf."""
    scores = jax.random.normal(jax.random.key(0), (2, 5, 12)) * 3  # [B, M, S]
    values = jax.random.normal(jax.random.key(1), (2, 12, 7))
    scores = scores.at[1, 4].set(-jnp.inf)  # row with no key
    bounds = [(0, 5), (5, 5), (5, 12)]  # the middle split is empty

    @jax.jit  # one compile, not one per op
    def merged_and_whole(scores, values):
        parts, lses = [], []
        for lo, hi in bounds:
            sc = scores[..., lo:hi]
            lse = jax.nn.logsumexp(sc, axis=-1) if hi > lo else jnp.full(sc.shape[:2], -jnp.inf)
            w = jnp.exp(sc - jnp.where(jnp.isfinite(lse), lse, 0)[..., None])
            parts.append(jnp.einsum("bms,bsv->bmv", w, values[:, lo:hi]))
            lses.append(lse)
        whole = (jnp.einsum("bms,bsv->bmv", jax.nn.softmax(scores[:, :4], -1), values),
                 jax.nn.logsumexp(scores[:, :4], -1))
        return md.combine_splits(jnp.stack(parts, 1), jnp.stack(lses, 1)), whole

    with jax.default_matmul_precision("highest"):
        (o, lse), (want_o, want_lse) = merged_and_whole(scores, values)
    chex.assert_trees_all_close((o[:, :4], lse[:, :4]), (want_o, want_lse), atol=1e-5, rtol=0)
    assert np.isneginf(lse[1, 4]) and float(jnp.abs(o[1, 4]).max()) == 0.0


def test_choose_num_splits_fills_the_sms():
    # FlashMLA's shapes already give >= 128 CTAs without splitting
    assert md.choose_num_splits(128, 1, 128, 4096, num_sms=132) == 1
    assert md.choose_num_splits(128, 2, 16, 16384, num_sms=132) == 1
    # one long row: as many splits as useful (each CTA a few blocks)
    assert md.choose_num_splits(1, 1, 128, 32768, num_sms=132) == md.MAX_SPLITS
    s = md.choose_num_splits(8, 1, 16, 8192, num_sms=132)
    assert 8 * s <= 132 and 8 * (s + 1) > 132


# ------------------------------------------------------------------------------------------
# The kernel in GPU interpret mode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b, tq, h, s, lengths, splits, block_s", [
    (2, 1, 16, 256, [256, 77], 1, 64),  # one split: the kernel writes bf16 directly; full cache
    (2, 2, 16, 256, [200, 70], 3, 64),  # causal pair of tokens, uneven splits, ring refills
    (2, 2, 128, 256, [130, 65], 2, 64),  # 256 rows: four 64-row blocks
    (3, 1, 16, 256, [0, 64, 255], 4, 64),  # an empty row, a whole block, empty splits
    (2, 2, 16, 256, [200, 33], 2, 32),  # 32-key blocks (a 4-stage ring)
    (2, 3, 24, 128, [128, 5], None, 64),  # Tq = 3, 72 rows (a padded second block), auto
    (1, 2, 16, 128, [1], 1, 64),  # token 0's window is empty, token 1 sees one key
])
def test_kernel_equals_the_reference_in_interpret_mode(b, tq, h, s, lengths, splits, block_s):
    q, kv, lengths = _inputs(b, tq, h, s, lengths, seed=b * 10 + h)
    o, lse = md.mla_decode(q, kv, lengths, scale=SCALE, impl="pallas", num_splits=splits,
                           block_s=block_s, interpret=True, return_lse=True)
    assert o.dtype == jnp.bfloat16 and o.shape == (b, tq, h, 512) and lse.shape == (b, tq, h)
    _assert_matches_reference(o, lse, q, kv, lengths)


def test_kernel_under_jit_with_traced_lengths_and_float16():
    q, kv, lengths = _inputs(2, 1, 16, 128, [128, 50], seed=5, dtype=jnp.float16)
    run = jax.jit(lambda q, kv, n: md.mla_decode(q, kv, n, scale=SCALE, impl="pallas",
                                                 num_splits=2, interpret=True,
                                                 return_lse=True))
    o, lse = run(q, kv, lengths)
    assert o.dtype == jnp.float16
    _assert_matches_reference(o, lse, q, kv, lengths)


# The GPU code path (no interpreter), lowered for CUDA on the CPU: this runs Mosaic GPU's layout
# inference, the wgmma / TMA shape and swizzle checks and the shared-memory budget.
@pytest.mark.parametrize("b, tq, h, s, splits", [
    (128, 1, 128, 4096, None), (128, 2, 128, 8192, None), (128, 2, 16, 16384, None),
    (4, 1, 16, 32768, None), (4, 3, 24, 4096, 3)])
@pytest.mark.parametrize("block_s", [64, 32])
def test_gpu_kernel_lowers_for_cuda(b, tq, h, s, splits, block_s):
    q = jax.ShapeDtypeStruct((b, tq, h, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, D), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.jit(lambda q, kv, n: md.mla_decode(q, kv, n, scale=SCALE, impl="pallas",
                                                num_splits=splits, block_s=block_s,
                                                return_lse=True))
    text = fn.trace(q, kv, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# ------------------------------------------------------------------------------------------
# The two-array form (the model's cache: c_kv [B, S, C], k_rope [B, S, R])
# ------------------------------------------------------------------------------------------

# V3 (C = 512, R = 64) and the `small` preset (C = 256, R = 64); C = 64 is the smallest the
# kernel takes.
SHAPES = {"v3": (512, 64), "small": (256, 64), "min": (64, 64)}


def _latent_inputs(b, tq, h, s, c, r, lengths, seed=0, dtype=jnp.bfloat16):
    """Split views of `_inputs`-style data: (q_lat, q_rope, c_kv, k_rope, lengths)."""
    keys = jax.random.split(jax.random.key(seed), 2)
    q = jax.random.normal(keys[0], (b, tq, h, c + r), jnp.float32)
    kv = jax.random.normal(keys[1], (b, s, c + r), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    kv = jnp.where(jnp.arange(s)[None, :, None] >= lengths[:, None, None], POISON, kv)
    q, kv = q.astype(dtype), kv.astype(dtype)
    return q[..., :c], q[..., c:], kv[..., :c], kv[..., c:], lengths


def _assert_latent_matches_reference(o, lse, q_lat, q_rope, c_kv, k_rope, lengths, scale):
    q, kv = jnp.concatenate([q_lat, q_rope], -1), jnp.concatenate([c_kv, k_rope], -1)
    _assert_matches_reference(o, lse, q, kv, lengths, scale, v_dim=c_kv.shape[-1])


def test_latent_xla_impl_is_the_reference():
    c, r = SHAPES["small"]
    args = _latent_inputs(2, 2, 16, 96, c, r, [96, 13], seed=3)
    scale = 3.0 / math.sqrt(c + r)
    o, lse = md.mla_decode_latent(*args, scale=scale, impl="xla", return_lse=True)
    assert o.dtype == jnp.bfloat16 and o.shape == (2, 2, 16, c)
    _assert_latent_matches_reference(o, lse, *args, scale)


# Interpret mode runs these at 64-key blocks; docs/kernels.md#mla-decode says which
# configurations (32-key blocks, R < 64) did not finish interpreted on a 2-core CPU, which the
# kernel's limits and the model's dispatch leave out.
@pytest.mark.parametrize("shape, b, tq, h, s, lengths, splits", [
    ("v3", 2, 1, 16, 128, [128, 77], 1),  # one split, a full cache
    ("v3", 2, 2, 16, 192, [150, 65], 2),  # Tq = 2, uneven splits, ring refills
    ("small", 2, 2, 16, 256, [200, 1], 3),  # small's C: 4 stages; token 0 of row 1 sees nothing
    ("small", 3, 1, 16, 128, [0, 64, 127], None),  # an empty row, auto splits
    ("min", 1, 2, 40, 128, [99], 1),  # 80 rows: a padded second row block
])
def test_latent_kernel_equals_the_reference_in_interpret_mode(shape, b, tq, h, s, lengths,
                                                             splits):
    c, r = SHAPES[shape]
    args = _latent_inputs(b, tq, h, s, c, r, lengths, seed=b * 10 + h + c)
    scale = 3.0 / math.sqrt(c + r)
    o, lse = md.mla_decode_latent(*args, scale=scale, impl="pallas", num_splits=splits,
                                  interpret=True, return_lse=True)
    assert o.dtype == jnp.bfloat16 and o.shape == (b, tq, h, c) and lse.shape == (b, tq, h)
    _assert_latent_matches_reference(o, lse, *args, scale)


def test_one_array_and_two_array_forms_agree_in_interpret_mode():
    """The same kernel reading [c_kv | k_rope] as one array (two column ranges) or two."""
    c, r = SHAPES["small"]
    q_lat, q_rope, c_kv, k_rope, lengths = _latent_inputs(2, 2, 16, 128, c, r, [128, 40], 4)
    kw = dict(scale=0.05, impl="pallas", num_splits=2, interpret=True, return_lse=True)
    o2, l2 = md.mla_decode_latent(q_lat, q_rope, c_kv, k_rope, lengths, **kw)
    o1, l1 = md.mla_decode(jnp.concatenate([q_lat, q_rope], -1),
                           jnp.concatenate([c_kv, k_rope], -1), lengths, v_dim=c, **kw)
    chex.assert_trees_all_equal((np.asarray(o1, np.float32), np.asarray(l1)),
                                (np.asarray(o2, np.float32), np.asarray(l2)))


@pytest.mark.parametrize("b, tq, h, s, shape", [
    (128, 1, 16, 4096, "v3"), (128, 2, 16, 8192, "v3"), (128, 1, 128, 4096, "v3"),
    (128, 2, 128, 4096, "v3"), (32, 1, 16, 4096, "small"), (32, 2, 16, 4096, "small"),
    (4, 3, 24, 1024, "min")])
@pytest.mark.parametrize("block_s", [64, 32])
def test_latent_gpu_kernel_lowers_for_cuda(b, tq, h, s, shape, block_s):
    c, r = SHAPES[shape]
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    fn = jax.jit(lambda *a: md.mla_decode_latent(*a, scale=SCALE, impl="pallas",
                                                 block_s=block_s, return_lse=True))
    lowered = fn.trace(sds(b, tq, h, c), sds(b, tq, h, r), sds(b, s, c), sds(b, s, r),
                       jax.ShapeDtypeStruct((b,), jnp.int32)).lower(
                           lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("message, change", [
    (r"c_kv C \(shape\[2\]\) = 256 but q_lat C \(shape\[3\]\) = 512",
     dict(c_kv=jnp.zeros((2, 128, 256), jnp.bfloat16))),
    (r"k_rope S_max \(shape\[1\]\) = 64 but c_kv's = 128",
     dict(k_rope=jnp.zeros((2, 64, 64), jnp.bfloat16))),
    (r"k_rope R \(shape\[2\]\) = 32 but q_rope R", dict(k_rope=jnp.zeros((2, 128, 32),
                                                                          jnp.bfloat16))),
    (r"q_rope \[B, Tq, H\] = \(2, 1, 8\)", dict(q_rope=jnp.zeros((2, 1, 8, 64), jnp.bfloat16))),
    (r"must share one dtype", dict(k_rope=jnp.zeros((2, 128, 64), jnp.float16))),
    (r"C \(c_kv last dim\) = 32 must be a multiple of 64",
     dict(q_lat=jnp.zeros((2, 1, 16, 32), jnp.bfloat16),
          c_kv=jnp.zeros((2, 128, 32), jnp.bfloat16))),
    (r"R \(k_rope last dim\) = 16 must be a positive multiple of 64",
     dict(q_rope=jnp.zeros((2, 1, 16, 16), jnp.bfloat16),
          k_rope=jnp.zeros((2, 128, 16), jnp.bfloat16))),
    (r"S_max \(shape\[1\]\) = 96 must be a multiple of block_s = 64",
     dict(c_kv=jnp.zeros((2, 96, 512), jnp.bfloat16),
          k_rope=jnp.zeros((2, 96, 64), jnp.bfloat16), lengths=jnp.array([96, 3]))),
])
def test_latent_bad_inputs_name_the_tensor_and_dimension(message, change):
    q_lat, q_rope, c_kv, k_rope, lengths = _latent_inputs(2, 1, 16, 128, 512, 64, [128, 5])
    args = {**dict(q_lat=q_lat, q_rope=q_rope, c_kv=c_kv, k_rope=k_rope, lengths=lengths),
            **change}
    with pytest.raises(ValueError, match=message):
        md.mla_decode_latent(**args, scale=SCALE, impl="pallas")


def test_kernel_refusal_at_the_presets():
    from dsv3_jax.config import get_config

    for name, ok in (("v3_671b", True), ("small", True), ("v2_lite_16b", True), ("tiny", False)):
        cfg = get_config(name)
        why = md.kernel_refusal(cfg.kv_lora_rank, cfg.qk_rope_head_dim, 4096, jnp.bfloat16)
        assert (why is None) == ok, (name, why)


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


def _bad(message, impl="pallas", **change):
    q, kv, lengths = _inputs(2, 1, 16, 128, [128, 5])
    args = {"q": q, "kv": kv, "lengths": lengths, "scale": SCALE, "impl": impl, **change}
    with pytest.raises(ValueError, match=message):
        md.mla_decode(args.pop("q"), args.pop("kv"), args.pop("lengths"), **args)


@pytest.mark.parametrize("message, change", [
    (r"D_k - v_dim \(q/kv last dim minus v_dim\) = 48 must be a positive multiple of 64",
     dict(q=jnp.zeros((2, 1, 16, 560), jnp.bfloat16), kv=jnp.zeros((2, 128, 560), jnp.bfloat16))),
    (r"q must be \[B, Tq, H, D_k\]", dict(q=jnp.zeros((2, 16, D), jnp.bfloat16))),
    (r"kv batch \(shape\[0\]\) = 3", dict(kv=jnp.zeros((3, 128, D), jnp.bfloat16))),
    (r"kv D_k \(shape\[2\]\) = 512", dict(kv=jnp.zeros((2, 128, 512), jnp.bfloat16))),
    (r"lengths must be an integer \[B\] = \[2\]", dict(lengths=jnp.zeros((2, 1), jnp.int32))),
    (r"lengths must be an integer", dict(lengths=jnp.zeros((2,), jnp.float32))),
    (r"lengths must lie in \[0, S_max = 128\].*max 129", dict(lengths=jnp.array([129, 3]))),
    (r"lengths must lie in .*min -1", dict(lengths=jnp.array([-1, 3]))),
    (r"S_max \(shape\[1\]\) = 100 must be a multiple of block_s = 64",
     dict(kv=jnp.zeros((2, 100, D), jnp.bfloat16), lengths=jnp.array([100, 3]))),
    (r"block_s = 48 must be 32 or 64", dict(block_s=48)),
    (r"num_splits = 0 must be in \[1, S_max / block_s = 2\]", dict(num_splits=0)),
    (r"num_splits = 3 must be in", dict(num_splits=3)),
    (r"impl='triton' is not one of", dict(impl="triton")),
    (r"v_dim = 96 must be a multiple of 64 in \[64, 512\]", dict(v_dim=96)),
    (r"v_dim = 576 = D_k leaves no rope columns", dict(v_dim=576)),
    (r"dtype float32 is not supported",
     dict(q=jnp.zeros((2, 1, 16, D)), kv=jnp.zeros((2, 128, D)))),
    (r"q dtype bfloat16 != kv dtype float16", dict(kv=jnp.zeros((2, 128, D), jnp.float16))),
    (r"scale = -1.0 must be positive", dict(scale=-1.0)),
])
def test_bad_inputs_name_the_tensor_and_dimension(message, change):
    _bad(message, **change)


def test_xla_impl_has_no_kernel_restrictions_but_checks_shapes():
    q, kv, lengths = _inputs(1, 1, 4, 100, [100])  # S_max 100: not a block multiple
    assert md.mla_decode(q, kv, lengths, scale=SCALE, v_dim=256).shape == (1, 1, 4, 256)
    _bad(r"v_dim = 600 must be in \(0, D_k = 576\]", impl="xla", v_dim=600)


def test_traced_scale_is_refused():
    q, kv, lengths = _inputs(1, 1, 16, 64, [64])
    with pytest.raises(ValueError, match="must be a concrete Python number"):
        jax.jit(lambda sc: md.mla_decode(q, kv, lengths, scale=sc, impl="pallas"))(0.1)


# ------------------------------------------------------------------------------------------
# The benchmark script (CPU smoke run)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow  # 2 kernel runs in interpret mode, each timed
def test_bench_decode_smoke_in_interpret_mode(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_decode

    out = tmp_path / "decode.json"
    recs = bench_decode.main(["--interpret", "--batch", "2", "--seqlens", "128", "--heads", "16",
                              "--tq", "1", "2", "--iterations", "1", "--json", str(out)])
    assert {r["impl"] for r in recs} == {"pallas", "xla"}
    assert len(recs) == 4 and all(r["ms"] > 0 and r["gbps"] > 0 and r["tflops"] > 0 for r in recs)
    assert all(r["max_abs_err"] < 5e-2 for r in recs)
    assert recs[0]["run"]["interpret"] and out.exists()


# ------------------------------------------------------------------------------------------
# On the GPU (DSV3_TEST_GPU=1)
# ------------------------------------------------------------------------------------------


def _varlen(b, mean, s_max, seed):
    """FlashMLA's varlen lengths: ~N(mean, mean / 2), clipped to [2, s_max] (kernels.md §3.5)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(mean, mean / 2, b).astype(np.int64), 2, s_max)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, b, tq, h, mean_s, splits", [
    ("v3", 128, 1, 128, 4096, None), ("v3", 128, 2, 16, 8192, None),
    ("small", 64, 2, 16, 4096, None), ("small", 16, 1, 16, 8192, 8),
])
def test_latent_kernel_on_the_gpu(shape, b, tq, h, mean_s, splits):
    c, r = SHAPES[shape]
    s_max = 2 * mean_s
    lengths = _varlen(b, mean_s, s_max, seed=b + h + c)
    lengths[0], lengths[-1] = s_max, 0
    args = _latent_inputs(b, tq, h, s_max, c, r, lengths, seed=8)
    scale = 3.0 / math.sqrt(c + r)
    o, lse = jax.jit(lambda *a: md.mla_decode_latent(
        *a, scale=scale, impl="pallas", num_splits=splits, return_lse=True))(*args)
    _assert_latent_matches_reference(o, lse, *args, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("b, tq, h, mean_s, splits", [
    (128, 1, 128, 4096, None),  # compute-bound, FlashMLA's headline shape
    (128, 2, 128, 4096, None),
    (128, 2, 16, 8192, None),  # memory-bound
    (16, 1, 128, 8192, 8),  # forced splits: the combine on the device
])
def test_kernel_on_the_gpu(b, tq, h, mean_s, splits):
    s_max = 2 * mean_s
    lengths = _varlen(b, mean_s, s_max, seed=b + h)
    lengths[0], lengths[-1] = s_max, 0  # a full cache and an empty row
    q, kv, lengths = _inputs(b, tq, h, s_max, lengths, seed=7)
    o, lse = jax.jit(lambda q, kv, n: md.mla_decode(
        q, kv, n, scale=SCALE, impl="pallas", num_splits=splits, return_lse=True))(q, kv, lengths)
    _assert_matches_reference(o, lse, q, kv, lengths)
