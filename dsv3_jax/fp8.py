"""FP8 mixed-precision linear layers: DeepSeek-V3's training recipe ([PAPER] §3.3).

Every GEMM of a linear layer takes e4m3 inputs with float32 scales over small tiles and
accumulates in float32 (`pallas_kernels.fp8_quant`, `pallas_kernels.fp8_gemm`):

  forward   y  = x @ w         x in 1 x 128 tiles along K, w in 128 x 128 blocks  (gemm_1d2d)
  dgrad     dx = dy @ w^T      dy in 1 x 128 tiles along N, the same weight blocks (gemm_1d2d)
  wgrad     dw = x^T @ dy      contracts over tokens, so both operands are re-quantized in
                               128 x 1 tiles along the token axis                  (gemm_1d1d)

The backward pass reads the *FP8* x cached by the forward (the report caches FP8 activations and
converts their 1 x 128 tiles to 128 x 1 tiles for the wgrad, §3.3.4), and the FP8 weight blocks
(the dgrad's operand, `transpose_blocks` of the forward's: blocks map to blocks, so no second
quantization). Kept in higher precision by the model, not here: embedding, output head, MoE
router, norms, the attention core, the MTP projection and the optimizer.

`fp8_linear` is the dense op (MLA projections, dense FFN, shared experts); `fp8_grouped_matmul`
the routed experts' grouped GEMM. `matmul` is what the model's call sites use: an einsum of a
linear layer, plain (`fp8_impl=None`, bit-for-bit the non-FP8 model) or in FP8;
`matmul_parts` runs several layers of one input as one FP8 GEMM (same outputs and weight
gradients, the input quantized once).

Axes that are not multiples of 128 (tokens, K, N; the `tiny` preset has D = 64) are zero-padded
explicitly around the op: a zero row or column of x or w adds nothing to any product and leaves
every tile's amax (so its scale) unchanged, and the padded outputs are sliced off; autodiff
slices the gradients back. Real shapes (`small`, V3) need none except the shared rope key's
projection w_kr [D, R = 64], the last part of the w_dkv + w_kr GEMM (`matmul_parts`; V3's
N = 512 + 64 runs padded to 640).

On a mesh (`matmul`'s `shard`) each FP8 GEMM runs in a `shard_map` of its own, on each device's
token rows and its compute split of the weight (`_on_mesh`): the Mosaic GPU kernels carry no
sharding rule, so XLA's partitioner must never see them.

How the ops run is a `dsv3_jax.runtime.Fp8` (`Runtime.fp8`; every `fp8_impl` argument here
also takes a plain gemm string, meaning quant "xla"): `gemm` "xla" multiplies the dequantized
values in float32 (any backend: FP8 numerics, not FP8 speed), "pallas" runs our Mosaic GPU
kernels on the e4m3 operands. `quant` "xla" quantizes everything with
`pallas_kernels.fp8_quant` (two XLA passes over the input: amax, then scale and convert);
"pallas" sends the bf16 activation quantizations -- quantize_rows(x), quantize_rows(dy) and
quantize_cols(dy), dense and grouped -- through the one-pass Mosaic GPU kernels of
`pallas_kernels.fp8_quant_kernel` (bit-identical, bf16 only; no fallback: another dtype or a
shape off the kernels' tiles raises). Weights (quantize_blocks, transpose_blocks) and the
wgrad's re-tiling of the cached FP8 x (`fp8_quant.rows_to_cols`) stay XLA. Measurements of
both choices: docs/fp8.md.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.runtime import Fp8
from pallas_kernels import fp8_gemm
from pallas_kernels import fp8_quant as q8
from pallas_kernels import fp8_quant_kernel as qk
from pallas_kernels import grouped_matmul as gk
from sharding.context import ShardingContext, single_device

BLOCK = q8.BLOCK
_log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        _log.warning(message)


QUANT_IMPLS = ("xla", "pallas")


class _Statics(NamedTuple):
    """The static (nondiff) argument of the dense and grouped custom_vjps."""
    gemm: str  # fp8_gemm impl
    quant: str  # activation quantizers
    interpret: bool  # Pallas GPU interpret mode (CPU tests)
    w_dtype: str  # the weight gradient's dtype
    grouped: str | None = None  # grouped path: the dequantized matmul under gemm "xla"
    # Dense op returning float32 sums (a K split's partial products on a mesh, summed before
    # the cast): x's dtype, which dy is cast back to before it is quantized and dx comes out
    # in. None: y in x's dtype.
    partial_of: str | None = None


def as_impl(fp8_impl: "str | Fp8") -> Fp8:
    """`fp8_impl` (a gemm impl string or an Fp8) as a checked Fp8."""
    impl = Fp8(fp8_impl) if isinstance(fp8_impl, str) else Fp8(*fp8_impl)
    if impl.gemm not in fp8_gemm.IMPLS or impl.quant not in QUANT_IMPLS:
        raise ValueError(f"fp8: fp8_impl={fp8_impl!r}: gemm must be one of {fp8_gemm.IMPLS} and "
                         f"quant one of {QUANT_IMPLS}")
    return impl


def _check_quant_dtype(a: jax.Array, name: str) -> None:
    """The kernels take bf16 only; say so naming the tensor (their own checks name `x`; the
    shapes here are padded to 128, which their default tiles divide, and they check that)."""
    if jnp.dtype(a.dtype) not in qk.KERNEL_DTYPES:
        raise ValueError(f"fp8: {name} is {jnp.dtype(a.dtype)}, but fp8 quant impl 'pallas' "
                         "(the fp8_quant_kernel quantizers) takes bfloat16 only; use quant "
                         "'xla' or a bfloat16 activation dtype")


def _quant_rows(a: jax.Array, name: str, quant: str, interpret) -> tuple[jax.Array, jax.Array]:
    """q8.quantize_rows(a) [M, K] in 1 x 128 tiles: XLA, or the one-pass kernel (bf16 only)."""
    if quant == "xla":
        return q8.quantize_rows(a, name=name)
    _check_quant_dtype(a, name)
    return qk.quantize_rows_kernel(a, interpret=interpret)


def _quant_cols(a: jax.Array, name: str, quant: str, interpret) -> tuple[jax.Array, jax.Array]:
    """q8.quantize_cols(a): a [M, K] -> a^T [K, M] in 1 x 128 tiles along M, XLA or kernel."""
    if quant == "xla":
        return q8.quantize_cols(a, name=name)
    _check_quant_dtype(a, name)
    return qk.quantize_cols_kernel(a, interpret=interpret)


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `axis` of `a` up to `size` (a no-op when it is already that long)."""
    extra = size - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


