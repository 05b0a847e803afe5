"""What bounds the FP8 GEMM kernel: variants of pallas_kernels/fp8_gemm.py's pipeline, side by side.

A lab experiment: the measured variants, most of them rejected, kept runnable so that their
results can be reproduced (docs/kernels.md#fp8-gemm tells the story). Each variant runs the
kernel's own body (`fp8_gemm.dense_body`) with another K pipeline in place of
`fp8_gemm.promoting_pipeline`.

Command:   python experiments/lab/fp8_gemm_variants.py                       (one GPU)
           python experiments/lab/fp8_gemm_variants.py --interpret --shapes 512x512x512 \
               --iterations 1     (a CPU smoke run in Pallas' GPU interpret mode; times
                                   meaningless)
Hardware:  one H100/H200 for the numbers.
What it measures, per shape y[M, N] = a[M, K] @ b[N, K]^T (e4m3 from random normals, K-block
scales uniform in [0.5, 2], 128 x 128 weight blocks; CUPTI kernel time, median of --iterations,
L2 flushed, pallas_kernels/timing.py), each variant's TFLOP/s and its max error relative to the
exact product:
  promote[CFG]   the kernel as it is (fp32 promotion every 128 of K) with tile config CFG,
                 multicast included (`Fp8Config.multicast`); work items row after row unless CFG
                 names groups of rows (`Fp8Config.group_m`; the kernel's default takes 8)
  inplace[CFG]   the same pipeline and tiles with the promotion removed: every wgmma accumulates
                 into one fp32 accumulator and the scales are ignored (its error is against the
                 unscaled product). The kernel's ceiling for its tiles: what the TMA and the
                 tensor cores reach when no CUDA-core work sits between the wgmmas
  carry[CFG]     two K-blocks a stage with the stage's second wgmma left in flight into the
                 next step (promoted there, once the next stage's first wgmma is issued), the
                 stages' consumed barriers arrived on by hand one step late. GPU only: Pallas'
                 interpret mode cannot store into an accumulator, which this needs to start
                 one afresh
  deferred[CFG]  two K-blocks a stage, the second one's product waited for at the end of the
                 step and promoted during the next step's first wgmma (carried as registers,
                 so nothing is in flight across the loop's back edge)
  serial[CFG]    promotion with one fresh accumulator at a time: each (K-block, part) wgmma is
                 waited for and promoted before the next is issued, so the registers hold the
                 result and one accumulator and bigger tiles fit; the tensor cores then stay
                 busy only through the other warpgroup's wgmmas (DeepGEMM's schedule). Parts
                 are row blocks (`splits`) or, for 128 x 256, two column halves
  upfront[CFG]   the kernel's schedule until the afternoon of 2026-12-02: both fresh
                 accumulators zeroed before the first wgmma, each K-block's scales read from
                 SMEM after its wgmma is waited for
  window[CFG]    two fresh accumulators sliding over a stage's parts (K-block, row block,
                 column part): each part waited for while the next one runs, then promoted, and
                 the part after next issued into a fresh accumulator, so wider tiles keep the
                 overlap with two part-sized accumulators (128 x 192 as a 128- and a 64-column
                 part; 256 x 128 as 64 x 64 parts)
  release[CFG]   the kernel's schedule with the stage released (its consumed barriers arrived
                 on by hand) as soon as its last wgmma is done and the scales are in registers,
                 before the last promotion, instead of after the step
Output: a table and a JSON list of records {"shape", "variant", "config", "tflops", "ms",
"max_rel_err"}, with "invalid" where the result is wrong (--json; metadata in the first
record's "run").
Result (one H200, 2026-12-02; experiments/results/fp8_gemm_variants_h200.json, recorded by
scratch versions of these variants in two device calls before they were gathered here; "call"
names the call, and only rows of one call are side by side): call A, at 8192^3: the promoting
128 x 128 kernel 1058, in place 1130 (128 x 128), 1337 (128 x 256), 1397 (256 x 128); multicast
of b 1135 against 1050 without it. Call B: serial 831 (256 x 128), 562 (128 x 256), 963 (128 x
128) against the promoting kernel's 1132; serial 256 x 128 with b multicast 1098. So the 128 x
128 tile's operand traffic bounds the kernel, bigger promoting tiles lose more to the serial
schedule than the tile gains, and multicast is the gain that fits: `fp8_gemm.default_config`.
Later the same day (fp8_gemm_variants_carry_h200.json, fp8_gemm_variants_deferred_h200.json, one
device call each, 4 shapes): carry ran at 0.35-0.51x the promoting kernel (430 against 1128 at
8192^3): ptxas (MOSAIC_GPU_DUMP_PTXAS=1) warned that it serializes the wgmmas because non-wgmma
instructions read an in-flight accumulator's registers, and the PTX copies the in-flight
accumulator into the loop-carried registers at the back edge; deferred, free of that warning,
ran at 0.95-1.01x (1144 against 1142 at 8192^3; 1153 against 1193 with b multicast): hiding
the second promotion gains nothing, which agrees with the in-place ceiling above.
The first file also holds scratch trials this script does not define: the scale rows multicast too
(a wrong result at 4096 x 24576 x 1536, not investigated) and in-place accumulation over two
K-blocks a stage (two wgmmas into one accumulator with no wait between them: wrong results);
rows with a wrong result carry "invalid", and their times mean nothing.
The afternoon of 2026-12-02, three calls (the records' notes say what "promote" was in each):
fp8_gemm_variants_window_h200.json: window over 128 x 192 and 256 x 128 tiles ran at 0.68-0.93x
the kernel, and ptxas spilled registers in every one (32-216 bytes, its lines in the file; none
at 128 x 128); window at 128 x 128 (the kernel's schedule with its scales read before the wait)
ran at 1.02-1.05x. fp8_gemm_variants_upfront_h200.json: zeroing each accumulator just before its
wgmma alone, 0.99-1.01x upfront. fp8_gemm_variants_scales_first_h200.json: the kernel with its
scales read before the wait (now `promote`) against upfront, 1.02-1.05x with b multicast (1185
against 1153 at 8192^3) and 1.02-1.03x without: the early scale load is the gain, and
fp8_gemm's promoting pipeline now does it.
The evening of 2026-12-02, two calls, the second in reversed order
(fp8_gemm_variants_release_groups_h200.json, fp8_gemm_variants_groups_reversed_h200.json; b
multicast in all): work items in groups of 8 rows ran at 1.08-1.10x row after row where b is large
(1346 and 1343 against 1219 at 8192^3; 1343 and 1342 against 1243 and 1245 at 4096 x 7168 x 16384)
and 1.00x at 4096 x 2176 x 7168; groups of 4 and 16 less well on the whole; release at 0.97-1.00x
(1197 against 1219 at 8192^3). Groups of 8 rows are now fp8_gemm.default_config's (GROUP_M).
"""

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from pallas_kernels import _mosaic as mg  # noqa: E402
from pallas_kernels import fp8_gemm as fg  # noqa: E402
from pallas_kernels import fp8_quant as q8  # noqa: E402
from pallas_kernels import timing  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
MAX_REL_ERR = 1e-2  # bf16 output rounding is ~4e-3 of the largest value; a wrong tile is O(1)
SHAPES = [(8192, 8192, 8192), (4096, 7168, 2048), (4096, 24576, 1536), (4096, 2176, 7168)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariantConfig(fg.Fp8Config):
    """Fp8Config plus the variants' knobs: `kb` K-blocks a stage (any schedule), `col_parts`
    equal column parts a warpgroup (serial, window; 0 with window: runs of at most 128
    columns, `_col_widths`), and the schedule."""
    kb: int = 1
    col_parts: int = 1
    schedule: str = "promote"  # promote carry deferred inplace serial window upfront release

    @property
    def k_blocks(self) -> int:
        return self.kb


def _inplace_mma(cfg):
    if cfg.k_blocks != 1:
        # two wgmmas into one accumulator ref with no wait between them came out wrong (on
        # the GPU and in interpret mode), so the in-place variant keeps one K-block a stage
        raise ValueError("inplace variants take one K-block a stage")
    rows, cols = cfg.wg_tile()

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, acc):
        del sa_smem, sb_smem
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))
        blk = pl.ds(0, q8.BLOCK)  # one K-block a stage (see VARIANTS)
        plgpu.wgmma(acc, a_smem.at[pl.ds(r0, rows), blk], b_smem.at[pl.ds(c0, cols), blk].T)
        plgpu.wgmma_wait(0)
        return acc

    def context(store_to):
        def run_with(run):
            store_to(pl.run_scoped(lambda acc: run(acc)[...],
                                   plgpu.ACC((rows, cols), jnp.float32)), 0)
        return run_with
    return mma, context


