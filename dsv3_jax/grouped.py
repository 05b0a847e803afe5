"""The grouped matmuls behind every routed-expert FFN: one interface, two implementations.

Rows of x are sorted by group (expert); group e multiplies its own weight matrix w[e].

- `ragged_dot`: `jax.lax.ragged_dot`, the right primitive on CPU. On GPU XLA lowers it to a
  dense masked product costing about (number of groups) x the useful work (measured on an H100:
  25 TFLOP/s at 32 groups against 760 for the same work as a dense batched einsum;
  ../shared/reference/gpu_facts.md), so GPU runs must not use it for speed.
- `pallas`: our Mosaic GPU grouped kernel (`pallas_kernels.grouped_matmul`, Hopper). Its rows
  live in a padded layout where each group starts on a tile boundary; `grouped_swiglu` pads once
  for the three matmuls of an expert FFN (the padding rows are zeros and stay zeros through
  SwiGLU), `grouped_matmul` pads per call.

`Runtime.grouped` chooses (`runtime.resolve`'s "auto": pallas on a GPU in 16 bits where the
experts' widths fit, ragged_dot otherwise). With FP8 on (`Runtime.fp8`), `grouped_swiglu`
quantizes the GEMM inputs to FP8 (`dsv3_jax.fp8.fp8_grouped_matmul`): gemm "pallas"
multiplies them with the FP8 grouped kernels of `pallas_kernels.fp8_gemm`, "xla" multiplies
the dequantized values with the choice above; quant "pallas" quantizes the bf16 activations
with the one-pass kernels of `pallas_kernels.fp8_quant_kernel`.
Choosing `ragged_dot` for a GPU says so once, as a warning (`runtime.resolve`).
"""

import jax
import jax.numpy as jnp

from dsv3_jax.fp8 import BLOCK, fp8_grouped_matmul
from pallas_kernels import grouped_matmul as gk

IMPLS = ("ragged_dot", "pallas")


def _check(x, w, group_sizes, impl):
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r} is not one of {IMPLS}")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != w.shape[:1]:
        raise ValueError(f"grouped_matmul shapes: x {x.shape} must be [M, K], w {w.shape} "
                         f"[E, K, N], group_sizes {group_sizes.shape} [E]")


def _ragged(x, w, group_sizes):
    out = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_matmul(x: jnp.ndarray, w: jnp.ndarray, group_sizes: jnp.ndarray, *,
                   impl: str = "ragged_dot", interpret: bool = False) -> jnp.ndarray:
    """x [M, K] (rows sorted by group), w [E, K, N], group_sizes [E] int32 summing to at most
    M -> [M, N] (rows past the groups are zeros). Output in x's dtype, accumulated in float32.
    `interpret`: run the Pallas kernel in GPU interpret mode (CPU tests)."""
    _check(x, w, group_sizes, impl)
    if impl == "ragged_dot":
        return _ragged(x, w, group_sizes)
    plan = gk.pad_plan(group_sizes, x.shape[0], gk.TileConfig().block_m)
    y = gk.grouped_matmul_padded(gk.pad_rows(x, plan), w.astype(x.dtype), plan, interpret=interpret)
    return gk.unpad_rows(y, plan)


def grouped_swiglu(p: dict, rows: jnp.ndarray, sizes: jnp.ndarray, *,
                   impl: str = "ragged_dot", interpret: bool = False,
                   fp8_impl=None) -> jnp.ndarray:
    """Each expert's SwiGLU over its contiguous rows: p {w_gate, w_up [E, D, F], w_down
    [E, F, D]}, rows [M, D] sorted by expert, sizes [E] -> [M, D]. `fp8_impl` (`Runtime.fp8`,
    a gemm impl string or an `Fp8` that also picks the activation quantizers): FP8 GEMM
    inputs (`fp8.fp8_grouped_matmul`); None: the GEMMs in the rows' dtype. `interpret` also
    reaches the FP8 kernels."""
    _check(rows, p["w_gate"], sizes, impl)
    if fp8_impl is not None:
        return _grouped_swiglu_fp8(p, rows, sizes, impl, fp8_impl, interpret)
    if impl == "ragged_dot":
        h = jax.nn.silu(_ragged(rows, p["w_gate"], sizes)) * _ragged(rows, p["w_up"], sizes)
        return _ragged(h, p["w_down"], sizes)
    plan = gk.pad_plan(sizes, rows.shape[0], gk.TileConfig().block_m)
    x = gk.pad_rows(rows, plan)

    def mm(a, w):
        return gk.grouped_matmul_padded(a, w.astype(a.dtype), plan, interpret=interpret)

    e, _, f = p["w_gate"].shape
    if rows.shape[0] >= e * f:
        # gate and up as one [E, D, 2F] product: x is read once and the backward runs one
        # dgrad and one wgrad kernel instead of two each (measured on an H200: 0.7 ms of a
        # 112 ms `small` step); the concatenation copies 2 E D F weights, which pays only when
        # the rows are many next to the experts' size (training: 98k rows for `small`'s
        # E F = 32k). Decoding's few rows would copy every expert's weights per token.
        gate_up = mm(x, jnp.concatenate([p["w_gate"], p["w_up"]], axis=-1))
        h = jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]
    else:
        h = jax.nn.silu(mm(x, p["w_gate"])) * mm(x, p["w_up"])
    return gk.unpad_rows(mm(h, p["w_down"]), plan)


def _grouped_swiglu_fp8(p: dict, rows, sizes, impl: str, fp8_impl,
                        interpret: bool) -> jnp.ndarray:
    """grouped_swiglu with FP8 GEMM inputs, in the padded-group layout whatever the impl: the
    weight gradient quantizes x and dy in 128-row tiles along tokens, and a layout in which
    every expert starts on a 128-row tile is one where no tile straddles two experts. Gate and
    up are one product over [E, D, F' + F], F' = F rounded up to 128 with zero columns (as
    `fp8.matmul_parts` does for the dense layers): x is quantized, cached and re-tiled once and
    the backward runs one dgrad and one wgrad; with gate starting at 0 and up at F', each weight
    keeps its own 128 x 128 blocks and dy its own 1 x 128 tiles, so the outputs and weight
    gradients are those of two products (the data gradient sums both in float32 before its
    rounding). The experts' weights are local here (inside shard_map on a mesh), so the
    concatenation moves no shards."""
    plan = gk.pad_plan(sizes, rows.shape[0], BLOCK)
    x = gk.pad_rows(rows, plan)

    def mm(a, w):
        return fp8_grouped_matmul(a, w, plan, fp8_impl=fp8_impl, grouped_impl=impl,
                                  interpret=interpret)

    f = p["w_gate"].shape[-1]
    f_pad = -(-f // BLOCK) * BLOCK
    w_gate = jnp.pad(p["w_gate"], ((0, 0), (0, 0), (0, f_pad - f)))
    gate_up = mm(x, jnp.concatenate([w_gate, p["w_up"]], axis=-1))
    h = jax.nn.silu(gate_up[:, :f]) * gate_up[:, f_pad:]
    return gk.unpad_rows(mm(h, p["w_down"]), plan)