# ------------------------------------------------------------------------------ dense linear


def fp8_linear(x: jax.Array, w: jax.Array, impl: "str | Fp8" = "xla", *,
               interpret=False, out_dtype=None) -> jax.Array:
    """x [..., K] @ w [K, N] (our [in, out] layout) with FP8 GEMMs both ways -> [..., N] in
    x's dtype; the weight gradient comes back in w's dtype. `impl`: fp8_gemm's impl ("xla": the
    dequantize + fp32 matmul reference, any backend; "pallas": the Mosaic GPU kernel), or an
    `Fp8` that also picks the activation quantizers (quant "pallas": the one-pass kernels,
    bf16 x only). `interpret`: run the Pallas kernels in GPU interpret mode (CPU tests).
    `out_dtype` float32: y as the GEMM's float32 sums, not rounded to x's dtype (what a K split
    over a mesh adds up before the cast, `matmul`); y's cotangent is then cast to x's dtype
    before it is quantized, as on one device."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_linear: x {x.shape} must be [..., K] and w {w.shape} [K, N]")
    if out_dtype is not None and jnp.dtype(out_dtype) not in (jnp.dtype(x.dtype),
                                                              jnp.dtype(jnp.float32)):
        raise ValueError(f"fp8_linear: out_dtype={out_dtype!r} must be None, x's dtype "
                         f"({jnp.dtype(x.dtype)}) or float32")
    impl = as_impl(impl)
    if impl.gemm == "xla":
        _log_once("xla", "fp8: dense GEMMs use the XLA reference path (dequantize + float32 "
                         "matmul): FP8 numerics, not FP8 speed")
    lead, (k, n) = x.shape[:-1], w.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    # Tokens are padded too: the wgrad quantizes along them in 128-row tiles, and the Pallas
    # kernel takes whole 128-row tiles (real runs have B * T a multiple of 128: no copy).
    x2 = _pad_axis(_pad_axis(x2, 0, _round_up(m)), 1, _round_up(k))  # [Mp, Kp]
    wp = _pad_axis(_pad_axis(w, 0, _round_up(k)), 1, _round_up(n))  # [Kp, Np]
    partial = out_dtype is not None and jnp.dtype(out_dtype) != jnp.dtype(x.dtype)
    mm = _Statics(impl.gemm, impl.quant, bool(interpret), jnp.dtype(w.dtype).name,
                  partial_of=jnp.dtype(x.dtype).name if partial else None)
    y = _fp8_matmul(x2, wp, mm)
    return y[:m, :n].reshape(*lead, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x, w, mm):
    """x [Mp, Kp] @ w [Kp, Np], every axis a multiple of 128; `mm` a `_Statics`."""
    return _fp8_matmul_fwd(x, w, mm)[0]


def _fp8_matmul_fwd(x, w, mm):
    qx, sx = _quant_rows(x, "x", mm.quant, mm.interpret)  # 1 x 128 tiles along K
    qw, sw = q8.quantize_blocks(w.T, name="w^T")  # [Np, Kp]: K-major, as the GEMM reads it
    y = fp8_gemm.gemm_1d2d(qx, sx, qw, sw, out_dtype=jnp.float32 if mm.partial_of else x.dtype,
                           impl=mm.gemm, interpret=mm.interpret)
    return y, (qx, sx, qw, sw)


def _fp8_matmul_bwd(mm, res, dy):
    qx, sx, qw, sw = res
    if mm.partial_of:  # float32 sums out: dy holds x-dtype values (the cast's cotangent)
        dy = dy.astype(mm.partial_of)
    # dgrad dx [Mp, Kp] = dy [Mp, Np] @ w^T: dy in 1 x 128 tiles along N; the weight's blocks
    # as the [Kp, Np] operand.
    qdy, sdy = _quant_rows(dy, "dy", mm.quant, mm.interpret)
    qwt, swt = q8.transpose_blocks(qw, sw)
    dx = fp8_gemm.gemm_1d2d(qdy, sdy, qwt, swt, out_dtype=dy.dtype, impl=mm.gemm,
                            interpret=mm.interpret)
    # wgrad dw [Kp, Np] = x^T @ dy, contracting over the Mp tokens: the cached FP8 x (its
    # exact values, re-tiled by q8.rows_to_cols) and dy, quantized in 128 x 1 tiles along the
    # tokens. The cached x always takes the XLA quantizer (the kernels are bf16 only). x^T is the
    # GEMM's left operand so that dw comes out in the weight's own [K, N] layout: with dy^T on
    # the left it came out as dw^T, and the transpose back cost a pass over every weight
    # gradient (fused into the optimizer's first read, ~4 ms of a `small` step on an H200).
    xt, sxt = q8.rows_to_cols(qx, sx, name="x")  # [Kp, Mp]
    dyt, sdyt = _quant_cols(dy, "dy", mm.quant, mm.interpret)  # [Np, Mp]
    dw = fp8_gemm.gemm_1d1d(xt, sxt, dyt, sdyt, out_dtype=jnp.float32, impl=mm.gemm,
                            interpret=mm.interpret)
    return dx, dw.astype(mm.w_dtype)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def _linear_spec(spec: str, x: jax.Array, w: jax.Array) -> int:
    """How many trailing axes of x the einsum `spec` contracts with the leading axes of w, after
    checking that it is a linear layer: x[..., in...] @ w[in..., out...] -> [..., out...]."""
    ins, out = spec.replace(" ", "").split("->")
    lhs, rhs = ins.split(",")
    n_in = len([c for c in rhs if c in lhs and c not in out])
    if (not 0 < n_in <= min(len(lhs), len(rhs)) or lhs[len(lhs) - n_in:] != rhs[:n_in]
            or out != lhs[:len(lhs) - n_in] + rhs[n_in:]
            or (x.ndim, w.ndim) != (len(lhs), len(rhs))):
        raise ValueError(f"fp8 matmul: {spec!r} (x {x.shape}, w {w.shape}) is not a linear layer "
                         "x[..., in...] @ w[in..., out...] -> [..., out...]")
    return n_in


def matmul(spec: str, x: jax.Array, w: jax.Array,
           fp8_impl: "str | Fp8 | None" = None, *, shard: ShardingContext | None = None,
           axes: "tuple[str | None, ...] | None" = None, name: str = "w") -> jax.Array:
    """A linear layer written as an einsum (`"btq,qnk->btnk"`): `jnp.einsum(spec, x, w)` when
    `fp8_impl` is None, else `fp8_linear` with x and w flattened to 2-D around the call
    (`fp8_impl`: a gemm impl string or an `Fp8`, `Runtime.fp8`).

    On the mesh of `shard` (several devices) the FP8 op runs in its own `shard_map`
    (`_on_mesh`): `axes` are w's logical axis names (its declaration in params.py without the
    layer axis), x's first axis is its batch; `name` names w in errors. The plain einsum is
    left to XLA's partitioner, which `shard` and `axes` do not change."""
    return matmul_parts(spec, x, [w], fp8_impl, shard=shard,
                        axes=None if axes is None else [axes], names=[name])[0]