def _serial_mma(cfg, b_blocks):
    wg_rows, wg_cols = cfg.wg_tile()
    rows, cols = wg_rows // cfg.splits, wg_cols // cfg.col_parts
    parts = [(kb, j, c) for kb in range(cfg.k_blocks) for j in range(cfg.splits)
             for c in range(cfg.col_parts)]

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, carry):
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))
        out = list(carry)
        for kb, j, c in parts:
            blk, i = pl.ds(kb * q8.BLOCK, q8.BLOCK), j * cfg.col_parts + c
            row_sl, col0 = pl.ds(r0 + j * rows, rows), c0 + c * cols

            def one(acc):
                plgpu.wgmma(acc, a_smem.at[row_sl, blk], b_smem.at[pl.ds(col0, cols), blk].T)
                scale = fg.promotion_scale(sa_smem.at[kb], sb_smem.at[kb], row_sl, col0,
                                            pl.ds(col0, cols), out[i].shape,
                                            b_blocks and q8.BLOCK % cols == 0)
                return plgpu.wgmma_accumulator_load(acc, wait_n=0) * scale
            out[i] = out[i] + pl.run_scoped(one, plgpu.ACC((rows, cols), jnp.float32))
        return tuple(out)

    def context(store_to):
        def run_with(run):
            zeros = tuple(_fresh(rows, cols) for _ in range(cfg.splits * cfg.col_parts))
            res = run(zeros)
            for j in range(cfg.splits):
                blocks = res[j * cfg.col_parts:(j + 1) * cfg.col_parts]
                store_to(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1),
                         j * rows)
        return run_with
    return mma, context


