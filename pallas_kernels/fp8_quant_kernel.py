"""Single-pass FP8 activation quantizers: Pallas Mosaic GPU kernels for Hopper (issue 5).

**Why.** `fp8_quant.quantize_rows` / `quantize_cols` are plain jnp, and XLA compiles each into
two fusions: a reduction for the per-tile amax and a second pass that reads the input again to
scale and convert, so they move well under half of a bf16 copy's bandwidth (issue 5 asks for
80%). A quantizer is memory-bound (2 bytes in, 1 + 4/128 bytes out per element), so the kernel
has to read each input element exactly once: load a tile, reduce it in registers, scale,
convert and write, with the next tiles' loads already in flight.

**What.** The same functions, bit for bit (`fp8_quant`'s docstring has the recipe; [PAPER]
§3.3.2; ../shared/reference/kernels.md §2.1):

  quantize_rows_kernel(x)  x [M, K] bf16 -> (q [M, K] e4m3, s [M, K/128] f32): 1 x 128 tiles
  quantize_cols_kernel(x)  x [M, K] bf16 -> (q [K, M] e4m3, s [K, M/128] f32): 128 x 1 tiles of
                           x (128 consecutive rows of one column), written transposed (K-major)
                           for the weight-gradient GEMM that contracts over M

with fp8_quant's recipe: s = max(amax, AMAX_FLOOR) / 448 in fp32 (a zero tile gets the floor's scale
and q = 0), `pow2` rounding s up to a power of two, q = x / s converted to e4m3 (round to
nearest even) -- computed the way XLA actually computes it (below), so that the bits agree.
`transposed_scales=True` returns s^T instead ([K/128, M] for rows, [M/128, K] for cols), which
is the layout the kernel writes and the one `fp8_gemm.gemm_kernel` reads (`kernel_scales`); by
default the wrapper transposes it back (a small XLA transpose: 4 bytes per 128 elements).

**The kernels.** One warpgroup (128 threads) per CTA; the grid is (row blocks, K splits), and
each CTA streams its rows' K range in steps through a ring of SMEM stages (our own loop rather
than `plgpu.emit_pipeline`: jax 0.11.2's GPU interpreter does not implement the predicated
TMA stores emit_pipeline uses for its outputs, "NotImplementedError: predicate not
supported", and we want the interpreter tests):
  * TMA loads the step's bf16 tile [block_m, block_k] (rows) or [128, block_k] (cols) into
    input stage `step % stages`, 128-byte swizzled, completing that stage's barrier; `stages`
    loads are issued ahead.
  * rows: each 128-column group of the tile is read from SMEM into registers in the WGMMA
    layout (a row's 128 values spread over 4 lanes of one warp), so the per-row amax is a
    thread-local max plus two lane shuffles (`jnp.max(axis=1)`, Mosaic GPU's row reduction;
    attention_mgpu.py reduces its softmax rows the same way); then s, 1 / s, x * (1 / s) and
    the e4m3 conversion in registers.
  * cols: the transpose happens in the SMEM -> register load: the [128, block_k] tile is read
    through its transposed view [block_k, 128] into the WGMMA layout (Mosaic GPU emits
    `ldmatrix.trans` for 16-bit data on a swizzled tile), so the 128 rows of x that share a
    scale become one register row and the rest is the rows kernel's arithmetic. This is why
    cols takes 16-bit input only: Hopper has no transposing ldmatrix for 32-bit data
    (and none for 8-bit: the transpose must happen before the e4m3 conversion).
  * The e4m3 tile and the scale row go into an output stage in SMEM and leave by TMA stores
    (one bulk group per step); before an output stage is rewritten the kernel waits until at
    most out_stages - 1 groups are still reading SMEM. The scales are written as s^T rows
    ([K/128, M] or [M/128, K]) because TMA needs 16-byte rows: one row block's scales along M
    are contiguous there, a [block_m, 1] column of s [M, K/128] would not be.
  * Order per step: wait for the input stage, wait for the output stage, compute, commit SMEM
    (fence for the async proxy + warpgroup barrier, so every thread's reads of the input stage
    are done), issue the stores, then refill the input stage with the load `stages` steps
    ahead (the order of jax's emit_pipeline, pallas/mosaic_gpu/pipeline.py).

**Bit-identical arithmetic.** XLA does not evaluate fp8_quant's two divisions as written: its
algebraic simplifier rewrites `amax / 448` into `amax * fl(1/448)` and `tiles / s` (s
broadcast over the tile) into `tiles * fl(1 / s)` (seen in the compiled HLO of
`jax.jit(quantize_rows)` on XLA:CPU, jax 0.11.2; the GPU compiler runs the same simplifier,
which the `gpu`-marked tests confirm or refute). The kernel computes exactly that: s =
max(amax, AMAX_FLOOR) * fl(1/448), one IEEE division 1 / s per row (no approx_math), q = x * (1/s).
Written with true divisions the kernel differed from XLA in 3 of 32,768 e4m3 values of a test
tile (quotients one ulp apart, on opposite sides of an e4m3 rounding tie), so this is not
cosmetic. With pow2 the scale is a power of two and both forms are exact. The power-of-two
rounding uses the float's bits, (bits + 0x7FFFFF) & 0xFF800000, which rounds a positive
normal float up to the next power of two and keeps exact powers (what fp8_quant does with
frexp/ldexp; s >= AMAX_FLOOR / 448 = 2.2e-33 is always normal).

**Limits.** bf16 input only; rows: M a multiple of block_m (64) and K of 128; cols: M a
multiple of 128 and K of block_k (64). Inputs are assumed finite (a NaN makes its tile NaN
in both implementations, but the order of the max over NaNs is not guaranteed to match).
No fallback: a shape the kernel cannot take raises ValueError naming the dimension.

Interpret mode (`interpret=True` or a `plgpu.InterpretGPUParams`) runs the same kernels on the
CPU through jax's GPU interpreter, which checks the barrier and TMA protocol (fresh SMEM is
NaN, so a read before a TMA write shows); the GPU path is checked on the CPU by lowering it for
CUDA (Mosaic GPU's layout and transfer checks run at lowering).

`python -m pallas_kernels.fp8_quant_kernel` checks both kernels bit for bit against fp8_quant
(interpret mode without a Hopper GPU); `--sweep` times the configs of `SWEEP`. Speed and the
side-by-side with XLA's quantizers (experiments/bench_fp8_gemm.py --quant):
docs/kernels.md#fp8-quantizers.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic as mg
from pallas_kernels import fp8_quant as q8

KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16),)
# Rows of one WGMMA-layout register tile (a warpgroup's 4 warps x 16 rows).
WG_ROWS = 64
# bits + POW2_ROUND, masked with POW2_MASK: the next power of two of a positive normal float.
POW2_ROUND = 0x7FFFFF
POW2_MASK = -0x800000  # 0xFF800000 as int32: sign and exponent bits
# fl32(1 / 448): XLA's algebraic simplifier turns fp8_quant's `amax / 448` into `amax * this`.
INV_E4M3_MAX = float(np.float32(1.0) / np.float32(q8.E4M3_MAX))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Tiles of the quantizer kernels.

    block_m: rows of x per CTA in the rows kernel (a multiple of 64: whole WGMMA-layout register
      tiles). The cols kernel always takes 128 rows, one scale tile.
    block_k: columns of x per pipeline step. rows: a multiple of 128 (one scale per 128); cols:
      a multiple of 64 (the transposed tile's rows are whole register tiles).
    stages: input SMEM stages (TMA loads in flight ahead of the step being computed).
    out_stages: output SMEM stages (TMA stores still reading SMEM while the next step runs).
    k_splits: CTAs along K, each streaming K / k_splits columns; None: `default_k_splits`.

    SMEM per CTA: stages x (tile bf16) + out_stages x (tile e4m3 + scale row). The defaults
    (rows: 64 x 128, cols: 128 x 64; 4 + 2 stages) take 80.5 KiB: two CTAs fit on an SM, each
    with 4 loads of 16 KiB in flight (Little's law: 3.3 TB/s x ~1 us of latency is ~25 KiB per
    SM). Not tuned yet: `python -m pallas_kernels.fp8_quant_kernel --sweep` times the
    alternatives of `SWEEP`.
    """
    block_m: int = 64
    block_k: int = 128
    stages: int = 4
    out_stages: int = 2
    k_splits: int | None = None

    def __post_init__(self):
        if self.block_m <= 0 or self.block_m % WG_ROWS:
            raise ValueError(f"QuantConfig.block_m={self.block_m} must be a positive multiple "
                             f"of {WG_ROWS}")
        if self.block_k <= 0 or self.block_k % WG_ROWS:
            raise ValueError(f"QuantConfig.block_k={self.block_k} must be a positive multiple "
                             f"of {WG_ROWS} (of {q8.BLOCK} for quantize_rows)")
        if self.stages < 1 or self.out_stages < 1:
            raise ValueError(f"QuantConfig: stages={self.stages} and out_stages="
                             f"{self.out_stages} must be >= 1")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"QuantConfig.k_splits={self.k_splits} must be >= 1")

    def smem_bytes(self, rows: int) -> int:
        tile = rows * self.block_k
        scales = tile // q8.BLOCK * 4
        return self.stages * tile * 2 + self.out_stages * (tile + scales)


