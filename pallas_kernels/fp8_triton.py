"""Block-scaled FP8 GEMM in Triton, called through jax-triton: the second implementation of
`fp8_gemm.gemm_1d2d` / `gemm_1d1d` and a baseline for our Mosaic GPU kernel
(../shared/reference/kernels.md §2.4-2.5, §5).

Same products, operands and scales as `fp8_gemm` (whose `check_operands` validates them):
  gemm_1d2d_triton   y [M, N] = dequant(a) @ dequant(b)^T, a [M, K] e4m3 in 1 x 128 tiles
                     (s_a [M, K/128]), b [N, K] e4m3 in 128 x 128 blocks (s_b [N/128, K/128]);
  gemm_1d1d_triton   b in 1 x 128 tiles too (s_b [N, K/128]): the weight gradient.

**The kernel** (`_fp8_gemm_kernel`) is the design of DeepSeek-V3's inference/kernel.py
`fp8_gemm_kernel` (kernels.md §2.4), written anew: one program per BLOCK_M x BLOCK_N output
tile walks K in blocks of 128; per K-block one `tl.dot` of the e4m3 tiles yields a fresh fp32
partial, which is multiplied by s_a[row] * s_b[col] and added to the fp32 accumulator. That is
the V3 recipe's promotion every 128 of K (the report §3.3.2): Triton's sm_90 default lets a
fp8 wgmma chain accumulate imprecisely for the whole of its K (`max_num_imprecise_acc` =
2^30), and here that K is 128. The b tile is loaded [BLOCK_N, 128] as stored (K contiguous)
and transposed in registers with `tl.trans`, so the dot's B operand is K-major, the only fp8
wgmma layout Triton pipelines on Hopper (kernels.md §2.5). 128 x 128 weight-block scales are
indexed per column as s_b[col // 128], 1 x 128 ones as s_b[col]: one kernel, two scalings.
M and N need not be multiples of the tile: rows and columns past the edge read in-bounds
rows (index mod M, mod N), so the loads need no masks, and the store drops them. K must be a
multiple of 128 (the scale tile). The output tile order is grouped (GROUP_M tiles of M per
column sweep) so programs running together share a and b tiles in L2.

Shapes, block sizes and strides are compile-time constants (`tl.constexpr`): one compile per
shape, as DeepGEMM's JIT does; scales are read in the caller's layout (no transposes). Each
K-block waits for its wgmma before promoting, as in our Mosaic kernel, so tensor cores and
promotion FMAs take turns: a likely reason Triton block-FP8 lands near bf16 speed rather than
near the FP8 ceiling (what ptxas makes of it, and the measurements:
docs/kernels.md#fp8-gemm-in-triton).

**Configs**: `default_config(m, n)` is fixed and deterministic (128 x 128 tiles, 8 warps, 4
stages; 64-row tiles for M <= 64); `config="autotune"` lets Triton's autotuner, through
jax-triton, time `AUTOTUNE_CONFIGS` on the first call of each shape.

**Installing**: Triton is imported only when a GEMM is called, so this module imports on a
CPU machine without it. jax-triton 0.3.1 is the release that matches triton 3.6 (0.4 needs
3.7); next to a triton 3.6 install it with `pip install --no-deps jax-triton==0.3.1`.
jax-triton 0.3.1 also needs a jaxlib with GPU support, and `triton_call` has no CPU
lowering, no JVP and no vmap: the kernel runs on NVIDIA GPUs only (sm_89+ for e4m3).

`python -m pallas_kernels.fp8_triton` checks both GEMMs against `fp8_gemm`'s reference on a
GPU (where Triton cannot run it says so and exits 0); `--bench [--autotune] [--shapes MxNxK
...]` times the kernel against XLA's bf16 dot (one GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic as mg
from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_quant as q8
from pallas_kernels import timing

INSTALL_HINT = ("the Triton FP8 GEMM needs triton 3.6 and jax-triton 0.3.1 on a GPU build of "
                "jax; next to triton 3.6 install jax-triton with "
                "`pip install --no-deps jax-triton==0.3.1` (jax-triton 0.4 needs triton >= 3.7)")
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Shared memory for the pipeline buffers: a block's whole opt-in budget (Triton places its own
# barriers and reports a config that does not fit when it compiles).
SMEM_BYTES = mg.SMEM_PER_BLOCK

# `triton.language`, bound by `_modules()` on first use. The kernel below is a plain function
# until then (its `tl.constexpr` annotations are strings under `from __future__ import
# annotations`, which Triton reads); Triton resolves `tl` in this module's globals when it
# compiles, after `_modules()` has bound it. This keeps the import of Triton lazy.
tl = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TritonConfig:
    """One launch configuration. block_k is the scale tile (128), not a choice.

    block_m, block_n: output tile (powers of two, 16..256);
    group_m: M tiles per column sweep of the tile order (L2 reuse);
    num_warps: 4 (one warpgroup) or 8 (two);
    num_stages: Triton's software-pipeline depth over K (a stage holds the a [block_m, 128]
      and b [block_n, 128] e4m3 tiles).
    """
    block_m: int = 128
    block_n: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v > 256 or v & (v - 1):
                raise ValueError(f"TritonConfig.{name}={v} must be a power of two in [16, 256]")
        if self.group_m < 1:
            raise ValueError(f"TritonConfig.group_m={self.group_m} must be >= 1")
        if self.num_warps not in (4, 8):
            raise ValueError(f"TritonConfig.num_warps={self.num_warps} must be 4 or 8")
        if self.num_stages < 1:
            raise ValueError(f"TritonConfig.num_stages={self.num_stages} must be >= 1")
        if self.smem_bytes() > SMEM_BYTES:
            raise ValueError(f"TritonConfig: {self.smem_bytes()} bytes of shared memory for "
                             f"{self.num_stages} stages, more than {SMEM_BYTES}")

    def smem_bytes(self) -> int:
        """Pipeline buffers: e4m3 tiles plus their fp32 scale vectors, per stage."""
        return self.num_stages * (self.block_m + self.block_n) * (q8.BLOCK + 4)


def default_config(m: int, n: int) -> TritonConfig:
    """128 x 128 tiles, 8 warps, 4 stages (the config of the jax-triton port in
    ../shared/reference/gpu_facts.md); 64-row tiles (one warpgroup) when M <= 64."""
    del n
    if m <= 64:
        return TritonConfig(block_m=64, block_n=128, num_warps=4, num_stages=5)
    return TritonConfig()


# What `config="autotune"` times: tiles {64, 128} x {128, 256}, 3-5 stages. 128 x 256 is left
# out: its fp32 accumulator plus the fresh dot result need 256+ registers a thread at 8 warps
# (ptxas: 255 registers and 288 bytes of spills).
AUTOTUNE_CONFIGS = (
    TritonConfig(block_m=128, block_n=128, num_warps=8, num_stages=3),
    TritonConfig(block_m=128, block_n=128, num_warps=8, num_stages=4),
    TritonConfig(block_m=128, block_n=128, num_warps=8, num_stages=5),
    TritonConfig(block_m=64, block_n=128, num_warps=4, num_stages=4),
    TritonConfig(block_m=64, block_n=128, num_warps=4, num_stages=5),
    TritonConfig(block_m=64, block_n=256, num_warps=8, num_stages=3),
    TritonConfig(block_m=64, block_n=256, num_warps=8, num_stages=4),
)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


def _fp8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr,
                     M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                     SA_STRIDE_M: tl.constexpr, SA_STRIDE_K: tl.constexpr,
                     SB_STRIDE_N: tl.constexpr, SB_STRIDE_K: tl.constexpr,
                     SB_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """a [M, K], b [N, K] e4m3 (row-major); s_a[m, kb] at sa_ptr + m SA_STRIDE_M + kb
    SA_STRIDE_K; s_b[col // SB_ROWS, kb] likewise (SB_ROWS = 128: weight blocks, 1: rows);
    y [M, N] = sum over K-blocks kb of (a_kb @ b_kb^T) * s_a[:, kb] * s_b[:, kb].

    Only builtins of triton.language (no `tl.cdiv`/`tl.zeros`, which are @jit helpers):
    those also run in Triton's interpreter when TRITON_INTERPRET is set after Triton was
    imported, which tests/test_fp8_triton.py relies on."""
    # grouped tile order: GROUP_M row tiles share each sweep over the column tiles
    pid = tl.program_id(0)
    tiles_m: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # edge tiles read wrapped rows/columns (always in bounds, no load masks); discarded below
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K], K contiguous
    sa_ptrs = sa_ptr + rows * SA_STRIDE_M  # [BLOCK_M]
    sb_ptrs = sb_ptr + (cols // SB_ROWS) * SB_STRIDE_N  # [BLOCK_N]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        s_a = tl.load(sa_ptrs + kb * SA_STRIDE_K)
        s_b = tl.load(sb_ptrs + kb * SB_STRIDE_K)
        # one K-block in the tensor cores, then promoted to fp32 with its scales (V3 recipe)
        part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        acc += part * (s_a[:, None] * s_b[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _modules():
    """(triton, jax_triton), imported now; an ImportError that says how to install them."""
    global tl
    try:
        import triton
        import triton.language as language
        import jax_triton
    except ImportError as e:  # jax-triton 0.3.1 also raises this without a GPU jaxlib
        raise ImportError(f"{INSTALL_HINT} [{type(e).__name__}: {e}]") from e
    tl = language
    return triton, jax_triton


@functools.cache
def _jitted(autotune: bool):
    """The kernel as a Triton JITFunction (autotune: wrapped in Triton's Autotuner over
    AUTOTUNE_CONFIGS, which jax-triton compiles all of and times on the first call)."""
    triton, _ = _modules()
    kernel = triton.jit(_fp8_gemm_kernel)
    if not autotune:
        return kernel
    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "GROUP_M": c.group_m},
                             num_warps=c.num_warps, num_stages=c.num_stages)
               for c in AUTOTUNE_CONFIGS]
    return triton.autotune(configs=configs, key=["M", "N", "K"])(kernel)


def _gemm(a, s_a, b, s_b, b_scale: str, out_dtype, config) -> jax.Array:
    """Validated operands -> the jax-triton call (config: None, a TritonConfig or "autotune")."""
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"fp8 gemm (triton): out_dtype={jnp.dtype(out_dtype)} must be one of "
                         f"{[jnp.dtype(d).name for d in OUT_DTYPES]}")
    if not (config is None or config == "autotune" or isinstance(config, TritonConfig)):
        raise ValueError(f"fp8 gemm (triton): config={config!r} must be None, a TritonConfig "
                         "or 'autotune'")
    (m, k), n = a.shape, b.shape[0]
    _, jt = _modules()
    autotune = config == "autotune"
    kernel = _jitted(autotune)
    params = dict(M=m, N=n, K=k, SA_STRIDE_M=s_a.shape[1], SA_STRIDE_K=1,
                  SB_STRIDE_N=s_b.shape[1], SB_STRIDE_K=1,
                  SB_ROWS=q8.BLOCK if b_scale == "blocks" else 1, BLOCK_K=q8.BLOCK)
    launch = {}
    if not autotune:
        cfg = config or default_config(m, n)
        params.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m)
        launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return jt.triton_call(a, b, s_a, s_b, kernel=kernel,
                          out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=_grid(m, n),
                          name=f"fp8_gemm_{b_scale}", **launch, **params)


@functools.cache
def _grid(m: int, n: int):
    """One program per output tile, for any config's BLOCK_M/BLOCK_N. Cached: the grid is a
    parameter of jax-triton's primitive, so one object per shape lets eager calls reuse their
    compiled executable."""
    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)
    return grid


def gemm_1d2d_triton(a: jax.Array, s_a: jax.Array, b: jax.Array, s_b: jax.Array, *,
                     out_dtype=jnp.bfloat16,
                     config: TritonConfig | str | None = None) -> jax.Array:
    """y [M, N] = dequant(a) @ dequant(b)^T; a 1 x 128-scaled, b 128 x 128-scaled (as
    `fp8_gemm.gemm_1d2d`). config: None (`default_config`), a TritonConfig, or "autotune"."""
    fg.check_operands(a, s_a, b, s_b, "blocks")
    return _gemm(a, s_a, b, s_b, "blocks", out_dtype, config)


def gemm_1d1d_triton(a: jax.Array, s_a: jax.Array, b: jax.Array, s_b: jax.Array, *,
                     out_dtype=jnp.float32,
                     config: TritonConfig | str | None = None) -> jax.Array:
    """y [M, N] = dequant(a) @ dequant(b)^T; both 1 x 128-scaled along K (as
    `fp8_gemm.gemm_1d1d`, the weight gradient)."""
    fg.check_operands(a, s_a, b, s_b, "rows")
    return _gemm(a, s_a, b, s_b, "rows", out_dtype, config)


# --------------------------------------------------------------------------------------------
# python -m pallas_kernels.fp8_triton: the self-check, and the benchmark (--bench, GPU)
# --------------------------------------------------------------------------------------------


def calc_diff(x: jax.Array, y: jax.Array) -> float:
    """DeepGEMM's 1 - 2<x,y>/(|x|^2+|y|^2): 0 for equal arrays (kernels.md §2.3)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return float(1 - 2 * jnp.sum(x * y) / (jnp.sum(x * x) + jnp.sum(y * y)))


def bench(argv=None) -> list[dict]:
    """Per shape: the Triton kernel's TFLOP/s (CUPTI kernel time, median) and calc_diff
    against the exact reference, next to XLA's bf16 dot on the same (unquantized) inputs.

    python -m pallas_kernels.fp8_triton --bench [--autotune] [--shapes MxNxK ...]"""
    import argparse

    ap = argparse.ArgumentParser(description="jax-triton block-scaled FP8 GEMM benchmark")
    ap.add_argument("--shapes", nargs="*", default=["8192x8192x8192", "4096x7168x16384",
                                                     "4096x4096x7168", "4096x7168x2048",
                                                     "128x7168x16384"])
    ap.add_argument("--autotune", action="store_true", help="also time config='autotune'")
    args = ap.parse_args(argv)
    rows = []
    for text in args.shapes:
        m, n, k = (int(v) for v in text.lower().split("x"))
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = jax.random.normal(kw, (n, k), jnp.bfloat16)
        aq, sa = jax.jit(q8.quantize_rows)(x)
        bq, sb = jax.jit(q8.quantize_blocks)(w)
        want = fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32)
        row = {"shape": [m, n, k], "xla_bf16": 2 * m * n * k / timing.kernel_ms(
            lambda p, q: jnp.einsum("mk,nk->mn", p, q), (x, w), 20) / 1e9}
        for name, cfg in (("triton", None), ("triton_autotune", "autotune"))[:1 + args.autotune]:
            fn = functools.partial(gemm_1d2d_triton, config=cfg)
            row[f"{name}_calc_diff"] = calc_diff(jax.jit(fn)(aq, sa, bq, sb), want)
            row[name] = 2 * m * n * k / timing.kernel_ms(fn, (aq, sa, bq, sb), 20) / 1e9
        print({key: round(v, 7 if "diff" in key else 1) if isinstance(v, float) else v
               for key, v in row.items()}, flush=True)
        rows.append(row)
    return rows