def _fresh(rows, cols):
    """A zero float32 [rows, cols] value in the wgmma accumulator's layout."""
    return plgpu.layout_cast(jnp.zeros((rows, cols), jnp.float32), plgpu.Layout.WGMMA)


def _issuer(a_smem, b_smem, r0, rows, c0, cols):
    """issue(acc, kb): the warpgroup's wgmma of the stage's K-block kb into accumulator acc."""
    def issue(acc, kb):
        blk = pl.ds(kb * q8.BLOCK, q8.BLOCK)
        plgpu.wgmma(acc, a_smem.at[pl.ds(r0, rows), blk], b_smem.at[pl.ds(c0, cols), blk].T)
    return issue


def _result_only_context(rows, cols):
    """compute_context for schedules that carry the warpgroup's result alone: zeros in, the
    pipeline's result stored."""
    def context(store_to):
        def run_with(run):
            store_to(run((_fresh(rows, cols),))[0], 0)
        return run_with
    return context


def _upfront_mma(cfg, b_blocks):
    """The promoting schedule as fp8_gemm had it until 2026-12-02: both fresh accumulators
    zeroed (their scopes opened) before the first wgmma is issued, then both wgmmas, then the
    promotions in issue order. The kernel now opens each accumulator's scope just before its
    wgmma (fp8_gemm's promoting pipeline)."""
    if cfg.k_blocks != 2 or cfg.splits != 1:
        raise ValueError("upfront variants take two K-blocks a stage and splits=1")
    rows, cols = cfg.wg_tile()

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, carry):
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))

        def products(acc0, acc1):
            issue = _issuer(a_smem, b_smem, r0, rows, c0, cols)
            for kb, acc in enumerate((acc0, acc1)):
                issue(acc, kb)
            out = carry[0]
            for kb, acc in enumerate((acc0, acc1)):
                part = plgpu.wgmma_accumulator_load(acc, wait_n=1 - kb)
                out = out + part * fg.promotion_scale(
                    sa_smem.at[kb], sb_smem.at[kb], pl.ds(r0, rows), c0, pl.ds(c0, cols),
                    out.shape, b_blocks)
            return (out,)
        return pl.run_scoped(products, plgpu.ACC((rows, cols), jnp.float32),
                             plgpu.ACC((rows, cols), jnp.float32))
    return mma, _result_only_context(rows, cols)