ROWS_CONFIG = QuantConfig()
COLS_CONFIG = QuantConfig(block_m=q8.BLOCK, block_k=64)


def default_k_splits(row_blocks: int, k_steps: int, num_sms: int = mg.DEFAULT_NUM_SMS) -> int:
    """The fewest K splits (a divisor of the K steps) that give two or more CTAs per SM: long
    streams per CTA amortise the pipeline's fill and drain, and a second CTA per SM hides one
    CTA's drain behind the other's loads."""
    for s in range(1, k_steps + 1):
        if k_steps % s == 0 and row_blocks * s >= 2 * num_sms:
            return s
    return k_steps


def _scale_as_xla(amax: jax.Array, pow2: bool) -> jax.Array:
    """fp8_quant's scale as XLA compiles it (max(amax, AMAX_FLOOR) * fl(1/448): module docstring),
    in operations Mosaic GPU lowers (no frexp/ldexp)."""
    s = jnp.maximum(amax, q8.AMAX_FLOOR) * INV_E4M3_MAX
    if pow2:
        bits = lax.bitcast_convert_type(s, jnp.int32)
        s = lax.bitcast_convert_type((bits + POW2_ROUND) & POW2_MASK, jnp.float32)
    return s


def _quantize_tile(x: jax.Array, pow2: bool) -> tuple[jax.Array, jax.Array]:
    """x [R, 128] (a WGMMA-layout register tile) -> (q [R, 128] e4m3, s [R] f32), one scale
    per row. abs and max are exact in any float type; q = x * fl(1/s) in fp32, the arithmetic
    XLA compiles `tiles / s` to (module docstring)."""
    xf = x.astype(jnp.float32)
    s = _scale_as_xla(jnp.max(jnp.abs(xf), axis=1), pow2)
    inv = 1.0 / s  # one IEEE division per row (no approx_math), not one per element
    q = (xf * lax.broadcast_in_dim(inv, xf.shape, [0])).astype(q8.FP8)
    return q, s


