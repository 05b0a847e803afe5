"""Train-step throughput, MFU and where the time goes, on one device.

Command:   python experiments/bench_train.py                 (the `small` preset in bf16, one GPU)
           python experiments/bench_train.py --preset tiny --batch 2 --seq_len 64 --steps 2 \
               --json bench_tiny.json                          (a CPU smoke run; no MFU there)
Hardware:  one NVIDIA H100/H200 for the numbers in experiments/results/; any CPU for the smoke run.
What it measures: the full jitted pretraining step of `dsv3_jax.train.step` (forward with MTP, loss,
backward, AdamW with bf16 moments, router-bias update) on synthetic token ids (or, with --data
corpus, on pretrain.py's default batches, placed on the device before timing), timed over
--steps steps after --warmup, each waited for. MFU = flops_per_token(seq_len) x tokens/s over the
device's dense bf16 peak (the datasheet's; --peak_tflops overrides). Then a profile of
--profile_steps steps, attributed to model parts through the scopes the model names
(`dsv3_jax.profiling`): attention core, expert GEMMs, MoE route/dispatch/combine, dense and
shared FFN, optimizer, the rest. The expert GEMMs run through --grouped_impl (auto: the Pallas
grouped kernel on GPU, ragged_dot on CPU).
Output: a table on stdout and a JSON record (--json) with the command, device, date and numbers.
Result (one H200, 2026-12-01, defaults: 16 x 2048 tokens, layers unrolled): 195.9 ms per step,
167k tokens/s, 357 model TFLOP/s, MFU 36.1% (36.6% in a second run; target 35% on an H100),
56 GiB peak memory; at 8 x 2048: 105.7 ms, MFU 33.4% (experiments/results/
train_small_h200_b16.json, train_small_h200.json; docs/performance.md has the profile and the
path there).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# XLA's GPU command buffers (CUDA graphs) report a graph of kernels as one op with no scope, which
# would hide where the time goes; --command_buffers turns them back on (for timing only).
if "--command_buffers" not in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()

import jax
import jax.numpy as jnp

from dsv3_jax import profiling
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import get_config
from dsv3_jax.train import step as train
from dsv3_jax.train.metrics import peak_tflops

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="config preset")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp8"),
                    help="activation/matmul dtype (master weights fp32, moments bf16); fp8 = bf16 "
                         "activations + FP8 GEMM inputs (Runtime.fp8; see --fp8_impl)")
    ap.add_argument("--fp8_impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="FP8 GEMMs under --precision fp8 (auto = pallas, our Mosaic GPU FP8 "
                         "kernels, on a Hopper GPU; xla = the dequantize + fp32 matmul reference)")
    ap.add_argument("--fp8_quant_impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="FP8 activation quantizers under --precision fp8: auto (pallas where "
                         "the FP8 GEMMs run our kernels, xla elsewhere), xla "
                         "(pallas_kernels/fp8_quant.py, two XLA passes) or pallas (the one-pass "
                         "Mosaic GPU kernels of fp8_quant_kernel.py for bf16 x and dy; Hopper)")
    ap.add_argument("--batch", type=int, default=16,
                    help="sequences per step (16 x 2048 fits an 80 GB H100: 56 GiB measured)")
    ap.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--data", default="random", choices=("random", "corpus"),
                    help="the step's tokens: random (one batch of uniform ids, reused) or corpus "
                         "(pretrain.py's default data, the embedded corpus in its step order: its "
                         "routing is as skewed as real text's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile included)")
    ap.add_argument("--profile_steps", type=int, default=3,
                    help="steps under the profiler for the per-part breakdown (0: no profile)")
    ap.add_argument("--profile_dir", default=None,
                    help="keep the profile here (TensorBoard / Perfetto); default: a temporary folder")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"),
                    help="per-layer rematerialisation (default: none)")
    ap.add_argument("--scan_layers", default="false", choices=("true", "false"),
                    help="run each layer stack as one lax.scan (true) or unrolled (false, the "
                         "default: measured 147 against 112 ms per step on an H200, at a longer "
                         "compile)")
    ap.add_argument("--top_ops", type=int, default=25,
                    help="record the N costliest ops of the profile with their scopes")
    ap.add_argument("--grouped_impl", default="auto", choices=("auto", "ragged_dot", "pallas"),
                    help="expert GEMMs: auto = pallas on GPU, ragged_dot elsewhere")
    ap.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                    help="attention core: auto = cudnn on GPU (xla with --deterministic), xla "
                         "elsewhere")
    ap.add_argument("--deterministic", action="store_true",
                    help="compile the step bitwise-reproducible (pretrain's --deterministic), to "
                         "measure what that costs")
    ap.add_argument("--command_buffers", action="store_true",
                    help="keep XLA's GPU command buffers (CUDA graphs); off by default so the "
                         "profile can name every kernel's scope (read before jax starts)")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="device peak for MFU (default: the dense bf16 datasheet peak)")
    ap.add_argument("--json", default=None,
                    help="where to write the record (default: experiments/results/"
                         "train_<preset>_<device>.json)")
    return ap.parse_args(argv)


def synthetic_batch(cfg, batch: int, seq_len: int) -> dict:
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, cfg.vocab_size,
                                jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def corpus_batches(cfg, batch: int, seq_len: int, n: int) -> list[dict]:
    """The first n steps' batches of pretrain.py's default data, on the device."""
    from dsv3_jax.train import data as data_lib
    from dsv3_jax.train.settings import Settings
    dataset, _ = data_lib.build_dataset(None, seq_len=seq_len, global_batch=batch, seed=0,
                                        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                                        embedded_bytes=Settings.embedded_bytes)
    return [{k: jnp.asarray(v) for k, v in dataset.rows(i).items()
             if k in ("inputs", "targets")} for i in range(n)]


class Batches:
    """The batches in turn (one batch, reused, for --data random)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.i = batches, 0

    def next(self) -> dict:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def time_steps(step, state, batches: Batches, n: int) -> tuple[dict, list[float]]:
    times = []
    guard = train.no_guard()
    for _ in range(n):
        batch = batches.next()
        t0 = time.perf_counter()
        state, metrics = step(state, batch, guard)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, times


