"""What the Mosaic GPU kernels of this package share: the hardware budget, SMEM swizzles, the
persistent warp-specialized launch with its K pipeline and epilogue, interpret-mode parameters,
and the self-check harness of `python -m pallas_kernels.<kernel>`.

Every name here is public to the kernel files (grouped_matmul, fp8_gemm, fp8_quant_kernel,
mla_decode, fp8_triton); a kernel file never reaches into another kernel file's private names.
What only one kernel uses stays in that kernel's file.

The persistent launch (`launch_shared`) runs one CTA per SM, each with three warpgroups: two
compute warpgroups ("wg" 0 and 1) issue wgmma, the third issues the TMA loads of the K pipeline
(`warp_specialized`). A CTA loops over its output tiles (`plgpu.nd_loop`), may chain the K
pipelines of consecutive tiles (`run_tile`), and writes each compute warpgroup's share of a tile
back through a small SMEM epilogue with TMA stores (`store_tile`). Design notes and measurements:
docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# --------------------------------------------------------------------------------------------
# Hardware budget
# --------------------------------------------------------------------------------------------

# Shared memory a block may opt into on H100/H200 (../shared/reference/gpu_facts.md). Each kernel
# subtracts its own reserve for what Mosaic GPU allocates next to the kernel's buffers.
SMEM_PER_BLOCK = 232_448
# The reserve of kernels whose SMEM is pipeline stages plus an epilogue (grouped_matmul, fp8_gemm,
# fp8_quant_kernel): 1 KiB for Mosaic GPU's barriers, and their budget.
BARRIER_RESERVE = 1024
PIPELINED_SMEM_BYTES = SMEM_PER_BLOCK - BARRIER_RESERVE
# Streaming multiprocessors of an H100 / H200 (SXM), for heuristics with no GPU at hand.
DEFAULT_NUM_SMS = 132
# SM count of interpret mode. Deliberately small and odd: every simulated SM then loops over
# several tiles, so the CPU runs exercise the persistent loop (barrier phases carried across
# tiles, epilogue slots reused) rather than one tile per SM.
INTERPRET_NUM_SMS = 3
# Registers kept by the TMA-issuing warpgroup; the compute warpgroups share the rest (the value
# the Mosaic GPU docs of emit_pipeline_warp_specialized call reasonable).
MEMORY_REGISTERS = 40
NUM_COMPUTE_WGS = 2
# Epilogue sub-tile: 64 rows x 128 bytes (the TMA swizzle width); two slots per compute
# warpgroup take 32 KiB of SMEM whatever the output dtype.
EPI_ROWS = 64
EPI_BYTES = 128
# How the two compute warpgroups share an output tile: "cols", each all rows and half of the
# columns; "rows", each half of the rows and all the columns (DeepGEMM's split).
WG_SPLITS = ("cols", "rows")

_assumed_num_sms: list[int] = []


def num_sms(interpret) -> int:
    """CTAs of a persistent launch: INTERPRET_NUM_SMS in interpret mode (`interpret` true or an
    `InterpretGPUParams`), else the count `assume_num_sms` set, else the device's SM count."""
    if interpret:
        return INTERPRET_NUM_SMS
    if _assumed_num_sms:
        return _assumed_num_sms[-1]
    return jax.devices()[0].core_count


def device_num_sms() -> int:
    """The SM count a heuristic plans for: the assumed count, the GPU's, or DEFAULT_NUM_SMS
    when no GPU is attached (a CPU run of the XLA paths or of interpret mode)."""
    if _assumed_num_sms:
        return _assumed_num_sms[-1]
    dev = jax.devices()[0]
    return int(dev.core_count) if dev.platform == "gpu" else DEFAULT_NUM_SMS


@contextlib.contextmanager
def assume_num_sms(count: int = DEFAULT_NUM_SMS) -> Iterator[None]:
    """Within the block, kernels are built for a GPU with `count` SMs whatever device is
    attached: for lowering the GPU code path for CUDA on a CPU (experiments/lowering_stats.py,
    the lowering tests). Interpret mode keeps INTERPRET_NUM_SMS."""
    _assumed_num_sms.append(count)
    try:
        yield
    finally:
        _assumed_num_sms.pop()


