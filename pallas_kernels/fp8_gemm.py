"""Block-scaled FP8 GEMMs, DeepSeek-V3's recipe ([PAPER] §3.3; ../shared/reference/kernels.md §2).

Every product here is y = a @ b^T with both operands K-major (Hopper's FP8 wgmma takes no other
layout), e4m3 data and float32 scales over tiles of the contraction axis K:

  gemm_1d2d   a [M, K] in 1 x 128 tiles (s_a [M, K/128]), b [N, K] in 128 x 128 blocks
              (s_b [N/128, K/128]). The forward pass (a = activations, b = weight) and the data
              gradient (a = dy, b = the transposed weight, `fp8_quant.transpose_blocks`).
  gemm_1d1d   both in 1 x 128 tiles (s_b [N, K/128]). The weight gradient, where K is the token
              axis: a = x^T and b = dy^T (`fp8_quant.rows_to_cols` of the cached FP8 x,
              `quantize_cols` of dy), so dw comes out in the weight's [in, out] layout.
  grouped_gemm_1d2d, grouped_wgrad_1d1d
              the MoE experts in grouped_matmul's padded-group layout: per-expert weights and
              block scales (forward, data gradient), and the weight gradient contracting over
              each expert's own 128-token tiles.

The accumulation is float32, "promoted" every 128 of K: each K-block's partial product is scaled
by s_a[m, kb] * s_b[n | n-block, kb] and added to the float32 result (Hopper's FP8 tensor cores
keep about 14 bits, so accumulating a long K inside them loses precision; the V3 report §3.3.2).

`impl` picks the implementation: "xla" dequantizes and multiplies in float32 (the reference:
exact products of the quantized values, any backend), "pallas" our Mosaic GPU kernel (Hopper).

**The kernel** (`gemm_kernel`) is persistent (one CTA per SM looping over work items) and
warp-specialized, on the launch, K pipeline and epilogue of `pallas_kernels._mosaic`: a TMA
warpgroup streams, per stage of one or two K-blocks of 128 (`Fp8Config.overlap`), the a tile
[block_m, 128 kb], the b tile [block_n, 128 kb] (e4m3, 128-byte swizzle, both K-major) and their
scale rows; two compute warpgroups each own half of the tile's rows (`wg_split` "rows",
DeepGEMM's split) or of its columns ("cols"). Per K-block a warpgroup runs the FP8 wgmma into a
fresh fp32 accumulator and adds it, times s_a[row] * s_b[col], to its carried fp32 result
(`promoting_pipeline`); with two blocks a stage both wgmmas are issued first and the first block
is promoted while the second runs. 128 x 128 weight blocks are passed as one scale per column
(the block scale repeated: exact), so the data-gradient and weight-gradient scalings use the
same kernel; with weight blocks a warpgroup's columns share one scale, which is folded into the
row scales (one FMA per element).

For a dense GEMM the default (`default_config`) also takes: clusters of two CTAs on
neighbouring m tiles whose shared b tile TMA fetches once and multicasts into both CTAs' SMEM
(`Fp8Config.multicast`: the 128 x 128 tile's operand traffic, not the promotion's arithmetic,
bounds this kernel); work items in groups of GROUP_M rows (`Fp8Config.group_m`), so the CTAs
running at one time share a few rows of a and columns of b in L2; and, where the output tiles
fill at most half the SMs (small M), K cut into ranges that are work items of their own
(`Fp8Config.split_k`).

`python -m pallas_kernels.fp8_gemm` checks the kernels against the "xla" reference (interpret
mode without a Hopper GPU). Tuning choices, what bounds the kernel, and the measurements:
docs/kernels.md#fp8-gemm; the benchmark is experiments/bench_fp8_gemm.py, the measured and
rejected variants experiments/lab/fp8_gemm_variants.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic as mg
from pallas_kernels import fp8_quant as q8

IMPLS = ("xla", "pallas")
OVERLAPS = ("none", "stage")
MULTICASTS = ("none", "a", "b")
MAX_SPLIT_K = 8
# split-K's shortest K range: ranges of 1792 were measured to win, ranges of 1024 to lose
# (docs/kernels.md#fp8-gemm, "Split-K")
MIN_SPLIT_RANGE = 1792
# rows of work items per group in a dense GEMM's order (`Fp8Config.group_m`): 8 was the best,
# or within 1% of it, at every shape measured against 4, 16 and row after row (1)
GROUP_M = 8


def check_operands(a, s_a, b, s_b, b_scale: str) -> None:
    """Raises a ValueError naming the operand unless a [M, K] and b [N, K] are e4m3 with float32
    scales of the layout `b_scale` says ("blocks": 128 x 128 blocks of b, "rows": 1 x 128
    tiles): what every implementation of gemm_1d2d / gemm_1d1d takes (fp8_triton too)."""
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.dtype != q8.FP8:
            raise ValueError(f"fp8 gemm: {name} must be a 2-D float8_e4m3fn array, got "
                             f"{x.dtype}{list(x.shape)}")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"fp8 gemm: a is [M={m}, K={k}] but b is [N={n}, K={kb}]: K must match")
    if k % q8.BLOCK:
        raise ValueError(f"fp8 gemm: K={k} must be a multiple of {q8.BLOCK}")
    want_b = (n // q8.BLOCK, k // q8.BLOCK) if b_scale == "blocks" else (n, k // q8.BLOCK)
    if b_scale == "blocks" and n % q8.BLOCK:
        raise ValueError(f"fp8 gemm: N={n} must be a multiple of {q8.BLOCK} (128 x 128 weight blocks)")
    for name, s, want in (("s_a", s_a, (m, k // q8.BLOCK)), ("s_b", s_b, want_b)):
        if s.shape != want or s.dtype != jnp.float32:
            raise ValueError(f"fp8 gemm: {name} must be float32{list(want)}, got "
                             f"{s.dtype}{list(s.shape)}")


def _reference(a, s_a, b_deq, out_dtype):
    a_deq = q8.dequantize_rows(a, s_a)
    y = jnp.einsum("mk,nk->mn", a_deq, b_deq, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def gemm_1d2d(a: jax.Array, s_a: jax.Array, b: jax.Array, s_b: jax.Array, *,
              out_dtype=jnp.bfloat16, impl: str = "xla", interpret: bool = False) -> jax.Array:
    """y [M, N] = dequant(a) @ dequant(b)^T; a 1 x 128-scaled, b 128 x 128-scaled."""
    check_operands(a, s_a, b, s_b, "blocks")
    if impl == "xla":
        return _reference(a, s_a, q8.dequantize_blocks(b, s_b), out_dtype)
    if impl == "pallas":
        return _pallas_gemm(a, s_a, b, s_b, "blocks", out_dtype, interpret)
    raise ValueError(f"fp8 gemm impl={impl!r} is not one of {IMPLS}")


def gemm_1d1d(a: jax.Array, s_a: jax.Array, b: jax.Array, s_b: jax.Array, *,
              out_dtype=jnp.float32, impl: str = "xla", interpret: bool = False) -> jax.Array:
    """y [M, N] = dequant(a) @ dequant(b)^T; both 1 x 128-scaled along K (the weight gradient)."""
    check_operands(a, s_a, b, s_b, "rows")
    if impl == "xla":
        return _reference(a, s_a, q8.dequantize_rows(b, s_b), out_dtype)
    if impl == "pallas":
        return _pallas_gemm(a, s_a, b, s_b, "rows", out_dtype, interpret)
    raise ValueError(f"fp8 gemm impl={impl!r} is not one of {IMPLS}")


# --------------------------------------------------------------------------------------------
# The Mosaic GPU kernel
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Config:
    """Tiles of the FP8 kernel. block_k is the scale tile (128) and is not a choice.

    block_m: rows of a CTA's output tile.
    block_n: columns of a CTA's output tile.
    wg_split: how the two compute warpgroups share the tile. "cols": each takes all block_m
      rows and half of the columns (block_n a multiple of 128); "rows": each takes half of the
      rows (block_m a multiple of 128) and all block_n columns (a multiple of 64), DeepGEMM's
      split. Per K-step of 32 a warpgroup's wgmmas read its A rows and B columns from SMEM:
      at 128 x 128 tiles "cols" issues two m64n64 wgmmas (4 + 4 KiB for 262,144 MACs) and
      "rows" one m64n128 (2 + 4 KiB for as many), and FP8 tensor cores at full rate consume
      4,096 MACs a cycle per SM against SMEM's 128 bytes a cycle: 8 KiB lasts 64 cycles of
      tensor-core work at full rate only when nothing else reads SMEM.
    max_concurrent_steps: SMEM stages of the K pipeline (a stage: a [block_m, 128 kb] + b
      [block_n, 128 kb] e4m3 tile and their kb scale rows, kb = 2 with overlap "stage", else 1).
    chain_tiles: let the TMA warpgroup run on into a CTA's next tile (see grouped_matmul).
    splits: 2 cuts a warpgroup's result into two row halves with their own wgmmas in
      flight: the first half is promoted while the second's wgmma still runs (the overlap of
      tensor-core and CUDA-core work the V3 report describes, §3.3.2). Each half is 64 rows or
      more.
    overlap: "none" or "stage": a stage holds two K-blocks of 128, both wgmmas are issued
      into two fresh accumulators and the first block is promoted while the second runs
      (`_promoting_mma`). K must then be a multiple of 256 and splits 1; the grouped weight
      gradient (per-expert token counts in 128s) does not take it.
    multicast: "none", "a" or "b": CTAs in clusters of two take neighbouring output tiles that
      share one operand tile, which TMA fetches from L2 once and multicasts into both CTAs'
      SMEM: "b", two m tiles of one n tile (the b tile shared; M / block_m must be even); "a",
      two n tiles of one m tile (N / block_n even). It halves that operand's L2 traffic, which
      bounds 128 x 128 tiles (docs/kernels.md#fp8-gemm). The scale rows are not multicast
      (they are 3% of the bytes). Dense GEMMs only (the grouped ones refuse it).
    split_k: S > 1 cuts K into S equal ranges, each a work item of its own (S times the work
      items: for small M, whose few output tiles leave most SMs idle, e.g. 17 tiles at 128 x
      2176 for 132 SMs); the kernel writes S float32 partial products [S, M, N] and XLA sums
      them in float32 and casts. K / S must be whole stages. Dense GEMMs only, no multicast.
      `default_config` takes it where the output tiles fill at most half the SMs and the
      ranges are long enough (`_split_k`).

    Registers bound the tile: a compute warpgroup holds its fp32 result and the K-block's fresh
    accumulator, block_m * block_n / 2 numbers each over 128 threads (either split), in at
    most 232 registers a thread (emit_pipeline_warp_specialized's share with 40 for the TMA
    warpgroup). 128 x 256 tiles need 256 and spill; 128 x 128 need 128, 128 x 192 192. With
    overlap "stage" it holds two fresh accumulators: 192 at 128 x 128, the largest share it
    accepts (a warpgroup's 64 x 128).

    group_m: the order of a dense GEMM's work items. 1: N minor (row of items after row), so
    the CTAs working at one time read one or two a tiles and, at 8192 x 8192, every b tile (64
    MiB of e4m3, more than the 50 MiB L2); G > 1: in groups of G rows of items, M minor within
    a group, so they read G rows of a and about (SMs / G) columns of b (the grouped order of
    DeepGEMM's scheduler and Triton's tutorials). `default_config` takes GROUP_M = 8 for the
    dense kernel.
    """
    block_m: int = 128
    block_n: int = 128
    max_concurrent_steps: int = 4
    chain_tiles: bool = True
    epilogue_slots: int = 2
    splits: int = 1
    wg_split: str = "rows"
    overlap: str = "none"
    multicast: str = "none"
    split_k: int = 1
    group_m: int = 1

    def __post_init__(self):
        if self.wg_split not in mg.WG_SPLITS:
            raise ValueError(f"Fp8Config.wg_split={self.wg_split!r} must be one of "
                             f"{mg.WG_SPLITS}")
        rows_split = self.wg_split == "rows"
        m_step, n_step = (128, 64) if rows_split else (64, 128)
        if self.block_m <= 0 or self.block_m % m_step:
            raise ValueError(f"Fp8Config.block_m={self.block_m} must be a positive multiple of "
                             f"{m_step} (wg_split={self.wg_split!r})")
        if self.block_n <= 0 or self.block_n % n_step:
            raise ValueError(f"Fp8Config.block_n={self.block_n} must be a positive multiple of "
                             f"{n_step} (wg_split={self.wg_split!r})")
        wg_rows = self.wg_tile()[0]
        if self.splits not in (1, 2) or wg_rows // self.splits < 64:
            raise ValueError(f"Fp8Config.splits={self.splits} must be 1 or 2, with a warpgroup's "
                             f"{wg_rows} rows / splits >= 64 (block_m={self.block_m}, "
                             f"wg_split={self.wg_split!r})")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"Fp8Config.overlap={self.overlap!r} must be one of {OVERLAPS}")
        if self.multicast not in MULTICASTS:
            raise ValueError(f"Fp8Config.multicast={self.multicast!r} must be one of {MULTICASTS}")
        if self.split_k < 1 or (self.split_k > 1 and self.multicast != "none"):
            raise ValueError(f"Fp8Config.split_k={self.split_k} must be >= 1, and 1 with "
                             f"multicast={self.multicast!r}")
        if self.group_m < 1:
            raise ValueError(f"Fp8Config.group_m={self.group_m} must be >= 1")
        if self.overlap != "none" and self.splits != 1:
            raise ValueError(f"Fp8Config.overlap={self.overlap!r} needs splits=1, got "
                             f"splits={self.splits}")
        if self.overlap != "none" and math.prod(self.wg_tile()) > 64 * 128:
            raise ValueError(f"Fp8Config.overlap={self.overlap!r}: a warpgroup's {self.wg_tile()} "
                             "share with its result and two accumulators needs more than 192 "
                             "registers a thread and would spill; use at most 64 x 128 a "
                             "warpgroup (128 x 128 tiles)")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"Fp8Config.max_concurrent_steps={self.max_concurrent_steps} must "
                             "be >= 2")
        if self.smem_bytes(4) > mg.PIPELINED_SMEM_BYTES:
            raise ValueError(f"Fp8Config: {self.smem_bytes(4)} bytes of shared memory needed, more "
                             f"than {mg.PIPELINED_SMEM_BYTES}; lower max_concurrent_steps or the "
                             "blocks")

    def wg_tile(self) -> tuple[int, int]:
        """(rows, columns) of one compute warpgroup's share of the output tile."""
        return mg.wg_share(self.wg_split, self.block_m, self.block_n)

    def wg_offsets(self, wg) -> tuple:
        """(first row, first column) of warpgroup `wg`'s share within the tile."""
        return mg.wg_offsets(self.wg_split, *self.wg_tile(), wg)

    def wg_part(self, tile_ref, wg):
        """Warpgroup `wg`'s share of an output tile ref [block_m, block_n]."""
        (rows, cols), (r0, c0) = self.wg_tile(), self.wg_offsets(wg)
        return tile_ref.at[pl.ds(r0, rows), pl.ds(c0, cols)]

    @property
    def k_blocks(self) -> int:
        """K-blocks of 128 per pipeline stage."""
        return 1 if self.overlap == "none" else 2

    @property
    def cluster(self) -> int:
        """CTAs per cluster: 2 with multicast, else 1."""
        return 1 if self.multicast == "none" else 2

    def smem_bytes(self, out_itemsize: int) -> int:
        # fp8 tiles + their f32 scale rows
        stage = (self.block_m + self.block_n) * (q8.BLOCK + 4) * self.k_blocks
        return self.max_concurrent_steps * stage + mg.epilogue_bytes(self.epilogue_slots)


def default_config(m: int, n: int, k: int | None = None, *, dense: bool = True,
                   sms: int = mg.DEFAULT_NUM_SMS) -> Fp8Config:
    """128 x 128 tiles (wider ones spill the compute warpgroups' registers: Fp8Config's note) and
    the "rows" warpgroup split; where K is a multiple of 256 (k given), stages of two K-blocks
    with the first block's promotion over the second's wgmma (`overlap="stage"`), 3 stages and
    one epilogue slot (what fits the SMEM); for a dense GEMM (`dense`) whose output tiles fill
    at most half the `sms`, K cut into 2, 4 or 8 ranges of at least MIN_SPLIT_RANGE
    (`split_k`, `_split_k`), else work items in groups of GROUP_M rows (`group_m`) and, where
    M is an even number of 128-row tiles, clusters of two CTAs on neighbouring m tiles with the
    b tile multicast (`multicast="b"`); otherwise 4 one-block stages, so that K's 128-blocks
    come in whole rounds of stages for DeepSeek-V3's K (multiples of 512) and the TMA warpgroup
    runs on into a CTA's next tile (`chain_tiles`). Each choice won side by side on an H200
    (docs/kernels.md#fp8-gemm).
    The grouped kernels (`dense=False`) take none of multicast, split-K and groups of rows.
    `sms`: the device's streaming multiprocessors (`gemm_kernel` passes the device's count)."""
    if k is not None and k % (2 * q8.BLOCK) == 0:
        splits = _split_k(m, n, k, sms) if dense else 1
        pair = (dense and splits == 1 and m % q8.BLOCK == 0 and (m // q8.BLOCK) % 2 == 0)
        return Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1,
                         multicast="b" if pair else "none", split_k=splits,
                         group_m=GROUP_M if dense and splits == 1 else 1)
    return Fp8Config()


def _split_k(m: int, n: int, k: int, sms: int) -> int:
    """K ranges for a dense GEMM with two-block stages: doubled (up to MAX_SPLIT_K) while the
    work items, output tiles times ranges, still fit the SMs once over and each range is whole
    stages of at least MIN_SPLIT_RANGE. Few output tiles (small M: 17 of them at 128 x 2112)
    otherwise leave most SMs idle; short ranges do not repay the float32 partials and their
    sum."""
    tiles = -(-m // q8.BLOCK) * -(-n // q8.BLOCK)
    s = 1
    while (2 * s <= MAX_SPLIT_K and tiles * 2 * s <= sms
           and k % (2 * s * 2 * q8.BLOCK) == 0 and k // (2 * s) >= MIN_SPLIT_RANGE):
        s *= 2
    return s


def _specs(cfg: Fp8Config) -> list:
    """`cfg.k_blocks` K-blocks of 128 per pipeline step: a [bm, 128 kb], b [bn, 128 kb] (e4m3,
    128-byte swizzle: one row of a K-block is exactly 128 bytes) and the scale rows [kb, bm],
    [kb, bn] (f32, from the transposed scale arrays so each row is contiguous for TMA)."""
    kb = cfg.k_blocks
    bm, bn, bk = cfg.block_m, cfg.block_n, q8.BLOCK * kb
    fp8 = jnp.dtype(q8.FP8)

    def shared(operand):  # the operand tile both CTAs of a cluster read (`Fp8Config.multicast`)
        return ("cluster",) if cfg.multicast == operand else None
    return [
        plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=mg.swizzled(bk, fp8),
                        collective_axes=shared("a")),
        plgpu.BlockSpec((bn, bk), lambda k: (0, k), transforms=mg.swizzled(bk, fp8),
                        collective_axes=shared("b")),
        plgpu.BlockSpec((kb, bm), lambda k: (k, 0)),
        plgpu.BlockSpec((kb, bn), lambda k: (k, 0)),
    ]


def _promoting_mma(cfg: Fp8Config, b_blocks: bool):
    """Pipeline step of one compute warpgroup over one stage: each FP8 wgmma runs into a fresh
    fp32 accumulator, which is then scaled by s_a[row] * s_b[col] and added to the carried fp32
    result (the V3 report's promotion every 128 of K; kernels.md §2.3 DeepGEMM).

    The carry is a tuple of `cfg.splits` row blocks of the warpgroup's result, and a stage holds
    `cfg.k_blocks` K-blocks of 128. One wgmma per (K-block, row block) is issued first, each
    into its own accumulator; they are promoted in issue order, each once only the wgmmas issued
    after it are still in flight (with weight blocks its scales are read before that wait), so
    every promotion but the last overlaps tensor-core work (the overlap of tensor-core and
    CUDA-core work the V3 report asks of its kernels, §3.3.2).
    Fp8Config allows two accumulators at most (splits=2 or overlap "stage"): registers.
    `b_blocks`: b's scales are 128 x 128 blocks and this warpgroup's columns lie in one block
    (`b_scalar_ok`), so the column scale is one number, folded into the row scales: one FMA per
    element instead of a multiply and an FMA."""
    wg_rows, wg_cols = cfg.wg_tile()
    rows = wg_rows // cfg.splits
    pairs = [(kb, j) for kb in range(cfg.k_blocks) for j in range(cfg.splits)]

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, carry):
        wg = lax.axis_index("wg")
        r0, c0 = cfg.wg_offsets(wg)
        cols = pl.ds(c0, wg_cols)

        def promote_all(accs):
            out = list(carry)
            for i, (acc, (kb, j)) in enumerate(zip(accs, pairs)):
                scale = functools.partial(promotion_scale, sa_smem.at[kb], sb_smem.at[kb],
                                          pl.ds(r0 + j * rows, rows), c0, cols, out[j].shape,
                                          b_blocks)
                # with weight blocks the scales (two numbers a thread) are read from SMEM
                # before the wait, so the load's latency passes while the wgmma runs.
                # Per-column scales (the weight gradient: 32 numbers a thread) held across the
                # wait cost registers and made that kernel slower, so they are read after it
                # (docs/kernels.md#fp8-gemm, "Scales read before the wait")
                early = scale() if b_blocks else None
                part = plgpu.wgmma_accumulator_load(acc, wait_n=len(pairs) - 1 - i)
                out[j] = out[j] + part * (early if b_blocks else scale())
            return tuple(out)

        def issue_from(i, accs):
            # each accumulator's scope opens just before its wgmma, so the second is zeroed
            # while the first wgmma runs (measured neutral against zeroing both first; kept as
            # the schedule every later measurement used)
            if i == len(pairs):
                return promote_all(accs)

            def scope(acc):
                kb, j = pairs[i]
                blk = pl.ds(kb * q8.BLOCK, q8.BLOCK)
                plgpu.wgmma(acc, a_smem.at[pl.ds(r0 + j * rows, rows), blk],
                            b_smem.at[cols, blk].T)
                return issue_from(i + 1, accs + (acc,))
            return pl.run_scoped(scope, plgpu.ACC((rows, wg_cols), jnp.float32))

        return issue_from(0, ())
    return mma


def promotion_scale(sa_row, sb_row, rows, c0, cols, shape, b_blocks: bool):
    """s_a[row] * s_b[col] over a warpgroup's [rows, cols] share of one K-block, from that
    block's scale rows in SMEM (sa_row [bm], sb_row [bn]); with `b_blocks` the column scale is
    the one number at c0."""
    sa = plgpu.load(sa_row.at[rows], layout=plgpu.Layout.WGMMA.reduce(1))
    if b_blocks:
        return lax.broadcast_in_dim(sa * sb_row[c0], shape, [0])
    sb = plgpu.load(sb_row.at[cols], layout=plgpu.Layout.WGMMA.reduce(0))
    return lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1])


def b_scalar_ok(cfg: Fp8Config) -> bool:
    """A compute warpgroup's columns (at a multiple of their width) lie within one 128-column
    weight block."""
    return q8.BLOCK % cfg.wg_tile()[1] == 0


def promoting_pipeline(cfg: Fp8Config, in_specs, grid, store_to, state=None, *,
                       b_blocks: bool = False):
    """The warp-specialized K pipeline of every FP8 kernel here (`_mosaic.warp_specialized`):
    each compute warpgroup carries its zero-initialised fp32 result (`cfg.wg_tile()`, in
    `cfg.splits` row blocks) through `_promoting_mma` and hands the blocks to
    `store_to(block, row0)` (the epilogue, row0 within the warpgroup's share); `state` chains a
    CTA's consecutive tiles (`_mosaic.run_tile`). `dense_body` takes another pipeline of this
    signature in its place (experiments/lab/fp8_gemm_variants.py)."""
    wg_rows, wg_cols = cfg.wg_tile()
    rows = wg_rows // cfg.splits

    def context(run):
        zeros = tuple(plgpu.layout_cast(jnp.zeros((rows, wg_cols), jnp.float32),
                                        plgpu.Layout.WGMMA) for _ in range(cfg.splits))
        for j, block in enumerate(run(zeros)):
            store_to(block, j * rows)
    return mg.warp_specialized(_promoting_mma(cfg, b_blocks and b_scalar_ok(cfg)), context,
                               in_specs, grid, cfg.max_concurrent_steps, state)


def _k_steps(cfg: Fp8Config, k: int) -> int:
    """Pipeline steps over K: K / (128 k_blocks), which must be whole."""
    per_step = q8.BLOCK * cfg.k_blocks
    if k % per_step:
        raise ValueError(f"fp8 gemm (pallas): K = {k} must be a multiple of {per_step} with "
                         f"Fp8Config.overlap={cfg.overlap!r} (K-blocks of 128 a stage: "
                         f"{cfg.k_blocks})")
    return k // per_step


def _store(slots, dst):
    """`store_to` for `promoting_pipeline`: row block `block` at row `row0` of the
    warpgroup's output tile `dst`."""
    def store_to(block, row0):
        mg.store_tile(block, slots, dst.at[pl.ds(row0, block.shape[0])])
    return store_to


def _work_items(cfg: Fp8Config, m_tiles: int, n_tiles: int) -> int:
    """Work items of the persistent loop: output tiles, or pairs of them (one per CTA of a
    cluster) with multicast, times `cfg.split_k` K ranges."""
    return m_tiles * n_tiles // cfg.cluster * cfg.split_k


def _item_of(lin, m_items: int, n_items: int, group: int):
    """(row, column) of work item `lin` in the [m_items, n_items] grid of items: N minor, or with
    group > 1 in groups of `group` rows, M minor within a group (the last group may be
    shorter). `Fp8Config.group_m`."""
    if group == 1:
        return lax.div(lin, jnp.int32(n_items)), lax.rem(lin, jnp.int32(n_items))
    per_group = jnp.int32(group * n_items)
    first = lax.div(lin, per_group) * group
    rows = jnp.minimum(jnp.int32(group), m_items - first)
    r = lax.rem(lin, per_group)
    return first + lax.rem(r, rows), lax.div(r, rows)


def _tile_of(cfg: Fp8Config, lin, m_tiles: int, n_tiles: int):
    """(m tile, n tile) of work item `lin` on this CTA, in `cfg.group_m`'s order (`_item_of`).
    With multicast the two CTAs of a cluster take neighbouring m tiles ("b") or n tiles ("a")
    of one item."""
    if cfg.multicast == "none":
        return _item_of(lin, m_tiles, n_tiles, cfg.group_m)
    cta = lax.axis_index("cluster")
    if cfg.multicast == "b":
        mi, ni = _item_of(lin, m_tiles // 2, n_tiles, cfg.group_m)
        return 2 * mi + cta, ni
    mi, ni = _item_of(lin, m_tiles, n_tiles // 2, cfg.group_m)
    return mi, 2 * ni + cta


def dense_body(a_ref, b_ref, sa_ref, sb_ref, y_ref, *, cfg: Fp8Config, b_blocks: bool,
               pipeline=promoting_pipeline):
    """The dense kernel's body (`gemm_kernel` launches it with `_mosaic.launch_shared`):
    a_ref [M, K], b_ref [N, K] (e4m3); sa_ref [K/128, M], sb_ref [K/128, N] (f32); y_ref
    [split_k * M, N]. Persistent: each CTA (each cluster, with multicast) loops over work items
    (`_work_items`, `_tile_of`). `pipeline`: the K pipeline, `promoting_pipeline` or another of
    its signature (the lab's variants)."""
    bm, bn, splits = cfg.block_m, cfg.block_n, cfg.split_k
    m = a_ref.shape[0]  # y_ref is [split_k * M, N]: one partial product per K range
    m_tiles, n_tiles = m // bm, y_ref.shape[1] // bn
    k_part = a_ref.shape[1] // splits
    k_steps = _k_steps(cfg, k_part)
    chain = cfg.chain_tiles and k_steps % min(cfg.max_concurrent_steps, k_steps) == 0
    in_specs = _specs(cfg)

    def make(store_to, state=None):
        return pipeline(cfg, in_specs, (k_steps,), store_to, state, b_blocks=b_blocks)

    def scoped(allocs, epi):
        wg = lax.axis_index("wg")
        num_sms = lax.axis_size("sm")  # CTAs, or clusters with multicast
        total = _work_items(cfg, m_tiles, n_tiles)
        per_split = total // splits

        @plgpu.nd_loop((total,), collective_axes="sm")
        def _tile(info):
            lin = info.index[0]
            if splits == 1:
                item, ks, kbs, out_row0 = lin, slice(None), slice(None), 0
            else:  # K range major: CTAs working at one time read the same K range of a
                part = lax.div(lin, jnp.int32(per_split))
                item = lax.rem(lin, jnp.int32(per_split))
                ks = pl.ds(pl.multiple_of(part * k_part, q8.BLOCK), k_part)
                kbs = pl.ds(part * (k_part // q8.BLOCK), k_part // q8.BLOCK)
                out_row0 = part * m
            m_idx, n_idx = _tile_of(cfg, item, m_tiles, n_tiles)
            rows = pl.ds(pl.multiple_of(m_idx * bm, bm), bm)
            cols = pl.ds(pl.multiple_of(n_idx * bn, bn), bn)
            out_rows = rows if splits == 1 else pl.ds(
                pl.multiple_of(out_row0 + m_idx * bm, bm), bm)
            y_tile = cfg.wg_part(y_ref.at[out_rows, cols], wg)
            store = _store(epi.at[wg], y_tile)
            mg.run_tile(lambda state=None: make(store, state),
                        (a_ref.at[rows, ks], b_ref.at[cols, ks], sa_ref.at[kbs, rows],
                         sb_ref.at[kbs, cols]),
                        allocs, chain=chain, first=info.local_index == 0,
                        last=lin + num_sms >= total)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    first_k, first_kb = ((slice(None), slice(None)) if splits == 1 else
                         (pl.ds(0, k_part), pl.ds(0, k_part // q8.BLOCK)))
    allocs = make(None).get_allocations(
        a_ref.at[pl.ds(0, bm), first_k], b_ref.at[pl.ds(0, bn), first_k],
        sa_ref.at[first_kb, pl.ds(0, bm)], sb_ref.at[first_kb, pl.ds(0, bn)])
    pl.run_scoped(scoped, allocs=allocs, epi=mg.epilogue_smem(y_ref.dtype, cfg.epilogue_slots),
                  collective_axes="wg")


def kernel_scales(s_a: jax.Array, s_b: jax.Array, b_scale: str) -> tuple[jax.Array, jax.Array]:
    """The scale layout the kernel reads: s_a^T [K/128, M] and one scale per b row, transposed,
    [K/128, N] (so each K-block's scales are one contiguous row for TMA). 128 x 128 weight
    blocks become one scale per output column: the block's scale repeated over its 128 rows,
    exact, so one kernel serves both scalings. Quantizers can emit this layout directly."""
    s_b_rows = jnp.repeat(s_b, q8.BLOCK, axis=0) if b_scale == "blocks" else s_b
    return s_a.T, s_b_rows.T


def gemm_kernel(a: jax.Array, b: jax.Array, sa_t: jax.Array, sb_t: jax.Array, *,
                out_dtype=jnp.bfloat16, config: Fp8Config | None = None, b_blocks: bool = False,
                interpret: bool = False) -> jax.Array:
    """The Mosaic GPU kernel alone: a [M, K], b [N, K] e4m3; sa_t [K/128, M], sb_t [K/128, N]
    float32 (`kernel_scales`) -> a @ b^T [M, N] with fp32 promotion every 128 of K.

    b_blocks=True promises that sb_t's columns repeat in runs of 128 (`kernel_scales` of 128 x
    128 weight blocks); the kernel then reads one b scale per warpgroup and K-block."""
    (m, k), n = a.shape, b.shape[0]
    cfg = config or default_config(m, n, k, sms=mg.num_sms(interpret))
    check_shapes(cfg, m, n, k)
    for name, x, want in (("sa_t", sa_t, (k // q8.BLOCK, m)), ("sb_t", sb_t, (k // q8.BLOCK, n))):
        if x.shape != want:
            raise ValueError(f"fp8 gemm (pallas): {name} must be [K/128, rows] = {list(want)}, "
                             f"got {list(x.shape)}")
    splits = cfg.split_k  # > 1: float32 partial products [S, M, N], summed here
    y = mg.launch_shared(a, b, sa_t, sb_t, body=dense_body,
                         params=(("cfg", cfg), ("b_blocks", b_blocks)),
                         out_type=jax.ShapeDtypeStruct(
                             (splits * m, n), out_dtype if splits == 1 else jnp.float32),
                         interpret=interpret, cluster=cfg.cluster)
    return y if splits == 1 else y.reshape(splits, m, n).sum(axis=0).astype(out_dtype)


def check_shapes(cfg: Fp8Config, m: int, n: int, k: int) -> None:
    """Raises a ValueError naming the dimension if the dense kernel cannot run y [M, N] = a [M, K]
    @ b [N, K]^T with `cfg`: M and N whole tiles, each of the split_k K ranges whole stages, an
    even tile count along the axis multicast pairs. Checked before tracing; the benchmark asks
    it which configs a shape takes."""
    if k % cfg.split_k:
        raise ValueError(f"fp8 gemm (pallas): K = {k} must split into Fp8Config.split_k="
                         f"{cfg.split_k} equal ranges")
    _k_steps(cfg, k // cfg.split_k)
    for name, size, block, paired in (("M (a.shape[0])", m, cfg.block_m, "b"),
                                      ("N (b.shape[0])", n, cfg.block_n, "a")):
        if size % block:
            raise ValueError(f"fp8 gemm (pallas): {name} = {size} must be a multiple of the "
                             f"{block}-wide tile; pad it explicitly (the reference path takes any)")
        if cfg.multicast == paired and (size // block) % 2:
            raise ValueError(f"fp8 gemm (pallas): {name} = {size} is an odd number of "
                             f"{block}-wide tiles; Fp8Config.multicast={paired!r} pairs them")


def _pallas_gemm(a, s_a, b, s_b, b_scale, out_dtype, interpret, config: Fp8Config | None = None):
    sa_t, sb_t = kernel_scales(s_a, s_b, b_scale)
    return gemm_kernel(a, b, sa_t, sb_t, out_dtype=out_dtype, config=config,
                       b_blocks=b_scale == "blocks", interpret=interpret)


# --------------------------------------------------------------------------------------------
# Grouped (MoE experts): rows sorted by expert in the padded-group layout of grouped_matmul
# --------------------------------------------------------------------------------------------


def _dense_only(cfg: Fp8Config, what: str) -> None:
    if cfg.multicast != "none":
        raise ValueError(f"{what}: Fp8Config.multicast={cfg.multicast!r} is for the dense GEMMs "
                         "only (their work items pair neighbouring tiles); use 'none'")
    if cfg.split_k != 1:
        raise ValueError(f"{what}: Fp8Config.split_k={cfg.split_k} is for the dense GEMMs only; "
                         "use 1")
    if cfg.group_m != 1:
        raise ValueError(f"{what}: Fp8Config.group_m={cfg.group_m} is for the dense GEMMs only; "
                         "use 1")


def _check_grouped(a, s_a, b, s_b, plan) -> None:
    if b.ndim != 3 or b.dtype != q8.FP8:
        raise ValueError(f"grouped fp8 gemm: b must be float8_e4m3fn[E, N, K], got "
                         f"{b.dtype}{list(b.shape)}")
    e, n, k = b.shape
    if e != plan.num_groups:
        raise ValueError(f"grouped fp8 gemm: b has {e} experts (shape[0]) but the plan has "
                         f"{plan.num_groups} groups")
    if a.ndim != 2 or a.shape[0] != plan.padded_rows:
        raise ValueError(f"grouped fp8 gemm: a must be [padded_rows={plan.padded_rows}, K], got "
                         f"{list(a.shape)}")
    if plan.block_m % q8.BLOCK and q8.BLOCK % plan.block_m:
        raise ValueError(f"grouped fp8 gemm: the plan's block_m={plan.block_m} must divide or be "
                         f"a multiple of {q8.BLOCK}")
    check_operands(a, s_a, b[0], s_b[0] if s_b.ndim == 3 else s_b, "blocks")
    if s_b.shape != (e, n // q8.BLOCK, k // q8.BLOCK):
        raise ValueError(f"grouped fp8 gemm: s_b must be float32[{e}, {n // q8.BLOCK}, "
                         f"{k // q8.BLOCK}], got {list(s_b.shape)}")


def grouped_gemm_1d2d(a: jax.Array, s_a: jax.Array, b: jax.Array, s_b: jax.Array, plan, *,
                      out_dtype=jnp.bfloat16, impl: str = "xla", interpret: bool = False,
                      config: Fp8Config | None = None) -> jax.Array:
    """y_pad[rows of expert g] = dequant(a rows) @ dequant(b[g])^T in the padded-group layout
    (`grouped_matmul.pad_plan`; every M-tile belongs to one expert, unused tiles give zeros).

    a [padded_rows, K] e4m3 in 1 x 128 tiles (s_a [padded_rows, K/128]); b [E, N, K] e4m3 in
    128 x 128 blocks per expert (s_b [E, N/128, K/128]). The forward pass of the experts (b =
    the expert weights) and their data gradient (b = the transposed weights). The kernel's
    tiles are the plan's: its block_m must equal the kernel's (128 by default)."""
    _check_grouped(a, s_a, b, s_b, plan)
    if impl == "xla":
        t = plan.tile_group.shape[0]
        a_deq = q8.dequantize_rows(a, s_a).reshape(t, plan.block_m, -1)
        b_deq = q8.dequantize_blocks(b, s_b)[jnp.maximum(plan.tile_group, 0)]  # [T, N, K]
        y = jnp.einsum("tmk,tnk->tmn", a_deq, b_deq, precision=lax.Precision.HIGHEST)
        y = jnp.where((plan.tile_group >= 0)[:, None, None], y, 0.0)
        return y.reshape(plan.padded_rows, -1).astype(out_dtype)
    if impl != "pallas":
        raise ValueError(f"fp8 gemm impl={impl!r} is not one of {IMPLS}")
    cfg = config or default_config(plan.padded_rows, b.shape[1], a.shape[1], dense=False)
    _k_steps(cfg, a.shape[1])
    _dense_only(cfg, "grouped fp8 gemm (pallas)")
    if cfg.block_m != plan.block_m:
        raise ValueError(f"grouped fp8 gemm (pallas): the plan's block_m={plan.block_m} must equal "
                         f"the kernel's block_m={cfg.block_m}; build the plan with it")
    if b.shape[1] % cfg.block_n:
        raise ValueError(f"grouped fp8 gemm (pallas): N = {b.shape[1]} must be a multiple of "
                         f"block_n = {cfg.block_n}")
    sb_t = jnp.swapaxes(jnp.repeat(s_b, q8.BLOCK, axis=1), 1, 2)  # [E, K/128, N]
    return mg.launch_shared(
        plan.num_tiles.reshape(1), plan.tile_group, a, b, s_a.T, sb_t, body=_grouped_body,
        params=(("cfg", cfg),),
        out_type=jax.ShapeDtypeStruct((plan.padded_rows, b.shape[1]), out_dtype),
        interpret=interpret)


def _grouped_body(num_tiles_ref, tile_group_ref, a_ref, b_ref, sa_ref, sb_ref, y_ref, *,
                  cfg: Fp8Config):
    """As `dense_body`, with the b tile and its scales taken from the tile's expert; the tiles
    past the last group store zeros."""
    bm, bn = cfg.block_m, cfg.block_n
    n_tiles = y_ref.shape[1] // bn
    k_steps = _k_steps(cfg, a_ref.shape[1])
    chain = cfg.chain_tiles and k_steps % min(cfg.max_concurrent_steps, k_steps) == 0
    in_specs = _specs(cfg)

    def pipeline(store_to, state=None):
        return promoting_pipeline(cfg, in_specs, (k_steps,), store_to, state, b_blocks=True)

    def scoped(allocs, epi):
        wg = lax.axis_index("wg")
        num_sms = lax.axis_size("sm")
        used = num_tiles_ref[0] * n_tiles

        @plgpu.nd_loop((tile_group_ref.shape[0] * n_tiles,), collective_axes="sm")
        def _tile(info):
            lin = info.index[0]
            m_idx, n_idx = lax.div(lin, jnp.int32(n_tiles)), lax.rem(lin, jnp.int32(n_tiles))
            rows = pl.ds(pl.multiple_of(m_idx * bm, bm), bm)
            cols = pl.ds(pl.multiple_of(n_idx * bn, bn), bn)
            y_tile = cfg.wg_part(y_ref.at[rows, cols], wg)

            @pl.when(lin < used)
            def _compute():
                g = tile_group_ref[m_idx]
                store = _store(epi.at[wg], y_tile)
                mg.run_tile(lambda state=None: pipeline(store, state),
                            (a_ref.at[rows, :], b_ref.at[g, cols, :], sa_ref.at[:, rows],
                             sb_ref.at[g, :, cols]),
                            allocs, chain=chain, first=info.local_index == 0,
                            last=lin + num_sms >= used)

            @pl.when(jnp.logical_and(lin >= used, wg < mg.NUM_COMPUTE_WGS))
            def _zeros():
                mg.zero_tile(cfg.wg_tile(), epi.at[wg], y_tile)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    allocs = pipeline(None).get_allocations(
        a_ref.at[pl.ds(0, bm), :], b_ref.at[0, pl.ds(0, bn), :], sa_ref.at[:, pl.ds(0, bm)],
        sb_ref.at[0, :, pl.ds(0, bn)])
    pl.run_scoped(scoped, allocs=allocs, epi=mg.epilogue_smem(y_ref.dtype, cfg.epilogue_slots),
                  collective_axes="wg")


def grouped_wgrad_1d1d(a_t: jax.Array, s_a: jax.Array, b_t: jax.Array, s_b: jax.Array, plan, *,
                       out_dtype=jnp.float32, impl: str = "xla", interpret: bool = False,
                       config: Fp8Config | None = None) -> jax.Array:
    """The experts' weight gradient, contracting over each expert's own tokens:
    y[g] [P, Q] = dequant(a_t[:, rows of g]) @ dequant(b_t[:, rows of g])^T.

    a_t [P, padded_rows] and b_t [Q, padded_rows] (dsv3_jax.fp8 passes x^T and dy^T, so that
    dw comes out [E, in, out] like the weights), e4m3 in
    1 x 128 tiles along the token axis (the padded rows, quantized along them: the plan's
    128-row tiles never straddle two experts, so neither do the scale tiles); s_a [P,
    padded_rows/128], s_b [Q, padded_rows/128]. Experts with no rows get exact zeros."""
    if plan.block_m != q8.BLOCK:
        raise ValueError(f"grouped fp8 wgrad: the plan's block_m={plan.block_m} must be "
                         f"{q8.BLOCK}, the token tile of the scales")
    for name, x in (("a_t", a_t), ("b_t", b_t)):
        if x.ndim != 2 or x.shape[1] != plan.padded_rows:
            raise ValueError(f"grouped fp8 wgrad: {name} must be [rows, padded_rows="
                             f"{plan.padded_rows}] (tokens last), got {list(x.shape)}")
    check_operands(a_t, s_a, b_t, s_b, "rows")
    e = plan.num_groups
    if impl == "xla":
        t = plan.tile_group.shape[0]
        a = q8.dequantize_rows(a_t, s_a).reshape(a_t.shape[0], t, q8.BLOCK)
        b = q8.dequantize_rows(b_t, s_b).reshape(b_t.shape[0], t, q8.BLOCK)
        per_tile = jnp.einsum("ntm,ktm->tnk", a, b, precision=lax.Precision.HIGHEST)
        seg = jnp.where(plan.tile_group >= 0, plan.tile_group, e)
        return jax.ops.segment_sum(per_tile, seg, num_segments=e + 1)[:e].astype(out_dtype)
    if impl != "pallas":
        raise ValueError(f"fp8 gemm impl={impl!r} is not one of {IMPLS}")
    n, k = a_t.shape[0], b_t.shape[0]
    cfg = config or default_config(n, k, dense=False)
    _dense_only(cfg, "grouped fp8 wgrad (pallas)")
    if cfg.overlap != "none":
        raise ValueError(f"grouped fp8 wgrad (pallas): Fp8Config.overlap={cfg.overlap!r} is not "
                         "supported: an expert's tokens come in 128s, not in the 256s of a stage")
    for name, size, block in (("a_t.shape[0]", n, cfg.block_m), ("b_t.shape[0]", k, cfg.block_n)):
        if size % block:
            raise ValueError(f"grouped fp8 wgrad (pallas): {name} = {size} must be a multiple of "
                             f"the {block}-wide tile")
    # longest experts first, as grouped_matmul.tgmm does (skewed routing)
    order = jnp.argsort(-plan.group_tile_count, stable=True).astype(jnp.int32)
    return mg.launch_shared(order, plan.group_tile_start, plan.group_tile_count, a_t, b_t,
                            s_a.T, s_b.T, body=_kgrouped_body, params=(("cfg", cfg),),
                            out_type=jax.ShapeDtypeStruct((e, n, k), out_dtype),
                            interpret=interpret)


def _kgrouped_body(order_ref, start_ref, count_ref, a_ref, b_ref, sa_ref, sb_ref, y_ref, *,
                   cfg: Fp8Config):
    """Work items (expert, n-tile, k-tile); each runs the K pipeline over its expert's own
    token blocks (a dynamic length: the index maps add the expert's first block)."""
    bm, bn = cfg.block_m, cfg.block_n
    e, n, k = y_ref.shape
    m_tiles, n_tiles = n // bm, k // bn
    fp8 = jnp.dtype(q8.FP8)

    def pipeline(first, steps, store_to):
        in_specs = [
            plgpu.BlockSpec((bm, q8.BLOCK), lambda s: (0, first + s),
                            transforms=mg.swizzled(q8.BLOCK, fp8)),
            plgpu.BlockSpec((bn, q8.BLOCK), lambda s: (0, first + s),
                            transforms=mg.swizzled(q8.BLOCK, fp8)),
            plgpu.BlockSpec((1, bm), lambda s: (first + s, 0)),
            plgpu.BlockSpec((1, bn), lambda s: (first + s, 0)),
        ]

        return promoting_pipeline(cfg, in_specs, (steps,), store_to)

    def scoped(allocs, epi):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((e * m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            lin = info.index[0]
            g = order_ref[lax.div(lin, jnp.int32(m_tiles * n_tiles))]
            mn = lax.rem(lin, jnp.int32(m_tiles * n_tiles))
            m_idx, n_idx = lax.div(mn, jnp.int32(n_tiles)), lax.rem(mn, jnp.int32(n_tiles))
            rows = pl.ds(pl.multiple_of(m_idx * bm, bm), bm)
            cols = pl.ds(pl.multiple_of(n_idx * bn, bn), bn)
            y_tile = cfg.wg_part(y_ref.at[g, rows, cols], wg)
            store = _store(epi.at[wg], y_tile)
            pipeline(start_ref[g], count_ref[g], store)(
                a_ref.at[rows, :], b_ref.at[cols, :], sa_ref.at[:, rows], sb_ref.at[:, cols],
                allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    # a static grid of max_concurrent_steps keeps the stage count the dynamic pipelines use
    allocs = pipeline(0, cfg.max_concurrent_steps, None).get_allocations(
        a_ref.at[pl.ds(0, bm), :], b_ref.at[pl.ds(0, bn), :], sa_ref.at[:, pl.ds(0, bm)],
        sb_ref.at[:, pl.ds(0, bn)])
    pl.run_scoped(scoped, allocs=allocs, epi=mg.epilogue_smem(y_ref.dtype, cfg.epilogue_slots),
                  collective_axes="wg")


# --------------------------------------------------------------------------------------------
# python -m pallas_kernels.fp8_gemm: the self-check
# --------------------------------------------------------------------------------------------


def selfcheck_operands(m: int, n: int, k: int, b_scale: str = "blocks", seed: int = 0):
    """e4m3 operands with scales over a wide range across K-blocks, rows and weight blocks, so a
    scale applied to the wrong block moves the result by far more than the tolerance (the
    self-check's and the tests'). The ranges cycle so that large K and N stay inside float32
    (2^(2 kb) over 56 K-blocks would overflow)."""
    ka, kb = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(ka, (m, k)) * jnp.exp2(jnp.arange(k) // q8.BLOCK % 6 * 2.0 - 3)
    x = x * jnp.exp2(jnp.arange(m) % 5 - 2.0)[:, None]
    w = jax.random.normal(kb, (n, k)) * jnp.exp2(jnp.arange(n) // q8.BLOCK % 8 - 1.0)[:, None]
    aq, sa = q8.quantize_rows(x)
    bq, sb = q8.quantize_blocks(w) if b_scale == "blocks" else q8.quantize_rows(w)
    return aq, sa, bq, sb


def _checks(interpret) -> list:
    """The four GEMMs against impl="xla" in float32 out. Dense: the default configs (two-block
    stages, b multicast and groups of rows at 256 x 256 x 512), one-block stages, and split-K;
    grouped: experts of 100, 0 (empty), 150 and 50 rows. Interpret mode computes wgmma exactly
    (1e-5); the tensor cores round within each 128-block of K (1e-2)."""
    tol = 1e-5 if interpret else 1e-2

    def dense(m, n, k, b_scale, config=None):
        aq, sa, bq, sb = selfcheck_operands(m, n, k, b_scale)
        sa_t, sb_t = kernel_scales(sa, sb, b_scale)
        got = gemm_kernel(aq, bq, sa_t, sb_t, out_dtype=jnp.float32, config=config,
                          b_blocks=b_scale == "blocks", interpret=interpret)
        ref = (gemm_1d2d if b_scale == "blocks" else gemm_1d1d)(aq, sa, bq, sb,
                                                                out_dtype=jnp.float32)
        return mg.rel_error(got, ref)

    def plan_and_rows(n_cols, seed):
        from pallas_kernels import grouped_matmul as gm  # the padded layout's public API

        sizes = jnp.asarray([100, 0, 150, 50], jnp.int32)
        m = int(sizes.sum()) + 7  # 7 rows past the last group: no group's
        plan = gm.pad_plan(sizes, m, q8.BLOCK)
        x = jax.random.normal(jax.random.key(seed), (m, n_cols))
        x = x * jnp.exp2(jnp.arange(n_cols) // q8.BLOCK * 2.0 - 2)
        return plan, gm.pad_rows(x, plan)

    def grouped():
        n, k = 256, 256
        plan, x_pad = plan_and_rows(k, 1)
        w = jax.random.normal(jax.random.key(2), (4, n, k)) * jnp.exp2(jnp.arange(4) - 1.0)[
            :, None, None]
        (aq, sa), (bq, sb) = q8.quantize_rows(x_pad), q8.quantize_blocks(w)
        got = grouped_gemm_1d2d(aq, sa, bq, sb, plan, out_dtype=jnp.float32, impl="pallas",
                                interpret=interpret)
        return mg.rel_error(got, grouped_gemm_1d2d(aq, sa, bq, sb, plan, out_dtype=jnp.float32))

    def wgrad():
        plan, dy_pad = plan_and_rows(128, 3)
        _, x_pad = plan_and_rows(256, 4)
        (aq, sa), (bq, sb) = q8.quantize_cols(dy_pad), q8.quantize_cols(x_pad)
        got = grouped_wgrad_1d1d(aq, sa, bq, sb, plan, impl="pallas", interpret=interpret)
        return mg.rel_error(got, grouped_wgrad_1d1d(aq, sa, bq, sb, plan))

    one_block = Fp8Config()
    split = Fp8Config(overlap="stage", max_concurrent_steps=2, split_k=2)
    return [
        mg.Check("gemm_1d2d default", "256x256x512", lambda: dense(256, 256, 512, "blocks"), tol),
        mg.Check("gemm_1d1d default", "256x256x512", lambda: dense(256, 256, 512, "rows"), tol),
        mg.Check("gemm_1d2d one-block stages", "384x256x384",
                 lambda: dense(384, 256, 384, "blocks", one_block), tol),
        mg.Check("gemm_1d2d split-K 2", "128x384x1024",
                 lambda: dense(128, 384, 1024, "blocks", split), tol),
        mg.Check("grouped_gemm_1d2d default", "E=4 rows=307 N=256 K=256", grouped, tol),
        mg.Check("grouped_wgrad_1d1d default", "E=4 rows=307 P=128 Q=256", wgrad, tol),
    ]


def main(argv=None) -> int:
    """python -m pallas_kernels.fp8_gemm [--interpret]: the Pallas GEMMs against the XLA
    reference, natively on a Hopper GPU, else (or with --interpret) in GPU interpret mode;
    prints a table and exits non-zero if a check fails. The benchmark is
    experiments/bench_fp8_gemm.py."""
    import argparse

    ap = argparse.ArgumentParser(description="FP8 GEMM kernels: self-check")
    ap.add_argument("--interpret", action="store_true",
                    help="check in GPU interpret mode even on a Hopper GPU")
    args = ap.parse_args(argv)
    interpret, where = mg.mode(args.interpret)
    return mg.run_checks(f"pallas_kernels.fp8_gemm ({where})", _checks(interpret))


if __name__ == "__main__":
    raise SystemExit(main())