def load_balance(step, state, batch) -> tuple[dict, float | None]:
    """(state, the largest max/mean expert load over the MoE layers for `batch`): what pretrain
    logs. One more step (the step donates its state)."""
    state, metrics = step(state, batch, train.no_guard())
    load = np.asarray(metrics["load"]) if "load" in metrics else None
    if load is None or load.ndim != 2 or not load.size:
        return state, None
    return state, float((load.max(-1) / np.maximum(load.mean(-1), 1e-9)).max())


def _top_ops_by_part(ops: dict, scopes: dict, n_steps: int, k: int = 6) -> dict:
    """{part: [(op, ms per step, scope)] of its k costliest ops}: what a part is made of."""
    by_part: dict = {}
    for op, ns in sorted(ops.items(), key=lambda kv: -kv[1]):
        name = scopes.get(op)
        part = profiling.UNATTRIBUTED if name is None else profiling.part_of(name)
        rows = by_part.setdefault(part, [])
        if len(rows) < k:
            rows.append((op, ns / 1e6 / n_steps, name or ""))
    return by_part


def profile_parts(step, state, batch, n: int, keep_dir: str | None,
                  top_ops: int = 25) -> tuple[dict, dict, dict]:
    """(state, {part: ms per step}, details) from a profile of n steps."""
    scopes = profiling.op_scopes(step.lower(state, batch.batches[0], train.no_guard())
                                 .compile().as_text())
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = keep_dir or tmp
        with jax.profiler.trace(trace_dir):
            state, _ = time_steps(step, state, batch, n)
        ops, recorded = profiling.device_op_times(trace_dir, "step")
    ms = lambda d: {k: v / 1e6 / n for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    # The compiled module's metadata names an op's own scope; the profiler's per-kernel `name`
    # is coarser on GPU (a kernel inside the layer scan reports the scan body's path: measured on
    # an H200, it hid the optimizer's 6 ms). So the module's scope wins, and the profiler's
    # record only fills ops the module text does not name (thunks, custom calls).
    text_only = ms(profiling.breakdown(ops, scopes))
    scopes = {**recorded, **scopes}
    details = {"profile_ms_per_step_module_scopes": text_only,
               "other_top_scopes_ms": [(k, v / 1e6 / n) for k, v in
                                       profiling.top_scopes(ops, scopes, profiling.OTHER)],
               "slowest_unattributed_ops_ms": [(op, v / 1e6 / n) for op, v in
                                               profiling.unattributed(ops, scopes)],
               "top_ops_by_part_ms": _top_ops_by_part(ops, scopes, n),
               "top_ops_ms": [(op, v / 1e6 / n, scopes.get(op, "")) for op, v in
                              sorted(ops.items(), key=lambda kv: -kv[1])[:top_ops]]}
    return state, ms(profiling.breakdown(ops, scopes)), details


def main(argv=None) -> dict:
    a = parse_args(argv)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    cfg = get_config(a.preset)
    rt = runtime_lib.resolve(
        cfg, dtype="float32" if a.precision == "fp32" else "bfloat16", remat=a.remat,
        scan_layers=a.scan_layers == "true", attention=a.attention_impl, grouped=a.grouped_impl,
        fp8=a.precision == "fp8", fp8_gemm=a.fp8_impl, fp8_quant=a.fp8_quant_impl,
        deterministic=a.deterministic)
    schedule = train.v3_schedule(1e-4, 1000, 10)
    optimizer = train.make_optimizer(cfg, schedule)
    state = train.init_state(cfg, jax.random.key(0), optimizer)
    step = train.make_train_step(cfg, optimizer, schedule, rt=rt)
    if a.data == "corpus":
        batch = Batches(corpus_batches(cfg, a.batch, a.seq_len,
                                       a.warmup + a.steps + a.profile_steps + 1))
    else:
        batch = Batches([synthetic_batch(cfg, a.batch, a.seq_len)])
    counts = cfg.param_count()
    print(f"bench_train: {a.preset} ({counts['main'] / 1e6:,.1f}M params, "
          f"{counts['activated'] / 1e6:,.1f}M activated) on {dev.device_kind}, batch {a.batch} x "
          f"{a.seq_len}, {a.precision}: {rt.describe()}", flush=True)

    t0 = time.perf_counter()
    state, warm = time_steps(step, state, batch, a.warmup)
    warmup_s = time.perf_counter() - t0
    print(f"warmup {a.warmup} steps (compile included): {warmup_s:.1f} s", flush=True)
    state, times = time_steps(step, state, batch, a.steps)
    sec = statistics.median(times)
    tokens = a.batch * a.seq_len
    flops = cfg.flops_per_token(a.seq_len) * tokens
    peak = peak_tflops(a.peak_tflops, dev)
    record = {
        "command": "python experiments/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "device": dev.device_kind,
        "platform": dev.platform, "jax": jax.__version__, "host": platform.machine(),
        "preset": a.preset, "precision": a.precision,
        "fp8_impl": rt.fp8.gemm if rt.fp8 else None,
        "fp8_quant_impl": rt.fp8.quant if rt.fp8 else None,
        "batch": a.batch, "seq_len": a.seq_len, "remat": rt.remat, "scan_layers": rt.scan_layers,
        "xla_command_buffers": a.command_buffers, "grouped_impl": rt.grouped,
        "attention_impl": rt.attention, "deterministic": rt.deterministic, "data": a.data,
        "params": counts, "flops_per_token": cfg.flops_per_token(a.seq_len),
        "warmup_s_compile_included": warmup_s,
        "step_ms_median": sec * 1e3, "step_ms_all": [t * 1e3 for t in times],
        "tokens_per_s": tokens / sec, "model_tflops_per_s": flops / sec / 1e12,
        "peak_tflops": peak, "mfu": (flops / sec / 1e12 / peak) if peak else None,
    }
    state, record["load_max_over_mean"] = load_balance(step, state, batch.batches[0])
    stats = dev.memory_stats() or {}  # None on CPU
    if "peak_bytes_in_use" in stats:
        record["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    if a.profile_steps:
        state, parts, details = profile_parts(step, state, batch, a.profile_steps, a.profile_dir,
                                               a.top_ops)
        record["profile_ms_per_step"] = parts
        record.update(details)

    print(f"\n{'step (median)':<52}{sec * 1e3:>10.1f} ms")
    print(f"{'tokens/s':<52}{tokens / sec:>10.0f}")
    print(f"{'model TFLOP/s':<52}{flops / sec / 1e12:>10.1f}")
    if "peak_memory_gib" in record:
        print(f"{'peak device memory':<52}{record['peak_memory_gib']:>10.1f} GiB")
    if record["load_max_over_mean"] is not None:
        print(f"{'expert load, max/mean (worst layer, first batch)':<52}"
              f"{record['load_max_over_mean']:>10.2f}")
    print(f"{'MFU':<52}{'n/a (no peak for this device)' if not peak else f'{record['mfu']:>10.1%}'}")
    if a.profile_steps:
        total = sum(parts.values())
        print(f"\nprofile, device time per step ({total:.1f} ms in ops):")
        for part, ms in parts.items():
            print(f"  {part:<50}{ms:>8.1f} ms {ms / total:>6.1%}")
        print("by the compiled module's scopes alone: " + ", ".join(
            f"{k.split(' (')[0]} {v:.1f}" for k, v in details["profile_ms_per_step_module_scopes"].items()))
        print("largest scopes inside 'other':")
        for path, ms in details["other_top_scopes_ms"][:8]:
            print(f"  {ms:8.2f} ms  {path}")
        print("costliest ops of each part:")
        for part, rows in details["top_ops_by_part_ms"].items():
            print(f"  {part.split(' (')[0]}: " + ", ".join(f"{op} {ms:.2f}" for op, ms, _ in rows[:4]))
        print("costliest ops:")
        for op, ms, scope in details["top_ops_ms"]:
            print(f"  {ms:8.2f} ms  {op:<40} {scope[-110:]}")
        rest = details["slowest_unattributed_ops_ms"]
        if rest:
            print("slowest ops without a scope: " + ", ".join(f"{op} {ms:.1f} ms" for op, ms in rest[:6]))
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"train_{a.preset}_{dev.device_kind.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")
    return record


if __name__ == "__main__":
    main()
