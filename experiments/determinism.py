"""Is training bitwise reproducible? One pretraining command run several times, per-step losses
compared bit for bit, with and without --deterministic, and what the deterministic mode costs.

Command:   python experiments/determinism.py --preset small --steps 40 --global_batch 8 \
               --seq_len 1024 --runs 2                     (one GPU)
           python experiments/determinism.py --preset tiny --steps 5 --global_batch 2 \
               --seq_len 32 --runs 2 --modes deterministic   (a CPU smoke run)
Hardware:  one GPU for the question that matters (a CPU is deterministic either way).
What it does: runs `experiments/pretrain.py` --runs times per mode, each run its own process
(so each compiles and autotunes for itself, as two invocations of a user's command do), with
the given model/batch flags and no checkpoints; reads each run's JSONL metrics and reports, per
mode, whether every run's per-step losses and gradient norms are bitwise equal to the first
run's, the first step where they are not, the largest relative loss difference, and the median
step time over the second half of the steps (the loop's `step_seconds`). The deterministic
mode's cost is its median step time over the default mode's, measured in the same call.
--xla_flags adds XLA_FLAGS to every run (e.g. --xla_flags=--xla_gpu_autotune_level=0).
--attention_impl goes to every run: with "auto" (the default) the default mode runs cuDNN's
fused attention on a GPU and the deterministic mode XLA's (cuDNN's attention crashes XLA's
deterministic programs, `runtime._resolve_attention`), so the cost then includes the change of
attention; `--attention_impl xla` measures the mode alone.
Output: a table on stdout and a JSON record (--json, default
experiments/results/determinism_<preset>_<device>.json) with the command, device and date.

Result (one NVIDIA H100 80GB HBM3, jax 0.11.2, 2026-12-07; pretraining commands run by hand,
not through this script, each twice per mode, scanned layers: `python experiments/pretrain.py
--preset small --precision bf16 --steps 12 --global_batch 4 --seq_len 1024 --sample_tokens 0
--no-progress --mesh none --log_every 4 --attention_impl xla [--deterministic] --metrics_file
...`, experiments/results/determinism_small_h100/{det_1,det_2,nodet_1,nodet_2}.jsonl): with
--deterministic the two runs' 12 losses and gradient norms are bitwise equal; without it the
losses differ from step 3 (gradient norms from step 1), by up to 0.77% relative. Median tokens/s
over steps 4-12: 34,578 and 34,717 deterministic against 35,869 and 36,015 default, a 3.6% cost
at the same (XLA) attention. With cuDNN's fused attention (what "auto" took then) the
deterministic programs compiled but crashed when run, `IndexError:
absl::container_internal::raw_hash_map<>::at` in jax's execute_sharded -- also with only
XLA_FLAGS=--xla_gpu_deterministic_ops=true and with `--grouped_impl ragged_dot`, so cuDNN's
attention, not our Pallas kernels; since then --deterministic takes XLA's attention on a GPU.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MODES = ("default", "deterministic")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="config preset of the runs")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8", "fp32", "preset"),
                    help="--precision of the runs")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of each run")
    ap.add_argument("--global_batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--runs", type=int, default=2, help="runs per mode (>= 2)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="default (XLA's fastest programs) and/or deterministic (--deterministic)")
    ap.add_argument("--scan_layers", default="true", choices=("true", "false"),
                    help="scanned (fast compile) or unrolled layer stacks")
    ap.add_argument("--embedded_bytes", type=int, default=4_000_000,
                    help="bytes of the embedded corpus the runs train on")
    ap.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                    help="--attention_impl of every run (auto: cuDNN's in the default mode on a "
                         "GPU, XLA's in the deterministic mode; xla: the mode's cost alone)")
    ap.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for every run")
    ap.add_argument("--json", default=None, help="where to write the record")
    a = ap.parse_args(argv)
    if a.runs < 2:
        ap.error("--runs must be >= 2: reproducibility needs a second run to compare")
    return a


def _run(a, mode: str, index: int, workdir: pathlib.Path) -> list[dict]:
    metrics = workdir / f"{mode}_{index}.jsonl"
    cmd = [sys.executable, str(ROOT / "experiments" / "pretrain.py"), "--preset", a.preset,
           "--precision", a.precision, "--steps", str(a.steps),
           "--global_batch", str(a.global_batch), "--seq_len", str(a.seq_len), "--lr", str(a.lr),
           "--embedded_bytes", str(a.embedded_bytes), "--metrics_file", str(metrics),
           "--no-progress", "--log_every", str(max(1, a.steps // 4)), "--sample_tokens", "0",
           "--mesh", "none", "--attention_impl", a.attention_impl]
    cmd.append("--scan_layers" if a.scan_layers == "true" else "--no-scan_layers")
    if mode == "deterministic":
        cmd.append("--deterministic")
    env = dict(os.environ)
    if a.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
    print(f"[{mode} run {index + 1}/{a.runs}] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{mode} run {index + 1} failed with exit code {proc.returncode}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in recs if "loss" in r and "step" in r]


def compare(runs: list[list[dict]]) -> dict:
    """Bitwise comparison of every run's per-step loss and gradient norm with the first run's."""
    first = runs[0]
    out = {"identical": True, "first_differing_step": None, "max_rel_loss_diff": 0.0}
    for other in runs[1:]:
        if len(other) != len(first):
            out.update(identical=False, note=f"runs logged {len(first)} and {len(other)} steps")
        for r0, r1 in zip(first, other):
            same = r0["loss"] == r1["loss"] and r0.get("grad_norm") == r1.get("grad_norm")
            if not same:
                out["identical"] = False
                if out["first_differing_step"] is None or r0["step"] < out["first_differing_step"]:
                    out["first_differing_step"] = r0["step"]
            if r0["loss"]:
                out["max_rel_loss_diff"] = max(out["max_rel_loss_diff"],
                                               abs(r1["loss"] - r0["loss"]) / abs(r0["loss"]))
    return out


def median_step_ms(run: list[dict]) -> float | None:
    times = [r["step_seconds"] for r in run[len(run) // 2:] if r.get("step_seconds")]
    return 1e3 * statistics.median(times) if times else None


def main(argv=None) -> dict:
    a = parse_args(argv)
    import jax  # only to name the device; the runs are separate processes

    device = jax.devices()[0].device_kind
    record = {"command": "python experiments/determinism.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": device,
              "jax": jax.__version__, "settings": vars(a), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            runs = [_run(a, mode, i, pathlib.Path(tmp)) for i in range(a.runs)]
            res = compare(runs)
            res["median_step_ms"] = [median_step_ms(r) for r in runs]
            res["losses"] = [[r["loss"] for r in run] for run in runs]
            record["modes"][mode] = res
    print(f"\n{'mode':<15}{'bitwise equal':>15}{'first diff at':>15}{'max rel diff':>14}"
          f"{'step ms (median)':>20}")
    for mode, res in record["modes"].items():
        ms = [m for m in res["median_step_ms"] if m is not None]
        step = res["first_differing_step"]
        print(f"{mode:<15}{str(res['identical']):>15}{'-' if step is None else step:>15}"
              f"{res['max_rel_loss_diff']:>14.2e}"
              f"{(statistics.median(ms) if ms else float('nan')):>20.1f}")
    modes = record["modes"]
    if {"default", "deterministic"} <= modes.keys():
        ms = {m: [v for v in modes[m]["median_step_ms"] if v] for m in modes}
        if ms["default"] and ms["deterministic"]:
            record["deterministic_cost"] = (statistics.median(ms["deterministic"])
                                            / statistics.median(ms["default"]))
            print(f"deterministic step time / default: {record['deterministic_cost']:.3f}")
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"determinism_{a.preset}_{device.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
