"""Expert-parallel dispatch on real GPUs: ragged all-to-all checked against one device, and the
training-step time of each dispatch implementation.

Command (a 2- or 4-GPU machine):
    python experiments/bench_ep.py                      # mesh expert=<all GPUs>, preset small
    python experiments/bench_ep.py --mesh fsdp=2,expert=2 --steps 20
Hardware: NVIDIA GPUs of one host (NCCL). Runtime: 2-4 minutes, mostly compiling.
What it does:
  1. correctness: `tiny` in float32 at full matmul precision; loss and gradients of the sharded
     step (fsdp_ep) with each dispatch against the same step on one GPU;
  2. speed: forward + loss + backward of `small` (bf16) on the mesh, each dispatch, median of
     --steps timed steps after warm-up (wall clock around block_until_ready).
Writes experiments/results/ep_dispatch_<devices>.json and prints a table.
Result: see experiments/results/ep_dispatch_*.json (command, device, jax version and date
inside). Expert GEMMs still run through jax.lax.ragged_dot, which costs about (experts) x the
useful work on GPU, so absolute step times here measure dispatch, not a tuned MoE.
"""

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import dsv3_jax
from dsv3_jax import placement
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.train.loss import loss_fn
from sharding.context import ShardingContext
from sharding.mesh import make_mesh

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mesh", default=None, help="mesh spec (default: expert=<device count>)")
    ap.add_argument("--preset", default="small", help="preset for the timing runs")
    ap.add_argument("--batch_per_device", type=int, default=4, help="sequences per device")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per dispatch")
    ap.add_argument("--dispatch", default="allgather,ragged_a2a",
                    help="comma-separated dispatch implementations to time")
    ap.add_argument("--skip_check", action="store_true", help="skip the correctness check")
    ap.add_argument("--json", default=None, help="output path (default: experiments/results/"
                    "ep_dispatch_<devices>.json)")
    return ap.parse_args(argv)


def step_fn(cfg, shard):
    """Loss and gradients on `shard`, with the kernels this machine's runtime picks for it."""
    rt = runtime_lib.resolve(cfg)
    return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, cfg, rt, shard=shard)[0]))


def random_batch(cfg, batch, seq, seed):
    toks = jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, cfg.vocab_size)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def check(mesh_spec: str, dispatches: list[str]) -> list[dict]:
    """Sharded fsdp_ep step of `tiny` in fp32 against one device, per dispatch."""
    cfg = dsv3_jax.get_config("tiny")
    n = jax.device_count()
    batch = random_batch(cfg, 2 * n, 32, 1)
    rows = []
    with jax.default_matmul_precision("highest"):
        params = dsv3_jax.init_params(cfg.replace(init_std=0.1), jax.random.key(0))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ref_loss, ref_grads = step_fn(cfg, None)(jax.device_put(params, one),
                                                 jax.device_put(batch, one))
        for d in dispatches:
            shard = ShardingContext(make_mesh(mesh_spec), "fsdp_ep", d)
            loss, grads = step_fn(cfg, shard)(placement.shard_params(params, cfg, shard),
                                              placement.shard_batch(batch, shard))
            gdiff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                        zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
            gscale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(ref_grads))
            rows.append({"dispatch": d, "loss": float(loss), "loss_one_device": float(ref_loss),
                         "max_abs_grad_diff": gdiff, "max_abs_grad": gscale})
            print(f"check {d:>22}: loss {float(loss):.6f} vs {float(ref_loss):.6f} on one device; "
                  f"max |grad diff| {gdiff:.2e} (max |grad| {gscale:.2e})")
    return rows


def time_dispatch(cfg, mesh_spec, dispatch, batch_per_device, seq, steps) -> dict:
    shard = ShardingContext(make_mesh(mesh_spec), "fsdp_ep", dispatch)
    params = placement.init_params_sharded(cfg, jax.random.key(0), shard)
    batch = placement.shard_batch(random_batch(cfg, batch_per_device * jax.device_count(), seq, 2),
                                  shard)
    fn = step_fn(cfg, shard)
    t0 = time.perf_counter()
    loss, grads = fn(params, batch)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss, grads = fn(params, batch)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t)
    ms = 1e3 * statistics.median(times)
    tokens = batch_per_device * jax.device_count() * seq
    print(f"time  {dispatch:>22}: {ms:8.1f} ms/step (median of {steps}), "
          f"{tokens / ms * 1e3:,.0f} tokens/s, loss {float(loss):.3f}, first call {compile_s:.0f} s")
    return {"dispatch": dispatch, "ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3,
            "steps": steps, "first_call_s": compile_s, "loss": float(loss)}


def main(argv=None):
    args = parse_args(argv)
    n = jax.device_count()
    mesh_spec = args.mesh or f"expert={n}"
    dispatches = [d.strip() for d in args.dispatch.split(",") if d.strip()]
    devices = f"{n}x {jax.devices()[0].device_kind}"
    print(f"{devices}, jax {jax.__version__}, mesh {mesh_spec}")
    result = {"command": " ".join(["python experiments/bench_ep.py"] + (argv or sys.argv[1:])),
              "devices": devices, "jax": jax.__version__, "mesh": mesh_spec,
              "date": datetime.date.today().isoformat(), "preset": args.preset,
              "batch_per_device": args.batch_per_device, "seq": args.seq}
    if not args.skip_check:
        result["check"] = check(mesh_spec, dispatches)
    cfg = dsv3_jax.get_config(args.preset)
    result["timing"] = [time_dispatch(cfg, mesh_spec, d, args.batch_per_device, args.seq,
                                      args.steps) for d in dispatches]
    print(f"\n| dispatch | ms/step | tokens/s |\n|---|---|---|")
    for r in result["timing"]:
        print(f"| {r['dispatch']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} |")
    RESULTS.mkdir(exist_ok=True)
    out = pathlib.Path(args.json or RESULTS / f"ep_dispatch_{n}gpu.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
