"""How long the training step takes to compile as the model deepens, scanned and unrolled.

Command:   python experiments/compile_time.py                      (v3_proxy at 4, 16, 61 layers; GPU)
           python experiments/compile_time.py --preset tiny --layers 2 4 --batch 1 --seq_len 32
               (a CPU smoke run)
Hardware:  one GPU for the numbers (compilation runs on the host, but for the GPU backend).
What it measures: the pretraining step of `dsv3_jax.train.step` (forward with MTP, loss,
backward, AdamW, router-bias update) for --preset deepened to each of --layers (the first layer
dense as in the preset, the rest MoE), lowered and compiled ahead of time on abstract shapes
(`jax.eval_shape`: nothing is allocated, so depths that would not fit the device still
compile), with the layer stacks scanned (`lax.scan`) and unrolled. Each case compiles in a
process of its own, so no case reuses another's autotuning or caches: the time is what a first
run sees. XLA's GEMM autotuning is off by default (--autotune turns it on): it runs candidate
kernels on real buffers, and at depths that cannot fit the device (61 V3-width layers on one
GPU) it fails for want of memory rather than compiling. Reported per case: seconds to trace and
lower, seconds to compile, and the compiled program's own size, or the error that stopped it.
Cases run from the cheapest up, the record is rewritten after each (a time limit keeps what
finished), and --max_seconds skips the cases left once that much time has passed.
Output: a table and a JSON record (--json, default experiments/results/compile_time_<preset>_<device>.json).
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from child import json_from_child
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import get_config
from dsv3_jax.train import step as train

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="v3_proxy", help="config preset to deepen")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16, 61],
                    help="main-model depths (n_layers; the preset's dense layers stay)")
    ap.add_argument("--modes", nargs="+", default=["scan", "unrolled"],
                    choices=("scan", "unrolled"), help="layer stacks as lax.scan or unrolled")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8"),
                    help="bf16, or fp8 GEMM inputs (our kernels on a Hopper GPU)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--max_seconds", type=float, default=540.0,
                    help="start no new case after this many seconds")
    ap.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=False,
                    help="keep XLA's GEMM autotuning on (it needs the program's buffers on "
                         "the device, so depths that do not fit fail)")
    ap.add_argument("--json", default=None, help="where to write the record")
    ap.add_argument("--case", nargs=2, metavar=("LAYERS", "MODE"), default=None,
                    help=argparse.SUPPRESS)  # internal: compile one case, print its JSON
    return ap.parse_args(argv)


def compile_case(cfg, rt, batch: int, seq_len: int) -> dict:
    schedule = train.v3_schedule(1e-4, 1000, 10)
    optimizer = train.make_optimizer(cfg, schedule)
    state = jax.eval_shape(lambda: train.init_state(cfg, jax.random.key(0), optimizer))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    step = train.make_train_step(cfg, optimizer, schedule, rt=rt)
    t0 = time.perf_counter()
    lowered = step.lower(state, {"inputs": tokens, "targets": tokens}, train.no_guard())
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1,
            "hlo_chars": len(compiled.as_text() or "")}


def case_config(base, n: int):
    return base.replace(n_layers=n, n_dense_layers=min(base.n_dense_layers, n))


def run_one(a) -> dict:
    n, mode = int(a.case[0]), a.case[1]
    cfg = case_config(get_config(a.preset), n)
    rt = runtime_lib.resolve(cfg, dtype="bfloat16", scan_layers=mode == "scan",
                             fp8=a.precision == "fp8")
    return compile_case(cfg, rt, a.batch, a.seq_len)


def run_in_process(a, n: int, mode: str) -> dict:
    """One case in a fresh interpreter: its own caches, and a failure that stays its own."""
    env = dict(os.environ)
    if not a.autotune:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return json_from_child([__file__, "--preset", a.preset, "--precision", a.precision,
                            "--batch", str(a.batch), "--seq_len", str(a.seq_len),
                            "--case", str(n), mode], env=env)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.case is not None:
        print(json.dumps(run_one(a)), flush=True)
        return {}
    dev = jax.devices()[0]
    record = {"command": "python experiments/compile_time.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": dev.device_kind,
              "jax": jax.__version__, "preset": a.preset, "batch": a.batch,
              "seq_len": a.seq_len, "precision": a.precision, "autotune": a.autotune,
              "cases": []}
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"compile_time_{a.preset}_{dev.device_kind.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"{'layers':>7} {'mode':<9} {'lower s':>9} {'compile s':>10} {'program chars':>14}",
          flush=True)
    for mode in a.modes:  # scanned first: cheapest
        for n in sorted(a.layers):
            if time.perf_counter() - start > a.max_seconds:
                record["cases"].append({"layers": n, "mode": mode, "skipped": "time"})
                continue
            res = {"layers": n, "mode": mode, **run_in_process(a, n, mode)}
            record["cases"].append(res)
            if "error" in res:
                print(f"{n:>7} {mode:<9} failed: {res['error']}", flush=True)
            else:
                print(f"{n:>7} {mode:<9} {res['lower_s']:>9.1f} {res['compile_s']:>10.1f} "
                      f"{res['hlo_chars']:>14,}", flush=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
    done = {(c["layers"], c["mode"]): c for c in record["cases"] if "compile_s" in c}
    for mode in a.modes:
        lo, hi = min(a.layers), max(a.layers)
        if (lo, mode) in done and (hi, mode) in done:
            ratio = done[(hi, mode)]["compile_s"] / done[(lo, mode)]["compile_s"]
            record[f"{mode}_compile_ratio_{hi}_to_{lo}"] = ratio
            print(f"{mode}: {hi} layers compile in {ratio:.2f}x the time of {lo}")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
