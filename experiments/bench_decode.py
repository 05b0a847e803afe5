"""MLA decode attention: our Mosaic GPU kernel against XLA's absorbed einsums, on one GPU.

Command:   python experiments/bench_decode.py                  (FlashMLA's shapes below, one GPU)
           python experiments/bench_decode.py --seqlens 4096 32768 --heads 128 --tq 2 --varlen
           python experiments/bench_decode.py --interpret --batch 2 --seqlens 128 --heads 16 \\
               --iterations 1     (a CPU smoke run of the kernel in Pallas' GPU interpret mode;
                                   times meaningless)
Hardware:  one H100/H200 for the numbers; the interpret smoke run on any CPU.
What it measures, per case (batch B, cache length s_k, new tokens Tq, heads H; FlashMLA's
benchmark shapes, kernels.md §3.5: B = 128, s_k 4096..32768, Tq 1 and 2, H = 128 (no tensor
parallelism: compute-bound) and H = 16 (128 heads over 8 GPUs: memory-bound)):
  pallas  our kernel (pallas_kernels/mla_decode.py), including its split combine
  xla     the absorbed einsum path as dsv3_jax.mla.attend_absorbed runs it (bf16 operands, fp32
          scores and softmax, bf16 probabilities, fp32 accumulation), jitted
on the same random-normal q [B, Tq, H, 576] and latent cache [B, s_k, 576] (bf16; lengths all
s_k, or with --varlen FlashMLA's per-row lengths ~ N(s_k, s_k / 2) clipped to [Tq, 2 s_k] in a
cache of 2 s_k). Time: CUPTI kernel time summed over the jitted function's kernels, median of
--iterations, L2 flushed before each iteration (pallas_kernels/timing.py, shared with
bench_fp8_gemm.py); wall clock around block_until_ready in interpret mode or on a CPU.
Reported: ms; GB/s = (cache bytes read, sum(lengths) x 576 x 2, + q + o bytes) / time, the
FlashMLA byte count; TFLOP/s = 2 B Tq H mean(s_k) (576 + 512) / time (FlashMLA's FLOP count);
each implementation's max abs / max relative error against the float32 reference; the speedup
of pallas over xla. Targets (kernels.md §8): >= 2.5 TB/s memory-bound (H = 16), >= 400
TFLOP/s compute-bound (H = 128), >= 3x XLA at s_k >= 4096.
Output: a table and experiments/results/decode_bench.json, a list of records {"batch",
"seqlen", "s_max", "tq", "heads", "impl", "num_splits", "ms", "gbps", "tflops",
"max_abs_err", "max_rel_err"} with run metadata (command, device, jax version, date) in the
first record's "run" field.
Result (one H200, 2026-12-01, `--iterations 10`, the one-array form; experiments/results/
decode_bench.json): max error ~6e-4 against the float32 reference; H = 16, Tq = 1: 3.34 / 3.64 /
3.82 TB/s at s_k 4096 / 8192 / 16384 (XLA 1.90-1.97 TB/s); H = 128, Tq = 1: 423 / 440 / 448
TFLOP/s (XLA 236-246); Tq = 2, H = 128: 431-448 (XLA 300-313). 1.4-2.1x XLA: the compute-bound
target is met, the 3x is not (XLA here is twice as fast as the 123 TFLOP/s kernels.md quotes).
The two-array form (--form split, what the model runs), the same day: 3.33 / 3.65 / 3.83 TB/s
at H = 16, Tq = 1, and 427 TFLOP/s at H = 128, s_k 4096, 1.9-2.5x XLA over the two arrays
(experiments/results/decode_bench_split_h200_table.txt: that run stopped at its time limit
after 7 of 9 cases).
"""

import argparse
import datetime
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mla_decode as md
from pallas_kernels import timing  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
IMPLS = ("pallas", "xla")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128, help="batch rows B (FlashMLA: 128)")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384],
                    help="cache lengths s_k (FlashMLA: 4096 .. 32768; default a subset)")
    ap.add_argument("--tq", type=int, nargs="+", default=[1, 2],
                    help="new tokens per row: 1 (decode) and 2 (one speculative token)")
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 128],
                    help="query heads H: 16 (memory-bound) and 128 (compute-bound)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                    help="implementations to time")
    ap.add_argument("--varlen", action="store_true",
                    help="FlashMLA's varlen rows: lengths ~ N(s_k, s_k/2) in a cache of 2 s_k")
    ap.add_argument("--num_splits", type=int, default=None,
                    help="kernel splits of each row's cache (default: choose_num_splits)")
    ap.add_argument("--block_s", type=int, default=64, choices=(32, 64),
                    help="keys per cache block of the kernel")
    ap.add_argument("--form", default="one", choices=("one", "split"),
                    help="cache layout: one [B, S, 576] array (mla_decode) or the model's two, "
                         "c_kv [B, S, 512] and k_rope [B, S, 64] (mla_decode_latent)")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations per case")
    ap.add_argument("--no_check", action="store_true",
                    help="skip the float32 reference (it needs B x Tq x H x s_k x 4 bytes)")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernel in Pallas' GPU interpret mode (CPU smoke test)")
    ap.add_argument("--json", default=str(RESULTS / "decode_bench.json"),
                    help="where to write the records")
    return ap.parse_args(argv)


