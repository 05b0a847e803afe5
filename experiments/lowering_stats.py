"""How many Mosaic GPU kernels a train step carries, and how long it takes to lower for CUDA.

Command:   python experiments/lowering_stats.py --preset small --precision fp8 bf16
Hardware:  any CPU: the step is traced and lowered for CUDA without a GPU (Pallas emits each
           Mosaic GPU kernel's module at lowering), nothing runs.
What it measures: for `--preset`'s jitted pretraining step (`dsv3_jax.train.make_train_step`,
scanned layers, --batch x --seq_len tokens, the Pallas grouped kernels and, under fp8, the
Pallas FP8 GEMMs; attention on XLA, since cuDNN's custom call needs no lowering work of ours),
the seconds to trace and to lower, the Mosaic GPU custom calls in the lowered module and how
many distinct kernels (kernel hashes) they are. Each call site of a kernel is compiled by XLA's
Mosaic GPU handler, so call sites are what compile time scales with.
Output: a table on stdout and a JSON list of records (--json).
Result (this project's 2-core CPU, 2026-12-01, jax 0.11.2, small at 8 x 2048; experiments/
results/lowering_stats_small.json): fp8 38 call sites of 27 kernels, 25 s to lower; bf16 8 of 6,
5 s. Before grouped_matmul.launch_shared (89dd002): fp8 117 call sites of 117, 87 s; bf16 12.
With --fp8_quant_impl pallas (2026-12-02, lowering_stats_small_quant_pallas.json): 61 call sites
of 43 kernels, 27 s; before the quantizer kernels launched through a shared jit, 155 of 144.
"""

import argparse
import datetime
import json
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax

from bench_train import synthetic_batch  # noqa: E402
from dsv3_jax.config import get_config  # noqa: E402
from dsv3_jax.runtime import Fp8, Runtime  # noqa: E402
from dsv3_jax.train import step as train  # noqa: E402
from pallas_kernels import _mosaic  # noqa: E402

H100_SMS = 132  # the persistent kernels size their grid by the SM count, which a CPU lacks


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="small", help="config preset")
    ap.add_argument("--precision", nargs="+", default=["fp8", "bf16"], choices=("bf16", "fp8"),
                    help="precisions to lower, each a record")
    ap.add_argument("--fp8_quant_impl", default="xla", choices=("xla", "pallas"),
                    help="Runtime.fp8.quant of the fp8 step: pallas adds the one-pass "
                         "quantizer kernels")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--json", default=None, help="where to write the records")
    return ap.parse_args(argv)


def lower_step(preset: str, precision: str, batch: int, seq_len: int,
               fp8_quant_impl: str = "xla") -> dict:
    cfg = get_config(preset)
    # the GPU runtime, built by hand: resolve() would ask this CPU's devices
    rt = Runtime(dtype="bfloat16", grouped="pallas", attention="xla", scan_layers=True,
                 fp8=Fp8("pallas", fp8_quant_impl) if precision == "fp8" else None)
    schedule = train.v3_schedule(1e-4, 1000, 10)
    optimizer = train.make_optimizer(cfg, schedule)
    state = jax.eval_shape(lambda: train.init_state(cfg, jax.random.key(0), optimizer))
    data = jax.eval_shape(lambda: synthetic_batch(cfg, batch, seq_len))
    step = train.make_train_step(cfg, optimizer, schedule, rt=rt)
    t0 = time.perf_counter()
    traced = step.trace(state, data, train.no_guard())
    t1 = time.perf_counter()
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    t2 = time.perf_counter()
    sites = [ln for ln in text.split("\n") if "stablehlo.custom_call @mosaic_gpu" in ln]
    hashes = {re.search(r'kernel_hash = "((?:[^"\\]|\\.)*)"', ln).group(1) for ln in sites}
    return {"preset": preset, "precision": precision, "batch": batch, "seq_len": seq_len,
            "fp8_quant_impl": fp8_quant_impl if precision == "fp8" else None,
            "trace_s": round(t1 - t0, 1), "lower_s": round(t2 - t1, 1),
            "mosaic_gpu_call_sites": len(sites), "distinct_kernels": len(hashes)}


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    records = []
    print(f"{'precision':>9} {'trace s':>8} {'lower s':>8} {'call sites':>11} {'kernels':>8}")
    with _mosaic.assume_num_sms(H100_SMS):  # no GPU to ask while lowering on a CPU
        for precision in a.precision:
            rec = lower_step(a.preset, precision, a.batch, a.seq_len, a.fp8_quant_impl)
            records.append(rec)
            print(f"{precision:>9} {rec['trace_s']:>8} {rec['lower_s']:>8} "
                  f"{rec['mosaic_gpu_call_sites']:>11} {rec['distinct_kernels']:>8}", flush=True)
    records[0]["run"] = {"command": "python experiments/lowering_stats.py " + " ".join(
                             argv if argv is not None else sys.argv[1:]),
                         "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                         "device": "CPU (lowered for CUDA)"}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