def _checks() -> list:
    """Both GEMMs against `fp8_gemm`'s reference in float32 out (1e-2: FP8 tensor cores round
    within each 128-block of K): the default config, a ragged M and N (edge tiles), a 64-row
    tile, and one row (decode)."""
    def case(m, n, k, b_scale, config=None):
        ka, kb = jax.random.split(jax.random.key(m + n + k))
        x = jax.random.normal(ka, (m, k)) * jnp.exp2(jnp.arange(k) // q8.BLOCK % 4 * 2.0 - 3)
        w = jax.random.normal(kb, (n, k)) * jnp.exp2(jnp.arange(n) // q8.BLOCK % 4 - 1.0)[
            :, None]
        aq, sa = q8.quantize_rows(x)
        if b_scale == "blocks":
            bq, sb = q8.quantize_blocks(w)
            got = gemm_1d2d_triton(aq, sa, bq, sb, out_dtype=jnp.float32, config=config)
            return mg.rel_error(got, fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32))
        bq, sb = q8.quantize_rows(w)
        got = gemm_1d1d_triton(aq, sa, bq, sb, out_dtype=jnp.float32, config=config)
        return mg.rel_error(got, fg.gemm_1d1d(aq, sa, bq, sb))

    small = TritonConfig(block_m=64, block_n=128, num_warps=4)
    return [
        mg.Check("gemm_1d2d_triton default", "256x256x512",
                 lambda: case(256, 256, 512, "blocks"), 1e-2),
        mg.Check("gemm_1d2d_triton ragged", "200x384x384",
                 lambda: case(200, 384, 384, "blocks"), 1e-2),
        mg.Check("gemm_1d2d_triton 64-row tiles", "128x256x256",
                 lambda: case(128, 256, 256, "blocks", small), 1e-2),
        mg.Check("gemm_1d1d_triton ragged", "200x200x256",
                 lambda: case(200, 200, 256, "rows"), 1e-2),
        mg.Check("gemm_1d1d_triton one row", "1x136x256", lambda: case(1, 136, 256, "rows"), 1e-2),
    ]


def main(argv=None) -> int:
    """python -m pallas_kernels.fp8_triton: both GEMMs against the reference on a GPU; prints a
    table and exits non-zero if a check fails. Without a GPU or without triton / jax-triton it
    says why it cannot run them and exits 0 (jax-triton has no CPU path; tests/test_fp8_triton.py
    runs the kernel in Triton's interpreter where triton is installed).
    python -m pallas_kernels.fp8_triton --bench [bench's options]: `bench`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--bench" in argv:
        argv.remove("--bench")
        bench(argv)
        return 0
    if argv:
        raise SystemExit(f"unknown arguments {argv}; the self-check takes none (or --bench)")
    if jax.devices()[0].platform != "gpu":
        print("pallas_kernels.fp8_triton: not run (jax-triton runs on NVIDIA GPUs only; no GPU "
              "here)")
        return 0
    try:
        _modules()
    except ImportError as e:
        print(f"pallas_kernels.fp8_triton: not run ({e})")
        return 0
    return mg.run_checks(f"pallas_kernels.fp8_triton ({jax.devices()[0].device_kind}, native)",
                         _checks())


if __name__ == "__main__":
    raise SystemExit(main())