def _release_mma(cfg, b_blocks):
    """The kernel's schedule (two K-blocks a stage, scales read before each wait) with the
    stage released early: its consumed barriers (`manual_consumed_barriers`) are arrived on
    once the stage's last wgmma is done and its scales are in registers, before that block's
    promotion, so the TMA warpgroup may refill the slot while the warpgroup still promotes
    (DeepGEMM releases a stage right after its wait, kernels.md §2.3). The pipeline otherwise
    arrives after the step's body returns."""
    if cfg.k_blocks != 2 or cfg.splits != 1:
        raise ValueError("release variants take two K-blocks a stage and splits=1")
    rows, cols = cfg.wg_tile()
    scales, scaled = _scale_fns(rows, cols, b_blocks)

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, *rest):
        *consumed, carry = rest
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))
        issue = _issuer(a_smem, b_smem, r0, rows, c0, cols)

        def first(acc0):
            issue(acc0, 0)

            def second(acc1):
                issue(acc1, 1)
                sc0 = scales(sa_smem.at[0], sb_smem.at[0], r0, c0)
                out = carry[0] + scaled(plgpu.wgmma_accumulator_load(acc0, wait_n=1), sc0)
                sc1 = scales(sa_smem.at[1], sb_smem.at[1], r0, c0)
                part1 = plgpu.wgmma_accumulator_load(acc1, wait_n=0)
                for barrier in consumed:  # nothing of this stage's SMEM is read after here
                    plgpu.barrier_arrive(barrier)
                return (out + scaled(part1, sc1),)
            return pl.run_scoped(second, plgpu.ACC((rows, cols), jnp.float32))
        return pl.run_scoped(first, plgpu.ACC((rows, cols), jnp.float32))
    return mma, _result_only_context(rows, cols)


def _col_widths(wg_cols: int, col_parts: int) -> list[int]:
    """Column widths of a warpgroup's parts: `col_parts` equal ones, or with col_parts=0 runs
    of at most 128 columns (128 x 192: 128 + 64; each part lies in one weight block where the
    tile starts on one)."""
    if col_parts:
        return [wg_cols // col_parts] * col_parts
    return [min(q8.BLOCK, wg_cols - c) for c in range(0, wg_cols, q8.BLOCK)]


def _window_mma(cfg, b_blocks):
    """Two fresh accumulators sliding over a stage's parts (K-block, row block, column part):
    parts 0 and 1 are issued, then each part is waited for with the next one still in flight,
    promoted, and its accumulator's successor (part i + 2) issued. With two parts a stage this
    is the kernel's schedule (scales read before the wait); with more, every promotion but the
    stage's last overlaps a wgmma while only two part-sized accumulators are live (128 x 192 in
    a 128- and a 64-column part: the result's 96 registers a thread and at most 64 + 32 for the
    accumulators; ptxas still spilled, the module docstring). Each part's accumulator is a
    scope of its own, opened just before its wgmma (the scopes nest), and its value is not
    used after its promotion."""
    wg_rows, wg_cols = cfg.wg_tile()
    rows = wg_rows // cfg.splits
    widths = _col_widths(wg_cols, cfg.col_parts)
    starts = [sum(widths[:c]) for c in range(len(widths))]
    parts = [(kb, j, c) for kb in range(cfg.k_blocks) for j in range(cfg.splits)
             for c in range(len(widths))]
    # b's scale is one number for a part only where every tile's part lies in one weight block:
    # a 192-wide tile starts at column 192 (in block 1) too, so there each column has its own
    scalar_b = [b_blocks and cfg.block_n % q8.BLOCK == 0 and q8.BLOCK % w == 0
                and (cfg.wg_offsets(1)[1] + st) % w == 0 for w, st in zip(widths, starts)]

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, carry):
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))

        def issue(acc, p):
            kb, j, c = parts[p]
            blk = pl.ds(kb * q8.BLOCK, q8.BLOCK)
            plgpu.wgmma(acc, a_smem.at[pl.ds(r0 + j * rows, rows), blk],
                        b_smem.at[pl.ds(c0 + starts[c], widths[c]), blk].T)

        def promote(out, acc, p, wait_n):
            kb, j, c = parts[p]
            i, col0 = j * len(widths) + c, c0 + starts[c]
            scale = fg.promotion_scale(sa_smem.at[kb], sb_smem.at[kb],
                                        pl.ds(r0 + j * rows, rows), col0,
                                        pl.ds(col0, widths[c]), out[i].shape,
                                        scalar_b[c])
            part = plgpu.wgmma_accumulator_load(acc, wait_n=wait_n)
            return out[:i] + (out[i] + part * scale,) + out[i + 1:]

        def step(p, prev, out):  # prev: part p - 1's accumulator, in flight
            def body(acc):
                issue(acc, p)
                res = out if prev is None else promote(out, prev, p - 1, wait_n=1)
                if p + 1 < len(parts):
                    return step(p + 1, acc, res)
                return promote(res, acc, p, wait_n=0)
            return pl.run_scoped(body, plgpu.ACC((rows, widths[parts[p][2]]), jnp.float32))

        return step(0, None, tuple(carry))

    def context(store_to):
        def run_with(run):
            zeros = tuple(plgpu.layout_cast(jnp.zeros((rows, w), jnp.float32),
                                            plgpu.Layout.WGMMA)
                          for _ in range(cfg.splits) for w in widths)
            res = run(zeros)
            for j in range(cfg.splits):
                blocks = res[j * len(widths):(j + 1) * len(widths)]
                store_to(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1),
                         j * rows)
        return run_with
    return mma, context


