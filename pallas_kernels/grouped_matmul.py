"""Grouped matmul for MoE experts on Hopper: Pallas Mosaic GPU kernels in a padded-group layout.

The MoE layer sorts its (token, expert) rows by expert, so the rows of expert `g` form one
contiguous group of `group_sizes[g]` rows, and multiplies each group by that expert's weight.
`jax.lax.ragged_dot` does this, but on GPU XLA rewrites it into a dense masked dot that costs
about (number of groups) times the useful FLOPs (../shared/reference/gpu_facts.md, "ragged_dot").

**The padded-group layout.** Before the matmul, `pad_rows` moves the sorted rows into a buffer
in which every group starts at a multiple of `block_m` and the rows between groups are zeros:

    sorted rows    [g0 g0 g0 | g1 | g2 g2 g2 g2 g2]          (group_sizes = 3, 1, 5; block_m = 4)
    padded rows    [g0 g0 g0 0 | g1 0 0 0 | g2 g2 g2 g2 | g2 0 0 0 | 0 0 0 0 ...]
    tile_group     [    0      |    1     |     2       |    2     |   -1    ...]

Every M-tile of `block_m` rows then belongs to exactly one group, which buys three things:
  * the forward and data-gradient kernels load and store whole tiles with TMA, with no row masks
    and no tiles shared between two experts (a ragged layout needs either masked stores or a
    second pass over the tiles that straddle a group boundary);
  * the weight gradient `dw[g] = x_g^T @ dy_g` contracts over whole tiles of one group: the zero
    padding rows add nothing, so it needs no masking either;
  * the tile -> group map is a small int32 table computed once per step (`pad_plan`) and shared by
    all three kernels of the forward and backward pass.
The price is at most `block_m - 1` zero rows per group, about `block_m / 2` on average (with
expert parallelism over 8 GPUs a device holds 32 of V3's 256 experts: ~2k padding rows against
~65k routed rows, 3%), and one gather of the rows, which the MoE layer does anyway when it sorts
tokens by expert. Buffers are sized by the static bound `max_tiles`; the unused tiles at the end
only cost a zero store.

**The kernels.** `gmm` (y = x @ w[g], also with w transposed for the data gradient) and `tgmm`
(dw[g] = x_g^T @ dy_g) are persistent, warp-specialized kernels on the launch, K pipeline and
epilogue of `pallas_kernels._mosaic`: one CTA per SM looping over output tiles in an interleaved
order, one warpgroup issuing the TMA loads, two issuing wgmma on halves of the output tile and
writing them back through a double-buffered SMEM epilogue. In `gmm` the K pipelines of a CTA's
consecutive tiles are chained, so the loads of the next tile overlap the last steps and the
epilogue of the current one. The structure follows the Hopper recipe of CUTLASS's
warp-specialized GEMMs and of the Pallas Mosaic GPU matmul in
jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py (jax 0.11.2); the group handling is ours: a
tile's group is one table lookup, tiles past the last group store zeros, and `tgmm`'s pipeline
length is the group's own tile count (empty groups store exact zeros). `tgmm` visits the longest
groups first; with skewed routing it is still bound by the longest group's tiles, each of which
contracts over all of that group's rows on one SM.

`grouped_matmul_padded` ties them together with a `jax.custom_vjp`: forward `gmm`, backward
dx = gmm(dy, w, transpose_w=True) and dw = tgmm(x, dy).

Interpret mode (`interpret=True`) runs the same kernels on the CPU through
`plgpu.InterpretGPUParams()`; it computes wgmma in fp32 and checks indexing and data flow.

`python -m pallas_kernels.grouped_matmul` checks the kernels against `gmm_reference` and
`tgmm_reference` (interpret mode without a Hopper GPU); `--bench [--tune]` times them at MoE
sizes. Speed, tuning choices and their measurements: docs/kernels.md#grouped-bf16-matmul.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic as mg
from pallas_kernels import timing
from pallas_kernels._mosaic import launch_shared  # noqa: F401 - part of this module's API
from pallas_kernels.rows import gather_rows

# Dtypes wgmma takes with both operand transposes (fp8 would need K-major operands on both
# sides; gpu_facts.md "FP8 wgmma needs both operands K-major").
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
    """Tile sizes of the grouped matmul kernels.

    block_m: rows per M-tile of `gmm` and the padding granularity of the layout (`pad_plan` must
      use the same value). Multiple of 64 (one wgmma is 64 rows per warpgroup).
    block_n: output columns per CTA in `gmm`; each of the two compute warpgroups takes half.
      Multiple of 128 so each half is a whole number of 128-byte swizzle tiles.
    block_k: contraction step of `gmm`. Multiple of 64 (a 128-byte swizzled row of bf16).
    max_concurrent_steps: TMA pipeline depth (SMEM stages) of both kernels.
    tgmm_block_k: rows of each `dw[g]` tile (the K side), multiple of 64.
    tgmm_block_n: columns of each `dw[g]` tile, split between the two compute warpgroups;
      multiple of 128.
    tgmm_block_rows: token rows consumed per `tgmm` pipeline step; divides `block_m`, multiple
      of 16 (the wgmma K step for 16-bit types).
    chain_tiles: in `gmm`, let the TMA warpgroup run on into the next tile's loads instead of
      draining the pipeline after every tile (used when K / block_k is a multiple of the stage
      count). Tiles have only K / block_k = 8-16 steps at MoE sizes, so a drain per tile costs.
    epilogue_slots: SMEM slots (64 rows x 128 bytes each) per compute warpgroup for the output;
      2 double-buffers the TMA stores; 4 lets a 128 x 128 bf16 warpgroup tile go out without
      waiting for any of its own stores (and leaves room for 3 stages).
    wg_split: how `gmm`'s two compute warpgroups share a tile (`_mosaic.WG_SPLITS`): "cols",
      each all block_m rows and half of the columns (two m64 wgmmas per K step of 16, each
      reading the warpgroup's whole B half: 4 + 8 KiB of SMEM for 262,144 MACs at 128 x 256);
      "rows", each half of the rows (block_m a multiple of 128) and all the columns (one m64n256
      wgmma: 2 + 8 KiB). Here the two measured within the spread of repeated runs, so "cols",
      the default every end-to-end number was measured with, stays. `tgmm` always splits its
      columns.

    The defaults were the fastest of the configs measured at the benchmark sizes
    (docs/kernels.md#grouped-bf16-matmul).
    """

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    max_concurrent_steps: int = 4
    tgmm_block_k: int = 128
    tgmm_block_n: int = 256
    tgmm_block_rows: int = 64
    chain_tiles: bool = True
    epilogue_slots: int = 2
    wg_split: str = "cols"

    def __post_init__(self):
        if self.wg_split not in mg.WG_SPLITS:
            raise ValueError(f"TileConfig.wg_split={self.wg_split!r} must be 'cols' or 'rows'")
        _check_multiple("block_m", self.block_m, 128 if self.wg_split == "rows" else 64)
        _check_multiple("block_n", self.block_n, 128)
        _check_multiple("block_k", self.block_k, 64)
        _check_multiple("tgmm_block_k", self.tgmm_block_k, 64)
        _check_multiple("tgmm_block_n", self.tgmm_block_n, 128)
        _check_multiple("tgmm_block_rows", self.tgmm_block_rows, 16)
        if self.block_m % self.tgmm_block_rows:
            raise ValueError(
                f"TileConfig.tgmm_block_rows={self.tgmm_block_rows} must divide "
                f"block_m={self.block_m}: a tgmm step may not straddle two groups")
        if self.epilogue_slots not in (2, 4):
            raise ValueError(f"TileConfig.epilogue_slots={self.epilogue_slots} must be 2 or 4")
        if self.max_concurrent_steps < 2:
            raise ValueError(
                f"TileConfig.max_concurrent_steps={self.max_concurrent_steps} must be >= 2 "
                "(one stage loading while another is multiplied)")
        for name, nbytes in (("gmm", self.gmm_smem_bytes()), ("tgmm", self.tgmm_smem_bytes())):
            if nbytes > mg.PIPELINED_SMEM_BYTES:
                raise ValueError(
                    f"TileConfig: the {name} tiles need {nbytes} bytes of shared memory, more than "
                    f"{mg.PIPELINED_SMEM_BYTES}; lower "
                    f"max_concurrent_steps={self.max_concurrent_steps} or the blocks")

    def replace(self, **changes) -> TileConfig:
        return dataclasses.replace(self, **changes)

    def gmm_wg_tile(self) -> tuple[int, int]:
        """(rows, columns) of one compute warpgroup's share of a `gmm` output tile."""
        return mg.wg_share(self.wg_split, self.block_m, self.block_n)

    def gmm_smem_bytes(self, itemsize: int = 2) -> int:
        stage = (self.block_m * self.block_k + self.block_k * self.block_n) * itemsize
        return self.max_concurrent_steps * stage + mg.epilogue_bytes(self.epilogue_slots)

    def tgmm_smem_bytes(self, itemsize: int = 2) -> int:
        stage = self.tgmm_block_rows * (self.tgmm_block_k + self.tgmm_block_n) * itemsize
        return self.max_concurrent_steps * stage + mg.epilogue_bytes(self.epilogue_slots)


def _check_multiple(name: str, value: int, multiple: int) -> None:
    if value <= 0 or value % multiple:
        raise ValueError(f"TileConfig.{name}={value} must be a positive multiple of {multiple}")


# --------------------------------------------------------------------------------------------
# The padded layout
# --------------------------------------------------------------------------------------------


class PadPlan(NamedTuple):
    """Where each sorted row lives in the padded layout, and which group owns each M-tile.

    Array fields (int32, computed by `pad_plan` with jnp, so they can be traced):
      positions [M]: padded row of each sorted input row; rows past sum(group_sizes) belong to no
        group and get `padded_rows + row` (out of range and still distinct: `pad_rows` drops
        them, `unpad_rows` returns zeros for them, as `ragged_dot` does).
      tile_group [T]: group of each M-tile, -1 for the unused tiles at the end.
      group_tile_start [G], group_tile_count [G]: first tile and number of tiles of each group.
      num_tiles []: tiles in use (the tiles from num_tiles on are all -1).
      sources [padded_rows]: the inverse of `positions`: the sorted row placed in each padded
        row, M for padding. With it both `pad_rows` and `unpad_rows` and their gradients are
        gathers (`pallas_kernels.rows`), never scatters.
    Static fields (Python ints, kept out of the pytree leaves by `_plan_flatten`):
      block_m: tile height the plan was built for.
      padded_rows: T * block_m, the rows of every padded buffer.
    """

    positions: jax.Array
    tile_group: jax.Array
    group_tile_start: jax.Array
    group_tile_count: jax.Array
    num_tiles: jax.Array
    sources: jax.Array
    block_m: int
    padded_rows: int

    @property
    def num_groups(self) -> int:
        return self.group_tile_count.shape[0]


def _plan_flatten(plan: PadPlan):
    arrays = (plan.positions, plan.tile_group, plan.group_tile_start, plan.group_tile_count,
              plan.num_tiles, plan.sources)
    return arrays, (plan.block_m, plan.padded_rows)


def _plan_unflatten(static, arrays):
    return PadPlan(*arrays, *static)


# Register explicitly so block_m / padded_rows stay Python ints under jit and custom_vjp.
jax.tree_util.register_pytree_node(PadPlan, _plan_flatten, _plan_unflatten)


def max_tiles(m: int, num_groups: int, block_m: int) -> int:
    """Static bound on the M-tiles of any split of `m` rows into `num_groups` groups.

    sum_g ceil(s_g / b) <= sum_g (s_g + b - 1) / b = (m + G (b - 1)) / b, and the left side is an
    integer, so the floor of the right side bounds it. It is also at most m, since a non-empty
    group needs ceil(s_g / b) <= s_g tiles: with few rows (decoding: a handful of tokens over
    64 experts) the layout then has one tile per row, not one per expert. At least one tile so
    buffers are non-empty.
    """
    return max(1, min(m, (m + num_groups * (block_m - 1)) // block_m))


def pad_plan(group_sizes: jax.Array, m: int, block_m: int) -> PadPlan:
    """Builds the padded layout for `m` sorted rows split into groups of `group_sizes` rows."""
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}")
    if block_m <= 0:
        raise ValueError(f"block_m={block_m} must be positive")
    num_groups = group_sizes.shape[0]
    t = max_tiles(m, num_groups, block_m)
    sizes = group_sizes.astype(jnp.int32)
    counts = (sizes + block_m - 1) // block_m  # [G]
    tile_end = jnp.cumsum(counts)  # [G]
    tile_start = tile_end - counts
    num_tiles = tile_end[-1] if num_groups else jnp.int32(0)

    tiles = jnp.arange(t, dtype=jnp.int32)
    # The group of tile i is the first group whose tile range ends after i.
    tile_group = jnp.searchsorted(tile_end, tiles, side="right").astype(jnp.int32)
    tile_group = jnp.where(tiles < num_tiles, tile_group, -1)

    rows = jnp.arange(m, dtype=jnp.int32)
    row_end = jnp.cumsum(sizes)
    row_group = jnp.searchsorted(row_end, rows, side="right").astype(jnp.int32)  # G if no group
    in_group = row_group < num_groups
    g = jnp.minimum(row_group, num_groups - 1)
    local = rows - (row_end[g] - sizes[g])
    positions = jnp.where(in_group, tile_start[g] * block_m + local, t * block_m + rows)
    # an int32 scatter of M entries, cheap next to the [M, K] rows it saves from scattering
    sources = jnp.full((t * block_m,), m, jnp.int32).at[positions].set(rows, mode="drop")
    return PadPlan(positions=positions.astype(jnp.int32), tile_group=tile_group, sources=sources,
                   group_tile_start=tile_start.astype(jnp.int32),
                   group_tile_count=counts.astype(jnp.int32),
                   num_tiles=jnp.asarray(num_tiles, jnp.int32), block_m=block_m,
                   padded_rows=t * block_m)


def pad_rows(x: jax.Array, plan: PadPlan) -> jax.Array:
    """[M, K] sorted rows -> [padded_rows, K], zeros between groups and after the last one."""
    if x.ndim != 2 or x.shape[0] != plan.positions.shape[0]:
        raise ValueError(
            f"x: shape {x.shape} must be [M, K] with M = len(plan.positions) = "
            f"{plan.positions.shape[0]}")
    return gather_rows(x, plan.sources, plan.positions)


def unpad_rows(y_pad: jax.Array, plan: PadPlan) -> jax.Array:
    """[padded_rows, N] -> [M, N] in the sorted row order (zeros for rows in no group)."""
    if y_pad.ndim != 2 or y_pad.shape[0] != plan.padded_rows:
        raise ValueError(
            f"y_pad: shape {y_pad.shape} must be [padded_rows, N] with padded_rows = "
            f"{plan.padded_rows}")
    return gather_rows(y_pad, plan.positions, plan.sources)


# --------------------------------------------------------------------------------------------
# Pure-jnp references (used by the tests; also the meaning of the kernels)
# --------------------------------------------------------------------------------------------


def gmm_reference(x_pad: jax.Array, w: jax.Array, plan: PadPlan, *,
                  transpose_w: bool = False) -> jax.Array:
    """y_pad[tile t] = x_pad[tile t] @ w[tile_group[t]] in fp32; unused tiles give zeros."""
    t = plan.tile_group.shape[0]
    xt = x_pad.reshape(t, plan.block_m, x_pad.shape[1]).astype(jnp.float32)
    wt = w[jnp.maximum(plan.tile_group, 0)].astype(jnp.float32)  # [T, K, N] (or [T, N, K])
    spec = "tmk,tnk->tmn" if transpose_w else "tmk,tkn->tmn"
    y = jnp.einsum(spec, xt, wt, precision=lax.Precision.HIGHEST)
    y = jnp.where((plan.tile_group >= 0)[:, None, None], y, 0.0)
    return y.reshape(plan.padded_rows, -1)


def tgmm_reference(x_pad: jax.Array, dy_pad: jax.Array, plan: PadPlan,
                   num_groups: int) -> jax.Array:
    """dw[g] = sum over the tiles of group g of x_tile^T @ dy_tile, fp32 [G, K, N]."""
    t = plan.tile_group.shape[0]
    xt = x_pad.reshape(t, plan.block_m, -1).astype(jnp.float32)
    dyt = dy_pad.reshape(t, plan.block_m, -1).astype(jnp.float32)
    per_tile = jnp.einsum("tmk,tmn->tkn", xt, dyt, precision=lax.Precision.HIGHEST)
    # Unused tiles (group -1) go to an extra segment that is dropped.
    seg = jnp.where(plan.tile_group >= 0, plan.tile_group, num_groups)
    return jax.ops.segment_sum(per_tile, seg, num_segments=num_groups + 1)[:num_groups]


# --------------------------------------------------------------------------------------------
# Kernel building blocks
# --------------------------------------------------------------------------------------------


def _accumulating_pipeline(mma, acc_shape, store_to, in_specs, grid, max_steps: int, state=None):
    """The bf16 kernels' K pipeline (`_mosaic.warp_specialized`): each compute warpgroup runs
    `mma` into its own fp32 accumulator of `acc_shape` and then hands it to `store_to` (the
    epilogue). `state` chains consecutive pipelines (`_mosaic.run_tile`)."""
    def context(run):
        acc = pl.run_scoped(lambda acc_ref: run(acc_ref)[...], plgpu.ACC(acc_shape, jnp.float32))
        store_to(acc)
    return mg.warp_specialized(mma, context, in_specs, grid, max_steps, state)


# --------------------------------------------------------------------------------------------
# gmm: y_pad = x_pad @ w[group of the tile]
# --------------------------------------------------------------------------------------------


def _gmm_specs(cfg: TileConfig, dtype, transpose_w: bool) -> list:
    """K-pipeline blocks of one tile: x [block_m, block_k] and w [block_k, block_n] (or
    [block_n, block_k] when transposed), each swizzled along its minor dimension."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    w_block = (bn, bk) if transpose_w else (bk, bn)
    return [
        plgpu.BlockSpec((bm, bk), lambda s: (0, s), transforms=mg.swizzled(bk, dtype)),
        plgpu.BlockSpec(w_block, (lambda s: (0, s)) if transpose_w else (lambda s: (s, 0)),
                        transforms=mg.swizzled(w_block[1], dtype)),
    ]


def _gmm_mma(transpose_w: bool, cfg: TileConfig):
    """Pipeline step of one compute warpgroup: acc += (its rows of x_stage) @ (its columns of
    w_stage), by `cfg.wg_split`."""
    rows, cols = cfg.gmm_wg_tile()

    def mma(_, x_smem, w_smem, acc):
        wg = lax.axis_index("wg")
        r0, c0 = mg.wg_offsets(cfg.wg_split, rows, cols, wg)
        a = x_smem.at[pl.ds(r0, rows)]
        if transpose_w:  # w tile [bn, bk]: this warpgroup's rows, read K-major by wgmma.
            b = w_smem.at[pl.ds(c0, cols), :].T
        else:  # w tile [bk, bn]: this warpgroup's columns.
            b = w_smem.at[:, pl.ds(c0, cols)]
        plgpu.wgmma(acc, a, b)
        # Wait before the stage is handed back to the TMA warpgroup (no delay_release).
        plgpu.wgmma_wait(0)
        return acc
    return mma


def _gmm_body(num_tiles_ref, tile_group_ref, x_ref, w_ref, y_ref, *, cfg: TileConfig,
              transpose_w: bool):
    """Kernel body. x_ref [Mp, K], w_ref [G, K, N] (or [G, N, K]), y_ref [Mp, N];
    tile_group_ref [T] and num_tiles_ref [1] come from the plan."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    wg_tile = cfg.gmm_wg_tile()
    n_tiles = y_ref.shape[1] // bn
    k_steps = x_ref.shape[1] // bk
    # Chaining needs whole rounds of stages per tile (emit_pipeline_warp_specialized's rule).
    chain = cfg.chain_tiles and k_steps % min(cfg.max_concurrent_steps, k_steps) == 0
    in_specs = _gmm_specs(cfg, x_ref.dtype, transpose_w)
    mma = _gmm_mma(transpose_w, cfg)

    def scoped(allocs, epi):
        wg = lax.axis_index("wg")
        num_sms = lax.axis_size("sm")
        # Work items (m-tile, n-tile) in use; the rest are the zero tiles past the last group,
        # which come last in every CTA's sequence because m is the major loop index.
        used = num_tiles_ref[0] * n_tiles

        @plgpu.nd_loop((tile_group_ref.shape[0] * n_tiles,), collective_axes="sm")
        def _tile(info):
            lin = info.index[0]
            # N is the minor loop index: the CTAs working at one time share x tiles and, since
            # neighbouring M-tiles mostly share a group, weight tiles too (both served from L2).
            m_idx = lax.div(lin, jnp.int32(n_tiles))
            n_idx = lax.rem(lin, jnp.int32(n_tiles))
            rows = pl.ds(pl.multiple_of(m_idx * bm, bm), bm)
            cols = pl.ds(pl.multiple_of(n_idx * bn, bn), bn)
            r0, c0 = mg.wg_offsets(cfg.wg_split, *wg_tile, wg)
            y_tile = y_ref.at[rows, cols].at[pl.ds(r0, wg_tile[0]), pl.ds(c0, wg_tile[1])]

            @pl.when(lin < used)
            def _compute():
                g = tile_group_ref[m_idx]
                w_tile = w_ref.at[g, cols, :] if transpose_w else w_ref.at[g, :, cols]
                store = functools.partial(mg.store_tile, slots=epi.at[wg], dst=y_tile)

                def make(state=None):
                    return _accumulating_pipeline(mma, wg_tile, store, in_specs, (k_steps,),
                                             cfg.max_concurrent_steps, state=state)

                mg.run_tile(make, (x_ref.at[rows, :], w_tile), allocs, chain=chain,
                          first=info.local_index == 0, last=lin + num_sms >= used)

            # Tiles past the last group hold zero rows; store zeros so no output row is undefined.
            @pl.when(jnp.logical_and(lin >= used, wg < mg.NUM_COMPUTE_WGS))
            def _zeros():
                mg.zero_tile(wg_tile, epi.at[wg], y_tile)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    allocs = _accumulating_pipeline(mma, wg_tile, None, in_specs, (k_steps,),
                               cfg.max_concurrent_steps).get_allocations(
        x_ref.at[pl.ds(0, bm), :],
        w_ref.at[0, pl.ds(0, bn), :] if transpose_w else w_ref.at[0, :, pl.ds(0, bn)])
    pl.run_scoped(scoped, allocs=allocs, epi=mg.epilogue_smem(y_ref.dtype, cfg.epilogue_slots),
                  collective_axes="wg")


def gmm(x_pad: jax.Array, w: jax.Array, plan: PadPlan, *, transpose_w: bool = False,
        config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """Grouped matmul in the padded layout: y_pad[rows of g] = x_pad[rows of g] @ w[g].

    x_pad [Mp, K]; w [G, K, N], or [G, N, K] with `transpose_w` (then y = x @ w[g]^T, the data
    gradient of the forward pass). Returns y_pad [Mp, N] in x's dtype, accumulated in fp32.
    Rows of tiles that belong to no group (past the last group) are zeros.
    """
    cfg = config or TileConfig()
    _check_operands(plan, cfg, ("x_pad", x_pad, 2), ("w", w, 3))
    mp, k = x_pad.shape
    g, wk, wn = w.shape
    k_w, n = (wn, wk) if transpose_w else (wk, wn)
    layout = "[G, N, K]" if transpose_w else "[G, K, N]"
    _check_rows("x_pad", mp, plan)
    if g != plan.num_groups:
        raise ValueError(f"w: {g} groups (shape[0]) but len(group_sizes) = {plan.num_groups}")
    if k_w != k:
        raise ValueError(f"w: K = {k_w} (shape {w.shape} read as {layout}) must equal "
                         f"x_pad.shape[1] = {k}")
    _check_divides("x_pad", "K (shape[1])", k, "block_k", cfg.block_k)
    _check_divides("w", "N", n, "block_n", cfg.block_n)
    return launch_shared(plan.num_tiles.reshape(1), plan.tile_group, x_pad, w, body=_gmm_body,
                         params=(("cfg", cfg), ("transpose_w", transpose_w)),
                         out_type=jax.ShapeDtypeStruct((mp, n), x_pad.dtype),
                         interpret=interpret)


# --------------------------------------------------------------------------------------------
# tgmm: dw[g] = x_pad[rows of g]^T @ dy_pad[rows of g]
# --------------------------------------------------------------------------------------------


def _tgmm_body(order_ref, start_ref, count_ref, x_ref, dy_ref, dw_ref, *, cfg: TileConfig):
    """Kernel body. x_ref [Mp, K], dy_ref [Mp, N], dw_ref [G, K, N]; order_ref [G] is the order
    in which groups are visited, start_ref / count_ref [G] their first tile and tile count."""
    tk, tn, br = cfg.tgmm_block_k, cfg.tgmm_block_n, cfg.tgmm_block_rows
    half = tn // mg.NUM_COMPUTE_WGS
    num_groups, k, n = dw_ref.shape
    k_tiles, n_tiles = k // tk, n // tn
    steps_per_tile = cfg.block_m // br
    dtype = x_ref.dtype

    def mma(_, x_smem, dy_smem, acc):
        wg = lax.axis_index("wg")
        # x chunk [br, tk] read transposed (M-major A, allowed for 16-bit wgmma): acc += x^T @ dy.
        plgpu.wgmma(acc, x_smem.T, dy_smem.at[:, pl.ds(wg * half, half)])
        plgpu.wgmma_wait(0)
        return acc

    def make_pipeline(first_step, steps, store_to):
        # The index maps add the group's first row block, so the pipeline's grid is the group's own
        # length (`steps`, dynamic); an empty group runs no step and stores the zero accumulator.
        in_specs = [
            plgpu.BlockSpec((br, tk), lambda s: (first_step + s, 0),
                            transforms=mg.swizzled(tk, dtype)),
            plgpu.BlockSpec((br, tn), lambda s: (first_step + s, 0),
                            transforms=mg.swizzled(tn, dtype)),
        ]
        return _accumulating_pipeline(mma, (tk, half), store_to, in_specs, (steps,),
                                 cfg.max_concurrent_steps)

    def scoped(allocs, epi):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_groups * k_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            lin = info.index[0]
            g = order_ref[lax.div(lin, jnp.int32(k_tiles * n_tiles))]
            kn = lax.rem(lin, jnp.int32(k_tiles * n_tiles))
            k_idx = lax.div(kn, jnp.int32(n_tiles))
            n_idx = lax.rem(kn, jnp.int32(n_tiles))
            ks = pl.ds(pl.multiple_of(k_idx * tk, tk), tk)
            ns = pl.ds(pl.multiple_of(n_idx * tn, tn), tn)
            dw_tile = dw_ref.at[g, ks, ns].at[:, pl.ds(wg * half, half)]
            pipeline = make_pipeline(start_ref[g] * steps_per_tile, count_ref[g] * steps_per_tile,
                                     lambda acc: mg.store_tile(acc, epi.at[wg], dw_tile))
            pipeline(x_ref.at[:, ks], dy_ref.at[:, ns], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    # Allocation only depends on block shapes and the stage count; a static grid of
    # max_concurrent_steps steps keeps emit_pipeline from shrinking the stage count, as the real
    # (dynamic-length) pipelines will not shrink it either.
    allocs = make_pipeline(0, cfg.max_concurrent_steps, None).get_allocations(
        x_ref.at[:, pl.ds(0, tk)], dy_ref.at[:, pl.ds(0, tn)])
    pl.run_scoped(scoped, allocs=allocs, epi=mg.epilogue_smem(dw_ref.dtype, cfg.epilogue_slots),
                  collective_axes="wg")


def tgmm(x_pad: jax.Array, dy_pad: jax.Array, plan: PadPlan, num_groups: int, *,
         out_dtype=jnp.float32, config: TileConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """Weight gradient in the padded layout: dw[g] = x_pad[rows of g]^T @ dy_pad[rows of g].

    x_pad [Mp, K], dy_pad [Mp, N] -> dw [G, K, N], accumulated in fp32 over the group's own tiles
    only; groups with no rows give exact zeros. `out_dtype` defaults to float32 because the sum
    runs over thousands of rows and the master weights are fp32 (../shared/DESIGN.md, "Precision
    and state"); the custom VJP asks for the weights' dtype instead, which halves the bytes the
    kernel writes and saves a cast pass.
    """
    cfg = config or TileConfig()
    _check_operands(plan, cfg, ("x_pad", x_pad, 2), ("dy_pad", dy_pad, 2))
    _check_rows("x_pad", x_pad.shape[0], plan)
    _check_rows("dy_pad", dy_pad.shape[0], plan)
    if num_groups != plan.num_groups:
        raise ValueError(f"num_groups={num_groups} but len(group_sizes) = {plan.num_groups}")
    k, n = x_pad.shape[1], dy_pad.shape[1]
    _check_divides("x_pad", "K (shape[1])", k, "tgmm_block_k", cfg.tgmm_block_k)
    _check_divides("dy_pad", "N (shape[1])", n, "tgmm_block_n", cfg.tgmm_block_n)
    # Longest groups first: the interleaved loop then hands the long tiles out in the first waves
    # and the short ones fill in behind them (longest-processing-time-first scheduling), which
    # matters when routing is skewed.
    order = jnp.argsort(-plan.group_tile_count, stable=True).astype(jnp.int32)
    return launch_shared(order, plan.group_tile_start, plan.group_tile_count, x_pad, dy_pad,
                         body=_tgmm_body, params=(("cfg", cfg),),
                         out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
                         interpret=interpret)


# --------------------------------------------------------------------------------------------
# Validation (no silent fallbacks: every message names the tensor and the field)
# --------------------------------------------------------------------------------------------


def _check_operands(plan: PadPlan, cfg: TileConfig, first: tuple, second: tuple) -> None:
    """The checks both kernels share: the plan, then (name, array, rank) of two operands that
    must have one kernel dtype between them."""
    _check_plan(plan, cfg)
    (name_a, a, rank_a), (name_b, b, rank_b) = first, second
    _check_kernel_dtype(name_a, a)
    _check_kernel_dtype(name_b, b)
    if b.dtype != a.dtype:
        raise ValueError(f"{name_b}: dtype {b.dtype} must equal {name_a}'s dtype {a.dtype}")
    _check_rank(name_a, a, rank_a)
    _check_rank(name_b, b, rank_b)


def _check_kernel_dtype(name: str, a: jax.Array) -> None:
    if jnp.dtype(a.dtype) not in KERNEL_DTYPES:
        raise ValueError(f"{name}: dtype {a.dtype} is not supported by the kernel; "
                         f"use bfloat16 or float16")


def _check_rank(name: str, a: jax.Array, rank: int) -> None:
    if a.ndim != rank:
        raise ValueError(f"{name}: expected {rank} dimensions, got shape {a.shape}")


def _check_rows(name: str, rows: int, plan: PadPlan) -> None:
    if rows != plan.padded_rows:
        raise ValueError(
            f"{name}: {rows} rows (shape[0]) but plan.padded_rows = {plan.padded_rows}")


def _check_divides(name: str, field: str, value: int, block_name: str, block: int) -> None:
    if value % block:
        raise ValueError(f"{name}: {field} = {value} is not a multiple of "
                         f"TileConfig.{block_name} = {block}")


def _check_plan(plan: PadPlan, cfg: TileConfig) -> None:
    if plan.block_m != cfg.block_m:
        raise ValueError(f"plan.block_m = {plan.block_m} must equal TileConfig.block_m = "
                         f"{cfg.block_m} (build the plan with "
                         "pad_plan(..., block_m=config.block_m))")


# --------------------------------------------------------------------------------------------
# Differentiable entry point
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x_pad, w, plan, config, interpret):
    return gmm(x_pad, w, plan, config=config, interpret=interpret)


def _grouped_matmul_fwd(x_pad, w, plan, config, interpret):
    return gmm(x_pad, w, plan, config=config, interpret=interpret), (x_pad, w, plan)


def _grouped_matmul_bwd(config, interpret, res, dy_pad):
    x_pad, w, plan = res
    dy_pad = dy_pad.astype(x_pad.dtype)
    # dx[rows of g] = dy[rows of g] @ w[g]^T: w [G, K, N] is the [G, N', K'] operand of gmm.
    dx = gmm(dy_pad, w, plan, transpose_w=True, config=config, interpret=interpret)
    dw = tgmm(x_pad, dy_pad, plan, w.shape[0], out_dtype=w.dtype, config=config,
              interpret=interpret)
    # The plan is integer bookkeeping: no cotangent.
    return dx, dw, jax.tree.map(lambda _: None, plan)


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul_padded(x_pad: jax.Array, w: jax.Array, plan: PadPlan, *,
                          config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """y_pad = x_pad @ w[group of each row], differentiable in x_pad and w (kernels both ways).

    x_pad [Mp, K] (from `pad_rows`), w [G, K, N]; returns y_pad [Mp, N] in x's dtype. The backward
    pass needs K and N to be multiples of both block sizes of the transposed problem too
    (checked there).
    """
    cfg = config or TileConfig()
    problem = unsupported_dims(x_pad.shape[-1], w.shape[-1], cfg, ("K (x_pad.shape[1])",
                                                                    "N (w.shape[2])"))
    if problem:
        raise ValueError(f"grouped_matmul_padded: {problem}")
    return _grouped_matmul(x_pad, w, plan, cfg, interpret)


def unsupported_dims(k: int, n: int, config: TileConfig | None = None,
                     names: tuple[str, str] = ("K", "N")) -> str | None:
    """Why `grouped_matmul_padded` cannot take a [*, k] @ [G, k, n] product (forward and
    backward kernels), or None when it can. The model's runtime
    resolution (`dsv3_jax.runtime.resolve`) asks this too, so that "auto" picks the kernel only
    for shapes it takes."""
    cfg = config or TileConfig()
    for name, value in zip(names, (k, n)):
        for block_name in ("block_n", "block_k", "tgmm_block_k", "tgmm_block_n"):
            block = getattr(cfg, block_name)
            if value % block:
                return (f"{name} = {value} must be a multiple of TileConfig.{block_name} = "
                        f"{block} (forward and backward kernels)")
    return None


# --------------------------------------------------------------------------------------------
# python -m pallas_kernels.grouped_matmul: the self-check, and the benchmark (--bench, GPU)
# --------------------------------------------------------------------------------------------

# Small tiles for the self-check, so that interpret mode takes seconds: 64-row tiles, 128-wide
# CTA tiles, 4 K steps at K = 256. (tgmm's steps stay 64 rows: its wgmma reads x transposed,
# which the GPU lowering takes only with K = 64 a step; interpret mode would take 32 too.)
_SMALL = TileConfig(block_m=64, block_n=128, block_k=64, tgmm_block_k=64, tgmm_block_n=128,
                    tgmm_block_rows=64)


def _checks(interpret) -> list:
    """gmm, gmm with transposed weights and tgmm against `gmm_reference` / `tgmm_reference`:
    4 groups of 120, 0 (empty), 130 and 50 rows out of 300 (the last 0 past every group), small
    tiles and the default ones; bf16 in, bf16 out for gmm (2e-2: the output's rounding), fp32
    out for tgmm."""
    g, m, k, n = 4, 300, 256, 256
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (g, k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
    sizes = jnp.asarray([120, 0, 130, 50], jnp.int32)
    shape = f"G={g} M={m} K={k} N={n}"

    def case(cfg, kernel):
        plan = pad_plan(sizes, m, cfg.block_m)
        x_pad, dy_pad = pad_rows(x, plan), pad_rows(dy, plan)
        if kernel == "gmm":
            return mg.rel_error(gmm(x_pad, w, plan, config=cfg, interpret=interpret),
                                gmm_reference(x_pad, w, plan))
        if kernel == "gmm_T":
            w_t = jnp.swapaxes(w, 1, 2)
            return mg.rel_error(gmm(x_pad, w_t, plan, transpose_w=True, config=cfg,
                                    interpret=interpret),
                                gmm_reference(x_pad, w_t, plan, transpose_w=True))
        return mg.rel_error(tgmm(x_pad, dy_pad, plan, g, config=cfg, interpret=interpret),
                            tgmm_reference(x_pad, dy_pad, plan, g))

    return [mg.Check(f"{kernel} {name} tiles", shape,
                     functools.partial(case, cfg, kernel), 1e-3 if kernel == "tgmm" else 2e-2)
            for name, cfg in (("small", _SMALL), ("default", TileConfig()))
            for kernel in ("gmm", "gmm_T", "tgmm")]


def _group_sizes(m: int, g: int, skewed: bool, key) -> jax.Array:
    """Equal sizes, or a skewed split (Zipf-like weights 1/(rank+1), shuffled) summing to m."""
    if not skewed:
        return jnp.full((g,), m // g, jnp.int32)
    weights = jax.random.permutation(key, 1.0 / (jnp.arange(g) + 1.0))
    sizes = jnp.floor(weights / weights.sum() * m).astype(jnp.int32)
    return sizes.at[0].add(m - sizes.sum())


def _bench_case(cfg: TileConfig, g: int, m: int, k: int, n: int, skewed: bool,
                baselines: bool) -> dict:
    """TFLOP/s (useful FLOPs 2 M K N) of gmm, gmm with w transposed, tgmm, and baselines."""
    kx, kw, kd, ks = jax.random.split(jax.random.key(0), 4)
    sizes = _group_sizes(m, g, skewed, ks)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (g, k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
    w_t = jnp.swapaxes(w, 1, 2)  # [G, N, K]: same shapes as the forward problem
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    plan = jax.jit(pad_plan, static_argnums=(1, 2))(sizes, m, cfg.block_m)
    x_pad, dy_pad = pad_rows(x, plan), pad_rows(dy, plan)
    row = {"K": k, "N": n, "sizes": "skewed" if skewed else "equal",
           "max_group": int(sizes.max()), "padded_rows": plan.padded_rows}
    runs = {
        "gmm": (lambda a, b: gmm(a, b, plan, config=cfg), x_pad, w),
        "gmm_T": (lambda a, b: gmm(a, b, plan, transpose_w=True, config=cfg), x_pad, w_t),
        "tgmm": (lambda a, b: tgmm(a, b, plan, g, out_dtype=jnp.bfloat16, config=cfg),
                 x_pad, dy_pad),
    }
    if baselines:
        runs["ragged_dot"] = (lambda a, b: lax.ragged_dot(a, b, sizes), x, w)
        if not skewed:
            runs["dense_einsum"] = (
                lambda a, b: jnp.einsum("gmk,gkn->gmn", a.reshape(g, m // g, k), b), x, w)
    flops = 2 * m * k * n
    for name, (fn, a, b) in runs.items():
        row[name] = round(flops / timing.kernel_ms(fn, (a, b), 20) / 1e9, 1)  # TFLOP/s
    print(row, flush=True)
    return row


def _check_on_device(cfg: TileConfig) -> None:
    """Checks all three kernels at benchmark size before timing them (fast must also be right)."""
    g, m, k, n = 64, 98304, 1024, 512
    sizes = _group_sizes(m, g, True, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(3), (g, k, n)) / 32).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(4), (m, n), jnp.bfloat16)
    plan = pad_plan(sizes, m, cfg.block_m)
    x_pad, dy_pad = pad_rows(x, plan), pad_rows(dy, plan)
    ref = lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    checks = {
        "gmm": (unpad_rows(gmm(x_pad, w, plan, config=cfg), plan), ref),
        "gmm_T": (unpad_rows(gmm(x_pad, jnp.swapaxes(w, 1, 2), plan, transpose_w=True,
                                 config=cfg), plan), ref),
        "tgmm": (tgmm(x_pad, dy_pad, plan, g, config=cfg), tgmm_reference(x_pad, dy_pad, plan, g)),
    }
    for name, (got, want) in checks.items():
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        print(f"check {name}: max rel err {err:.2e}", flush=True)
        if not np.isfinite(err) or err > 2e-2:
            raise RuntimeError(f"{name} is wrong on the device with {cfg} (max rel err {err})")


def _bench(tune: bool = False, g: int = 64, m: int = 98304) -> list[dict]:
    """The default config on G=64, M=98304, (K, N) in {(1024, 512), (512, 1024)}, equal and
    skewed sizes, against ragged_dot and a dense batched einsum; with `tune`, a few other
    configs on the kernels alone. Prints one dict per case and returns them all."""
    _check_on_device(TileConfig())
    rows = []
    for k, n in ((1024, 512), (512, 1024)):
        for skewed in (False, True):
            rows.append({"config": "default", **_bench_case(TileConfig(), g, m, k, n, skewed,
                                                             baselines=True)})
    if tune:
        variants = {"wg_split=rows": TileConfig(wg_split="rows"),
                    "chain_tiles=False": TileConfig(chain_tiles=False),
                    "slots=4,stages=3": TileConfig(epilogue_slots=4, max_concurrent_steps=3),
                    "slots=4,stages=3,chain_tiles=False": TileConfig(
                        epilogue_slots=4, max_concurrent_steps=3, chain_tiles=False)}
        for name, cfg in variants.items():
            print(f"=== {name}", flush=True)
            for k, n in ((1024, 512), (512, 1024)):
                try:
                    if k == 1024:
                        _check_on_device(cfg)
                    rows.append({"config": name, **_bench_case(cfg, g, m, k, n, False,
                                                                baselines=False)})
                except Exception as e:  # noqa: BLE001 - a failing variant must not stop the rest
                    print(f"{name} K={k} N={n} failed: {type(e).__name__}: {e}", flush=True)
    return rows


def main(argv=None) -> int:
    """python -m pallas_kernels.grouped_matmul [--interpret]
        the kernels against the references (natively on a Hopper GPU, else in interpret mode);
        prints a table and exits non-zero if a check fails.
    python -m pallas_kernels.grouped_matmul --bench [--tune] [--json PATH]   (one GPU)
        `_bench`: TFLOP/s of the default config (with --tune, of other configs too)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="grouped matmul kernels: self-check or benchmark")
    ap.add_argument("--interpret", action="store_true",
                    help="check in GPU interpret mode even on a Hopper GPU")
    ap.add_argument("--bench", action="store_true", help="time the kernels (GPU)")
    ap.add_argument("--tune", action="store_true", help="with --bench: other configs too")
    ap.add_argument("--json", default=None, help="with --bench: write the rows here")
    args = ap.parse_args(argv)
    if args.bench or args.tune:
        results = _bench(tune=args.tune)
        if args.json:
            meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
        return 0
    interpret, where = mg.mode(args.interpret)
    return mg.run_checks(f"pallas_kernels.grouped_matmul ({where})", _checks(interpret))


if __name__ == "__main__":
    raise SystemExit(main())