def matmul_parts(spec: str, x: jax.Array, ws: "list[jax.Array]",
                 fp8_impl: "str | Fp8 | None" = None, *, fuse: bool = True,
                 shard: ShardingContext | None = None,
                 axes: "list[tuple[str | None, ...]] | None" = None,
                 names: "list[str] | None" = None) -> list:
    """`[matmul(spec, x, w, fp8_impl) for w in ws]`, the linear layers of one input, as one FP8
    GEMM over the weights concatenated along their flattened output axis when `fuse` (and
    `fp8_impl` is set): x is quantized, cached and re-tiled for the weight gradient once
    instead of once per weight, and the data gradient is one GEMM instead of one per weight
    plus their sum. Each part but the last is zero-padded to a multiple of 128 columns, so every
    part starts on a block boundary: each weight keeps its own 128 x 128 blocks, dy its own
    1 x 128 tiles, and the outputs and weight gradients are those of separate layers (tested
    bit for bit on the XLA reference path on the CPU; our Mosaic GPU kernel's per-element K
    order does not depend on N, except where its default splits K for few output tiles
    (small M) and splits the fused GEMM and the parts differently: then the last bit can
    differ; the data gradient accumulates all parts in one float32 sum before its bf16
    rounding, instead of rounding each part's product and adding them in bf16). On a mesh
    the concatenation is of each device's own parts, inside the shard_map (`matmul`'s
    `shard`, `axes` (one tuple per weight) and `names`), so it moves no shard. Its effect on
    the step time: docs/fp8.md."""
    names = list(names) if names is not None else [f"weight {i}" for i in range(len(ws))]
    if fp8_impl is None:
        return [jnp.einsum(spec, x, w) for w in ws]
    if not single_device(shard):
        return _on_mesh(spec, x, list(ws), fp8_impl, fuse, shard, axes, names)
    return _parts(spec, x, list(ws), fp8_impl, fuse)


