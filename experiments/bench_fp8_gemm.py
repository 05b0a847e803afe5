"""Block-scaled FP8 GEMM: our Mosaic GPU kernel against what XLA offers, on one GPU.

Command:   python experiments/bench_fp8_gemm.py                    (all shapes below, one GPU)
           python experiments/bench_fp8_gemm.py --shapes 8192x8192x8192 4096x2112x7168
           python experiments/bench_fp8_gemm.py --interpret --shapes 256x256x256 --iterations 1
               (a CPU smoke run of the kernel in Pallas' GPU interpret mode; times meaningless)
Hardware:  one H100/H200 for the numbers; the interpret smoke run on any CPU.
What it measures, per shape y[M, N] = x[M, K] @ w[N, K]^T (random-normal inputs, the same for
every implementation; CUPTI kernel time, median of --iterations, L2 flushed before each
iteration by rewriting a 256 MiB buffer whose kernel is left out of the sum):
  pallas_fp8        our kernel (pallas_kernels/fp8_gemm.py): x in 1 x 128 tiles, w in 128 x 128
                    blocks, e4m3, fp32 promotion every 128 of K, bf16 out; inputs pre-quantized
  xla_bf16          XLA's bf16 dot (cuBLAS)
  xla_fp8_unscaled  XLA's e4m3 dot_general with no scales (cuBLASLt): the raw FP8 ceiling, not
                    DeepSeek's recipe
  xla_dequant_bf16  dequantize the same FP8 tiles to bf16 and dot, in one jit: what a JAX user
                    gets today for the recipe
  triton_fp8        our jax-triton block-scaled kernel (pallas_kernels/fp8_triton.py; needs
                    jax-triton 0.3.1 next to triton 3.6, else recorded as not run)
  pallas_fp8[BMxBNxSTAGESxSPLITS[r][+stage][+mX][+kS][+gG][_e1]]  the kernel with the tile
                    configs of --configs (a sweep; r: the "rows" warpgroup split, +stage: two
                    K-blocks a stage, +ma/+mb: a or b multicast in clusters of two CTAs, +kS:
                    split-K in S ranges, +gG: work items in groups of G rows, _e1: one
                    epilogue slot), also for the grouped (none of multicast, split-K, group_m)
                    and wgrad cases
grouped cases (G experts x ROWS rows, the MoE layout): pallas_fp8_grouped (our grouped FP8
kernel) against pallas_bf16_grouped (our bf16 grouped kernel, the baseline); weight-gradient
cases (--wgrad): pallas_fp8_wgrad (1 x 128 tiles along tokens, fp32 out) against
xla_bf16_wgrad; and the quantizers' bandwidth (--quant) against a bf16 copy, written to
experiments/results/fp8_quant.json (records {"shape": [M, K], "impl", "gbps",
"fraction_of_copy"}).
TFLOP/s = 2 M N K / time; the fraction of the FP8 dense peak (1979 on H100/H200 datasheets) and
ratios to xla_bf16 are printed. The kernel's error against the exact product of the quantized
values is checked per shape (DeepGEMM's calc_diff, and max relative error).
Output: a table and experiments/results/fp8_gemm.json, a list of records
{"shape": [M, N, K], "impl": ..., "tflops": ...} plus run metadata in the first record's
"run" field ("complete": false while a run is cut short; the file is rewritten after each case).
Result (one H200, 2026-12-02, evening, `--iterations 10 --quant`, the quantizers skipped;
experiments/results/fp8_gemm.json, one complete run):
  pallas_fp8 (two K-blocks a stage, "rows" split, scales read before each wgmma wait; b
  multicast in clusters of two where M is an even number of tiles; work items in groups of 8
  rows unless split; split-K where the tiles fill at most half the SMs) at 8192^3: 1332 TFLOP/s
  = 1.64x xla_bf16 (814); xla_fp8_unscaled 1552, xla_dequant_bf16 730, triton_fp8 864. M = 4096,
  DeepSeek-V3's six (N, K): 1.18-1.64x bf16 (913-1340). M = 128: 1.39-1.72x (split-K at 17-56
  tiles). Grouped 1.60-1.63x our bf16 grouped kernel; weight gradient 1.16-1.26x bf16.
  Quantizers (fp8_quant.json, the morning's complete run): XLA's 1.51-1.64 TB/s (46-50% of the
  bf16 copy's 3.27-3.28 TB/s), the one-pass kernels 3.35-3.82 TB/s (102-117%), bit-identical to
  XLA's.
  Earlier runs: the afternoon's (fp8_gemm_h200_2026-12-02d.json: 1194 = 1.50x at 8192^3, work
  items row after row; its wgrad rows from a second call, as its note says); groups of rows
  pinned against row after row, with and without multicast (fp8_gemm_groups_pins_h200.json);
  the morning's complete run (fp8_gemm_h200_2026-12-02c.json: 1173 = 1.44x at
  8192^3, before the early scale reads); multicast against the same kernel without it
  (fp8_gemm_h200_2026-12-02b.json, cut before its last grouped and wgrad cases: 0.99-1.08x,
  1151 against 1067 at 8192^3); the complete run before multicast
  (fp8_gemm_h200_2026-12-02a.json: 1143 = 1.39x at 8192^3); split-K and multicast pinned side by
  side at M = 128 and 256 (fp8_gemm_pins_h200.json);
  split-K against the unsplit kernel at M = 128 (fp8_gemm_splitk_h200.json: 1.23-1.76x); the
  2026-12-01 run (fp8_gemm_h200_2026-12-01.json, the "cols" split, its table in
  fp8_gemm_h200_table.txt; quantizers in fp8_quant_h200_2026-12-01.json); the two-block
  stages against one-block ones (fp8_gemm_overlap_h200.json, 1.07-1.18x); the warpgroup split
  (fp8_gemm_wg_split_h200.json).
  Targets: dense 1.6x (at 8192^3), grouped 1.3x, wgrad 1.1x and quantizers 80% of copy met.
  What bounded the kernel on the way: experiments/lab/fp8_gemm_variants.py.
"""

