"""RMSNorm and YaRN RoPE against the formulas (reference §2, §3.3-3.5)."""

import chex
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import get_config
from dsv3_jax.layers import rms_norm
from dsv3_jax.rope import apply_rope, inv_frequencies, rope_tables, yarn_range


def test_rms_norm_matches_formula_in_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32) * 3
    w = rng.normal(size=(48,)).astype(np.float32)
    ref = w * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    chex.assert_trees_all_close(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6), ref, rtol=1e-6,
                                atol=1e-6)


def test_rms_norm_bf16_input_is_normalised_in_float32():
    """bf16 in, bf16 out, one rounding: mean(x^2), the rsqrt and the float32 gain's multiply all
    in float32, then a single cast. So each output is the float64 formula rounded to bf16:
    within half a bf16 ulp (2^-9 relative to the power of two below it, at most 2^-8 of the
    value). A bf16 computation, a gain rounded to bf16, or a cast before the gain's multiply
    (HF's order) round more than once and miss that bound (the rows mix magnitudes up to 300,
    where x^2 in bf16 keeps 8 bits)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 64)) * np.array([[0.01], [1.0], [30.0], [300.0]])
    x = jnp.asarray(x, jnp.bfloat16)
    w = jnp.asarray(1 + 0.5 * rng.normal(size=(64,)), jnp.float32)  # not representable in bf16
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == jnp.bfloat16
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = w64 * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    chex.assert_trees_all_close(np.asarray(y, np.float64), ref, rtol=2.0 ** -8 * (1 + 1e-4),
                                atol=0)
    # and nearly every element is exactly the correctly rounded value
    exact = np.asarray(y, np.float32) == np.asarray(jnp.asarray(ref, jnp.float32)
                                                    .astype(jnp.bfloat16), np.float32)
    assert exact.mean() > 0.98, exact.mean()


def test_yarn_range_and_frequencies_v3():
    cfg = get_config("v3_671b")
    assert yarn_range(cfg) == (10, 23)  # reference §3.5
    f = inv_frequencies(cfg).astype(np.float64)
    theta = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    chex.assert_trees_all_close(f[:11], theta[:11], rtol=1e-6, atol=0)  # extrapolated: unchanged
    chex.assert_trees_all_close(f[23:], theta[23:] / 40, rtol=1e-6, atol=0)  # interpolated: / s
    ramp = (np.arange(11, 23) - 10) / 13
    chex.assert_trees_all_close(f[11:23], theta[11:23] * ((1 - ramp) + ramp / 40), rtol=1e-6,
                                atol=0)
    chex.assert_trees_all_close(f[16], 5.5e-3, rtol=2e-2, atol=0)  # reference §3.5 examples
    chex.assert_trees_all_close(f[23], 3.3338e-5, rtol=1e-4, atol=0)


def test_softmax_scales():
    chex.assert_trees_all_close(get_config("v3_671b").softmax_scale, 0.1352338, rtol=0, atol=1e-7)
    chex.assert_trees_all_close(get_config("v2_lite_16b").softmax_scale, 0.1147214, rtol=0,
                                atol=1e-7)
    assert get_config("v3_671b").rope_cos_sin_factor == 1.0
    plain = get_config("tiny", rope_scaling="none")
    chex.assert_trees_all_close(plain.softmax_scale, plain.qk_head_dim ** -0.5, rtol=1e-12, atol=0)
    chex.assert_trees_all_close(inv_frequencies(plain), 10000.0 ** (-np.arange(0, 16, 2) / 16),
                                rtol=1e-6, atol=0)


def test_interleaved_rope_is_complex_rotation_of_pairs():
    cfg = get_config("tiny")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
    pos = np.array([np.arange(7), np.arange(100, 107)], np.int32)
    cos, sin = rope_tables(jnp.asarray(pos), cfg)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleave=True))
    z = x[..., 0::2] + 1j * x[..., 1::2]  # the official view_as_complex pairing
    angle = pos[:, :, None, None] * inv_frequencies(cfg).astype(np.float64)
    rot = z * np.exp(1j * angle)
    ref = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)


def test_half_split_rope_equals_interleaved_on_permuted_dims():
    cfg = get_config("tiny")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 16)).astype(np.float32)
    pos = jnp.arange(5)[None]
    cos, sin = rope_tables(pos, cfg)
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])  # reference §3.4 (b)
    inter = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleave=True))
    half = np.asarray(apply_rope(jnp.asarray(x[..., perm]), cos, sin, interleave=False))
    chex.assert_trees_all_close(half, inter[..., perm], rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    cfg = get_config("tiny")
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 16)).astype(np.float32)) for _ in range(2))

    def score(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), cfg)
        ck, sk = rope_tables(jnp.array([[pk]]), cfg)
        return float((apply_rope(q, cq, sq, interleave=True)
                      * apply_rope(k, ck, sk, interleave=True)).sum())

    chex.assert_trees_all_close(score(5, 2), score(105, 102), rtol=0, atol=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # ... and it does depend on it


def test_embedding_gradient_without_atomics_sums_each_ids_rows():
    """The sorted segmented-sum gradient of `embed` against a numpy accumulation: random ids,
    one id repeated (the byte corpus's case), negative ids (jnp.take wraps them) and ids past
    the table (NaN rows forward, no gradient)."""
    import jax
    from dsv3_jax.layers import embed

    v, d = 50, 16
    table = np.asarray(jax.random.normal(jax.random.key(0), (v, d)), np.float32)
    rng = np.random.default_rng(0)
    for toks in (rng.integers(0, v, (4, 33)), np.full((3, 9), 7), np.array([[1, 2, 60, -1, 2]])):
        g = rng.standard_normal(toks.shape + (d,)).astype(np.float32)
        want = np.zeros((v, d), np.float64)
        for t, row in zip(toks.reshape(-1), g.reshape(-1, d)):
            if -v <= t < v:
                want[t % v] += row
        f = lambda w: jnp.sum(jnp.nan_to_num(embed(w, jnp.asarray(toks, jnp.int32))) * g)
        got = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(table)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        plain = jax.grad(lambda w: jnp.sum(jnp.nan_to_num(
            embed(w, jnp.asarray(toks, jnp.int32), sorted_grad=False)) * g))(jnp.asarray(table))
        np.testing.assert_allclose(got, np.asarray(plain), rtol=1e-5, atol=1e-5)