def _one(spec, x, w, fp8_impl, out_dtype=None):
    """One FP8 linear layer of einsum `spec` on whole (or one device's) arrays."""
    n_in = _linear_spec(spec, x, w)
    lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    k, n = math.prod(ins), math.prod(outs)
    y = fp8_linear(x.reshape(*lead, k), w.reshape(k, n), fp8_impl, out_dtype=out_dtype)
    return y.reshape(*lead, *outs)


def _parts(spec, x, ws, fp8_impl, fuse, out_dtype=None) -> list:
    """`matmul_parts` on whole (or one device's) arrays."""
    if not fuse or len(ws) == 1:
        return [_one(spec, x, w, fp8_impl, out_dtype) for w in ws]
    n_in = _linear_spec(spec, x, ws[0])
    lead, ins = x.shape[:x.ndim - n_in], ws[0].shape[:n_in]
    k = math.prod(ins)
    flat, widths = [], []
    for i, w in enumerate(ws):
        _linear_spec(spec, x, w)
        if w.shape[:n_in] != ins or w.dtype != ws[0].dtype:
            raise ValueError(f"fp8 matmul_parts: weight {i} is {w.dtype}{list(w.shape)}, but "
                             f"weight 0 is {ws[0].dtype}{list(ws[0].shape)}: the input axes "
                             "and dtypes must match")
        n = math.prod(w.shape[n_in:])
        w2 = w.reshape(k, n)
        flat.append(w2 if i == len(ws) - 1 else _pad_axis(w2, 1, _round_up(n)))
        widths.append(n)
    y = fp8_linear(x.reshape(*lead, k), jnp.concatenate(flat, axis=1), fp8_impl,
                   out_dtype=out_dtype)
    outs, start = [], 0
    for w, part, n in zip(ws, flat, widths):
        outs.append(y[..., start:start + n].reshape(*lead, *w.shape[n_in:]))
        start += part.shape[1]
    return outs


