"""Pipeline schedules against no pipelining and against FSDP alone: step time, tokens/s and the
measured bubble against the schedule's formula, on every device this process sees.

Command:   python experiments/bench_pipeline.py                     (all devices; `small`)
           python experiments/bench_pipeline.py --presets small v3_proxy --micro 4 8
           XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
             python experiments/bench_pipeline.py --presets tiny --batch 8 --seq_len 32 \
             --precision fp32 --steps 1 --json pipe.json                (the fake-device check)
Hardware:  one GPU measures the pipelined program's overhead (pipeline = 1: every stage on one
           rank, no bubble); a machine of 2, 4 or 8 GPUs measures the schedules.
What it measures, per preset, each the full jitted pretraining step (`train.step`: forward with
MTP, loss, backward, AdamW, router-bias update) on synthetic tokens, median of --steps after
--warmup:
  plain        no pipeline, one device, the whole global batch;
  fsdp=N       no pipeline, FSDP over all N devices;
  P=1 S M      the pipeline executor with one rank (its overhead against `plain`);
  P=p S M      pipeline=p with fsdp=N/p beside it, each schedule S and microbatch count M.
The measured bubble of a p-rank row is 1 - t(P=1, same S and M, one device) / (p x t(row)):
the share of the ranks' time not spent on the serial work (communication counts as bubble);
`theory` is the schedule's formula (gpipe/zero bubble: (p-1)/(M+p-1) resp. its ZB-H1 value,
1f1b: as gpipe, dualpipev: DualPipe's) and `ticks` the lock-step timeline's own idle share.
Output: a table on stdout and one JSON (--json; default experiments/results/
pipeline_<device>_x<N>.json) with the command, devices, date and every row.
"""

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import get_config
from dsv3_jax.placement import shard_batch
from dsv3_jax.train import pipeline as pipeline_lib
from dsv3_jax.train import step as train
from sharding import schedules
from sharding.context import ShardingContext
from sharding.mesh import make_mesh

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small"],
                    help="config presets to run, in order (e.g. small v3_proxy)")
    ap.add_argument("--schedules", nargs="+", default=list(schedules.SCHEDULES),
                    choices=schedules.SCHEDULES, help="pipeline schedules to run")
    ap.add_argument("--micro", nargs="+", type=int, default=[4, 8],
                    help="microbatch counts M (each must divide --batch)")
    ap.add_argument("--ranks", nargs="+", type=int, default=None,
                    help="pipeline sizes p to run (default: 1 and every power of two up to the "
                         "device count)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp8"),
                    help="activation/matmul dtype (fp8: FP8 GEMM inputs)")
    ap.add_argument("--batch", type=int, default=8, help="global batch in sequences per step")
    ap.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first, at least 1 (the first call compiles)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"),
                    help="per-layer rematerialisation")
    ap.add_argument("--json", default=None, help="where the JSON goes (default: experiments/"
                    "results/pipeline_<device>_x<N>.json)")
    a = ap.parse_args(argv)
    if a.warmup < 1:
        ap.error("--warmup must be at least 1: the first step compiles")
    bad = [m for m in a.micro if m < 1 or a.batch % m]
    if bad:
        ap.error(f"--micro {bad}: each microbatch count must divide --batch {a.batch}")
    return a


def _tokens(cfg, batch: int, seq_len: int) -> dict:
    t = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    return {"inputs": t[:, :-1], "targets": t[:, 1:]}


def time_row(cfg, rt, devices, mesh_spec: str | None, plan, batch: dict, a) -> dict:
    """Median step time of one layout; the state and step are built and dropped here."""
    shard = None
    if mesh_spec is not None:
        shard = ShardingContext(make_mesh(mesh_spec, devices), "fsdp")
        batch = shard_batch(batch, shard)
    else:
        batch = jax.device_put(batch, devices[0])
    schedule = train.v3_schedule(1e-4, 1000, 10)
    optimizer = train.make_optimizer(cfg, schedule)
    with jax.default_device(devices[0]):
        state = train.init_state(cfg, jax.random.key(0), optimizer, shard)
    step = train.make_train_step(cfg, optimizer, schedule, shard, rt=rt, pipeline=plan)
    guard = train.no_guard()
    times, t0 = [], time.perf_counter()
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        state, metrics = step(state, batch, guard)
        jax.block_until_ready((state, metrics))
        if i == a.warmup - 1:
            compile_s = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"step_ms": sec * 1e3, "tokens_per_s": a.batch * a.seq_len / sec,
            "loss": float(metrics["loss"]), "warmup_s": compile_s}