def _scale_fns(rows, cols, b_blocks):
    """(scales, scaled): a warpgroup's K-block scales as registers (s_a of its rows times the
    one s_b of its columns with `b_blocks`, else the pair), and a partial product times them."""
    def scales(sa_row, sb_row, r0, c0):
        sa = plgpu.load(sa_row.at[pl.ds(r0, rows)], layout=plgpu.Layout.WGMMA.reduce(1))
        if b_blocks:
            return sa * sb_row[c0]
        sb = plgpu.load(sb_row.at[pl.ds(c0, cols)], layout=plgpu.Layout.WGMMA.reduce(0))
        return sa, sb

    def scaled(part, sc):
        if b_blocks:
            return part * lax.broadcast_in_dim(sc, part.shape, [0])
        sa, sb = sc
        return part * (lax.broadcast_in_dim(sa, part.shape, [0])
                       * lax.broadcast_in_dim(sb, part.shape, [1]))
    return scales, scaled


def _zero_scales(rows, cols, b_blocks):
    """Zero scales in `_scale_fns`'s form (a carried pending block's scales before the first
    step): the row scales, or with per-column b scales (rows, columns)."""
    sa0 = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    sb0 = plgpu.layout_cast(jnp.zeros((cols,), jnp.float32), plgpu.Layout.WGMMA.reduce(0))
    return sa0 if b_blocks else (sa0, sb0)


def _carry_mma(cfg, b_blocks, holder):
    """Two K-blocks a stage with the stage's second wgmma left in flight into the next step:
    step s issues K-block 0 into acc0, then (only acc0 in flight) promotes the previous step's
    acc1, issues K-block 1 into acc1 and promotes acc0. The intent: no promotion waits on an
    empty tensor pipe, whatever the two warpgroups' phase; in fact ptxas serializes its wgmmas
    (the module docstring).
    The previous step's stage is released (its consumed barriers arrived on by hand) once its
    acc1 is read; the tile's last stage after the loop (`holder` carries the barrier refs and
    the accumulators, which live across the steps)."""
    if cfg.k_blocks != 2 or cfg.splits != 1:
        raise ValueError("carry variants take two K-blocks a stage and splits=1")
    rows, cols = cfg.wg_tile()
    n_slots = cfg.max_concurrent_steps
    scales, scaled = _scale_fns(rows, cols, b_blocks)

    def release(slot):
        for barrier in holder["consumed"]:
            plgpu.barrier_arrive(barrier.at[slot])

    def mma(idx, a_smem, b_smem, sa_smem, sb_smem, *rest):
        carry = rest[-1]  # rest: the four consumed barriers of this slot (unused), the carry
        result, prev = carry
        step = idx[0]
        acc0, acc1 = holder["accs"]
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))
        issue = _issuer(a_smem, b_smem, r0, rows, c0, cols)

        issue(acc0, 0)
        part1 = plgpu.wgmma_accumulator_load(acc1, wait_n=1)  # the previous step's block 1
        result = result + scaled(part1, prev)  # zero at step 0 (acc1 fresh)
        acc1[...] = _fresh(rows, cols)

        @pl.when(step > 0)
        def _():
            release(lax.rem(step + n_slots - 1, n_slots))
        issue(acc1, 1)
        part0 = plgpu.wgmma_accumulator_load(acc0, wait_n=1)
        result = result + scaled(part0, scales(sa_smem.at[0], sb_smem.at[0], r0, c0))
        acc0[...] = _fresh(rows, cols)
        return result, scales(sa_smem.at[1], sb_smem.at[1], r0, c0)

    def context(store_to, num_steps):
        def run_with(run):
            def with_accs(acc0, acc1):
                holder["accs"] = (acc0, acc1)
                no_scales = _zero_scales(rows, cols, b_blocks)
                result, last = run((_fresh(rows, cols), no_scales))
                result = result + scaled(plgpu.wgmma_accumulator_load(acc1, wait_n=0), last)
                release((num_steps - 1) % n_slots)
                store_to(result, 0)
            pl.run_scoped(with_accs, plgpu.ACC((rows, cols), jnp.float32),
                          plgpu.ACC((rows, cols), jnp.float32))
        return run_with
    return mma, context


