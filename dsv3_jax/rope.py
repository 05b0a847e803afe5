"""Rotary position embedding on the decoupled RoPE parts, with YaRN frequency correction.

YaRN ([PAPER] §4.3; reference §3.5): pair i keeps its frequency theta_i = base^(-2i/R) when its
wavelength is short (i <= low), is divided by the factor s when long (i >= high), and blends
linearly in between, with `low`/`high` from the beta_fast/beta_slow rotation counts over the
original context. Same math as `deepseek-ai/DeepSeek-V3@9b4e978 inference/model.py
precompute_freqs_cis` and transformers 5.23 `_compute_yarn_parameters`. Always applied for YaRN
configs, whatever the run's length (reference gotcha 2: the official code switches it off below
4096 tokens, which is a different function from the one the weights were extended with).

Layout (reference §3.4): the released weights pair dimensions (2i, 2i+1) ("interleaved", the
official `view_as_complex`); `rope_interleave=False` checkpoints pair (i, i + R/2) instead. We
rotate in the checkpoint's own layout, so no weight permutation is needed.
"""

import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import Config


def _correction_dim(rotations: float, dim: int, base: float, original_len: int) -> float:
    """The pair index whose wavelength fits `rotations` turns into the original context."""
    return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_range(cfg: Config) -> tuple[float, float]:
    """(low, high) pair indices of the YaRN blend (10 and 23 for DeepSeek-V3)."""
    dim, base, orig = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.original_seq_len
    low = _correction_dim(cfg.beta_fast, dim, base, orig)
    high = _correction_dim(cfg.beta_slow, dim, base, orig)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def inv_frequencies(cfg: Config) -> np.ndarray:
    """Per-pair angular frequencies [R/2] (float32), YaRN-corrected when configured."""
    dim = cfg.qk_rope_head_dim
    theta = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if cfg.rope_scaling == "none":
        return theta.astype(np.float32)
    low, high = yarn_range(cfg)
    if low == high:
        high += 0.001  # avoid 0/0, as both references do
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    # ramp 0 keeps theta (extrapolation), ramp 1 divides by the factor (interpolation)
    freqs = theta / cfg.rope_factor * ramp + theta * (1.0 - ramp)
    return freqs.astype(np.float32)


def rope_tables(positions: jnp.ndarray, cfg: Config) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [..., R/2] in float32 for integer positions [...]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
    factor = cfg.rope_cos_sin_factor  # 1.0 for every released DeepSeek model
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, *, interleave: bool) -> jnp.ndarray:
    """Rotate x [B, T, ..., R] by per-position angles; cos/sin are [B, T, R/2].

    Computed in float32 (the official code rotates in complex64) and cast back to x's dtype.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    extra = x.ndim - cos.ndim  # broadcast over the head axis when x is [B, T, N, R]
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    if interleave:
        pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
    else:
        a, b = jnp.split(x, 2, axis=-1)
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.astype(dtype)