def _lengths(b: int, s: int, tq: int, varlen: bool, seed: int) -> tuple[np.ndarray, int]:
    """Per-row cache lengths and the cache size S_max (a multiple of 64)."""
    if not varlen:
        return np.full((b,), s, np.int32), s
    s_max = 2 * s
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(s, s / 2, b), tq, s_max).astype(np.int32), s_max


def _inputs(b, tq, h, s_max, seed=0):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (b, tq, h, md.D_K), jnp.bfloat16)
    kv = jax.random.normal(kk, (b, s_max, md.D_K), jnp.bfloat16)
    return q, kv


def _errors(got, want) -> dict:
    err = jnp.abs(got.astype(jnp.float32) - want)
    return {"max_abs_err": float(err.max()),
            "max_rel_err": float(err.max() / jnp.maximum(jnp.abs(want).max(), 1e-30))}


def run_case(b, s, tq, h, a) -> list[dict]:
    lengths_np, s_max = _lengths(b, s, tq, a.varlen, seed=s + h)
    lengths = jnp.asarray(lengths_np)
    q, kv = _inputs(b, tq, h, s_max)
    scale = 1.0 / math.sqrt(md.D_K)
    # the device's SMs, or an H100/H200's 132 without a GPU (interpret mode on a CPU)
    splits = a.num_splits or md.choose_num_splits(b, tq, h, s_max, a.block_s)
    if a.form == "split":  # sliced once here, outside the timed functions
        c = md.V_DIM
        args = (q[..., :c], q[..., c:], kv[..., :c], kv[..., c:], lengths)
        fns = {
            "pallas": lambda *x: md.mla_decode_latent(*x, scale=scale, impl="pallas",
                                                      num_splits=splits, block_s=a.block_s,
                                                      interpret=a.interpret),
            "xla": lambda *x: md.mla_decode_latent(*x, scale=scale, impl="xla"),
        }
    else:
        args = (q, kv, lengths)
        fns = {
            "pallas": lambda q, kv, n: md.mla_decode(q, kv, n, scale=scale, impl="pallas",
                                                     num_splits=splits, block_s=a.block_s,
                                                     interpret=a.interpret),
            "xla": lambda q, kv, n: md.mla_decode(q, kv, n, scale=scale, impl="xla"),
        }
    want = None
    if not a.no_check:
        want = jax.jit(lambda q, kv, n: md.mla_decode_reference(q, kv, n, scale)[0])(
            q, kv, lengths)
    keys = int(lengths_np.astype(np.int64).sum())
    nbytes = keys * md.D_K * 2 + q.size * 2 + b * tq * h * md.V_DIM * 2
    flops = 2 * tq * h * keys * (md.D_K + md.V_DIM)
    shape = {"batch": b, "seqlen": s, "s_max": s_max, "tq": tq, "heads": h,
             "varlen": a.varlen, "mean_len": keys / b, "form": a.form}
    records = []
    for impl in a.impls:
        rec = {**shape, "impl": impl, "num_splits": splits if impl == "pallas" else None}
        try:
            if want is not None:
                rec.update(_errors(jax.jit(fns[impl])(*args), want))
            ms = timing.kernel_ms(fns[impl], args, a.iterations, interpret=a.interpret)
            rec.update(ms=ms, gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9)
        except Exception as e:  # noqa: BLE001 - a failed implementation is a result, said so
            rec.update(ms=None, gbps=None, tflops=None,
                       error=f"{type(e).__name__}: {str(e)[:300]}")
        records.append(rec)
    del want, q, kv, args
    return records


def _print_case(recs: list[dict]) -> None:
    by = {r["impl"]: r for r in recs}
    base = (by.get("xla") or {}).get("ms")
    for r in recs:
        head = (f"  B={r['batch']:<4} s_k={r['seqlen']:<6} Tq={r['tq']} H={r['heads']:<4} "
                f"{r['impl']:<7}")
        if r["ms"] is None:
            print(f"{head} failed: {r['error']}", flush=True)
            continue
        extra = f"  {base / r['ms']:5.2f}x xla" if base and r["impl"] != "xla" else ""
        err = f"  err {r['max_abs_err']:.1e}" if "max_abs_err" in r else ""
        print(f"{head} {r['ms']:9.3f} ms {r['gbps']:8.1f} GB/s {r['tflops']:7.1f} TFLOP/s"
              f"{err}{extra}", flush=True)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    dev = jax.devices()[0]
    print(f"bench_decode on {dev.device_kind}{' (interpret mode)' if a.interpret else ''}, "
          f"{a.iterations} iterations", flush=True)
    run = {"command": "python experiments/bench_decode.py " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "device": dev.device_kind,
           "jax": jax.__version__, "interpret": a.interpret, "iterations": a.iterations,
           "block_s": a.block_s, "form": a.form}
    out = pathlib.Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for h in a.heads:
        for tq in a.tq:
            for s in a.seqlens:
                recs = run_case(a.batch, s, tq, h, a)
                _print_case(recs)
                records += recs
                # saved after every case: a run stopped by a time limit keeps what it measured
                records[0]["run"] = run
                out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    main()
