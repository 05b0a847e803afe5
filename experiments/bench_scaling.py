"""Train-step throughput as the GPUs multiply (weak scaling), and the plan's memory against the
measured peak, for the layouts a user picks between.

Command:   python experiments/bench_scaling.py                    (a host with 2, 4 or 8 GPUs:
                                                                   `small` and `v3_proxy`, bf16
                                                                   and FP8, 1 GPU and every power
                                                                   of two up to all of them)
           python experiments/bench_scaling.py --presets tiny --batch_per_device 1 --seq_len 32 \
               --steps 1 --json s.json                             (a CPU smoke run: 8 fake devices)
Hardware:  the GPUs of one host (NCCL); fake CPU devices for the smoke run.
What it measures: for each preset, precision and device count N, the pretraining step
(`dsv3_jax.train.step.make_train_step`: forward with MTP, loss, backward, AdamW) with
--batch_per_device sequences per device (weak scaling: the work per device is fixed), on the
layouts
  fsdp         mesh fsdp=N, strategy fsdp (ZeRO-3)
  fsdp_ep      mesh expert=N, strategy fsdp_ep (routed experts split N ways, --dispatch)
  ep_pipeline  mesh pipeline=2,expert=N/2, strategy fsdp_ep, 1F1B with 4 microbatches
and one device with no mesh (N = 1, every layout's baseline). Each row runs in a process of its
own (the device's peak memory is per process) on the first N devices. Reported per row: the
median step time, tokens/s, the weak-scaling efficiency (tokens/s / (N x the one-device
tokens/s); target >= 80% at 8 GPUs for fsdp_ep), the peak memory of the busiest device
(`memory_stats`, GPU only) and the plan dump's prediction for the same layout
(`dsv3_jax.plan.build_plan`: parameters, gradients, optimizer and the activation estimate;
target: the peak within 10% of it). A layout that does not fit the device count or the preset
is skipped with the reason; a row that fails records its error.
Output: a table and a JSON record (--json; default experiments/results/scaling_<n>x<device>.json).
"""

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from child import json_from_child  # noqa: E402 (experiments/child.py)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LAYOUTS = ("fsdp", "fsdp_ep", "ep_pipeline")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small", "v3_proxy"], help="config presets")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS,
                    help="mesh layouts to run at each device count > 1")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=("bf16", "fp8"),
                    help="compute precisions")
    ap.add_argument("--device_counts", nargs="+", type=int, default=None,
                    help="device counts N (default: 1 and every power of two up to all)")
    ap.add_argument("--batch_per_device", type=int, default=2, help="sequences per device")
    ap.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--dispatch", default="a2a", help="expert-parallel dispatch (sharding/ep.py)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile included)")
    ap.add_argument("--row_timeout", type=float, default=900.0,
                    help="seconds before a row's process is stopped (its row records why)")
    ap.add_argument("--json", default=None, help="where to write the record")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row, as JSON
    return ap.parse_args(argv)


