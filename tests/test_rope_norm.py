"""RMSNorm and YaRN RoPE against the formulas (reference §2, §3.3-3.5)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    x = jnp.full((1, 64), 300.0, jnp.bfloat16)  # x^2 overflows nothing in fp32, loses bits in bf16
    y = rms_norm(x, jnp.ones((64,)), 1e-6)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, rtol=1e-2)


def test_yarn_range_and_frequencies_v3():
    cfg = get_config("v3_671b")
    assert yarn_range(cfg) == (10, 23)  # reference §3.5
    f = inv_frequencies(cfg).astype(np.float64)
    theta = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(f[:11], theta[:11], rtol=1e-6)  # extrapolated: unchanged
    np.testing.assert_allclose(f[23:], theta[23:] / 40, rtol=1e-6)  # interpolated: / s
    ramp = (np.arange(11, 23) - 10) / 13
    np.testing.assert_allclose(f[11:23], theta[11:23] * ((1 - ramp) + ramp / 40), rtol=1e-6)
    assert f[16] == pytest.approx(5.5e-3, rel=2e-2)  # reference §3.5 examples
    assert f[23] == pytest.approx(3.3338e-5, rel=1e-4)


def test_softmax_scales():
    assert get_config("v3_671b").softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert get_config("v2_lite_16b").softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert get_config("v3_671b").rope_cos_sin_factor == 1.0
    plain = get_config("tiny", rope_scaling="none")
    assert plain.softmax_scale == pytest.approx(plain.qk_head_dim ** -0.5)
    np.testing.assert_allclose(inv_frequencies(plain),
                               10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)


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
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_half_split_rope_equals_interleaved_on_permuted_dims():
    cfg = get_config("tiny")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 16)).astype(np.float32)
    pos = jnp.arange(5)[None]
    cos, sin = rope_tables(pos, cfg)
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])  # reference §3.4 (b)
    inter = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleave=True))
    half = np.asarray(apply_rope(jnp.asarray(x[..., perm]), cos, sin, interleave=False))
    np.testing.assert_allclose(half, inter[..., perm], rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    cfg = get_config("tiny")
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 16)).astype(np.float32)) for _ in range(2))

    def score(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), cfg)
        ck, sk = rope_tables(jnp.array([[pk]]), cfg)
        return float((apply_rope(q, cq, sq, interleave=True)
                      * apply_rope(k, ck, sk, interleave=True)).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