def _carry_pipeline(cfg, in_specs, grid, store_to, state, b_blocks):
    """emit_pipeline_warp_specialized with consumed barriers released by `_carry_mma`; the
    returned pipeline hands its barrier allocations to the body before it is traced."""
    holder = {}
    mma, context = _carry_mma(cfg, b_blocks, holder)
    inner = mg.warp_specialized(mma, context(store_to, grid[0]), in_specs, grid,
                                cfg.max_concurrent_steps, state, manual_consumed_barriers=True)

    def pipeline(*refs, allocations=None):
        if allocations is None:
            raise ValueError("carry variants need the kernel's allocations")
        holder["consumed"] = allocations["flat_consumed_barrier_refs"]
        return inner(*refs, allocations=allocations)
    pipeline.get_allocations = inner.get_allocations
    return pipeline


def _deferred_mma(cfg, b_blocks):
    """Two K-blocks a stage, the stage's second block promoted during the next stage's first
    wgmma: step s issues K-block 0 into a fresh acc0, promotes the previous step's block 1
    (carried as registers, `pending`, with its scales) while it runs, issues K-block 1 into
    acc1, promotes acc0 while that runs, and waits for acc1 without promoting it. No wgmma is
    in flight across the loop's back edge (the carry variant's in-flight accumulator made
    ptxas serialize the wgmmas), the stages are released as usual, and the registers peak at
    the result and two accumulators' worth, as in the default (ptxas still spilled 28 bytes
    here, the default nothing)."""
    if cfg.k_blocks != 2 or cfg.splits != 1:
        raise ValueError("deferred variants take two K-blocks a stage and splits=1")
    rows, cols = cfg.wg_tile()
    scales, scaled = _scale_fns(rows, cols, b_blocks)

    def mma(_, a_smem, b_smem, sa_smem, sb_smem, carry):
        result, pending, prev = carry
        r0, c0 = cfg.wg_offsets(lax.axis_index("wg"))

        def products(acc0, acc1):
            issue = _issuer(a_smem, b_smem, r0, rows, c0, cols)
            issue(acc0, 0)
            out = result + scaled(pending, prev)  # the previous stage's block 1 (zero at first)
            issue(acc1, 1)
            part0 = plgpu.wgmma_accumulator_load(acc0, wait_n=1)
            out = out + scaled(part0, scales(sa_smem.at[0], sb_smem.at[0], r0, c0))
            part1 = plgpu.wgmma_accumulator_load(acc1, wait_n=0)
            return out, part1, scales(sa_smem.at[1], sb_smem.at[1], r0, c0)
        return pl.run_scoped(products, plgpu.ACC((rows, cols), jnp.float32),
                             plgpu.ACC((rows, cols), jnp.float32))

    def context(store_to):
        def run_with(run):
            zeros = _fresh(rows, cols)
            result, pending, last = run((zeros, zeros, _zero_scales(rows, cols, b_blocks)))
            store_to(result + scaled(pending, last), 0)
        return run_with
    return mma, context


def _variant_pipeline(cfg, in_specs, grid, store_to, state=None, *, b_blocks=False):
    """The K pipeline of `cfg`'s schedule, in fp8_gemm.promoting_pipeline's place."""
    schedule = getattr(cfg, "schedule", "promote")
    if schedule == "promote":
        return fg.promoting_pipeline(cfg, in_specs, grid, store_to, state, b_blocks=b_blocks)
    if schedule == "carry":
        return _carry_pipeline(cfg, in_specs, grid, store_to, state,
                               b_blocks and fg.b_scalar_ok(cfg))
    if schedule == "deferred":
        mma, context = _deferred_mma(cfg, b_blocks and fg.b_scalar_ok(cfg))
    elif schedule == "inplace":
        mma, context = _inplace_mma(cfg)
    elif schedule == "window":
        mma, context = _window_mma(cfg, b_blocks)
    elif schedule == "upfront":
        mma, context = _upfront_mma(cfg, b_blocks and fg.b_scalar_ok(cfg))
    elif schedule == "release":
        mma, context = _release_mma(cfg, b_blocks and fg.b_scalar_ok(cfg))
    else:  # serial: b's scale is one number per column part that lies in one 128-column block
        mma, context = _serial_mma(cfg, b_blocks)
    return mg.warp_specialized(mma, context(store_to), in_specs, grid, cfg.max_concurrent_steps,
                               state, manual_consumed_barriers=schedule == "release")