# ------------------------------------------------------------------------------ on a mesh


def _on_mesh(spec, x, ws, fp8_impl, fuse, shard: ShardingContext, axes, names) -> list:
    """The FP8 layers of `matmul_parts` on a mesh, in one `shard_map` of their own: the Mosaic
    GPU kernels (GEMMs and quantizers) are custom calls with no sharding rule, so left to
    XLA's partitioner their operands would be gathered onto every device. Inside, each device
    runs the one-device op (`_parts`, its custom_vjp) on its own blocks:

      x  [B_(batch axes), ..., K]   the activations' split: each device its token rows
      w  [K, N] as the strategy computes with it: its activation-table split (tensor
         parallelism: heads and FFN widths), so an FSDP split is gathered at the boundary, as
         XLA gathers it for a plain einsum; column parallel (N split): y is split too; row
         parallel (K split): each device's float32 partial products are summed over the K
         axes (psum) before the cast to x's dtype, as one device accumulates all of K.

    Gradients come from autodiff's transpose of the shard_map (check_vma=False: cotangents
    of inputs not split over an axis are summed over it): dw, each device's x^T dy over its
    own tokens, is summed over the batch axes (XLA then splits it to the weight's own
    sharding); under column parallelism dx sums the N parts in x's dtype, as XLA sums a plain
    einsum's partial products. A split K or N keeps whole 128-wide tiles (`_mesh_specs`), so
    every tile and block is quantized as on one device; the weight gradient's 128-token tiles
    are each device's own rows (the one-device tiles where each device holds a multiple of
    128 rows, as real batches do)."""
    if axes is None or len(axes) != len(ws):
        raise ValueError(f"fp8 matmul on a mesh {shard.sizes}: {names} need their logical axis "
                         "names (axes=..., one tuple per weight) to run in a shard_map")
    n_in = _linear_spec(spec, x, ws[0])
    mesh = shard.shard_map_mesh()
    x_spec, w_specs, y_specs, k_axes = _mesh_specs(x, ws, n_in, axes, names, shard, mesh)
    out_dtype = jnp.float32 if k_axes else None

    def local(x, *ws):
        ys = _parts(spec, x, list(ws), fp8_impl, fuse, out_dtype)
        return [jax.lax.psum(y, k_axes) for y in ys] if k_axes else ys

    ys = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, *w_specs), out_specs=y_specs,
                       check_vma=False)(x, *ws)
    return [y.astype(x.dtype) for y in ys]


