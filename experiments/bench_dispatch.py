"""Expert-parallel dispatch + combine on its own: latency and bandwidth of each implementation
against a dense all-to-all of the same bytes, on every device of the machine.

Command:   python experiments/bench_dispatch.py                  (all GPUs of one host; V3's MoE
                                                                 shapes: D 7168, 256 experts, 8 per
                                                                 token, 4096 tokens per device)
           python experiments/bench_dispatch.py --tokens 64 --dim 128 --experts 16 --topk 2 \
               --iters 2 --json d.json                           (a CPU smoke run on fake devices)
Hardware:  a host with 2, 4 or 8 GPUs (NCCL); any CPU with fake devices for the smoke run.
What it measures: the round trip `sharding.ep.run_experts` makes around the experts (dispatch,
an identity FFN, combine) in bf16, inside shard_map over all devices as one expert axis, for
each --dispatch, with routings drawn per --routing: uniform (each token's experts uniformly at
random), zipf (expert popularity 1/(rank+1)^1.2: a hot few) and one_device (every token to the
experts of device 0: the worst case). Each round trip is checked against the one-device result
(x times the sum of its weights) before it is timed. The yardstick is two dense `all_to_all`s
(there and back) of the bytes a balanced dispatch must move, M x A / ep pairs of D values to
every peer; `vs dense` = the yardstick's time / the implementation's (target >= 0.8 for the
default dispatch on uniform routing). Payload bandwidth = the pairs that leave the device x D x
2 bytes, both ways, over the time.
Output: a table and a JSON record (--json; default experiments/results/dispatch_<n>x<device>.json).
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
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding import ep

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROUTINGS = ("uniform", "zipf", "one_device")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per device (M)")
    ap.add_argument("--dim", type=int, default=7168, help="hidden size (D)")
    ap.add_argument("--experts", type=int, default=256, help="routed experts (E)")
    ap.add_argument("--topk", type=int, default=8, help="experts per token (A)")
    ap.add_argument("--dispatch", nargs="+", default=["a2a", "allgather", "ragged_a2a"],
                    choices=ep.DISPATCH_IMPLS, help="implementations to time")
    ap.add_argument("--routing", nargs="+", default=list(ROUTINGS), choices=ROUTINGS,
                    help="routings to time")
    ap.add_argument("--capacity_factor", type=float, default=2.0,
                    help="the a2a dispatch's buffers, in multiples of the mean pairs per peer")
    ap.add_argument("--iters", type=int, default=20, help="timed round trips per case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed round trips first")
    ap.add_argument("--json", default=None, help="where to write the record")
    return ap.parse_args(argv)


def routing(kind: str, n_tokens: int, n_experts: int, topk: int, n_dev: int,
            seed: int = 0) -> np.ndarray:
    """[n_tokens, topk] distinct expert ids per token."""
    rng = np.random.default_rng(seed)
    if kind == "one_device":
        local = n_experts // n_dev
        if topk > local:
            raise ValueError(f"--routing one_device needs --topk <= experts per device ({local})")
        return np.tile(np.arange(topk, dtype=np.int32), (n_tokens, 1))
    p = np.ones(n_experts) if kind == "uniform" else 1.0 / np.arange(1, n_experts + 1) ** 1.2
    p = rng.permutation(p / p.sum())
    # Gumbel top-k: distinct experts per token, drawn by popularity
    keys = np.log(p)[None] - np.log(-np.log(rng.uniform(size=(n_tokens, n_experts))))
    return np.argsort(-keys, axis=1)[:, :topk].astype(np.int32)


def round_trip(mesh, impl: str, n_experts: int, capacity_factor: float):
    def body(x, experts, weights):
        y, over = ep.run_experts(lambda rows, sizes: rows, x, experts, weights,
                                 n_experts=n_experts, axis="ep", impl=impl,
                                 capacity_factor=capacity_factor)
        return y, over[None]

    spec = P("ep")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec),
                                 out_specs=(spec, spec), check_vma=False))


def dense_yardstick(mesh, pairs_per_peer: int):
    """Two dense all_to_alls of [ep, pairs_per_peer, D] per device: a balanced dispatch's bytes."""
    def body(chunks):
        there = jax.lax.all_to_all(chunks, "ep", 0, 0, tiled=True)
        return jax.lax.all_to_all(there * 2, "ep", 0, 0, tiled=True)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"),
                                 check_vma=False))