def _stream(n_steps: int, stages: int, out_stages: int, ready, load, compute, store) -> None:
    """The CTA's pipeline over `n_steps` steps (static): `load(step, slot)` issues the TMA load
    of a step into input stage `slot`, completing `ready[slot]`; `compute(step, slot, oslot)`
    reads input stage `slot` and writes output stage `oslot` (registers in between);
    `store(step, oslot)` issues that step's TMA stores as one bulk group."""
    for i in range(min(stages, n_steps)):
        load(i, i)

    @pl.loop(0, n_steps)
    def _step(i):
        slot, oslot = lax.rem(i, stages), lax.rem(i, out_stages)
        plgpu.barrier_wait(ready.at[slot])
        # The stores of step i - out_stages read this output stage: let them finish reading
        # (Mosaic GPU follows the wait with a warpgroup barrier, so every thread sees it).
        plgpu.wait_smem_to_gmem(out_stages - 1, wait_read_only=True)
        compute(i, slot, oslot)
        # Fence the SMEM writes for TMA and barrier the warpgroup: after this no thread still
        # reads input stage `slot`, so it can be refilled.
        plgpu.commit_smem()
        store(i, oslot)

        @pl.when(i + stages < n_steps)
        def _refill():
            load(i + stages, slot)

    plgpu.wait_smem_to_gmem(0)