def _mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _mesh_specs(x, ws, n_in, axes, names, shard: ShardingContext, mesh):
    """(x's spec, each weight's spec, each output's spec, the mesh axes splitting K).

    The inputs' specs also name the shard_map's axes of size 1 (they split nothing): the
    transpose sums an input's cotangent over every axis its spec leaves out, and XLA:CPU keeps
    such an all-reduce over groups of one device (measured: dx's, per FP8 op under FSDP)."""
    lead = x.ndim - n_in
    idle = tuple(a for a in mesh.axis_names
                 if shard.sizes[a] == 1 and a not in getattr(mesh, "manual_axes", ()))
    w_specs = []
    for w, ax, name in zip(ws, axes, names):
        if len(ax) != w.ndim:
            raise ValueError(f"fp8 matmul: {name} {list(w.shape)} has {w.ndim} axes but "
                             f"{len(ax)} logical names {tuple(ax)}")
        ws_spec = tuple(shard.activation_spec(tuple(ax), w.shape, name))
        _check_tiles(name, w.shape, ws_spec, 0, n_in, "input (K)", shard)
        _check_tiles(name, w.shape, ws_spec, n_in, w.ndim, "output (N)", shard)
        w_specs.append(ws_spec)
    for ws_spec, name in zip(w_specs[1:], names[1:]):
        if ws_spec[:n_in] != w_specs[0][:n_in]:
            raise ValueError(f"fp8 matmul_parts: {name}'s input axes are split as "
                             f"{ws_spec[:n_in]}, {names[0]}'s as {w_specs[0][:n_in]}: parts of "
                             "one input must split it alike")
    k_spec = w_specs[0][:n_in]
    x_lead = tuple(shard.activation_spec(("batch",) + (None,) * (lead - 1), x.shape[:lead],
                                         f"{names[0]}'s input"))
    k_axes = tuple(a for entry in k_spec for a in _mesh_axes(entry))
    x_spec = (_mesh_axes(x_lead[0]) + idle or None,) + x_lead[1:] + k_spec
    return (P(*x_spec), [P(_mesh_axes(s[0]) + idle or None, *s[1:]) for s in w_specs],
            [P(*x_lead, *s[n_in:]) for s in w_specs], k_axes)


def _check_tiles(name, shape, spec, lo, hi, what, shard: ShardingContext) -> None:
    """A K (or N) split over the mesh must leave each device whole 128-wide FP8 tiles of the
    flattened axis, so that its tiles and blocks are the one-device op's: split on the first
    of the flattened axes (each device a contiguous range), into multiples of 128."""
    split = [i for i in range(lo, hi) if spec[i] is not None]
    if not split:
        return
    mesh_axes = tuple(a for i in split for a in _mesh_axes(spec[i]))
    ways = math.prod(shard.sizes[a] for a in mesh_axes)
    local = math.prod(shape[lo:hi]) // ways
    if split != [lo]:
        raise ValueError(f"fp8 on a mesh: {name} {list(shape)} is split over mesh axes "
                         f"{mesh_axes} along {what} axis {split} other than the first "
                         f"({lo}): each device's part of the flattened {what} axis would not be "
                         "a contiguous range of the one-device FP8 tiles")
    if local % BLOCK:
        raise ValueError(f"fp8 on a mesh: {name} {list(shape)} is split {ways} ways over mesh "
                         f"axes {mesh_axes} along its {what} axes, {local} per device, which "
                         f"is not a whole number of {BLOCK}-wide FP8 tiles; choose a size of "
                         f"{mesh_axes} that leaves multiples of {BLOCK}, or another precision "
                         "than fp8")