import argparse
import datetime
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic
from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_quant as q8
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import timing  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FP8_PEAK = 1979.0
# issue 5's shapes: 8192^3; DeepSeek-V3's GEMMs at M = 4096 and 128 ((N, K) from DeepGEMM's
# table, kernels.md §2.2). N = 2112 is not a multiple of 128: it runs padded to 2176 (explicit,
# useful FLOPs counted).
DEEPSEEK_NK = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
DEFAULT_SHAPES = [(8192, 8192, 8192)] + [(m, n, k) for m in (4096, 128) for n, k in DEEPSEEK_NK]
DEFAULT_WGRAD = [(4096, 7168, 8192), (7168, 2048, 8192), (2176, 7168, 8192)]
DEFAULT_QUANT = [(8192, 7168), (16384, 2048)]
DEFAULT_GROUPED = [(g, rows, n, k) for g, rows in ((4, 8192), (8, 4096))
                   for n, k in ((4096, 7168), (7168, 2048))]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=None,
                    help="MxNxK shapes (default: 8192^3 and DeepSeek-V3's at M = 4096 and 128; "
                         "pass none to skip: --shapes)")
    ap.add_argument("--impls", nargs="*", default=None,
                    help="subset of pallas_fp8 xla_bf16 xla_fp8_unscaled xla_dequant_bf16 triton_fp8")
    ap.add_argument("--grouped", nargs="*", default=None,
                    help="GxROWSxNxK grouped cases (default: 4x8192 and 8x4096 rows with (N, K) "
                         "in {(4096, 7168), (7168, 2048)}; pass none to skip: --grouped)")
    ap.add_argument("--configs", nargs="*", default=[],
                    help="extra kernel tile configs to time next to the default, as "
                         "BMxBNxSTAGES[xSPLITS][r][+stage][+ma|+mb][+kS][+gG] (e.g. 128x128x5x2 "
                         "128x256x3 128x128x4r 128x128x3r+stage 128x128x3r+stage+mb "
                         "128x128x3r+stage+k4; r = Fp8Config.wg_split 'rows', +stage = "
                         "Fp8Config.overlap 'stage', +ma / +mb = Fp8Config.multicast 'a' / 'b', "
                         "+kS = Fp8Config.split_k S, +gG = Fp8Config.group_m G (work items in "
                         "groups of G rows), with one epilogue slot where two do not "
                         "fit), in the dense, grouped and wgrad cases whose sizes they divide "
                         "(multicast, split-K, group_m: dense only; multicast needs an even tile "
                         "count); recorded as impl "
                         "'pallas_fp8[BMxBNxSTAGESxSPLITS[r][+stage][+mX][+kS][+gG][_e1]]' "
                         "(…_grouped[…], …_wgrad[…])")
    ap.add_argument("--wgrad", nargs="*", default=None,
                    help="weight-gradient cases NxKxTOKENS: dw [N, K] = dy^T x over TOKENS, "
                         "fp32 out (default: (N, K) in {(4096, 7168), (7168, 2048), "
                         "(2176, 7168)} over 8192 tokens; pass none to skip: --wgrad)")
    ap.add_argument("--quant", nargs="*", default=None,
                    help="quantizer cases MxK (bf16 in): quantize_rows, quantize_cols and "
                         "quantize_blocks against a bf16 copy, in GB/s (default: 8192x7168 "
                         "and 16384x2048; pass none to skip: --quant); written to --quant_json")
    ap.add_argument("--quant_json", default=str(RESULTS / "fp8_quant.json"),
                    help="where to write the quantizer records")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations per case")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernel in Pallas' GPU interpret mode (CPU smoke test)")
    ap.add_argument("--json", default=str(RESULTS / "fp8_gemm.json"), help="where to write records")
    return ap.parse_args(argv)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not MxNxK") from None
    return m, n, k