def layout_mesh(layout: str, n: int, batch_per_device: int = 2
                ) -> tuple[str | None, str | None, str | None, str]:
    """(mesh spec, strategy, pipeline schedule, why not) of `layout` on n devices."""
    if n == 1:
        return None, None, None, ""
    if layout == "fsdp":
        return f"fsdp={n}", "fsdp", None, ""
    if layout == "fsdp_ep":
        return f"expert={n}", "fsdp_ep", None, ""
    if n < 4:
        return None, None, None, "ep_pipeline needs at least 4 devices (pipeline=2 x expert>=2)"
    if (batch_per_device * n // 4) % (n // 2):
        return None, None, None, ("ep_pipeline: each of the 4 microbatches must split over the "
                                  f"{n // 2} expert ranks; use an even --batch_per_device")
    return f"pipeline=2,expert={n // 2}", "fsdp_ep", "1f1b", ""


def run_row(spec: dict) -> dict:
    """One row in this process: build, time, measure (the child side)."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax import runtime as runtime_lib
    from dsv3_jax.config import get_config
    from dsv3_jax.placement import shard_batch
    from dsv3_jax.train import pipeline as pipeline_lib
    from dsv3_jax.train import step as train
    from sharding.context import ShardingContext
    from sharding.mesh import make_mesh

    cfg = get_config(spec["preset"])
    n, seq = spec["devices"], spec["seq_len"]
    devices = jax.devices()[:n]
    batch_rows = spec["batch_per_device"] * n
    toks = jax.random.randint(jax.random.key(1), (batch_rows, seq + 1), 0, cfg.vocab_size,
                              jnp.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    shard, plan = None, None
    if spec["mesh"]:
        shard = ShardingContext(make_mesh(spec["mesh"], devices), spec["strategy"],
                                spec["dispatch"])
        batch = shard_batch(batch, shard)
        if spec["schedule"]:
            plan = pipeline_lib.stage_plan(cfg, spec["schedule"], shard.pipeline, 4, seq)
    else:
        batch = jax.device_put(batch, devices[0])
    rt = runtime_lib.resolve(cfg, dtype="bfloat16", scan_layers=True,
                             fp8=spec["precision"] == "fp8")
    schedule = train.v3_schedule(1e-4, 1000, 10)
    optimizer = train.make_optimizer(cfg, schedule)
    with jax.default_device(devices[0]):
        state = train.init_state(cfg, jax.random.key(0), optimizer, shard)
    step = train.make_train_step(cfg, optimizer, schedule, shard, rt=rt, pipeline=plan)
    guard, times = train.no_guard(), []
    t0 = time.perf_counter()
    for i in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        state, metrics = step(state, batch, guard)
        jax.block_until_ready((state, metrics))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    warm = time.perf_counter() - t0 - sum(times)
    sec = statistics.median(times)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return {"step_ms": sec * 1e3, "tokens_per_s": batch_rows * seq / sec,
            "warmup_s": warm, "loss": float(metrics["loss"]),
            "peak_gib": max(peaks) / 2**30 if all(p is not None for p in peaks) else None}


def predicted_gib(spec: dict) -> float | None:
    """The plan dump's per-device total for the row's layout (None for one device)."""
    if not spec["mesh"]:
        return None
    from dsv3_jax.plan import build_plan

    args = SimpleNamespace(
        preset=spec["preset"], mesh=spec["mesh"], strategy=spec["strategy"],
        dispatch=spec["dispatch"], batch=spec["batch_per_device"] * spec["devices"],
        seq=spec["seq_len"], remat="none", attention_impl="cudnn", precision=spec["precision"],
        pipeline_schedule=spec["schedule"], microbatches=4 if spec["schedule"] else None,
        json=None, compile=False)
    return sum(build_plan(args)["per_device_bytes"].values()) / 2**30


def run_in_process(spec: dict, timeout: float) -> dict:
    return json_from_child([__file__, "--row", json.dumps(spec)], timeout=timeout)


def device_facts() -> tuple[int, str]:
    """(device count, kind) from a child process, so this one never holds a GPU."""
    out = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices(); "
                          "print(len(d)); print(d[0].device_kind)"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return int(out[0]), out[1]


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.row is not None:
        print(json.dumps(run_row(json.loads(a.row))), flush=True)
        return {}
    n_all, kind = device_facts()
    counts = a.device_counts or [c for c in (1, 2, 4, 8, 16, 32) if c <= n_all]
    if max(counts) > n_all:
        raise SystemExit(f"--device_counts {counts}: this machine has {n_all} devices")
    record = {"command": "python experiments/bench_scaling.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": kind, "devices": n_all,
              "batch_per_device": a.batch_per_device, "seq_len": a.seq_len,
              "dispatch": a.dispatch, "rows": []}
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"scaling_{n_all}x{kind.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'preset':<9} {'prec':<5} {'N':>3} {'layout':<12} {'step ms':>9} {'tok/s':>10} "
          f"{'weak eff':>9} {'peak GiB':>9} {'plan GiB':>9}", flush=True)
    for preset in a.presets:
        for precision in a.precisions:
            base = None
            for n in counts:
                for layout in (["one device"] if n == 1 else a.layouts):
                    mesh, strategy, schedule, why = layout_mesh(layout, n, a.batch_per_device)
                    row = {"preset": preset, "precision": precision, "devices": n,
                           "layout": layout, "mesh": mesh, "strategy": strategy,
                           "schedule": schedule}
                    if why:
                        record["rows"].append({**row, "skipped": why})
                        print(f"{preset:<9} {precision:<5} {n:>3} {layout:<12} skipped: {why}")
                        continue
                    spec = {**row, "batch_per_device": a.batch_per_device,
                            "seq_len": a.seq_len, "dispatch": a.dispatch, "steps": a.steps,
                            "warmup": a.warmup}
                    res = run_in_process(spec, a.row_timeout)
                    try:
                        res["plan_gib"] = predicted_gib(spec)
                    except Exception as e:  # the plan refuses this layout: say why
                        res["plan_error"] = str(e).splitlines()[0][:200]
                    if n == 1 and "tokens_per_s" in res:
                        base = res["tokens_per_s"]
                    if base and "tokens_per_s" in res:
                        res["weak_scaling"] = res["tokens_per_s"] / (n * base)
                    row.update(res)
                    record["rows"].append(row)
                    _print_row(row)
                    out.write_text(json.dumps(record, indent=1) + "\n")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


def _print_row(r: dict) -> None:
    head = f"{r['preset']:<9} {r['precision']:<5} {r['devices']:>3} {r['layout']:<12}"
    if "error" in r:
        print(f"{head} failed: {r['error']}", flush=True)
        return
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    print(f"{head} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
          f"{fmt(r.get('weak_scaling'), '>9.1%'):>9} {fmt(r.get('peak_gib'), '>9.2f'):>9} "
          f"{fmt(r.get('plan_gib'), '>9.2f'):>9}", flush=True)


if __name__ == "__main__":
    main()