# ------------------------------------------------------------------------------ grouped (MoE)


def fp8_grouped_matmul(x_pad: jax.Array, w: jax.Array, plan, *,
                       fp8_impl: "str | Fp8" = "xla",
                       grouped_impl: str = "ragged_dot", interpret: bool = False) -> jax.Array:
    """The routed experts' GEMM with FP8 inputs both ways, in the padded-group layout of
    `pallas_kernels.grouped_matmul` (each expert's rows start on a 128-row tile): x_pad [Mp, K],
    w [E, K, N], plan from `pad_plan(..., block_m=128)` -> y_pad [Mp, N] in x's dtype.

    Quantized exactly as the dense op: rows of x and dy in 1 x 128 tiles, each expert's weight
    in 128 x 128 blocks, and for the wgrad x and dy in 128 x 1 tiles along tokens, which in this
    layout never straddle two experts. The products:
      fp8_impl="pallas": fp8_gemm's grouped Mosaic GPU kernels (grouped_gemm_1d2d forward and
        dgrad, grouped_wgrad_1d1d wgrad), reading the e4m3 operands;
      fp8_impl="xla": the dequantized values multiplied by `grouped_impl` (the reference path,
        any backend): "ragged_dot" in float32 (exact products of the quantized values, like
        fp8_gemm's "xla"), or "pallas", our bf16 grouped kernel (each dequantized value rounded
        to x's 16-bit dtype: a relative 2^-9 in bf16, 1/32 of e4m3's own step).
    `fp8_impl` may be an `Fp8`: its gemm is the fp8_impl above, and quant "pallas" sends
    the bf16 activation quantizations (rows of x and dy, dy's token tiles) through the one-pass
    fp8_quant_kernel quantizers (`interpret` reaches them too).
    K and N are zero-padded to multiples of 128 around the op, as in `fp8_linear`."""
    impl = as_impl(fp8_impl)
    if grouped_impl not in ("ragged_dot", "pallas"):
        raise ValueError(f"fp8_grouped_matmul: grouped_impl={grouped_impl!r} must be one of "
                         "('ragged_dot', 'pallas')")
    if plan.block_m != BLOCK:
        raise ValueError(f"fp8_grouped_matmul: plan.block_m={plan.block_m} must be {BLOCK}, the "
                         "token tile of the wgrad scales (no tile may straddle two experts)")
    if x_pad.ndim != 2 or w.ndim != 3 or x_pad.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_grouped_matmul: x_pad {x_pad.shape} must be [Mp, K] and w "
                         f"{w.shape} [E, K, N]")
    if impl.gemm == "xla":
        _log_once("grouped", "fp8: routed experts quantize their GEMM inputs to FP8 and multiply "
                             f"the dequantized values with grouped_impl={grouped_impl!r} (the "
                             "XLA reference path: FP8 numerics, not FP8 speed)")
    _, k, n = w.shape
    xp = _pad_axis(x_pad, 1, _round_up(k))
    wp = _pad_axis(_pad_axis(w, 1, _round_up(k)), 2, _round_up(n))
    mm = _Statics(impl.gemm, impl.quant, bool(interpret), jnp.dtype(w.dtype).name, grouped_impl)
    return _fp8_gmm(xp, wp, plan, mm)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_gmm(x_pad, w, plan, mm):
    """x_pad [Mp, Kp] @ w[expert] [E, Kp, Np]; `mm` a `_Statics`."""
    return _fp8_gmm_fwd(x_pad, w, plan, mm)[0]