MULTICAST_FLAGS = {"ma": "a", "mb": "b"}


def _config(text: str) -> "fg.Fp8Config":
    body, *flags = text.lower().split("+")
    split = "rows" if body.endswith("r") else "cols"
    try:
        split_flags = [f for f in flags if f[:1] == "k" and f[1:].isdigit()]
        group_flags = [f for f in flags if f[:1] == "g" and f[1:].isdigit()]
        unknown = [f for f in flags if f not in MULTICAST_FLAGS and f not in fg.OVERLAPS[1:]
                   and f not in split_flags and f not in group_flags]
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}")
        overlap = next((f for f in flags if f in fg.OVERLAPS), "none")
        multicast = next((MULTICAST_FLAGS[f] for f in flags if f in MULTICAST_FLAGS), "none")
        split_k = int(split_flags[0][1:]) if split_flags else 1
        group_m = int(group_flags[0][1:]) if group_flags else 1
        bm, bn, stages, *splits = (int(v) for v in body.rstrip("r").split("x"))
        kw = dict(block_m=bm, block_n=bn, max_concurrent_steps=stages,
                  splits=splits[0] if splits else 1, wg_split=split, overlap=overlap,
                  multicast=multicast, split_k=split_k, group_m=group_m)
        # two-block stages may leave room for one epilogue slot only
        try:
            return fg.Fp8Config(**kw, epilogue_slots=2)
        except ValueError as e:
            if "bytes of shared memory" not in str(e):
                raise
            return fg.Fp8Config(**kw, epilogue_slots=1)
    except (ValueError, IndexError) as e:
        raise SystemExit(f"--configs: {text!r}: {e} (want BMxBNxSTAGES[xSPLITS][r][+stage]"
                         "[+ma|+mb][+kS][+gG])") from None


def _tag(cfg) -> str:
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.max_concurrent_steps}x{cfg.splits}"
            + ("r" if cfg.wg_split == "rows" else "")
            + ("" if cfg.overlap == "none" else f"+{cfg.overlap}")
            + ("" if cfg.multicast == "none" else f"+m{cfg.multicast}")
            + ("" if cfg.split_k == 1 else f"+k{cfg.split_k}")
            + ("" if cfg.group_m == 1 else f"+g{cfg.group_m}")
            + ("" if cfg.epilogue_slots == 2 else f"_e{cfg.epilogue_slots}"))


def _fits(cfg, m: int, n: int, k: int) -> bool:
    """Whether the dense kernel takes [M, K] @ [N, K]^T with `cfg` (fp8_gemm.check_shapes)."""
    try:
        fg.check_shapes(cfg, m, n, k)
    except ValueError:
        return False
    return True


