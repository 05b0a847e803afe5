"""MLA decode attention over the latent cache: a Pallas Mosaic GPU kernel in the manner of FlashMLA.

The absorbed decode form of MLA (dsv3_jax/mla.py `attend_absorbed`; ../shared/DESIGN.md
"Notation") attends every head directly over the latent cache: W^UK is folded into the query,
so each head's query is q = [q_nope @ W^UK | q_rope], D_k = C + R = 512 + 64 = 576 wide, and
every head reads the same cache row [c_kv | k_rope] (one shared "KV head", MQA). The values are
the first C = 512 columns of the same row (W^UV is applied after this function). Per batch row
b, new token t of Tq and head h:

    limit[b, t]  = lengths[b] - Tq + t + 1        (the new tokens are already in the cache;
                                                   token t sees positions <= its own: causal)
    s[b,t,h,j]   = scale * <q[b,t,h], kv[b,j]>    for j < limit[b, t]
    o[b,t,h]     = softmax_j(s) @ kv[b, :limit, :512]          [B, Tq, H, 512]
    lse[b,t,h]   = log sum_j exp(s[b,t,h,j])                  [B, Tq, H] float32

**Two cache layouts.** `mla_decode_latent(q_lat, q_rope, c_kv, k_rope, ...)` takes the cache
as the model keeps it (dsv3_jax/mla.py `mla_cached`: c_kv [B, S, C] and k_rope [B, S, R], two
arrays per layer) and the query split the same way (q_lat = q_nope @ W^UK [.., C], q_rope
[.., R]); `mla_decode(q, kv, ...)` takes one [B, S, C + R] array with v_dim = C. Both run the
same kernel, which loads each cache block as two TMA tiles (latent columns, rope columns) into
two SMEM buffers and sums two wgmmas into one score accumulator; the one-array form points
both loads at the same array (column ranges [0, C) and [C, C + R)), so neither form copies
the cache. dsv3_jax/mla.py calls `mla_decode_latent` when the model's runtime asks for the
kernel (`Runtime.decode_attention`).

**Empty windows.** A (b, t) whose window is empty (limit <= 0, e.g. lengths[b] = 0) has no
softmax; we define its output as zeros and its lse as -inf (the log of an empty sum), in every
implementation, so it is never NaN. `mla_decode` raises for concrete `lengths` outside
[0, S_max]; traced lengths are clamped to that range by the kernel's schedule (the reference
clamps the same way).

`impl` picks the implementation: "xla" is the absorbed einsum path as `attend_absorbed` runs it
(bf16 operands, fp32 scores and softmax, bf16 probabilities, fp32 accumulation), "pallas" our
Mosaic GPU kernel (Hopper). `mla_decode_reference` is the float32 definition the tests use.

**The kernel** (kernels.md §3.3-3.4, FlashMLA's dense decode kernel, in our own structure):
  * Rows. The Tq * H (token, head) pairs of one batch row are the M dimension of the MMAs
    (q [B, Tq, H, D] -> [B, Tq*H, D] is a free reshape; FlashMLA does the same with
    s_q * h_q / h_kv), cut into 64-row blocks (one wgmma is 64 rows); a last partial block is
    padded with zero queries whose outputs are dropped. 16 heads x 2 tokens = 32 rows: one block;
    128 heads x 2 tokens: four.
  * Grid (row block, split, batch): one CTA per block of 64 rows and per split of the row's
    cache blocks, three warpgroups per CTA. Warpgroup 2 streams the cache in blocks of
    `block_s` = 64 keys x 576 with TMA into a 2-stage SMEM ring (the 64 x 576 query block takes
    72 KiB, each stage another 72 KiB: 2 stages is what fits next to it in the 227 KiB of SMEM,
    kernels.md §3.4 has FlashMLA's same budget; `small`'s 256 + 64 gets 4 stages), after
    loading the query block once. Each load is two TMA copies (latent and rope columns)
    completing one barrier.
  * The two math warpgroups split the work as FlashMLA does (kernels.md §3.4): the 64 x 512
    fp32 output is 32,768 registers, half the SM, so each warpgroup owns one 64 x 256 half of O
    (256 is also the widest wgmma N). Per cache block, warpgroup w computes the scores of its
    half of the keys, S_w = Q_c @ K_c[w-th 32 keys]^T + Q_r @ K_r[..]^T (two wgmmas into one
    accumulator, one per SMEM tile), masks keys past each row's causal
    limit, and the two exchange their row maxima through SMEM so that both rescale by one
    running maximum (online softmax in fp32, exp2 with log2(e) folded into the scale). Each
    writes its probabilities P_w (bf16) into its half of the block's 64 x 64 P tile in SMEM;
    after a second exchange both run O_w += P @ V[:, w-th C/2 columns] with V the *same*
    latent SMEM tile (no second load of the values: FlashMLA's MQA mode).
    FlashMLA's finer schedule ("seesaw": each warpgroup scoring whole alternate blocks so one
    warpgroup's softmax overlaps the other's MMAs) is not reproduced: same dataflow, plain
    barriers, every wgmma waited for at once.
  * Shapes. C (= the values' width) is a multiple of 64 up to 512: each math warpgroup owns a
    C/2-wide half of O, whole 32-column swizzle tiles and at most a 256-wide wgmma N (V3 and
    `small`: 512 and 256). R is a multiple of 64 (V3: 64): Mosaic GPU also lowers R = 16, 32
    and 48 for CUDA, but those were never checked numerically (interpret mode did not finish
    on them: docs/kernels.md#mla-decode), so `kernel_refusal` admits only R that was, and the
    model uses 64-key blocks only. SMEM: query block (C + R) x 64, stages of block_s x (C + R).
  * Swizzle. Mosaic GPU's wgmma takes a single swizzle for both SMEM operands, and each
    warpgroup's 32-key half of P must be whole swizzle tiles, so Q, the cache ring and P are
    64-byte swizzled (FlashMLA: 128). A 32-key P half cannot be a wgmma A operand by itself
    either: a transposed (MN-major) B, which V is, needs K = 64 per wgmma at that swizzle.
  * Split-KV. Each (row, split) CTA covers a contiguous range of the row's cache blocks and
    writes its normalised partial O and its LSE (fp32); `combine_splits` (jnp) merges them by
    log-sum-exp. With one split the kernel writes the final bf16 output and LSE directly.
    `choose_num_splits` picks the split count that fills the SMs (FlashMLA's
    `get_mla_metadata` idea with a static wave model, kernels.md §3.3), overridable.
  * The epilogue reuses the cache ring's SMEM (a `plgpu.RefUnion`) for the output tiles.

Interpret mode (`interpret=True`) runs the same kernel on the CPU through
`plgpu.InterpretGPUParams()` (jax 0.11.2's GPU interpreter: wgmma in exact fp32, fresh SMEM
filled with NaNs, barrier phases checked): it checks indexing, masking, the pipeline's
synchronisation and the split combine, not the tensor cores' rounding. One line differs from
the GPU code: the interpreter cannot store into a wgmma accumulator, so `_accumulate` adds a
fresh one there. The GPU path is checked on the CPU by lowering it for CUDA (Mosaic GPU's
layout inference, wgmma/TMA constraints and the SMEM budget all run at lowering).

Requirement: cache entries at positions >= lengths[b] inside the last cache block that a row
reads must be finite (masked keys get probability 0, but 0 * inf is NaN in the P @ V product,
as in FlashMLA). The model's caches (`dsv3_jax.model.init_cache`) start as zeros, so they are.

`python -m pallas_kernels.mla_decode` checks both forms of the kernel against
`mla_decode_reference` (interpret mode without a Hopper GPU); experiments/bench_decode.py times
it. Measurements and design notes: docs/kernels.md#mla-decode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic as mg

IMPLS = ("xla", "pallas")
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# DeepSeek-V3's latent row: kv_lora_rank C = 512 values (= keys' nope part) + R = 64 rope dims
# (the one-array form's default v_dim).
V_DIM = 512
D_K = 576
# Rows per wgmma / per CTA row block (Hopper's wgmma is 64 rows per warpgroup).
BLOCK_M = 64
# Registers of each math warpgroup (each holds a 64 x 256 fp32 half of O: 128 registers a
# thread): with the TMA warpgroup's _mosaic.MEMORY_REGISTERS, (2 x 232 + 40) x 128 threads =
# 64,512 of the SM's 65,536, the split the warp-specialized Mosaic GPU kernels in jax's examples
# use.
COMPUTE_REGISTERS = 232
# What Mosaic GPU adds to our allocations for barriers and alignment (1,352-1,384 bytes at
# lowering). The kernel sets CompilerParams.reduction_scratch_bytes = 0: its reductions are
# along wgmma rows, within a warp, and the 2 KiB default would not leave room for two cache
# stages.
SMEM_RESERVE = 1536
SMEM_BYTES = mg.SMEM_PER_BLOCK - SMEM_RESERVE
# FlashMLA's load model counts a fixed overhead of 5 blocks per split (prologue, Q load,
# epilogue, combine), kernels.md §3.3.
SPLIT_OVERHEAD_BLOCKS = 5
MAX_SPLITS = 64
# Widest half of O a math warpgroup owns (a wgmma N; 64 x 256 fp32 is 128 registers a thread),
# so C <= 512. The rope width R must be whole swizzle tiles of the rope wgmma's K.
MAX_HALF_V = 256
R_MULTIPLE = 64
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def _limits(lengths: jax.Array, s_max: int, tq: int) -> jax.Array:
    """[B, Tq] exclusive key limit of each new token: lengths - Tq + t + 1, in [.., S_max]."""
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_max)
    return lengths[:, None] - tq + 1 + jnp.arange(tq, dtype=jnp.int32)[None, :]


def _masked_softmax_out(scores, kv_v, limits, out_dtype, p_dtype, precision=None):
    """scores [B, Tq, H, S] float32 (already scaled), kv_v [B, S, V] -> (o [B, Tq, H, V],
    lse [B, Tq, H]); keys j >= limits[b, t] are masked; empty windows give o = 0, lse = -inf."""
    keys = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    valid = keys[None, None, None, :] < limits[:, :, None, None]  # [B, Tq, 1, S]
    scores = jnp.where(valid, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)  # an empty window: every term exp(-inf) = 0
    e = jnp.exp(scores - m_safe)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / jnp.where(denom > 0, denom, 1.0)).astype(p_dtype)
    o = jnp.einsum("bths,bsv->bthv", probs, kv_v, preferred_element_type=jnp.float32,
                   precision=precision)
    lse = jnp.where(denom[..., 0] > 0, m_safe[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return o.astype(out_dtype), lse


def mla_decode_reference(q: jax.Array, kv: jax.Array, lengths: jax.Array, scale: float,
                         v_dim: int = V_DIM) -> tuple[jax.Array, jax.Array]:
    """The definition, in float32: q [B, Tq, H, D_k], kv [B, S_max, D_k], lengths [B] ->
    (o [B, Tq, H, v_dim] float32, lse [B, Tq, H] float32). See the module docstring."""
    f32 = jnp.float32
    scores = jnp.einsum("bthd,bsd->bths", q.astype(f32), kv.astype(f32),
                        precision=lax.Precision.HIGHEST) * scale
    limits = _limits(lengths, kv.shape[1], q.shape[1])
    return _masked_softmax_out(scores, kv[..., :v_dim].astype(f32), limits, f32, f32,
                               lax.Precision.HIGHEST)


def _xla_decode(q, kv, lengths, scale, v_dim):
    """What dsv3_jax.mla.attend_absorbed computes: bf16 operands with fp32 accumulation, the
    softmax in fp32, probabilities cast back to the cache dtype, output in q's dtype."""
    scores = jnp.einsum("bthd,bsd->bths", q, kv, preferred_element_type=jnp.float32) * scale
    limits = _limits(lengths, kv.shape[1], q.shape[1])
    return _masked_softmax_out(scores, kv[..., :v_dim], limits, q.dtype, kv.dtype)