def timed(fn, args, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def leaving_pairs(experts: np.ndarray, n_dev: int, n_experts: int) -> int:
    """The most pairs any device sends to other devices (what its link carries)."""
    m = experts.shape[0] // n_dev
    dest = experts // (n_experts // n_dev)
    return max(int((dest[d * m:(d + 1) * m] != d).sum()) for d in range(n_dev))


def main(argv=None) -> dict:
    a = parse_args(argv)
    devs = jax.devices()
    n = len(devs)
    if a.experts % n:
        raise ValueError(f"--experts {a.experts} must split evenly over the {n} devices")
    if a.tokens * a.topk % n:
        raise ValueError(f"--tokens x --topk ({a.tokens * a.topk}) must split over {n} peers")
    mesh = jax.sharding.Mesh(np.array(devs), ("ep",))
    shard = NamedSharding(mesh, P("ep"))
    rng = np.random.default_rng(1)
    x = jax.device_put(jnp.asarray(rng.normal(size=(n * a.tokens, a.dim)), jnp.bfloat16), shard)
    w_np = rng.uniform(0.1, 1.0, (n * a.tokens, a.topk)).astype(np.float32)
    weights = jax.device_put(w_np, shard)
    want = np.asarray(x, np.float32) * w_np.sum(1, keepdims=True)
    per_peer = a.tokens * a.topk // n
    chunks = jax.device_put(jnp.zeros((n * n, per_peer, a.dim), jnp.bfloat16), shard)
    dense_s = timed(dense_yardstick(mesh, per_peer), (chunks,), a.iters, a.warmup)
    record = {"command": "python experiments/bench_dispatch.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": devs[0].device_kind,
              "devices": n, "jax": jax.__version__, "tokens_per_device": a.tokens,
              "dim": a.dim, "experts": a.experts, "topk": a.topk,
              "capacity_factor": a.capacity_factor,
              "dense_a2a_ms": dense_s * 1e3, "cases": []}
    print(f"{n} x {devs[0].device_kind}: M {a.tokens} tokens per device, D {a.dim}, "
          f"E {a.experts}, A {a.topk}; dense all_to_all yardstick {dense_s * 1e3:.3f} ms",
          flush=True)
    print(f"{'dispatch':<20} {'routing':<11} {'ms':>9} {'vs dense':>9} {'payload GB/s':>13} "
          f"{'overflow':>9} {'max err':>9}", flush=True)
    for kind in a.routing:
        experts_np = routing(kind, n * a.tokens, a.experts, a.topk, n)
        experts = jax.device_put(experts_np, shard)
        payload = 2 * leaving_pairs(experts_np, n, a.experts) * a.dim * 2  # both ways, bf16
        for impl in a.dispatch:
            fn = round_trip(mesh, impl, a.experts, a.capacity_factor)
            try:
                y, over = fn(x, experts, weights)
                err = float(np.abs(np.asarray(y) - want).max() / np.abs(want).max())
            except Exception as e:  # an implementation this backend lacks: say so, go on
                msg = str(e).splitlines()[0][:160]
                record["cases"].append({"dispatch": impl, "routing": kind, "error": msg})
                print(f"{impl:<20} {kind:<11} failed: {msg}", flush=True)
                continue
            s = timed(fn, (x, experts, weights), a.iters, a.warmup)
            case = {"dispatch": impl, "routing": kind, "ms": s * 1e3, "vs_dense": dense_s / s,
                    "payload_gb_per_s": payload / s / 1e9,
                    "overflowed": bool(np.asarray(over).any()), "max_rel_error": err}
            record["cases"].append(case)
            print(f"{impl:<20} {kind:<11} {s * 1e3:>9.3f} {dense_s / s:>9.2f} "
                  f"{payload / s / 1e9:>13.1f} {str(case['overflowed']):>9} {err:>9.1e}",
                  flush=True)
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"dispatch_{n}x{devs[0].device_kind.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