def _pad128(v: int) -> int:
    return -(-v // q8.BLOCK) * q8.BLOCK


def calc_diff(x, y) -> float:
    """DeepGEMM's 1 - 2<x,y>/(|x|^2+|y|^2): 0 for equal arrays; < 1e-3 passes there."""
    x, y = x.astype(jnp.float64 if jax.config.x64_enabled else jnp.float32), y.astype(x.dtype)
    return float(1 - 2 * jnp.sum(x * y) / (jnp.sum(x * x) + jnp.sum(y * y)))


def run_case(m: int, n: int, k: int, impls, iterations: int, interpret: bool,
             configs=()) -> list[dict]:
    n_pad = _pad128(n)
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (n_pad, k), jnp.bfloat16).at[n:].set(0)  # explicit N padding
    aq, sa = jax.jit(q8.quantize_rows)(x)
    bq, sb = jax.jit(q8.quantize_blocks)(w)
    sa_t, sb_t = fg.kernel_scales(sa, sb, "blocks")
    cfg = fg.default_config(m, n_pad, k, sms=_mosaic.num_sms(interpret))

    def kernel(c):
        return (lambda a, b, s1, s2: fg.gemm_kernel(a, b, s1, s2, config=c, b_blocks=True,
                                                    interpret=interpret), (aq, bq, sa_t, sb_t))

    fns = {
        "pallas_fp8": kernel(cfg),
        "xla_bf16": (lambda a, b: jnp.einsum("mk,nk->mn", a, b), (x, w)),
        "xla_fp8_unscaled": (lambda a, b: jax.lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16), (aq, bq)),
        "xla_dequant_bf16": (lambda a, s1, b, s2: jnp.einsum(
            "mk,nk->mn", q8.dequantize_rows(a, s1, jnp.bfloat16),
            q8.dequantize_blocks(b, s2, jnp.bfloat16)), (aq, sa, bq, sb)),
    }
    rows = []
    flops = 2 * m * n * k
    want = fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32)
    kernels = {"pallas_fp8": cfg} if "pallas_fp8" in impls else {}
    for c in configs:
        if not _fits(c, m, n_pad, k):
            continue  # the sweep covers the shapes each tile divides
        fns[f"pallas_fp8[{_tag(c)}]"] = kernel(c)
        kernels[f"pallas_fp8[{_tag(c)}]"] = c
    for impl in [i for i in impls if i != "triton_fp8"] + [i for i in kernels if i != "pallas_fp8"]:
        if impl not in fns:
            raise SystemExit(f"--impls: unknown {impl!r}; choose from "
                             f"{sorted(fns) + ['triton_fp8']}")
        fn, args = fns[impl]
        try:
            if impl in kernels:  # correctness first: a wrong kernel's time means nothing
                got = jax.jit(fn)(*args).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                check = {"calc_diff": calc_diff(got, want), "max_rel_err": err,
                         "config": _tag(kernels[impl])}
            ms = timing.kernel_ms(fn, args, iterations, interpret=interpret)
            rec = {"shape": [m, n, k], "impl": impl, "tflops": flops / ms / 1e9, "ms": ms}
            if impl in kernels:
                rec.update(check)
        except Exception as e:  # noqa: BLE001 - a failed implementation is a result, said so
            rec = {"shape": [m, n, k], "impl": impl, "tflops": None,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if n_pad != n:
            rec["n_padded_to"] = n_pad
        rows.append(rec)
    if "triton_fp8" in impls:
        rows.append(_triton_case(m, n, k, aq, sa, bq, sb, want, iterations, interpret))
    return rows


def _triton_case(m, n, k, aq, sa, bq, sb, want, iterations, interpret) -> dict:
    """The jax-triton kernel (pallas_kernels/fp8_triton.py) on the same operands; it needs a GPU
    and jax_triton, and a run without them records why it did not run."""
    rec = {"shape": [m, n, k], "impl": "triton_fp8", "tflops": None}
    if interpret or jax.devices()[0].platform != "gpu":
        return {**rec, "note": "not run: jax-triton kernels need a GPU"}
    try:
        from pallas_kernels import fp8_triton

        fn = lambda a, s1, b, s2: fp8_triton.gemm_1d2d_triton(a, s1, b, s2)  # noqa: E731
        got = jax.jit(fn)(aq, sa, bq, sb).astype(jnp.float32)
        check = {"calc_diff": calc_diff(got, want),
                 "max_rel_err": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))}
        ms = timing.kernel_ms(fn, (aq, sa, bq, sb), iterations, interpret=interpret)
        return {**rec, "tflops": 2 * m * n * k / ms / 1e9, "ms": ms, **check}
    except Exception as e:  # noqa: BLE001 - a failed implementation is a result, said so
        return {**rec, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def run_wgrad_case(n: int, k: int, t: int, iterations: int, interpret: bool,
                   configs=()) -> list[dict]:
    """dw [N, K] = dy^T x over t tokens, fp32 out: our kernel on 1 x 128 tiles along tokens
    (`quantize_cols` of dy and x) against XLA's bf16 dot with fp32 output. The model's wgrad
    (dsv3_jax.fp8) puts x^T on the left for a [K, N] result: the same kernel with the two
    output sizes swapped, i.e. this case at K x N x t."""
    kd, kx = jax.random.split(jax.random.key(2))
    dy = jax.random.normal(kd, (t, n), jnp.bfloat16)
    x = jax.random.normal(kx, (t, k), jnp.bfloat16)
    aq, sa = jax.jit(q8.quantize_cols)(dy)  # [N, T], [N, T/128]
    bq, sb = jax.jit(q8.quantize_cols)(x)   # [K, T], [K, T/128]
    sa_t, sb_t = fg.kernel_scales(sa, sb, "rows")
    want = fg.gemm_1d1d(aq, sa, bq, sb)
    fns = {
        "pallas_fp8_wgrad": (lambda a, b, s1, s2: fg.gemm_kernel(
            a, b, s1, s2, out_dtype=jnp.float32, interpret=interpret), (aq, bq, sa_t, sb_t)),
        "xla_bf16_wgrad": (lambda d, v: jnp.einsum("tn,tk->nk", d, v,
                                                   preferred_element_type=jnp.float32), (dy, x)),
    }
    for c in configs:  # the sweep covers the shapes each tile divides
        if _fits(c, n, k, t):
            fns[f"pallas_fp8_wgrad[{_tag(c)}]"] = (
                lambda a, b, s1, s2, c=c: fg.gemm_kernel(a, b, s1, s2, out_dtype=jnp.float32,
                                                         config=c, interpret=interpret),
                (aq, bq, sa_t, sb_t))
    out = []
    for impl, (fn, args) in fns.items():
        rec = {"shape": [n, k, t], "impl": impl, "tflops": None}
        try:
            if impl.startswith("pallas_fp8_wgrad"):
                got = jax.jit(fn)(*args)
                rec["calc_diff"] = calc_diff(got, want)
            ms = timing.kernel_ms(fn, args, iterations, interpret=interpret)
            rec.update(tflops=2 * n * k * t / ms / 1e9, ms=ms)
        except Exception as e:  # noqa: BLE001 - a failed implementation is a result, said so
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(rec)
    return out


def run_quant_case(m: int, k: int, iterations: int, interpret: bool) -> list[dict]:
    """The quantizers' bandwidth (bytes read + written / time) against a bf16 copy (x + 1: read
    and write the same bytes as the input twice), the ceiling for a one-pass op.

    Next to XLA's (fp8_quant) the one-pass Mosaic GPU kernels (fp8_quant_kernel), counted with
    the same bytes: "quantize_{rows,cols}_pallas" return fp8_quant's exact layouts (the wrapper's
    XLA transpose of the scales is in the time: every kernel of the call is summed), "..._st"
    the scales transposed, the kernel's own layout and what fp8_gemm's kernel reads. Their
    records carry "matches_xla": q and s bit-identical to the XLA quantizer's on this input."""
    from pallas_kernels import fp8_quant_kernel as qk

    x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
    n_in = m * k * 2
    tile_bytes = n_in + m * k + m * k // q8.BLOCK * 4  # bf16 in, e4m3 out, one f32 per 128
    cases = {
        "copy_bf16": (lambda v: v + 1, 2 * n_in),
        "quantize_rows": (q8.quantize_rows, tile_bytes),
        "quantize_cols": (q8.quantize_cols, tile_bytes),
        "quantize_blocks": (q8.quantize_blocks, n_in + m * k + m * k // q8.BLOCK**2 * 4),
        "quantize_rows_pallas": (lambda v: qk.quantize_rows_kernel(v, interpret=interpret),
                                 tile_bytes),
        "quantize_rows_pallas_st": (lambda v: qk.quantize_rows_kernel(
            v, interpret=interpret, transposed_scales=True), tile_bytes),
        "quantize_cols_pallas": (lambda v: qk.quantize_cols_kernel(v, interpret=interpret),
                                 tile_bytes),
        "quantize_cols_pallas_st": (lambda v: qk.quantize_cols_kernel(
            v, interpret=interpret, transposed_scales=True), tile_bytes),
    }
    # kernel impl -> (the XLA quantizer it must equal, whether its scales come transposed)
    checks = {"quantize_rows_pallas": (q8.quantize_rows, False),
              "quantize_rows_pallas_st": (q8.quantize_rows, True),
              "quantize_cols_pallas": (q8.quantize_cols, False),
              "quantize_cols_pallas_st": (q8.quantize_cols, True)}

    def bits(a):  # e4m3 -> uint8, f32 -> uint32: compare bit patterns
        return jax.lax.bitcast_convert_type(a, jnp.uint8 if a.dtype == q8.FP8 else jnp.uint32)

    out = []
    for impl, (fn, nbytes) in cases.items():
        try:
            ms = timing.kernel_ms(fn, (x,), iterations, interpret=interpret)
            rec = {"shape": [m, k], "impl": impl, "ms": ms, "gbps": nbytes / ms / 1e6}
            if impl in checks:
                ref_fn, transposed = checks[impl]
                (q, s), (q_ref, s_ref) = jax.jit(fn)(x), jax.jit(ref_fn)(x)
                rec["matches_xla"] = bool(jnp.array_equal(bits(q), bits(q_ref)) and jnp.array_equal(
                    bits(s.T if transposed else s), bits(s_ref)))
            out.append(rec)
        except Exception as e:  # noqa: BLE001 - a failed implementation is a result, said so
            out.append({"shape": [m, k], "impl": impl, "gbps": None,
                        "error": f"{type(e).__name__}: {str(e)[:300]}"})
    copy = out[0]["gbps"]
    for r in out:
        r["fraction_of_copy"] = r["gbps"] / copy if r["gbps"] and copy else None
    return out


def run_grouped_case(g: int, rows: int, n: int, k: int, iterations: int, interpret: bool,
                     configs=()) -> list[dict]:
    """g experts of `rows` rows each (the contiguous layout, already sorted and 128-aligned):
    our grouped FP8 kernel against our grouped bf16 kernel (pallas_kernels/grouped_matmul.py,
    the bf16 grouped baseline) on the same rows and weights."""

    m = g * rows
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (g, n, k), jnp.bfloat16)  # [E, N, K]: K-major, as FP8 needs
    plan = gm.pad_plan(jnp.full((g,), rows, jnp.int32), m, 128)
    x_pad = gm.pad_rows(x, plan)
    aq, sa = jax.jit(q8.quantize_rows)(x_pad)
    bq, sb = jax.jit(q8.quantize_blocks)(w)
    fns = {
        "pallas_fp8_grouped": (lambda a, s1, b, s2: fg.grouped_gemm_1d2d(
            a, s1, b, s2, plan, impl="pallas", interpret=interpret), (aq, sa, bq, sb)),
        "pallas_bf16_grouped": (lambda a, b: gm.gmm(a, b, plan, transpose_w=True,
                                                    interpret=interpret), (x_pad, w)),
    }
    for c in configs:  # the plan's 128-row tiles fix block_m; multicast is dense only
        if (c.block_m == plan.block_m and n % c.block_n == 0 and c.multicast == "none"
                and c.split_k == 1 and c.group_m == 1):
            fns[f"pallas_fp8_grouped[{_tag(c)}]"] = (
                lambda a, s1, b, s2, c=c: fg.grouped_gemm_1d2d(
                    a, s1, b, s2, plan, impl="pallas", interpret=interpret, config=c),
                (aq, sa, bq, sb))
    flops = 2 * m * n * k
    out = []
    for impl, (fn, args) in fns.items():
        try:
            ms = timing.kernel_ms(fn, args, iterations, interpret=interpret)
            out.append({"shape": [m, n, k], "groups": g, "impl": impl, "tflops": flops / ms / 1e9,
                        "ms": ms})
        except Exception as e:  # noqa: BLE001 - a failed implementation is a result, said so
            out.append({"shape": [m, n, k], "groups": g, "impl": impl, "tflops": None,
                        "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return out


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    shapes = [_shape(s) for s in a.shapes] if a.shapes is not None else DEFAULT_SHAPES
    impls = a.impls or ["pallas_fp8", "xla_bf16", "xla_fp8_unscaled", "xla_dequant_bf16",
                        "triton_fp8"]
    configs = [_config(c) for c in a.configs]
    dev = jax.devices()[0]
    print(f"bench_fp8_gemm on {dev.device_kind}{' (interpret mode)' if a.interpret else ''}, "
          f"{len(shapes)} shapes, {a.iterations} iterations", flush=True)
    run = {"command": "python experiments/bench_fp8_gemm.py " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "device": dev.device_kind,
           "jax": jax.__version__, "interpret": a.interpret, "iterations": a.iterations,
           "complete": False}  # True once every case has run (the file is written after each)

    def save(records, quant_records=()):
        """Written after every case, so a run cut short keeps what it measured."""
        for path, recs in ((a.json, records), (a.quant_json, quant_records)):
            if recs:
                recs[0]["run"] = run
                path = pathlib.Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(recs, indent=1) + "\n")

    records = []
    for m, n, k in shapes:
        rows = run_case(m, n, k, impls, a.iterations, a.interpret, configs)
        records += rows
        save(records)
        by = {r["impl"]: r for r in rows}
        bf16 = (by.get("xla_bf16") or {}).get("tflops")
        for r in rows:
            t = r["tflops"]
            extra = r.get("error") or r.get("note") or ""
            if t is not None:
                extra = (f"{t / FP8_PEAK:6.1%} of FP8 peak" + (f", {t / bf16:4.2f}x bf16" if bf16 else "")
                         + (f", calc_diff {r['calc_diff']:.1e}" if "calc_diff" in r else ""))
            print(f"  {m:>5}x{n:>5}x{k:>5}  {r['impl']:<17} "
                  f"{'-' if t is None else f'{t:8.1f}':>8} TFLOP/s  {extra}", flush=True)
    grouped = ([tuple(int(v) for v in c.lower().split("x")) for c in a.grouped]
               if a.grouped is not None else DEFAULT_GROUPED)
    for g, rows, n, k in grouped:
        recs = run_grouped_case(g, rows, n, k, a.iterations, a.interpret, configs)
        records += recs
        save(records)
        base = recs[1]["tflops"]
        for r in recs:
            t = r["tflops"]
            extra = r.get("error", "") if t is None else (
                f"{t / FP8_PEAK:6.1%} of FP8 peak" + (f", {t / base:4.2f}x bf16 grouped" if base else ""))
            print(f"  {g}x{rows}x{n}x{k} {r['impl']:<20} {'-' if t is None else f'{t:8.1f}':>8} "
                  f"TFLOP/s  {extra}", flush=True)
    wgrad = ([tuple(int(v) for v in c.lower().split("x")) for c in a.wgrad]
             if a.wgrad is not None else DEFAULT_WGRAD)
    for n, k, t in wgrad:
        recs = run_wgrad_case(n, k, t, a.iterations, a.interpret, configs)
        records += recs
        save(records)
        base = recs[1]["tflops"]
        for r in recs:
            tf = r["tflops"]
            extra = r.get("error", "") if tf is None else (
                f"{tf / FP8_PEAK:6.1%} of FP8 peak" + (f", {tf / base:4.2f}x bf16" if base else "")
                + (f", calc_diff {r['calc_diff']:.1e}" if "calc_diff" in r else ""))
            print(f"  wgrad {n}x{k} over {t} tokens {r['impl']:<17} "
                  f"{'-' if tf is None else f'{tf:8.1f}':>8} TFLOP/s  {extra}", flush=True)
    quant = ([tuple(int(v) for v in c.lower().split("x")) for c in a.quant]
             if a.quant is not None else DEFAULT_QUANT)
    quant_records = []
    for m, k in quant:
        recs = run_quant_case(m, k, a.iterations, a.interpret)
        quant_records += recs
        save(records, quant_records)
        for r in recs:
            extra = r.get("error", "") if r["gbps"] is None else (
                f"{r['fraction_of_copy']:6.1%} of the copy's bandwidth")
            gbps = "-" if r["gbps"] is None else f"{r['gbps']:8.1f}"
            print(f"  quant {m}x{k} {r['impl']:<16} {gbps:>8} GB/s  {extra}", flush=True)
    run["complete"] = True
    save(records, quant_records)
    print(f"wrote {a.json}" + (f" and {a.quant_json}" if quant_records else ""))
    return records


if __name__ == "__main__":
    main()