def interpret_params(interpret):
    """`plgpu.kernel`'s `interpret` argument from ours: False (compile for the GPU), True (GPU
    interpret mode with defaults; the interpreter fills fresh SMEM with NaNs, so a read before a
    write shows) or the caller's `plgpu.InterpretGPUParams`."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


# --------------------------------------------------------------------------------------------
# SMEM layout
# --------------------------------------------------------------------------------------------


def swizzled(minor_elems: int, dtype, max_swizzle: int = 128) -> tuple:
    """SMEM tiling + swizzle transforms for a tile whose rows hold `minor_elems` elements: the
    widest swizzle (at most `max_swizzle` bytes) that divides the row (Mosaic GPU's
    `find_swizzle`). wgmma and TMA read 8-row groups of a swizzled layout without bank
    conflicts; 128 bytes for most of our tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(max_swizzle, plgpu.find_swizzle(minor_elems * itemsize * 8))
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def wg_share(split: str, block_m: int, block_n: int) -> tuple[int, int]:
    """(rows, columns) of one compute warpgroup's share of a [block_m, block_n] output tile:
    "rows" halves the rows, "cols" the columns (`WG_SPLITS`)."""
    if split == "rows":
        return block_m // NUM_COMPUTE_WGS, block_n
    return block_m, block_n // NUM_COMPUTE_WGS


def wg_offsets(split: str, rows: int, cols: int, wg) -> tuple:
    """(first row, first column) of warpgroup `wg`'s (rows, cols) share within the tile."""
    return (wg * rows, 0) if split == "rows" else (0, wg * cols)


# --------------------------------------------------------------------------------------------
# Epilogue: fp32 accumulators -> SMEM slots -> TMA stores
# --------------------------------------------------------------------------------------------


def epilogue_bytes(slots: int) -> int:
    """SMEM of `epilogue_smem` with `slots` slots per compute warpgroup."""
    return NUM_COMPUTE_WGS * slots * EPI_ROWS * EPI_BYTES


def epilogue_smem(dtype, slots: int):
    """Output slots per compute warpgroup: [wg, slot, EPI_ROWS, EPI_BYTES / itemsize]."""
    cols = EPI_BYTES // jnp.dtype(dtype).itemsize
    return plgpu.SMEM((NUM_COMPUTE_WGS, slots, EPI_ROWS, cols), dtype,
                      transforms=swizzled(cols, dtype))