# --------------------------------------------------------------------------------------------
# Split-KV schedule and combine
# --------------------------------------------------------------------------------------------


def row_blocks(tq: int, heads: int) -> int:
    """64-row blocks of the (token, head) rows of one batch row."""
    return -(-tq * heads // BLOCK_M)


def choose_num_splits(batch: int, tq: int, heads: int, s_max: int, block_s: int = 64,
                      num_sms: int | None = None) -> int:
    """Splits of each row's cache so that the grid fills the SMs.

    One CTA runs per SM at a time (its ~220 KiB of SMEM), so the kernel's time is about
    (waves of CTAs) x (cache blocks per CTA + a fixed overhead per split); we take the split
    count that minimises that, the smallest on ties (FlashMLA balances the same two terms in
    `get_mla_metadata`, kernels.md §3.3; it counts 5 blocks of overhead per split). The model is
    static: it uses S_max, not the (traced) lengths. `num_sms` None: `_mosaic.device_num_sms()`.
    """
    num_sms = num_sms or mg.device_num_sms()
    n_blk = max(1, -(-s_max // block_s))
    ctas = batch * row_blocks(tq, heads)

    def cost(s):
        waves = -(-ctas * s // num_sms)
        return waves * (-(-n_blk // s) + SPLIT_OVERHEAD_BLOCKS)

    return min(range(1, min(MAX_SPLITS, n_blk) + 1), key=lambda s: (cost(s), s))


def split_schedule(lengths: jax.Array, s_max: int, block_s: int,
                   num_splits: int) -> tuple[jax.Array, jax.Array]:
    """(first cache block, number of blocks) [B, num_splits] int32 of each split: row b's
    ceil(lengths[b] / block_s) blocks cut into num_splits contiguous, near-equal ranges (the
    last ranges may be empty when the row is short)."""
    n_blk = -(-jnp.clip(lengths.astype(jnp.int32), 0, s_max) // block_s)  # [B]
    per = -(-n_blk // num_splits)
    start = jnp.arange(num_splits, dtype=jnp.int32)[None, :] * per[:, None]
    count = jnp.clip(n_blk[:, None] - start, 0, per[:, None])
    return start.astype(jnp.int32), count.astype(jnp.int32)


def combine_splits(o_part: jax.Array, lse_part: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merges per-split results by log-sum-exp: o_part [B, P, M, V] (each split normalised by
    its own sum), lse_part [B, P, M] -> (o [B, M, V] float32, lse [B, M]). Splits with no keys
    carry lse = -inf and weigh 0; rows with no key in any split give o = 0, lse = -inf."""
    m = jnp.max(lse_part, axis=1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m_safe)  # [B, P, M]; exp(-inf) = 0 for empty splits
    denom = jnp.sum(w, axis=1)  # [B, M]
    o = jnp.einsum("bpm,bpmv->bmv", w, o_part.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    o = o / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, m_safe[:, 0] + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    return o, lse


# --------------------------------------------------------------------------------------------
# The Mosaic GPU kernel
# --------------------------------------------------------------------------------------------


def num_stages(d_k: int, block_s: int, itemsize: int = 2) -> int:
    """Cache-ring stages that fit in SMEM next to the query block (2 at 576 x 64, bf16)."""
    fixed = _fixed_smem_bytes(d_k, block_s, itemsize)
    stage = block_s * d_k * itemsize
    return min(4, (SMEM_BYTES - fixed) // stage)


def _fixed_smem_bytes(d_k: int, block_s: int, itemsize: int) -> int:
    q = BLOCK_M * d_k * itemsize
    p = BLOCK_M * block_s * itemsize
    stats = mg.NUM_COMPUTE_WGS * BLOCK_M * 4 + BLOCK_M * 4  # row max / sum exchange, lse
    return q + p + stats


def smem_bytes(d_k: int, v_dim: int, block_s: int, stages: int, out_itemsize: int,
               itemsize: int = 2) -> int:
    """The kernel's SMEM: query block, the union of the cache ring and the output tiles, the
    probability tiles and the statistics."""
    ring = stages * block_s * d_k * itemsize
    out = BLOCK_M * v_dim * out_itemsize
    return _fixed_smem_bytes(d_k, block_s, itemsize) + max(ring, out)


def _accumulate(o: jax.Array, issue, interpret: bool) -> jax.Array:
    """o + (the wgmmas `issue(acc_ref)` issues into a zero accumulator), in o's registers.

    On the GPU the running value becomes the wgmma accumulator (stored into a fresh ACC, then
    accumulated in place), so O takes its 128 registers per thread only once; adding a second,
    fresh 64 x 256 accumulator would need 256 and spill. jax 0.11.2's GPU interpreter supports
    neither that store (`wgmma_accumulator_store_p`) nor `pl.run_state` with an initialised ACC,
    so interpret mode adds a fresh accumulator instead: the same value, computed exactly.
    """
    def run(acc):
        if not interpret:
            acc[...] = o
        issue(acc)
        return acc[...]

    out = pl.run_scoped(run, plgpu.ACC(o.shape, jnp.float32))
    return o + out if interpret else out


@dataclasses.dataclass(frozen=True)
class _Cta:
    """What one CTA works on: batch row `b`, split `split`, query rows row0 .. row0 + 63; its
    cache blocks first_blk .. first_blk + n_steps - 1; the row's cache length (traced values),
    and the kernel's static parameters."""
    b: jax.Array
    split: jax.Array
    row0: jax.Array
    length: jax.Array
    first_blk: jax.Array
    n_steps: jax.Array
    tq: int
    heads: int
    scale: float
    block_s: int
    stages: int
    interpret: bool
    cols: "_Cols"


class _Cols(NamedTuple):
    """Where the latent and rope columns sit in the kernel's operands (static): q's latent part
    is q_c_ref[..., q_c0 : q_c0 + c], its rope part q_r_ref[..., q_r0 : q_r0 + r], and the same
    for the cache (kv_c0, kv_r0). The model's two-array cache passes c_kv and k_rope with
    offsets 0; the one-array form passes the same [c_kv | k_rope] array twice with the rope
    part at column c, so neither form copies the cache."""
    c: int
    r: int
    q_c0: int
    q_r0: int
    kv_c0: int
    kv_r0: int


class _Smem(NamedTuple):
    """The CTA's shared memory: q [64, C] and q_r [64, R] (the query block's latent and rope
    parts), kv [stages, block_s, C] and kv_r [stages, block_s, R] (the cache ring, two buffers
    per stage) aliased with o [2, 64, C/2] (the output halves, written after the last block),
    p [64, block_s] (the block's probabilities), stat [2, 64] f32 (row statistics exchanged
    between the math warpgroups), lse [64] f32; barriers: q_bar (query loaded: two TMA
    copies), ready[stages] (a cache block loaded: two TMA copies), free[stages] (both math
    warpgroups done with a stage), sync[2] (the two exchanges between the math warpgroups)."""
    q: Any
    q_r: Any
    kv: Any
    kv_r: Any
    o: Any
    p: Any
    stat: Any
    lse: Any
    q_bar: Any
    ready: Any
    free: Any
    sync: Any


def _smem_types(dtype, out_dtype, c: int, r: int, block_s: int, stages: int) -> list:
    """Allocation order of `_Smem` (the ring and o in one `RefUnion`: their lifetimes are
    disjoint)."""
    half_s, half_v = block_s // 2, c // mg.NUM_COMPUTE_WGS
    # Mosaic GPU's wgmma takes one swizzle for both SMEM operands (mosaic/gpu/wgmma.py), and
    # each math warpgroup writes its half_s keys of the P tile, which must be whole swizzle
    # tiles: so every 16-bit tile an MMA with P reads (P, and V: the latent ring) is swizzled
    # by half_s * 2 bytes (64 at block_s = 64; FlashMLA uses 128, which would need a P tile
    # written in 64-key halves). The latent scores Q_c @ K_c^T use the same swizzle; the rope
    # scores Q_r @ K_r^T are their own wgmma, so q_r and the rope ring only agree with each
    # other (the widest swizzle, up to the same cap, that divides an R-wide row).
    swz = half_s * jnp.dtype(dtype).itemsize
    ring = (plgpu.SMEM((stages, block_s, c), dtype, transforms=mg.swizzled(c, dtype, swz)),
            plgpu.SMEM((stages, block_s, r), dtype, transforms=mg.swizzled(r, dtype, swz)))
    out = plgpu.SMEM((mg.NUM_COMPUTE_WGS, BLOCK_M, half_v), out_dtype,
                     transforms=mg.swizzled(half_v, out_dtype))
    return [
        plgpu.SMEM((BLOCK_M, c), dtype, transforms=mg.swizzled(c, dtype, swz)),
        plgpu.SMEM((BLOCK_M, r), dtype, transforms=mg.swizzled(r, dtype, swz)),
        plgpu.RefUnion(ring, out),
        plgpu.SMEM((BLOCK_M, block_s), dtype, transforms=mg.swizzled(block_s, dtype, swz)),
        plgpu.SMEM((mg.NUM_COMPUTE_WGS, BLOCK_M), jnp.float32),
        plgpu.SMEM((BLOCK_M,), jnp.float32),
        # A barrier that TMA copies complete counts one arrival per copy (as jax's own
        # pipelines set num_arrivals = copies per step, pallas/mosaic_gpu/pipeline.py).
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=mg.NUM_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=mg.NUM_COMPUTE_WGS, num_barriers=2),
    ]


def _body(lengths_ref, start_ref, count_ref, q_c_ref, q_r_ref, kv_c_ref, kv_r_ref, o_ref,
          lse_ref, **static):
    """One CTA of the grid (rows, split, batch): warpgroups 0 and 1 do the math, 2 the TMA loads.

    lengths_ref [B]; start_ref, count_ref [B, P] (cache blocks); q_c_ref, q_r_ref [B, M_pad, .]
    and kv_c_ref, kv_r_ref [B, S_max, .] (columns as `_Cols` says); o_ref [B, P, M_pad, C]
    (float32 partials, or the final dtype when P = 1); lse_ref [B, P, M_pad] float32.
    """
    b, split = lax.axis_index("batch"), lax.axis_index("split")
    cta = _Cta(b=b, split=split, row0=pl.multiple_of(lax.axis_index("rows") * BLOCK_M, BLOCK_M),
               length=jnp.clip(lengths_ref[b], 0, kv_c_ref.shape[1]),
               first_blk=start_ref[b, split], n_steps=count_ref[b, split], **static)

    def scoped(*refs):
        q, q_r, ((kv, kv_r), o), *rest = refs
        smem = _Smem(q, q_r, kv, kv_r, o, *rest)
        wg = lax.axis_index("wg")

        @pl.when(wg < mg.NUM_COMPUTE_WGS)
        def _math():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            _math_wg(cta, smem, wg, o_ref, lse_ref)

        @pl.when(wg == mg.NUM_COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(mg.MEMORY_REGISTERS, action="decrease")
            _memory_wg(cta, smem, q_c_ref, q_r_ref, kv_c_ref, kv_r_ref)

    pl.run_scoped(scoped, *_smem_types(q_c_ref.dtype, o_ref.dtype, cta.cols.c, cta.cols.r,
                                       cta.block_s, cta.stages),
                  collective_axes="wg")


def _memory_wg(cta: _Cta, smem: _Smem, q_c_ref, q_r_ref, kv_c_ref, kv_r_ref) -> None:
    """TMA producer: the query block once, then the CTA's cache blocks through the ring; each
    is two copies (latent and rope columns), completing one barrier."""
    cols, rows = cta.cols, pl.ds(cta.row0, BLOCK_M)
    plgpu.copy_gmem_to_smem(q_c_ref.at[cta.b, rows, pl.ds(cols.q_c0, cols.c)], smem.q,
                            smem.q_bar)
    plgpu.copy_gmem_to_smem(q_r_ref.at[cta.b, rows, pl.ds(cols.q_r0, cols.r)], smem.q_r,
                            smem.q_bar)
    stages, block_s = cta.stages, cta.block_s

    def load(step, slot):
        keys = pl.ds(pl.multiple_of((cta.first_blk + step) * block_s, block_s), block_s)
        plgpu.copy_gmem_to_smem(kv_c_ref.at[cta.b, keys, pl.ds(cols.kv_c0, cols.c)],
                                smem.kv.at[slot], smem.ready.at[slot])
        plgpu.copy_gmem_to_smem(kv_r_ref.at[cta.b, keys, pl.ds(cols.kv_r0, cols.r)],
                                smem.kv_r.at[slot], smem.ready.at[slot])

    for i in range(stages):
        pl.when(i < cta.n_steps)(functools.partial(load, i, i))

    @pl.loop(0, jnp.maximum(cta.n_steps - stages, 0))
    def _refill(step):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(smem.free.at[slot])  # both math warpgroups are done with the stage
        load(step + stages, slot)

    # Observe the last release of every stage too: a barrier's waiter must see each of its
    # phases (parity waits cannot tell phase k from k + 2; the GPU interpreter checks this
    # when the barriers are freed). It costs nothing: this warpgroup has no more work.
    @pl.loop(jnp.maximum(cta.n_steps - stages, 0), cta.n_steps)
    def _drain(step):
        plgpu.barrier_wait(smem.free.at[lax.rem(step, stages)])


def _exchange(smem: _Smem, w, vec, bar):
    """Publishes this math warpgroup's row vector, returns the other one's. Both warpgroups
    pass `bar` (2 arrivals) once per call. A warpgroup writes its slot again only after the
    next 2-arrival barrier (the P exchange of the same step), which the other warpgroup reaches
    only after this read: one slot per warpgroup suffices."""
    smem.stat[w] = vec
    plgpu.barrier_arrive(bar)
    plgpu.barrier_wait(bar)
    return plgpu.load(smem.stat.at[1 - w], layout=plgpu.Layout.WGMMA.reduce(1))


def _key_room(cta: _Cta, w) -> jax.Array:
    """[64, block_s / 2] int32: key j = key0 + w * half_s + col of a block starting at key0 is
    visible to block row r iff key0 < room[r, col], i.e. j < length - Tq + 1 + t(r), where
    row0 + r = t * H + h (padding rows count as the last token; their outputs are dropped)."""
    half_s = cta.block_s // 2
    wgmma = plgpu.Layout.WGMMA
    rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK_M, half_s), 0, layout=wgmma) + cta.row0
    cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK_M, half_s), 1, layout=wgmma)
    token = jnp.zeros_like(rows)
    for t in range(1, cta.tq):  # t(r) = (row0 + r) // H without a vector division
        token = token + jnp.where(rows >= t * cta.heads, 1, 0)
    return (cta.length - cta.tq + 1 - w * half_s) + token - cols


def _math_wg(cta: _Cta, smem: _Smem, w, o_ref, lse_ref) -> None:
    """Math warpgroup w: online softmax over the CTA's cache blocks, this warpgroup scoring
    keys w * half_s .. of each block and owning output columns w * V/2 .. (kernels.md §3.4)."""
    wgmma, row_vec = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    half_s, half_v = cta.block_s // 2, o_ref.shape[-1] // mg.NUM_COMPUTE_WGS
    key_room = _key_room(cta, w)
    scale_log2 = cta.scale * LOG2E  # exp(x * scale) = exp2(x * scale * log2 e)
    plgpu.barrier_wait(smem.q_bar)

    def step(i, carry):
        o, m, l = carry  # [64, V/2] f32; running max (log2 units) and this half's sum [64]
        slot = lax.rem(i, cta.stages)
        plgpu.barrier_wait(smem.ready.at[slot])
        kv, kv_r = smem.kv.at[slot], smem.kv_r.at[slot]
        keys = pl.ds(w * half_s, half_s)

        def scores(acc):  # S_w = Q_c @ K_c,w^T + Q_r @ K_r,w^T: two wgmmas, one accumulator
            plgpu.wgmma(acc, smem.q, kv.at[keys, :].T)  # K-major B operands
            plgpu.wgmma(acc, smem.q_r, kv_r.at[keys, :].T)
            return acc[...]

        s = pl.run_scoped(scores, plgpu.ACC((BLOCK_M, half_s), jnp.float32))
        s = jnp.where((cta.first_blk + i) * cta.block_s < key_room, s * scale_log2, -jnp.inf)
        m_blk = jnp.max(s, axis=1)
        m_new = jnp.maximum(jnp.maximum(m, m_blk), _exchange(smem, w, m_blk, smem.sync.at[0]))
        # Rows with no visible key yet keep m = -inf: offset them by 0, so every exponent
        # below is exp2(-inf) = 0 and never -inf - -inf.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
        l = l * alpha + jnp.sum(p, axis=1)
        o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
        # Publish P_w into its half of the block's P tile (whole swizzle tiles: a static slice
        # per warpgroup), fence for the wgmma's async proxy, wait for the other half.
        p16 = p.astype(smem.p.dtype)
        for j in range(mg.NUM_COMPUTE_WGS):
            @pl.when(w == j)
            def _publish(keys=slice(j * half_s, (j + 1) * half_s)):
                smem.p[:, keys] = p16

        plgpu.commit_smem()
        plgpu.barrier_arrive(smem.sync.at[1])
        plgpu.barrier_wait(smem.sync.at[1])
        v = kv.at[:, pl.ds(w * half_v, half_v)]  # V: the same tile's first columns, our half
        o = _accumulate(o, lambda acc: plgpu.wgmma(acc, smem.p, v), cta.interpret)
        plgpu.barrier_arrive(smem.free.at[slot])
        return o, m_new, l

    o0 = plgpu.layout_cast(jnp.zeros((BLOCK_M, half_v), jnp.float32), wgmma)
    m0 = plgpu.layout_cast(jnp.full((BLOCK_M,), -jnp.inf, jnp.float32), row_vec)
    l0 = plgpu.layout_cast(jnp.zeros((BLOCK_M,), jnp.float32), row_vec)
    o, m, l = lax.fori_loop(0, cta.n_steps, step, (o0, m0, l0))
    # The total sum. This exchange also orders both warpgroups' last reads of the ring before
    # the output tiles, which alias it, are written.
    l = l + _exchange(smem, w, l, smem.sync.at[0])
    _epilogue(cta, smem, w, o, m, l, o_ref, lse_ref)


def _epilogue(cta: _Cta, smem: _Smem, w, o, m, l, o_ref, lse_ref) -> None:
    """O_w / l and (warpgroup 0) lse = ln 2 * m + ln l, through SMEM and TMA stores; rows with
    no visible key (l = 0) get O = 0 and lse = -inf."""
    half_v = o.shape[1]
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o = o * lax.broadcast_in_dim(jnp.where(nonempty, 1.0 / l_safe, 0.0), o.shape, [0])
    smem.o[w] = o.astype(smem.o.dtype)
    plgpu.commit_smem()
    rows = pl.ds(cta.row0, BLOCK_M)
    plgpu.copy_smem_to_gmem(smem.o.at[w], o_ref.at[cta.b, cta.split, rows,
                                                   pl.ds(w * half_v, half_v)])

    @pl.when(w == 0)
    def _lse():
        smem.lse[...] = jnp.where(nonempty, m * LN2 + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem.lse, lse_ref.at[cta.b, cta.split, rows])

    plgpu.wait_smem_to_gmem(0)


# A jit keyed by the statics: the decode step's call sites with equal shapes (the dense and MoE
# layer stacks, the MTP module) share one lowered kernel instead of lowering and compiling one
# each (as `_mosaic.launch_shared` does for the persistent kernels).
@functools.partial(jax.jit, static_argnames=("cols", "tq", "heads", "scale", "block_s",
                                             "out_dtype", "interpret"))
def _launch_decode(q_c, q_r, kv_c, kv_r, lengths, start, count, *, cols: _Cols, tq: int,
                   heads: int, scale: float, block_s: int, out_dtype,
                   interpret) -> tuple[jax.Array, jax.Array]:
    bsz, m_pad = q_c.shape[:2]
    splits = start.shape[1]
    out_dtype = jnp.dtype(out_dtype or jnp.float32)
    stages = num_stages(cols.c + cols.r, block_s, q_c.dtype.itemsize)
    body = functools.partial(_body, tq=tq, heads=heads, scale=float(scale), block_s=block_s,
                             stages=stages, interpret=bool(interpret), cols=cols)
    out_type = (jax.ShapeDtypeStruct((bsz, splits, m_pad, cols.c), out_dtype),
                jax.ShapeDtypeStruct((bsz, splits, m_pad), jnp.float32))
    run = plgpu.kernel(
        body, out_type=out_type, grid=(m_pad // BLOCK_M, splits, bsz),
        grid_names=("rows", "split", "batch"), num_threads=mg.NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
            reduction_scratch_bytes=0),
        interpret=mg.interpret_params(interpret))
    return run(lengths.astype(jnp.int32), start, count, q_c, q_r, kv_c, kv_r)


def mla_decode_kernel(q_rows: jax.Array, kv: jax.Array, lengths: jax.Array, start: jax.Array,
                      count: jax.Array, *, tq: int, heads: int, scale: float, block_s: int = 64,
                      v_dim: int = V_DIM, out_dtype=None,
                      interpret=False) -> tuple[jax.Array, jax.Array]:
    """The Mosaic GPU kernel alone, one-array cache.

    q_rows [B, M_pad, D_k] (row = t * H + h, zero rows past Tq * H, M_pad a multiple of 64);
    kv [B, S_max, D_k] (C = v_dim latent columns, then R = D_k - v_dim rope columns); lengths
    [B]; start, count [B, P] from `split_schedule`. Returns (o [B, P, M_pad, v_dim], lse
    [B, P, M_pad] float32): per split, the output normalised over the split's keys and its
    log-sum-exp. o is float32 unless `out_dtype` says otherwise (use q's dtype when P = 1: then
    it is the final output). The same arrays feed both column ranges (no copy).
    """
    cols = _Cols(c=v_dim, r=kv.shape[-1] - v_dim, q_c0=0, q_r0=v_dim, kv_c0=0, kv_r0=v_dim)
    return _launch_decode(q_rows, q_rows, kv, kv, lengths, start, count, cols=cols, tq=tq,
                          heads=heads, scale=scale, block_s=block_s, out_dtype=out_dtype,
                          interpret=interpret)


def mla_decode_kernel_latent(q_lat_rows, q_rope_rows, c_kv, k_rope, lengths, start, count, *,
                             tq: int, heads: int, scale: float, block_s: int = 64,
                             out_dtype=None, interpret=False) -> tuple[jax.Array, jax.Array]:
    """The Mosaic GPU kernel alone, two-array cache (the model's): q_lat_rows [B, M_pad, C],
    q_rope_rows [B, M_pad, R], c_kv [B, S_max, C], k_rope [B, S_max, R]; otherwise as
    `mla_decode_kernel` (o [B, P, M_pad, C])."""
    cols = _Cols(c=c_kv.shape[-1], r=k_rope.shape[-1], q_c0=0, q_r0=0, kv_c0=0, kv_r0=0)
    return _launch_decode(q_lat_rows, q_rope_rows, c_kv, k_rope, lengths, start, count,
                          cols=cols, tq=tq, heads=heads, scale=scale, block_s=block_s,
                          out_dtype=out_dtype, interpret=interpret)


def _as_rows(q: jax.Array) -> jax.Array:
    """[B, Tq, H, X] -> [B, M_pad, X]: row t * H + h, zero rows up to whole 64-row blocks."""
    bsz, tq, heads, x = q.shape
    rows, m_pad = tq * heads, row_blocks(tq, heads) * BLOCK_M
    q_rows = q.reshape(bsz, rows, x)
    return jnp.pad(q_rows, ((0, 0), (0, m_pad - rows), (0, 0))) if m_pad != rows else q_rows


def _pallas_decode(q_shape, q_dtype, kernel, lengths, s_max, num_splits, block_s, interpret,
                   num_sms=None):
    """Runs `kernel(start, count, out_dtype)` over the split schedule and merges the splits:
    -> (o [B, Tq, H, C] in q's dtype, lse [B, Tq, H])."""
    bsz, tq, heads = q_shape[:3]
    if num_splits is None:
        num_splits = choose_num_splits(bsz, tq, heads, s_max, block_s, num_sms)
    start, count = split_schedule(lengths, s_max, block_s, num_splits)
    single = num_splits == 1
    o, lse = kernel(start, count, q_dtype if single else jnp.float32)
    if single:
        o, lse = o[:, 0], lse[:, 0]
    else:
        o, lse = combine_splits(o, lse)
    rows = tq * heads
    o = o[:, :rows].reshape(bsz, tq, heads, o.shape[-1]).astype(q_dtype)
    return o, lse[:, :rows].reshape(bsz, tq, heads)


# --------------------------------------------------------------------------------------------
# Validation and the public entry points
# --------------------------------------------------------------------------------------------


def _check_inputs(q, kv, lengths, scale, v_dim, impl, num_splits, block_s) -> None:
    """Every message names the tensor and the dimension (../shared/DESIGN.md convention 4)."""
    if impl not in IMPLS:
        raise ValueError(f"mla_decode: impl={impl!r} is not one of {IMPLS}")
    if q.ndim != 4:
        raise ValueError(f"mla_decode: q must be [B, Tq, H, D_k], got shape {q.shape}")
    if kv.ndim != 3 or kv.shape[1] < 1:
        raise ValueError(f"mla_decode: kv must be [B, S_max >= 1, D_k], got shape {kv.shape}")
    bsz, tq, heads, d_k = q.shape
    if kv.shape[0] != bsz:
        raise ValueError(f"mla_decode: kv batch (shape[0]) = {kv.shape[0]} but q batch "
                         f"(shape[0]) = {bsz}")
    if kv.shape[2] != d_k:
        raise ValueError(f"mla_decode: kv D_k (shape[2]) = {kv.shape[2]} but q D_k "
                         f"(shape[3]) = {d_k}")
    if q.dtype != kv.dtype:
        raise ValueError(f"mla_decode: q dtype {q.dtype} != kv dtype {kv.dtype}")
    _check_common("mla_decode", q, lengths, kv.shape[1], scale)
    if not 0 < v_dim <= d_k:
        raise ValueError(f"mla_decode: v_dim = {v_dim} must be in (0, D_k = {d_k}]")
    if impl == "pallas":
        if v_dim == d_k:
            raise ValueError(f"mla_decode (pallas): v_dim = {v_dim} = D_k leaves no rope columns; "
                             "the kernel needs D_k - v_dim > 0")
        why = kernel_refusal(v_dim, d_k - v_dim, kv.shape[1], q.dtype, block_s, num_splits,
                             c_name="v_dim", r_name="D_k - v_dim (q/kv last dim minus v_dim)")
        if why:
            raise ValueError(f"mla_decode (pallas): {why}")


def _check_common(fn: str, q, lengths, s_max: int, scale) -> None:
    bsz, tq, heads = q.shape[:3]
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{fn}: q dtype {q.dtype} is not a floating type")
    if lengths.shape != (bsz,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{fn}: lengths must be an integer [B] = [{bsz}] array, got "
                         f"{lengths.dtype}{list(lengths.shape)}")
    if tq < 1 or heads < 1:
        raise ValueError(f"{fn}: q has Tq (shape[1]) = {tq}, H (shape[2]) = {heads}; "
                         "both must be >= 1")
    _check_scale(scale)
    try:
        lv = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # traced: the kernel clamps to [0, S_max]
        lv = None
    if lv is not None and lv.size and (lv.min() < 0 or lv.max() > s_max):
        raise ValueError(f"{fn}: lengths must lie in [0, S_max = {s_max}] "
                         f"(kv shape[1]); got min {lv.min()}, max {lv.max()}")


def _check_scale(scale) -> None:
    """The kernel bakes the scale into its code, so it must be a concrete number."""
    try:
        value = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"mla_decode: scale = {scale!r} must be a concrete Python number "
                         "(it is compiled into the kernel)") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"mla_decode: scale = {scale!r} must be positive and finite")


def kernel_refusal(c: int, r: int, s_max: int, dtype, block_s: int = 64,
                   num_splits: int | None = None, *, c_name: str = "C (c_kv last dim)",
                   r_name: str = "R (k_rope last dim)") -> str | None:
    """Why the kernel cannot run a cache of C latent (= value) columns and R rope columns,
    S_max slots, in `dtype`, with `block_s`-key blocks; None when it can. The model's dispatch
    (dsv3_jax/mla.py) asks this before choosing the kernel."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not supported; use bfloat16 or float16"
    if c % 64 or not 64 <= c <= 2 * MAX_HALF_V:
        return (f"{c_name} = {c} must be a multiple of 64 in [64, {2 * MAX_HALF_V}] (each "
                f"math warpgroup owns a C/2-wide half of O: a wgmma N <= {MAX_HALF_V} made of "
                "whole swizzle tiles)")
    if r % R_MULTIPLE or r <= 0:
        return (f"{r_name} = {r} must be a positive multiple of {R_MULTIPLE} (whole swizzle "
                "tiles of the rope wgmma's K)")
    if block_s not in (32, 64):
        return (f"block_s = {block_s} must be 32 or 64 (each math warpgroup scores half of a "
                "block: a wgmma N of 16 or 32)")
    if s_max % block_s:
        return (f"kv S_max (shape[1]) = {s_max} must be a multiple of block_s = {block_s}; "
                "allocate the cache in whole blocks")
    if num_splits is not None and not 1 <= num_splits <= max(1, s_max // block_s):
        return (f"num_splits = {num_splits} must be in [1, S_max / block_s = "
                f"{s_max // block_s}]")
    itemsize = jnp.dtype(dtype).itemsize
    stages = num_stages(c + r, block_s, itemsize)
    need = smem_bytes(c + r, c, block_s, max(stages, 2), 4, itemsize)
    if stages < 2 or need > SMEM_BYTES:
        return (f"C + R = {c + r} with block_s = {block_s} needs {need} bytes of shared memory "
                f"for 2 stages, more than {SMEM_BYTES}")
    return None


def mla_decode(q: jax.Array, kv: jax.Array, lengths: jax.Array, *, scale: float,
               v_dim: int = V_DIM, impl: str = "xla", num_splits: int | None = None,
               block_s: int = 64, interpret=False, return_lse: bool = False):
    """Absorbed MLA decode attention over a one-array latent cache (see the module docstring).

    q [B, Tq, H, D_k] (the absorbed query [q_nope @ W^UK | q_rope]), kv [B, S_max, D_k]
    (the latent cache [c_kv | k_rope], its first v_dim columns the values), lengths [B] int
    (row b's cache holds positions < lengths[b], the Tq new tokens included: token t sits at
    lengths[b] - Tq + t and attends to positions <= its own), scale the softmax scale.
    Returns o [B, Tq, H, v_dim] in q's dtype, and with `return_lse` also lse [B, Tq, H]
    float32 (natural log). Empty windows give o = 0 and lse = -inf.

    impl "xla": the einsum path of dsv3_jax.mla.attend_absorbed (any backend); "pallas": the
    Mosaic GPU kernel (Hopper; `interpret=True` or a `plgpu.InterpretGPUParams` runs it on the
    CPU), with `num_splits` splits of each row's cache (None: `choose_num_splits`) and cache
    blocks of `block_s` keys (64, or 32). The kernel reads the latent (first v_dim) and rope
    columns of kv as two tiles; its limits are `kernel_refusal`'s with C = v_dim and
    R = D_k - v_dim (V3: 512 + 64); any Tq >= 1 (rows t * H + h).
    """
    lengths = jnp.asarray(lengths)
    _check_inputs(q, kv, lengths, scale, v_dim, impl, num_splits, block_s)
    scale = float(scale)
    if impl == "xla":
        o, lse = _xla_decode(q, kv, lengths, scale, v_dim)
    else:
        q_rows, tq, heads = _as_rows(q), q.shape[1], q.shape[2]
        kernel = lambda start, count, out_dtype: mla_decode_kernel(  # noqa: E731
            q_rows, kv, lengths, start, count, tq=tq, heads=heads, scale=scale,
            block_s=block_s, v_dim=v_dim, out_dtype=out_dtype, interpret=interpret)
        o, lse = _pallas_decode(q.shape, q.dtype, kernel, lengths, kv.shape[1], num_splits,
                                block_s, interpret)
    return (o, lse) if return_lse else o


def _check_latent_inputs(q_lat, q_rope, c_kv, k_rope, lengths, scale, impl, num_splits,
                         block_s) -> None:
    fn = "mla_decode_latent"
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl={impl!r} is not one of {IMPLS}")
    for name, a, nd, dims in (("q_lat", q_lat, 4, "[B, Tq, H, C]"),
                              ("q_rope", q_rope, 4, "[B, Tq, H, R]"),
                              ("c_kv", c_kv, 3, "[B, S_max >= 1, C]"),
                              ("k_rope", k_rope, 3, "[B, S_max >= 1, R]")):
        if a.ndim != nd or (nd == 3 and a.shape[1] < 1):
            raise ValueError(f"{fn}: {name} must be {dims}, got shape {a.shape}")
    if q_rope.shape[:3] != q_lat.shape[:3]:
        raise ValueError(f"{fn}: q_rope [B, Tq, H] = {q_rope.shape[:3]} but q_lat's = "
                         f"{q_lat.shape[:3]}")
    bsz = q_lat.shape[0]
    for name, a in (("c_kv", c_kv), ("k_rope", k_rope)):
        if a.shape[0] != bsz:
            raise ValueError(f"{fn}: {name} batch (shape[0]) = {a.shape[0]} but q_lat batch "
                             f"(shape[0]) = {bsz}")
    if k_rope.shape[1] != c_kv.shape[1]:
        raise ValueError(f"{fn}: k_rope S_max (shape[1]) = {k_rope.shape[1]} but c_kv's = "
                         f"{c_kv.shape[1]}")
    if c_kv.shape[2] != q_lat.shape[3]:
        raise ValueError(f"{fn}: c_kv C (shape[2]) = {c_kv.shape[2]} but q_lat C (shape[3]) = "
                         f"{q_lat.shape[3]}")
    if k_rope.shape[2] != q_rope.shape[3]:
        raise ValueError(f"{fn}: k_rope R (shape[2]) = {k_rope.shape[2]} but q_rope R "
                         f"(shape[3]) = {q_rope.shape[3]}")
    dtypes = {n: a.dtype for n, a in (("q_lat", q_lat), ("q_rope", q_rope), ("c_kv", c_kv),
                                      ("k_rope", k_rope))}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"{fn}: q_lat, q_rope, c_kv and k_rope must share one dtype, got "
                         f"{ {n: str(d) for n, d in dtypes.items()} }")
    _check_common(fn, q_lat, lengths, c_kv.shape[1], scale)
    if impl == "pallas":
        why = kernel_refusal(c_kv.shape[2], k_rope.shape[2], c_kv.shape[1], c_kv.dtype,
                             block_s, num_splits)
        if why:
            raise ValueError(f"{fn} (pallas): {why}")


def _xla_decode_latent(q_lat, q_rope, c_kv, k_rope, lengths, scale):
    """attend_absorbed's attention core: the latent and rope scores summed in fp32."""
    f32 = jnp.float32
    scores = (jnp.einsum("bthc,bsc->bths", q_lat, c_kv, preferred_element_type=f32)
              + jnp.einsum("bthr,bsr->bths", q_rope, k_rope, preferred_element_type=f32)) * scale
    limits = _limits(lengths, c_kv.shape[1], q_lat.shape[1])
    return _masked_softmax_out(scores, c_kv, limits, q_lat.dtype, c_kv.dtype)


def mla_decode_latent(q_lat: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
                      lengths: jax.Array, *, scale: float, impl: str = "xla",
                      num_splits: int | None = None, block_s: int = 64, interpret=False,
                      return_lse: bool = False):
    """`mla_decode` over the model's two-array latent cache (dsv3_jax/mla.py `mla_cached`):
    q_lat [B, Tq, H, C] (q_nope @ W^UK), q_rope [B, Tq, H, R], c_kv [B, S_max, C] (the values
    too), k_rope [B, S_max, R]. The same result as `mla_decode` on q = [q_lat | q_rope],
    kv = [c_kv | k_rope], v_dim = C, without concatenating anything: the kernel loads a
    latent and a rope tile per cache block into two SMEM buffers and sums two wgmmas into one
    score accumulator. Returns o [B, Tq, H, C] (and lse [B, Tq, H] with `return_lse`)."""
    lengths = jnp.asarray(lengths)
    _check_latent_inputs(q_lat, q_rope, c_kv, k_rope, lengths, scale, impl, num_splits, block_s)
    scale = float(scale)
    if impl == "xla":
        o, lse = _xla_decode_latent(q_lat, q_rope, c_kv, k_rope, lengths, scale)
    else:
        q_c, q_r, tq, heads = _as_rows(q_lat), _as_rows(q_rope), q_lat.shape[1], q_lat.shape[2]
        kernel = lambda start, count, out_dtype: mla_decode_kernel_latent(  # noqa: E731
            q_c, q_r, c_kv, k_rope, lengths, start, count, tq=tq, heads=heads, scale=scale,
            block_s=block_s, out_dtype=out_dtype, interpret=interpret)
        o, lse = _pallas_decode(q_lat.shape, q_lat.dtype, kernel, lengths, c_kv.shape[1],
                                num_splits, block_s, interpret)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------------------------
# python -m pallas_kernels.mla_decode: the self-check
# --------------------------------------------------------------------------------------------


def _output_error(o, lse, ro, rl) -> float:
    """max |o - ro| / max |ro|, or the largest lse difference if that is larger; inf where the
    empty windows (lse = -inf) differ or a value is NaN."""
    o, lse, ro, rl = (np.asarray(a, np.float32) for a in (o, lse, ro, rl))
    if np.isnan(o).any() or np.isnan(lse).any() or not np.array_equal(np.isneginf(lse),
                                                                       np.isneginf(rl)):
        return float("inf")
    finite = np.isfinite(rl)
    lse_err = float(np.max(np.abs(lse[finite] - rl[finite]), initial=0.0))
    return max(float(np.max(np.abs(o - ro)) / max(float(np.max(np.abs(ro))), 1e-30)), lse_err)


def _checks(interpret) -> list:
    """Both forms against `mla_decode_reference` in bf16 (2e-2: the output's rounding and the
    bf16 probabilities): one split writing the output directly, a causal pair of tokens over
    uneven splits, an empty row and empty splits, `small`'s C = 256 with a token that sees no
    key. Cache entries past each row's length hold a large finite value, so a key the mask
    misses shows."""
    def inputs(b, tq, h, s, d, lengths, seed):
        kq, kk = jax.random.split(jax.random.key(seed))
        q = jax.random.normal(kq, (b, tq, h, d), jnp.float32).astype(jnp.bfloat16)
        kv = jax.random.normal(kk, (b, s, d), jnp.float32)
        lengths = jnp.asarray(lengths, jnp.int32)
        kv = jnp.where(jnp.arange(s)[None, :, None] >= lengths[:, None, None], 4.0, kv)
        return q, kv.astype(jnp.bfloat16), lengths

    def one_array(b, tq, h, s, lengths, splits):
        q, kv, lengths = inputs(b, tq, h, s, D_K, lengths, seed=b * 10 + h)
        scale = 3.0 / math.sqrt(D_K)
        o, lse = mla_decode(q, kv, lengths, scale=scale, impl="pallas", num_splits=splits,
                            interpret=interpret, return_lse=True)
        return _output_error(o, lse, *mla_decode_reference(q, kv, lengths, scale))

    def two_arrays(b, tq, h, s, c, lengths, splits):
        q, kv, lengths = inputs(b, tq, h, s, c + 64, lengths, seed=b * 10 + h + c)
        scale = 3.0 / math.sqrt(c + 64)
        o, lse = mla_decode_latent(q[..., :c], q[..., c:], kv[..., :c], kv[..., c:], lengths,
                                   scale=scale, impl="pallas", num_splits=splits,
                                   interpret=interpret, return_lse=True)
        return _output_error(o, lse, *mla_decode_reference(q, kv, lengths, scale, v_dim=c))

    check = functools.partial(mg.Check, tol=2e-2)
    return [
        check("mla_decode 1 split", "B=2 Tq=1 H=16 S=256 C+R=576",
              lambda: one_array(2, 1, 16, 256, [256, 77], 1)),
        check("mla_decode 3 splits, Tq=2", "B=2 Tq=2 H=16 S=256 C+R=576",
              lambda: one_array(2, 2, 16, 256, [200, 70], 3)),
        check("mla_decode empty row", "B=3 Tq=1 H=16 S=256 C+R=576",
              lambda: one_array(3, 1, 16, 256, [0, 64, 255], 4)),
        check("mla_decode_latent V3", "B=2 Tq=1 H=16 S=128 C=512 R=64",
              lambda: two_arrays(2, 1, 16, 128, 512, [128, 77], 1)),
        check("mla_decode_latent small", "B=2 Tq=2 H=16 S=256 C=256 R=64",
              lambda: two_arrays(2, 2, 16, 256, 256, [200, 1], 3)),
    ]


def main(argv=None) -> int:
    """python -m pallas_kernels.mla_decode [--interpret]: the kernel (both cache forms) against
    `mla_decode_reference`, natively on a Hopper GPU, else (or with --interpret) in GPU
    interpret mode; prints a table and exits non-zero if a check fails. The benchmark is
    experiments/bench_decode.py."""
    import argparse

    ap = argparse.ArgumentParser(description="MLA decode kernel: self-check")
    ap.add_argument("--interpret", action="store_true",
                    help="check in GPU interpret mode even on a Hopper GPU")
    args = ap.parse_args(argv)
    interpret, where = mg.mode(args.interpret)
    return mg.run_checks(f"pallas_kernels.mla_decode ({where})", _checks(interpret))


if __name__ == "__main__":
    raise SystemExit(main())