def _rows_body(x_ref, q_ref, st_ref, *, cfg: QuantConfig, k_splits: int, pow2: bool):
    """x_ref [M, K] bf16 -> q_ref [M, K] e4m3, st_ref [K/128, M] f32 (s^T). CTA (r, c): rows
    r * block_m .., K columns c * K / k_splits .. in steps of block_k."""
    bm, bk = cfg.block_m, cfg.block_k
    groups = bk // q8.BLOCK
    n_steps = x_ref.shape[1] // bk // k_splits
    rows = pl.ds(pl.multiple_of(lax.axis_index("m") * bm, bm), bm)
    step0 = lax.axis_index("k") * n_steps

    def scoped(x_s, q_s, s_s, ready):
        def load(i, slot):
            cols = pl.ds(pl.multiple_of((step0 + i) * bk, bk), bk)
            plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], x_s.at[slot], ready.at[slot])

        def compute(i, slot, oslot):
            del i
            for g in range(groups):
                cols = slice(g * q8.BLOCK, (g + 1) * q8.BLOCK)
                x = plgpu.load(x_s.at[slot].at[:, cols], layout=plgpu.Layout.WGMMA)
                q, s = _quantize_tile(x, pow2)
                q_s.at[oslot][:, cols] = q
                s_s.at[oslot][g, :] = s

        def store(i, oslot):
            k0 = pl.multiple_of((step0 + i) * bk, bk)
            plgpu.copy_smem_to_gmem(q_s.at[oslot], q_ref.at[rows, pl.ds(k0, bk)],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(s_s.at[oslot],
                                    st_ref.at[pl.ds(k0 // q8.BLOCK, groups), rows])

        _stream(n_steps, cfg.stages, cfg.out_stages, ready, load, compute, store)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((cfg.stages, bm, bk), x_ref.dtype, transforms=mg.swizzled(bk, x_ref.dtype)),
        plgpu.SMEM((cfg.out_stages, bm, bk), q8.FP8, transforms=mg.swizzled(bk, q8.FP8)),
        plgpu.SMEM((cfg.out_stages, groups, bm), jnp.float32),
        plgpu.Barrier(num_arrivals=1, num_barriers=cfg.stages))


def _cols_body(x_ref, q_ref, st_ref, *, cfg: QuantConfig, k_splits: int, pow2: bool):
    """x_ref [M, K] bf16 -> q_ref [K, M] e4m3 (x^T quantized along M), st_ref [M/128, K] f32
    (s^T). CTA (r, c): x rows r * 128 .. (one scale tile), K columns c * K / k_splits .. in
    steps of block_k; each step writes a [block_k, 128] tile of q."""
    tm, bk = q8.BLOCK, cfg.block_k
    n_steps = x_ref.shape[1] // bk // k_splits
    r = lax.axis_index("m")
    rows = pl.ds(pl.multiple_of(r * tm, tm), tm)
    step0 = lax.axis_index("k") * n_steps

    def scoped(x_s, q_s, s_s, ready):
        def load(i, slot):
            cols = pl.ds(pl.multiple_of((step0 + i) * bk, bk), bk)
            plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], x_s.at[slot], ready.at[slot])

        def compute(i, slot, oslot):
            del i
            for h in range(bk // WG_ROWS):
                part = slice(h * WG_ROWS, (h + 1) * WG_ROWS)
                # [128 rows of x, 64 columns] read as its transpose [64, 128]: one register row
                # per column of x, holding the 128 values that share a scale.
                xt = plgpu.load(x_s.at[slot].at[:, part].T, layout=plgpu.Layout.WGMMA)
                q, s = _quantize_tile(xt, pow2)
                q_s.at[oslot][part, :] = q
                s_s.at[oslot][0, part] = s

        def store(i, oslot):
            k0 = pl.multiple_of((step0 + i) * bk, bk)
            plgpu.copy_smem_to_gmem(q_s.at[oslot], q_ref.at[pl.ds(k0, bk), rows],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(s_s.at[oslot], st_ref.at[pl.ds(r, 1), pl.ds(k0, bk)])

        _stream(n_steps, cfg.stages, cfg.out_stages, ready, load, compute, store)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((cfg.stages, tm, bk), x_ref.dtype, transforms=mg.swizzled(bk, x_ref.dtype)),
        plgpu.SMEM((cfg.out_stages, bk, tm), q8.FP8, transforms=mg.swizzled(tm, q8.FP8)),
        plgpu.SMEM((cfg.out_stages, 1, bk), jnp.float32),
        plgpu.Barrier(num_arrivals=1, num_barriers=cfg.stages))


def _check_input(fn: str, x: jax.Array, cfg: QuantConfig, rows: int, k_multiple: int) -> None:
    """Every message names the tensor and the dimension (../shared/DESIGN.md convention 4)."""
    if x.ndim != 2:
        raise ValueError(f"{fn}: x must be 2-D [M, K], got shape {x.shape}")
    if jnp.dtype(x.dtype) not in KERNEL_DTYPES:
        raise ValueError(f"{fn}: x dtype {jnp.dtype(x.dtype)} is not supported; the kernel "
                         "takes bfloat16 (cast explicitly, or use fp8_quant's XLA quantizers)")
    m, k = x.shape
    if m == 0 or m % rows:
        raise ValueError(f"{fn}: x M (shape[0]) = {m} must be a positive multiple of {rows}; "
                         "pad it explicitly")
    if k == 0 or k % k_multiple:
        raise ValueError(f"{fn}: x K (shape[1]) = {k} must be a positive multiple of "
                         f"{k_multiple}; pad it explicitly")
    if cfg.k_splits is not None and (k // cfg.block_k) % cfg.k_splits:
        raise ValueError(f"{fn}: QuantConfig.k_splits = {cfg.k_splits} must divide the "
                         f"{k // cfg.block_k} steps of block_k = {cfg.block_k} along x K "
                         f"(shape[1]) = {k}")
    if cfg.smem_bytes(rows) > mg.PIPELINED_SMEM_BYTES:
        raise ValueError(f"{fn}: {cfg} needs {cfg.smem_bytes(rows)} bytes of shared memory, "
                         f"more than {mg.PIPELINED_SMEM_BYTES}; lower stages or the blocks")


def _launch_quantizer(body, x, out_shapes, rows: int, cfg: QuantConfig, pow2: bool, interpret):
    m, k = x.shape
    k_steps = k // cfg.block_k
    splits = cfg.k_splits or default_k_splits(m // rows, k_steps)
    return _launch_shared(x, body=body, out_shapes=tuple(out_shapes), rows=rows, cfg=cfg,
                          splits=splits, pow2=bool(pow2), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("body", "out_shapes", "rows", "cfg", "splits",
                                             "pow2", "interpret"))
def _launch_shared(x, *, body, out_shapes, rows, cfg, splits, pow2, interpret):
    """The launch under a jit keyed by the kernel's statics, so that equal calls share one
    lowered function and one compiled kernel, as `_mosaic.launch_shared` does for the
    persistent kernels (docs/kernels.md, "Shared launches")."""
    run = plgpu.kernel(
        functools.partial(body, cfg=cfg, k_splits=splits, pow2=pow2),
        out_type=tuple(jax.ShapeDtypeStruct(s, d) for s, d in out_shapes),
        grid=(x.shape[0] // rows, splits), grid_names=("m", "k"),
        interpret=mg.interpret_params(interpret))
    return run(x)


def quantize_rows_kernel(x: jax.Array, *, pow2: bool = False, interpret=False,
                         config: QuantConfig | None = None,
                         transposed_scales: bool = False) -> tuple[jax.Array, jax.Array]:
    """`fp8_quant.quantize_rows` for a bf16 x [M, K] in one pass: (q [M, K] e4m3, s [M, K/128]
    f32), bit-identical. `transposed_scales`: return s^T [K/128, M] (the kernel's layout).
    M must be a multiple of config.block_m (64), K of 128 and of config.block_k."""
    cfg = config or ROWS_CONFIG
    if cfg.block_k % q8.BLOCK:
        raise ValueError(f"quantize_rows_kernel: QuantConfig.block_k = {cfg.block_k} must be "
                         f"a multiple of {q8.BLOCK} (one scale per 128 columns)")
    _check_input("quantize_rows_kernel", x, cfg, cfg.block_m, cfg.block_k)
    m, k = x.shape
    q, st = _launch_quantizer(_rows_body, x,
                              (((m, k), q8.FP8), ((k // q8.BLOCK, m), jnp.float32)),
                              cfg.block_m, cfg, pow2, interpret)
    return q, (st if transposed_scales else st.T)


def quantize_cols_kernel(x: jax.Array, *, pow2: bool = False, interpret=False,
                         config: QuantConfig | None = None,
                         transposed_scales: bool = False) -> tuple[jax.Array, jax.Array]:
    """`fp8_quant.quantize_cols` for a bf16 x [M, K] in one pass: (q [K, M] e4m3, s [K, M/128]
    f32), x^T in 1 x 128 tiles along M, bit-identical. `transposed_scales`: return s^T
    [M/128, K] (the kernel's layout, what fp8_gemm.gemm_kernel reads for this operand).
    M must be a multiple of 128, K of config.block_k (64). config.block_m is not used (the
    kernel's row block is the 128-row scale tile)."""
    cfg = config or COLS_CONFIG
    _check_input("quantize_cols_kernel", x, cfg, q8.BLOCK, cfg.block_k)
    m, k = x.shape
    q, st = _launch_quantizer(_cols_body, x,
                              (((k, m), q8.FP8), ((m // q8.BLOCK, k), jnp.float32)),
                              q8.BLOCK, cfg, pow2, interpret)
    return q, (st if transposed_scales else st.T)


# --------------------------------------------------------------------------------------------
# python -m pallas_kernels.fp8_quant_kernel: the self-check, and the tuning sweep (--sweep)
# (the side-by-side with XLA's quantizers is experiments/bench_fp8_gemm.py --quant)
# --------------------------------------------------------------------------------------------

SWEEP = {
    "rows": (ROWS_CONFIG, QuantConfig(stages=3), QuantConfig(stages=5),
             QuantConfig(out_stages=1), QuantConfig(k_splits=1),
             QuantConfig(block_k=256, stages=3), QuantConfig(block_m=128, stages=3)),
    "cols": (COLS_CONFIG, dataclasses.replace(COLS_CONFIG, stages=3),
             dataclasses.replace(COLS_CONFIG, stages=5),
             dataclasses.replace(COLS_CONFIG, out_stages=1),
             dataclasses.replace(COLS_CONFIG, k_splits=1),
             dataclasses.replace(COLS_CONFIG, block_k=128, stages=3)),
}


def sweep(argv=None) -> list[dict]:
    """Per shape, every config of `SWEEP` for both kernels (scales in the kernel's transposed
    layout: the kernel alone): GB/s (bf16 in + e4m3 out + f32 scales over CUPTI kernel time,
    median, L2 flushed: pallas_kernels/timing.py), the fraction of a bf16 copy's GB/s (x + 1)
    measured in the same run, and whether q and s are bit-identical to fp8_quant's.

    python -m pallas_kernels.fp8_quant_kernel --sweep [--shapes 8192x7168 16384x2048] [--json PATH]
    python -m pallas_kernels.fp8_quant_kernel --sweep --interpret --shapes 128x256 --iterations 1
        (a CPU smoke run in GPU interpret mode; times meaningless)
    """
    import argparse
    import json
    import pathlib

    from pallas_kernels import timing

    ap = argparse.ArgumentParser(description="FP8 quantizer kernel config sweep")
    ap.add_argument("--shapes", nargs="*", default=["8192x7168", "16384x2048"])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    kernels = {"rows": (quantize_rows_kernel, q8.quantize_rows),
               "cols": (quantize_cols_kernel, q8.quantize_cols)}

    def bits(a):
        return lax.bitcast_convert_type(a, jnp.uint8 if a.dtype == q8.FP8 else jnp.uint32)

    records = []
    for text in args.shapes:
        m, k = (int(v) for v in text.lower().split("x"))
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
        nbytes = m * k * 3 + m * k // q8.BLOCK * 4
        copy = 4 * m * k / timing.kernel_ms(lambda v: v + 1, (x,), args.iterations,
                                            interpret=args.interpret) / 1e6
        for name, (kernel, reference) in kernels.items():
            q_ref, s_ref = jax.jit(reference)(x)
            for cfg in SWEEP[name]:
                rec = {"shape": [m, k], "kernel": name, "config": dataclasses.asdict(cfg)}
                fn = functools.partial(kernel, config=cfg, interpret=args.interpret,
                                       transposed_scales=True)
                try:
                    ms = timing.kernel_ms(fn, (x,), args.iterations, interpret=args.interpret)
                    q, s_t = jax.jit(fn)(x)
                    gbps = nbytes / ms / 1e6
                    rec.update(ms=ms, gbps=gbps, fraction_of_copy=gbps / copy,
                               matches_xla=bool(jnp.array_equal(bits(q), bits(q_ref))
                                                and jnp.array_equal(bits(s_t.T), bits(s_ref))))
                except Exception as e:  # noqa: BLE001 - a failing config is a result, said so
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                records.append(rec)
                c = cfg
                print(f"  {m}x{k} {name} {c.block_m}x{c.block_k} stages {c.stages}+{c.out_stages} "
                      f"k_splits {c.k_splits}: " + (rec.get("error") or (
                          f"{rec['gbps']:8.1f} GB/s, {rec['fraction_of_copy']:6.1%} of copy "
                          f"({copy:.1f} GB/s), matches_xla {rec['matches_xla']}")), flush=True)
    if args.json:
        meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                "interpret": args.interpret, "iterations": args.iterations}
        pathlib.Path(args.json).write_text(json.dumps([{"run": meta}] + records, indent=1) + "\n")
    return records


def _bit_mismatches(got, want) -> float:
    """Values of (q, s) whose bits differ from the reference's (0: bit-identical)."""
    (q, s), (q_ref, s_ref) = got, want
    if q.shape != q_ref.shape or s.shape != s_ref.shape:
        raise ValueError(f"shapes {q.shape}, {s.shape} != {q_ref.shape}, {s_ref.shape}")
    return float(np.sum(np.asarray(q).view(np.uint8) != np.asarray(q_ref).view(np.uint8))
                 + np.sum(np.asarray(s).view(np.uint32) != np.asarray(s_ref).view(np.uint32)))


def _checks(interpret) -> list:
    """Both kernels against fp8_quant's XLA quantizers, counting differing values (must be 0):
    tiles whose magnitudes differ by up to 2^50 (some land in e4m3's subnormals), one all-zero
    128 x 128 block and scattered zeros; with and without pow2, the default configs and one
    that streams several steps per CTA through fewer stages."""
    def x_of(m, k, seed):
        kx, kz = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(kx, (m, k), jnp.float32)
        x = x * jnp.exp2((jnp.arange(m) * 7 % 11) * 3.0 - 15.0)[:, None]
        x = x * jnp.exp2((jnp.arange(k) // 64 % 5) * 5.0 - 10.0)[None, :]
        x = jnp.where(jax.random.bernoulli(kz, 0.02, (m, k)), 0.0, x.at[:128, :128].set(0.0))
        return x.astype(jnp.bfloat16)

    def case(kernel, reference, m, k, pow2=False, config=None):
        x = x_of(m, k, seed=m + k + pow2)
        got = jax.jit(lambda v: kernel(v, pow2=pow2, config=config, interpret=interpret))(x)
        return _bit_mismatches(got, jax.jit(lambda v: reference(v, pow2=pow2))(x))

    rows = functools.partial(case, quantize_rows_kernel, q8.quantize_rows)
    cols = functools.partial(case, quantize_cols_kernel, q8.quantize_cols)
    streamed_rows = QuantConfig(k_splits=1, stages=2, out_stages=1)
    streamed_cols = QuantConfig(block_m=q8.BLOCK, block_k=64, k_splits=1, stages=2, out_stages=1)
    return [
        mg.Check("quantize_rows_kernel", "256x384", lambda: rows(256, 384), 0),
        mg.Check("quantize_rows_kernel pow2", "256x384", lambda: rows(256, 384, True), 0),
        mg.Check("quantize_rows_kernel streamed", "128x768",
                 lambda: rows(128, 768, config=streamed_rows), 0),
        mg.Check("quantize_cols_kernel", "256x384", lambda: cols(256, 384), 0),
        mg.Check("quantize_cols_kernel pow2", "256x384", lambda: cols(256, 384, True), 0),
        mg.Check("quantize_cols_kernel streamed", "128x512",
                 lambda: cols(128, 512, config=streamed_cols), 0),
    ]


def main(argv=None) -> int:
    """python -m pallas_kernels.fp8_quant_kernel [--interpret]
        both kernels against fp8_quant's quantizers, bit for bit (natively on a Hopper GPU, else
        in GPU interpret mode); prints a table and exits non-zero if a check fails.
    python -m pallas_kernels.fp8_quant_kernel --sweep [sweep's options]: `sweep`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in argv:
        argv.remove("--sweep")
        sweep(argv)
        return 0
    import argparse

    ap = argparse.ArgumentParser(description="FP8 quantizer kernels: self-check (or --sweep)")
    ap.add_argument("--interpret", action="store_true",
                    help="check in GPU interpret mode even on a Hopper GPU")
    args = ap.parse_args(argv)
    interpret, where = mg.mode(args.interpret)
    return mg.run_checks(f"pallas_kernels.fp8_quant_kernel ({where})", _checks(interpret))


if __name__ == "__main__":
    raise SystemExit(main())