def store_tile(acc: jax.Array, slots, dst) -> None:
    """Writes one warpgroup's fp32 tile `acc` [rows, cols] to GMEM `dst` through the SMEM
    `slots` [S, epi_rows, epi_cols] in round robin.

    Each sub-tile is cast, written to a slot, fenced (`commit_smem`, so the TMA engine sees the
    stores) and sent with a TMA store; before a slot is reused we wait until at most S - 1 stores
    are still reading SMEM, so the one that read this slot is done. The stores of the previous
    tile were issued a whole K loop ago, so the wait at the start costs nothing in practice.
    """
    rows, cols = acc.shape
    num_slots, epi_rows, epi_cols = slots.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    step = 0
    for i in range(rows // epi_rows):
        for j in range(cols // epi_cols):
            slot = step % num_slots
            if step >= num_slots:
                plgpu.wait_smem_to_gmem(num_slots - 1, wait_read_only=True)
            r0, c0 = i * epi_rows, j * epi_cols
            slots[slot] = acc[r0:r0 + epi_rows, c0:c0 + epi_cols].astype(slots.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                slots.at[slot], dst.at[pl.ds(r0, epi_rows), pl.ds(c0, epi_cols)])
            step += 1


def zero_tile(shape: tuple[int, int], slots, dst) -> None:
    """Stores zeros to `dst`. The zeros come from an unused (zero-initialised) accumulator so
    they carry the wgmma register layout that `store_tile` expects."""
    zeros = pl.run_scoped(lambda acc: acc[...], plgpu.ACC(shape, jnp.float32))
    store_tile(zeros, slots, dst)


# --------------------------------------------------------------------------------------------
# The K pipeline and the persistent launch
# --------------------------------------------------------------------------------------------


def warp_specialized(mma, context, in_specs, grid, max_steps: int, state=None, **kwargs):
    """`plgpu.emit_pipeline_warp_specialized` as every kernel here runs it: warpgroup
    NUM_COMPUTE_WGS issues the TMA loads with MEMORY_REGISTERS registers, warpgroups 0 ..
    NUM_COMPUTE_WGS - 1 run `mma` on each stage inside `context` (the compute context: it sets
    up the carry and hands the result to the epilogue); `state` chains consecutive pipelines
    (`run_tile`). `kwargs` go to emit_pipeline_warp_specialized (e.g.
    manual_consumed_barriers)."""
    return plgpu.emit_pipeline_warp_specialized(
        mma, grid=grid, in_specs=in_specs, max_concurrent_steps=max_steps,
        memory_registers=MEMORY_REGISTERS, num_compute_wgs=NUM_COMPUTE_WGS, wg_axis="wg",
        compute_context=context, pipeline_state=state, **kwargs)


def run_tile(make_pipeline, operands, allocs, *, chain: bool, first, last) -> None:
    """Runs one tile's K pipeline, chained to the CTA's previous and next tiles if `chain`.

    Chained, the TMA warpgroup runs on into the next tile's loads as soon as stages free up,
    instead of draining the pipeline after every tile: only a CTA's first tile fills it and only
    its last drains it (`plgpu.PipelinePipeline` START / STEADY / STOP); the kernels chain where
    a tile's K steps are whole rounds of stages (emit_pipeline_warp_specialized's rule). A CTA
    with a single tile needs both fill and drain, which is a plain pipeline.
    """
    if not chain:
        make_pipeline()(*operands, allocations=allocs)
        return
    states = plgpu.PipelinePipeline
    state = jnp.where(first, jnp.int32(states.START),
                      jnp.where(last, jnp.int32(states.STOP), jnp.int32(states.STEADY)))
    lax.cond(jnp.logical_and(first, last),
             lambda: make_pipeline()(*operands, allocations=allocs),
             lambda: make_pipeline(state)(*operands, allocations=allocs))


def persistent_kernel(body, out_type, interpret, cluster: int = 1, sms: int | None = None):
    """A persistent launch: one CTA per SM (`sms`, default `num_sms(interpret)`), three
    warpgroups per CTA. With `cluster` > 1 the CTAs come in clusters of that many (axis
    "cluster") and the grid axis "sm" counts clusters, so TMA can multicast a tile to every CTA
    of a cluster (`fp8_gemm.Fp8Config.multicast`)."""
    sms = num_sms(interpret) if sms is None else sms
    clusters = {} if cluster == 1 else dict(cluster=(cluster,), cluster_names=("cluster",))
    return plgpu.kernel(
        body, out_type=out_type, grid=(sms // cluster,), grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1, thread_name="wg", **clusters,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret))


def launch_shared(*args, body, params: tuple, out_type, interpret, cluster: int = 1):
    """`persistent_kernel(partial(body, **dict(params)), out_type, interpret, cluster)(*args)`
    under a jit keyed by the kernel's statics (`body` a module-level function, `params`
    hashable (name, value) pairs, `out_type`, the SM count): every call with the same statics
    and operand shapes shares one lowered function. Without it each call site lowers and
    compiles its own copy of the kernel (docs/kernels.md, "Shared launches")."""
    return _launch_jit(*args, body=body, params=params, out_type=out_type, interpret=interpret,
                       cluster=cluster, sms=num_sms(interpret))


@functools.partial(jax.jit, static_argnames=("body", "params", "out_type", "interpret",
                                             "cluster", "sms"))
def _launch_jit(*args, body, params, out_type, interpret, cluster, sms):
    return persistent_kernel(functools.partial(body, **dict(params)), out_type, interpret,
                             cluster, sms)(*args)


# --------------------------------------------------------------------------------------------
# Self-checks: python -m pallas_kernels.<kernel>
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """One row of a self-check: `run()` computes the kernel's result and its reference and
    returns the error (`rel_error`, or a count of differing values); it passes at <= `tol`."""
    name: str
    shape: str
    run: Callable[[], float]
    tol: float


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), where the kernels
    run natively; elsewhere the self-checks use GPU interpret mode."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def rel_error(got, want) -> float:
    """max |got - want| / max |want| in float32 (numpy: NaN, what an unwritten tile holds in
    interpret mode, gives inf rather than being skipped)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    return err if np.isfinite(err) else float("inf")


def run_checks(title: str, checks: Iterable[Check], out=sys.stdout) -> int:
    """Runs the checks, prints a table (check, shape, error, tolerance, PASS/FAIL; an exception
    is a FAIL with its message) and returns the exit status: 0 when every check passed."""
    print(title, file=out, flush=True)
    print(f"{'check':<32} {'shape':<32} {'error':>9} {'tol':>7}  result", file=out)
    failed = 0
    for c in checks:
        try:
            err = c.run()
            ok = err <= c.tol
            line = f"{c.name:<32} {c.shape:<32} {err:>9.2e} {c.tol:>7.0e}  "
            line += "PASS" if ok else "FAIL"
        except Exception as e:  # noqa: BLE001 - a check that raises is a failure, said so
            ok = False
            line = (f"{c.name:<32} {c.shape:<32} {'-':>9} {c.tol:>7.0e}  FAIL "
                    f"({type(e).__name__}: {str(e)[:200]})")
        failed += not ok
        print(line, file=out, flush=True)
    print(f"{'all passed' if not failed else f'{failed} failed'}", file=out, flush=True)
    return 1 if failed else 0


def mode(force_interpret: bool = False) -> tuple[bool, str]:
    """(interpret, description) for a self-check: native on a Hopper GPU unless forced."""
    interpret = force_interpret or not on_hopper()
    dev = jax.devices()[0].device_kind
    return interpret, f"{dev}, " + ("Pallas GPU interpret mode" if interpret else "native")