def rows_for(preset: str, a, devices) -> list[dict]:
    cfg = get_config(preset)
    n = len(devices)
    rt = runtime_lib.resolve(cfg, dtype="float32" if a.precision == "fp32" else "bfloat16",
                             remat=a.remat, scan_layers=True, fp8=a.precision == "fp8")
    batch = _tokens(cfg, a.batch, a.seq_len)
    ranks = a.ranks or [p for p in (1, 2, 4, 8, 16) if p <= n]
    rows = []

    def add(layout, schedule, p, m, mesh_spec, plan, devs):
        label = f"{preset:<9} {layout:<22} {schedule or '':<11} {m or '':>3}"
        print(f"  {label} ...", end="", flush=True)
        r = time_row(cfg, rt, devs, mesh_spec, plan, batch, a)
        r.update(preset=preset, layout=layout, schedule=schedule, ranks=p, microbatches=m,
                 mesh=mesh_spec, devices=len(devs))
        if plan is not None:
            s = plan.timeline.summary()
            r.update(theory_bubble=s["theory_bubble"], ticks_bubble=s["bubble_fraction"],
                     activations_in_flight=s["activations_in_flight"],
                     stage_layers=[list(x) for x in plan.ranges])
        rows.append(r)
        print(f" {r['step_ms']:9.1f} ms  {r['tokens_per_s']:10.0f} tok/s", flush=True)
        return r

    add("plain (1 device)", None, 0, None, None, None, devices[:1])
    if n > 1:
        add(f"fsdp={n}", None, 0, None, f"fsdp={n}", None, devices)
    serial = {}
    for p in ranks:
        if n % p:
            continue
        for name in a.schedules:
            if schedules.n_stages(name, p) > cfg.n_layers:
                print(f"  skip {name} at p={p}: {schedules.n_stages(name, p)} stages for "
                      f"{cfg.n_layers} layers")
                continue
            for m in a.micro:
                try:
                    schedules.check(name, p, m)
                except ValueError as e:
                    print(f"  skip {name} p={p} M={m}: {e}")
                    continue
                plan = pipeline_lib.stage_plan(cfg, name, p, m, a.seq_len)
                if p == 1:
                    r = add("P=1 (1 device)", name, 1, m, None, plan, devices[:1])
                    serial[(name, m)] = r["step_ms"]
                    continue
                rest = n // p
                mesh_spec = f"pipeline={p}" + (f",fsdp={rest}" if rest > 1 else "")
                if (a.batch // m) % rest:
                    print(f"  skip {name} p={p} M={m}: a microbatch of {a.batch // m} does not "
                          f"split over fsdp={rest}")
                    continue
                r = add(mesh_spec, name, p, m, mesh_spec, plan, devices)
                base = serial.get((name, m))
                if base is not None:  # the serial work over p ranks' time
                    r["measured_bubble"] = 1 - base / (p * r["step_ms"])
    plain = rows[0]["step_ms"]
    for r in rows:
        r["vs_plain"] = plain / r["step_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'preset':<9} {'layout':<22} {'schedule':<11} {'M':>3} {'step ms':>9} "
            f"{'tok/s':>10} {'vs plain':>8} {'bubble':>7} {'theory':>7} {'ticks':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    pct = lambda v: "" if v is None else f"{v:.1%}"  # noqa: E731
    for r in rows:
        print(f"{r['preset']:<9} {r['layout']:<22} {r['schedule'] or '':<11} "
              f"{r['microbatches'] or '':>3} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['vs_plain']:>7.2f}x {pct(r.get('measured_bubble')):>7} "
              f"{pct(r.get('theory_bubble')):>7} {pct(r.get('ticks_bubble')):>7}")


def main(argv=None) -> dict:
    a = parse_args(argv)
    devices = jax.devices()
    dev = devices[0]
    print(f"bench_pipeline: {len(devices)} x {dev.device_kind}; batch {a.batch} x {a.seq_len}, "
          f"{a.precision}, schedules {' '.join(a.schedules)}, M {a.micro}", flush=True)
    rows = []
    for preset in a.presets:
        rows += rows_for(preset, a, devices)
    print_table(rows)
    record = {
        "command": "python experiments/bench_pipeline.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "device": dev.device_kind,
        "devices": len(devices), "platform": dev.platform, "jax": jax.__version__,
        "host": platform.machine(), "precision": a.precision, "batch": a.batch,
        "seq_len": a.seq_len, "remat": a.remat, "rows": rows,
    }
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"pipeline_{dev.device_kind.replace(' ', '_')}_x{len(devices)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")
    return record


if __name__ == "__main__":
    main()
