"""DeepSeek-V3's tile-wise FP8 quantization ([PAPER] §3.3.2; ../shared/reference/kernels.md §2.1).

Every FP8 GEMM input is e4m3 with float32 scales over small tiles, so one outlier spoils only
its own tile:
  * activations: 1 x 128 tiles (one token, 128 consecutive channels of the contraction axis);
  * weights:     128 x 128 blocks;
  * the weight gradient contracts over tokens, so its operands are quantized along the token
    axis: `quantize_cols` transposes and quantizes in one function (the report's "128 x 1" tiles).
scale = amax / 448 (e4m3's largest finite value), amax floored at `AMAX_FLOOR` so an all-zero
tile gets a finite, normal scale; `pow2=True` rounds
each scale up to a power of two (the report's option; DeepSeek's `ue8m0` format), so applying it
is exact.

These are plain jnp functions (the route kernels.md §8 recommends trying first for a
memory-bound op) and the reference of the kernels. XLA compiles each into two fusions, the tile
amax and then the scale and cast, so the input is read twice (under half of a bf16 copy's
bandwidth: docs/kernels.md#fp8-quantizers); `fp8_quant_kernel` has one-pass Mosaic GPU kernels
with bit-identical results. x q/s are what the FP8 GEMMs in `fp8_gemm` take.
Shapes whose quantized axis is not a multiple of 128 raise, naming the axis: padding is the
caller's explicit choice, never implicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
# Only an all-zero tile (or one of denormal values) meets the floor. DeepGEMM's test helpers
# clamp at 1e-4, which suits activations but not gradients: tiles of dy sit at 1e-6 and below,
# and a 1e-4 floor pushed their values into e4m3's subnormals (a 3.5% normwise error on `tiny`'s
# weight gradients at init, tests/test_fp8.py). 1e-30 / 448 stays a normal float32, also after
# the kernels' multiply by 1/448, so no flush-to-zero turns a zero tile into 0/0.
AMAX_FLOOR = 1e-30


def _check_axis(name: str, x: jax.Array, axis: int, what: str, block: int = BLOCK) -> None:
    size = x.shape[axis]
    if size % block:
        raise ValueError(f"{name}: {what} (shape[{axis % x.ndim}] = {size} of {x.shape}) must be a "
                         f"multiple of {block} for FP8 tile scales; pad it explicitly")


def _scale(amax: jax.Array, pow2: bool) -> jax.Array:
    s = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / E4M3_MAX
    if pow2:
        # round up to a power of two so q = x / s stays within e4m3's range; frexp/ldexp are
        # exact where exp2(ceil(log2(s))) is not (XLA's exp2(-15.0) is 2^-15 (1 + 5e-7) on CPU)
        m, e = jnp.frexp(s)  # s = m 2^e with m in [0.5, 1)
        s = jnp.ldexp(jnp.float32(1.0), jnp.where(m == 0.5, e - 1, e))
    return s


def quantize_rows(x: jax.Array, *, pow2: bool = False, name: str = "x",
                  block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """1 x 128 tiles along the last axis: x [..., K] -> (q [..., K] e4m3, s [..., K/128] fp32),
    x ~= q * s (s repeated over each tile). `block`: another tile width (the FP8 latent cache
    takes the whole latent of a model whose latent is not a multiple of 128)."""
    _check_axis(name, x, -1, "the quantized (last) axis", block)
    k = x.shape[-1]
    tiles = x.astype(jnp.float32).reshape(*x.shape[:-1], k // block, block)
    s = _scale(jnp.max(jnp.abs(tiles), axis=-1), pow2)
    q = (tiles / s[..., None]).astype(FP8)
    return q.reshape(x.shape), s


def quantize_cols(x: jax.Array, *, pow2: bool = False, name: str = "x") -> tuple[jax.Array, jax.Array]:
    """Transpose + quantize: x [M, K] -> (q [K, M] e4m3, s [K, M/128]): 128 x 1 tiles of x (128
    consecutive rows of one column), laid out K-major for a GEMM that contracts over M."""
    if x.ndim != 2:
        raise ValueError(f"{name}: quantize_cols takes [M, K], got shape {x.shape}")
    _check_axis(name, x, 0, "the contraction (first) axis")
    return quantize_rows(x.T, pow2=pow2, name=name)


def quantize_blocks(w: jax.Array, *, pow2: bool = False, name: str = "w") -> tuple[jax.Array, jax.Array]:
    """128 x 128 blocks: w [..., N, K] -> (q [..., N, K] e4m3, s [..., N/128, K/128] fp32)."""
    if w.ndim < 2:
        raise ValueError(f"{name}: quantize_blocks takes [..., N, K], got shape {w.shape}")
    _check_axis(name, w, -2, "N (the second-to-last axis)")
    _check_axis(name, w, -1, "K (the last axis)")
    *lead, n, k = w.shape
    blocks = w.astype(jnp.float32).reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    s = _scale(jnp.max(jnp.abs(blocks), axis=(-3, -1)), pow2)
    q = (blocks / s[..., :, None, :, None]).astype(FP8)
    return q.reshape(w.shape), s


def _fp8_values(q: jax.Array) -> jax.Array:
    """q's e4m3 values as float32, never the unrounded numbers q was made from.

    XLA on GPU may drop a narrowing convert followed by a widening one (excess precision is
    allowed by default), so quantize -> dequantize inside one jit computed with the original
    values: the XLA reference path of fp8_linear came out e4m3's rounding error away from the
    exact FP8 product on an H200, while the same GEMM on pre-quantized inputs matched
    (docs/kernels.md#fp8-quantizers). The optimization barrier keeps the rounding."""
    return jax.lax.optimization_barrier(q).astype(jnp.float32)


def dequantize_rows(q: jax.Array, s: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize_rows`: q [..., K], s [..., K/block] -> [..., K] in `dtype` (the
    tile width read off the shapes)."""
    k, n_tiles = q.shape[-1], s.shape[-1]
    tiles = _fp8_values(q).reshape(*q.shape[:-1], n_tiles, k // n_tiles) * s[..., None]
    return tiles.reshape(q.shape).astype(dtype)


def dequantize_blocks(q: jax.Array, s: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize_blocks`: q [..., N, K], s [..., N/128, K/128] -> [..., N, K]."""
    *lead, n, k = q.shape
    blocks = _fp8_values(q).reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    return (blocks * s[..., :, None, :, None]).reshape(q.shape).astype(dtype)


def rows_to_cols(q: jax.Array, s: jax.Array, *, name: str = "x") -> tuple[jax.Array, jax.Array]:
    """`quantize_cols(dequantize_rows(q, s))`, bit for bit, transposing the e4m3 bytes instead
    of the float32 values: q [M, K] e4m3 in 1 x 128 tiles (s [M, K/128]) -> (q [K, M], s [K,
    M/128]) in 128 x 1 tiles. The weight gradient re-tiles the cached FP8 activations this way
    (the report's §3.3.4). Transposing first moves 1 byte an element where the float32 route
    moved 4 (XLA materialized that float32 transpose on its own in a `small` FP8 step's expert
    backward: docs/kernels.md#fp8-quantizers). The products q * s are the same float32
    multiplications either way, so the bits are."""
    if (q.ndim != 2 or s.ndim != 2 or s.shape[0] != q.shape[0] or not s.shape[1]
            or q.shape[1] % s.shape[1]):
        raise ValueError(f"{name}: rows_to_cols takes q [M, K] and s [M, K/tile], got "
                         f"{q.shape} and {s.shape}")
    _check_axis(name, q, 0, "the contraction (first) axis")
    m, k = q.shape
    qt = _fp8_values(q.T)  # the barrier pins the transpose on the e4m3 bytes
    x_t = qt.reshape(s.shape[1], k // s.shape[1], m) * s.T[:, None, :]  # [K/t, t, M]
    return quantize_rows(x_t.reshape(k, m), name=name)


def transpose_blocks(q: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A 128 x 128 block-quantized [..., N, K] as the same quantization of its transpose
    [..., K, N] (exact: blocks map to blocks). The data gradient contracts over N, and Hopper's
    FP8 wgmma wants K-major operands, so it takes this copy of the weight."""
    return jnp.swapaxes(q, -1, -2), jnp.swapaxes(s, -1, -2)