def variant_gemm(a, b, sa_t, sb_t, *, cfg, interpret=False):
    """fp8_gemm.gemm_kernel's dense GEMM (b in 128 x 128 blocks, bf16 out) with the K pipeline
    of `cfg`'s schedule: the kernel's body and launch, `_variant_pipeline` in it."""
    (m, k), n = a.shape, b.shape[0]
    if cfg.split_k != 1:
        raise ValueError("variants run unsplit K (split_k=1)")
    fg.check_shapes(cfg, m, n, k)
    return mg.launch_shared(
        a, b, sa_t, sb_t, body=fg.dense_body,
        params=(("cfg", cfg), ("b_blocks", True), ("pipeline", _variant_pipeline)),
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16), interpret=interpret,
        cluster=cfg.cluster)


def _stage(**kw):
    return fg.Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1, **kw)


def _stages2(schedule, **kw):
    """A variant schedule with the kernel's default stages: two K-blocks each, 3 of them, one
    epilogue slot."""
    return VariantConfig(schedule=schedule, kb=2, max_concurrent_steps=3, epilogue_slots=1, **kw)


VARIANTS = {
    "promote[128x128, 2-block stages]": _stage(),
    "promote[128x128, 2-block stages, multicast b]": _stage(multicast="b"),
    "promote[128x128, 2-block stages, multicast a]": _stage(multicast="a"),
    "promote[128x128, 2-block stages, multicast b, groups of 4 rows]": _stage(
        multicast="b", group_m=4),
    "promote[128x128, 2-block stages, multicast b, groups of 8 rows]": _stage(
        multicast="b", group_m=8),
    "promote[128x128, 2-block stages, multicast b, groups of 16 rows]": _stage(
        multicast="b", group_m=16),
    "promote[128x128, 2-block stages, multicast a, tiles not chained]": _stage(
        multicast="a", chain_tiles=False),
    "promote[128x128, multicast a]": fg.Fp8Config(multicast="a"),
    "carry[128x128, 2-block stages]": _stages2("carry"),
    "carry[128x128, 2-block stages, multicast b]": _stages2("carry", multicast="b"),
    "deferred[128x128, 2-block stages]": _stages2("deferred"),
    "deferred[128x128, 2-block stages, multicast b]": _stages2("deferred", multicast="b"),
    "inplace[128x128]": VariantConfig(schedule="inplace"),
    "inplace[128x256]": VariantConfig(schedule="inplace", block_n=256, max_concurrent_steps=3,
                                      epilogue_slots=1),
    "inplace[256x128]": VariantConfig(schedule="inplace", block_m=256, epilogue_slots=1),
    "serial[128x128]": VariantConfig(schedule="serial"),
    "serial[256x128, 2 row blocks]": VariantConfig(schedule="serial", block_m=256, splits=2,
                                                   epilogue_slots=1),
    "serial[256x128, 2 row blocks, 2-block stages]": VariantConfig(
        schedule="serial", block_m=256, splits=2, kb=2, max_concurrent_steps=2,
        epilogue_slots=1),
    "serial[128x256, 2 column halves]": VariantConfig(schedule="serial", block_n=256,
                                                      col_parts=2, epilogue_slots=1),
    "serial[256x128, 2 row blocks, multicast b]": VariantConfig(
        schedule="serial", block_m=256, splits=2, epilogue_slots=1, multicast="b"),
    "serial[256x128, 2 row blocks, multicast a]": VariantConfig(
        schedule="serial", block_m=256, splits=2, epilogue_slots=1, multicast="a"),
    "serial[128x256, 2 column halves, multicast b]": VariantConfig(
        schedule="serial", block_n=256, col_parts=2, epilogue_slots=1, multicast="b"),
    "upfront[128x128, 2-block stages]": _stages2("upfront"),
    "upfront[128x128, 2-block stages, multicast b]": _stages2("upfront", multicast="b"),
    "release[128x128, 2-block stages]": _stages2("release"),
    "release[128x128, 2-block stages, multicast b]": _stages2("release", multicast="b"),
    "window[128x128, 2-block stages, multicast b]": _stages2("window", multicast="b"),
    "window[128x192, 128+64 columns, multicast b]": VariantConfig(
        schedule="window", block_n=192, col_parts=0, max_concurrent_steps=4, multicast="b"),
    "window[128x192, 128+64 columns, 2-block stages x2, multicast b]": VariantConfig(
        schedule="window", block_n=192, col_parts=0, kb=2, max_concurrent_steps=2,
        epilogue_slots=1, multicast="b"),
    "window[128x192, 128+64 columns, 2-block stages x2]": VariantConfig(
        schedule="window", block_n=192, col_parts=0, kb=2, max_concurrent_steps=2,
        epilogue_slots=1),
    "window[256x128, 2 row blocks x 2 column halves, multicast b]": VariantConfig(
        schedule="window", block_m=256, splits=2, col_parts=2, max_concurrent_steps=3,
        epilogue_slots=1, multicast="b"),
    "window[256x128, 2 row blocks x 2 column halves, 2-block stages x2, multicast b]":
        VariantConfig(schedule="window", block_m=256, splits=2, col_parts=2, kb=2,
                      max_concurrent_steps=2, epilogue_slots=1, multicast="b"),
}