def _fp8_gmm_fwd(x_pad, w, plan, mm):
    qx, sx = _quant_rows(x_pad, "expert rows", mm.quant, mm.interpret)
    qw, sw = q8.quantize_blocks(jnp.swapaxes(w, 1, 2), name="expert weights")  # [E, Np, Kp]
    y = _grouped_1d2d(qx, sx, qw, sw, plan, mm, x_pad.dtype)
    # residuals: the FP8 rows (as V3 caches activations) and the FP8 weight blocks
    return y, (qx, sx, qw, sw, plan)


def _fp8_gmm_bwd(mm, res, dy):
    qx, sx, qw, sw, plan = res
    qdy, sdy = _quant_rows(dy, "expert dy", mm.quant, mm.interpret)
    qwt, swt = q8.transpose_blocks(qw, sw)  # [E, Kp, Np]: the dgrad's K-major weight
    dx = _grouped_1d2d(qdy, sdy, qwt, swt, plan, mm, dy.dtype)
    # 128 x 1 tiles along the tokens; x^T on the left, so that dw comes out [E, Kp, Np], the
    # weights' own layout (as in the dense op's wgrad)
    xt, sxt = q8.rows_to_cols(qx, sx, name="expert rows")  # [Kp, Mp]
    dyt, sdyt = _quant_cols(dy, "expert dy", mm.quant, mm.interpret)  # [Np, Mp]
    dw = _grouped_wgrad(xt, sxt, dyt, sdyt, plan, mm, dy.dtype)  # [E, Kp, Np] float32
    return dx, dw.astype(mm.w_dtype), jax.tree.map(lambda _: None, plan)


_fp8_gmm.defvjp(_fp8_gmm_fwd, _fp8_gmm_bwd)


def _grouped_1d2d(qa, sa, qb, sb, plan, mm, out_dtype):
    """y_pad = a @ b[expert]^T: a [Mp, K] in 1 x 128 tiles, b [E, N, K] in 128 x 128 blocks."""
    fp8_impl, grouped_impl, interpret = mm.gemm, mm.grouped, mm.interpret
    if fp8_impl == "pallas":
        return fp8_gemm.grouped_gemm_1d2d(qa, sa, qb, sb, plan, out_dtype=out_dtype,
                                          impl="pallas", interpret=interpret)
    a, b = q8.dequantize_rows(qa, sa), q8.dequantize_blocks(qb, sb)
    if grouped_impl == "ragged_dot":
        sizes = plan.group_tile_count * plan.block_m  # padded groups: whole tiles
        y = jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), sizes,
                               precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    return gk.gmm(a.astype(out_dtype), b.astype(out_dtype), plan, transpose_w=True,
                  interpret=interpret)


def _grouped_wgrad(a_t, s_a, b_t, s_b, plan, mm, act_dtype):
    """[E, P, Q] = a_t[:, rows of e] @ b_t[:, rows of e]^T in float32; a_t [P, Mp] and b_t
    [Q, Mp] in 1 x 128 tiles along the tokens (x^T and dy^T: dw [E, K, N])."""
    fp8_impl, grouped_impl, interpret = mm.gemm, mm.grouped, mm.interpret
    if fp8_impl == "pallas":
        return fp8_gemm.grouped_wgrad_1d1d(a_t, s_a, b_t, s_b, plan, out_dtype=jnp.float32,
                                           impl="pallas", interpret=interpret)
    a, b = q8.dequantize_rows(a_t, s_a).T, q8.dequantize_rows(b_t, s_b).T  # [Mp, P], [Mp, Q]
    if grouped_impl == "ragged_dot":
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(a, b, plan.group_tile_count * plan.block_m, dims,
                                          precision=jax.lax.Precision.HIGHEST,
                                          preferred_element_type=jnp.float32)
    return gk.tgmm(a.astype(act_dtype), b.astype(act_dtype), plan, plan.num_groups,
                   out_dtype=jnp.float32, interpret=interpret)