def run_variant(m, n, k, name, cfg, iterations, interpret) -> dict:
    rec = {"shape": [m, n, k], "variant": name, "config": repr(cfg)}
    if interpret and getattr(cfg, "schedule", "promote") == "carry":
        rec.update(tflops=None, error="GPU only: interpret mode cannot store into an "
                   "accumulator, which the carry schedule needs")
        return rec
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(q8.FP8)
    b = jax.random.normal(kb, (n, k), jnp.float32).astype(q8.FP8)
    sa_t = jax.random.uniform(ka, (k // q8.BLOCK, m), jnp.float32, 0.5, 2.0)
    sb_t = jnp.repeat(jax.random.uniform(kb, (k // q8.BLOCK, n // q8.BLOCK), jnp.float32,
                                         0.5, 2.0), q8.BLOCK, axis=1)
    inplace = getattr(cfg, "schedule", "promote") == "inplace"
    ones = (jnp.ones_like(sa_t), jnp.ones_like(sb_t))
    sa_w, sb_w = ones if inplace else (sa_t, sb_t)
    a_deq = a.astype(jnp.float32).reshape(m, -1, q8.BLOCK) * sa_w.T[:, :, None]
    b_deq = b.astype(jnp.float32).reshape(n, -1, q8.BLOCK) * sb_w.T[:, :, None]
    want = jnp.einsum("mk,nk->mn", a_deq.reshape(m, k), b_deq.reshape(n, k),
                      precision=lax.Precision.HIGHEST)
    fn = jax.jit(functools.partial(variant_gemm, cfg=cfg, interpret=interpret))
    try:
        # numpy: XLA's max on the CPU skips NaN, which is what an unwritten tile holds in
        # interpret mode
        got, want = np.asarray(fn(a, b, sa_t, sb_t), np.float32), np.asarray(want)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        rec["max_rel_err"] = err if np.isfinite(err) else None
        if not err < MAX_REL_ERR:  # NaN too
            rec["invalid"] = f"wrong result: max relative error {err:.3g}"
        ms = timing.kernel_ms(fn, (a, b, sa_t, sb_t), iterations, interpret=interpret)
        rec.update(tflops=2 * m * n * k / ms / 1e9, ms=ms)
    except Exception as e:  # noqa: BLE001 - a variant that fails is a result, said so
        rec.update(tflops=None, error=f"{type(e).__name__}: {str(e)[:300]}")
    return rec


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=None,
                    help="MxNxK shapes (default: 8192^3 and V3's 4096 x {7168 x 2048, 24576 x "
                         "1536, 2176 x 7168})")
    ap.add_argument("--variants", nargs="*", default=None,
                    help=f"a subset of the variants, by name (default: all): {list(VARIANTS)}")
    ap.add_argument("--iterations", type=int, default=10, help="timed iterations per case")
    ap.add_argument("--interpret", action="store_true",
                    help="Pallas GPU interpret mode on the CPU (a smoke run; times meaningless)")
    ap.add_argument("--json", default=str(RESULTS / "fp8_gemm_variants.json"),
                    help="where to write the records")
    a = ap.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
              if a.shapes is not None else SHAPES)
    names = a.variants or list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    run = {"command": "python experiments/lab/fp8_gemm_variants.py " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "interpret": a.interpret, "iterations": a.iterations}
    records = []
    for m, n, k in shapes:
        for name in names:
            cfg = VARIANTS[name]
            r = run_variant(m, n, k, name, cfg, a.iterations, a.interpret)
            records.append(r)
            records[0]["run"] = run
            path = pathlib.Path(a.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1) + "\n")
            tf = "-" if r["tflops"] is None else f"{r['tflops']:8.1f}"
            extra = r.get("error") or r.get("invalid") or f"max rel err {r['max_rel_err']:.1e}"
            print(f"  {m:>5}x{n:>5}x{k:>5}  {name:<48} {tf:>8} TFLOP/s  {extra}", flush=True)
    print(f"wrote {a.json}")
    return records


if __name__ == "__main__":
    main()
