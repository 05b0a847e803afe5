"""Generation speed as users feel it: ms per token and tokens/s at batch 1, 8 and 64, greedy and
sampled, plain and MTP-speculative, and (--profile) where a batch-1 decode step's time goes.

Command:   python experiments/bench_generate.py --checkpoint_dir runs/small    (a trained model, one GPU)
           python experiments/bench_generate.py --preset small                  (random weights)
           python experiments/bench_generate.py --preset tiny --batches 1 2 --max_new_tokens 8 \
               --repeats 1 --modes greedy           (a CPU smoke run)
Hardware:  one GPU for the numbers; any CPU for the smoke run.
What it measures: `dsv3_jax.generate` (prefill + the one-jit decode loop over the latent cache)
on prompts of --prompt_len tokens cut from the embedded corpus (the Python standard library's
sources, byte tokens: what `experiments/pretrain.py` trains on), every row generating exactly
--max_new_tokens tokens (no stop tokens). Per batch and mode, the best of --repeats timed calls
after a compiling one: wall ms per generated token per row (the call's seconds / tokens per
row, prefill included) and tokens/s over all rows, and for speculative modes the drafts
accepted. Modes: greedy, sampled (--temperature, --top_p), and each with --speculative (MTP
drafts verified by the main model; meaningful on a trained model, whose drafts are accepted).
The speed-up of speculative over plain is per batch and sampling mode, in the same process.
--profile also traces one batch-1 greedy call and reports the device time per token, the
kernels launched per token and the costliest ops: wall time far above device time means
launches and host gaps, not the GPU, are what a token costs.
Output: a table and a JSON record (--json, default experiments/results/generate_bench_<preset>_<device>.json).
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# XLA reads its flags when the backend starts: --xla_flags must be in the environment first.
for _i, _arg in enumerate(sys.argv):
    if _arg.startswith("--xla_flags="):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + _arg.split("=", 1)[1]).strip()

import jax
import numpy as np

import dsv3_jax
from dsv3_jax import profiling
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import get_config
from dsv3_jax.io.tokenizer import ByteTokenizer
from dsv3_jax.train.checkpoint import load_params
from dsv3_jax.train.data import embedded_corpus_files

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODES = ("greedy", "greedy_speculative", "sampled", "sampled_speculative")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint_dir", help="a training run's checkpoint folder (its newest "
                     "verified checkpoint)")
    src.add_argument("--preset", default="small", help="random weights of this preset when no "
                     "--checkpoint_dir is given")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="rows per call")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="greedy / sampled, plain / MTP-speculative")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--prompt_len", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampled modes' temperature")
    ap.add_argument("--top_p", type=float, default=0.95, help="sampled modes' nucleus mass")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed calls per case after the compiling one (the best is reported)")
    ap.add_argument("--scan_layers", default="false", choices=("true", "false"),
                    help="decode layout: false (generate's default: unrolled layers over "
                         "per-layer weights and caches) or true (stacked, scanned layers)")
    ap.add_argument("--gather_experts", default="true", choices=("true", "false"),
                    help="routed experts of few tokens as gathered per-pair GEMMs "
                         "(Runtime.gather_experts, the default) or through the grouped path")
    ap.add_argument("--decode_attention_impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="absorbed decode attention (Runtime.decode_attention)")
    ap.add_argument("--profile", action="store_true",
                    help="trace one batch-1 greedy call: device time, kernels and costliest ops "
                         "per token")
    ap.add_argument("--xla_flags", default="",
                    help="extra XLA_FLAGS (written --xla_flags=..., read before jax starts), "
                         "e.g. command-buffer settings")
    ap.add_argument("--json", default=None, help="where to write the record")
    return ap.parse_args(argv)


def corpus_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` byte tokens cut at random places of the embedded corpus."""
    tok = ByteTokenizer()
    if vocab_size < tok.vocab_size:
        raise SystemExit(f"the model's vocabulary ({vocab_size}) is smaller than the byte "
                         f"tokenizer's ({tok.vocab_size}): corpus prompts do not fit it")
    text = embedded_corpus_files(2_000_000)
    ids = np.concatenate([tok.encode(p.read_text(errors="replace")) for p in text[:20]])
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, n)
    return [ids[s:s + length].tolist() for s in starts]


def load(a):
    if a.checkpoint_dir:
        params, cfg, step = load_params(a.checkpoint_dir)
        return params, cfg, f"{a.checkpoint_dir} (step {step})"
    cfg = get_config(a.preset)
    return dsv3_jax.init_params(cfg, jax.random.key(0)), cfg, f"{a.preset} (random weights)"


def time_case(params, cfg, rt, prompts, mode: str, a) -> dict:
    kw = dict(temperature=0.0 if mode.startswith("greedy") else a.temperature,
              top_p=None if mode.startswith("greedy") else a.top_p,
              speculative=mode.endswith("speculative"), runtime=rt, return_stats=True)
    t0 = time.perf_counter()
    outs, stats = dsv3_jax.generate(params, cfg, prompts, a.max_new_tokens, **kw)
    first = time.perf_counter() - t0
    times = []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        outs, stats = dsv3_jax.generate(params, cfg, prompts, a.max_new_tokens, seed=r + 1, **kw)
        times.append(time.perf_counter() - t0)
    best = min(times)
    n_new = sum(len(o) for o in outs)
    rec = {"batch": len(prompts), "mode": mode, "first_call_s": first, "call_s": times,
           "ms_per_token": 1e3 * best / a.max_new_tokens, "tokens_per_s": n_new / best,
           "tokens": n_new}
    if kw["speculative"]:
        rec["acceptance"] = stats["accepted"] / max(stats["drafted"], 1)
        rec["verification_steps"] = stats["steps"]
    return rec


def profile_batch1(params, cfg, rt, prompts, a) -> dict:
    """Device time, kernels and the costliest ops of one batch-1 greedy call, per token."""
    kw = dict(temperature=0.0, runtime=rt)
    dsv3_jax.generate(params, cfg, prompts[:1], a.max_new_tokens, **kw)  # compiled
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            t0 = time.perf_counter()
            dsv3_jax.generate(params, cfg, prompts[:1], a.max_new_tokens, **kw)
            wall = time.perf_counter() - t0
        ops, _ = profiling.device_op_times(tmp, "_run")
        counts = profiling.kernel_count(tmp)
    n = a.max_new_tokens
    device_ms = sum(ops.values()) / 1e6
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms_per_token": 1e3 * wall / n, "device_ms_per_token": device_ms / n,
            "kernels_per_token": counts / n,
            "top_ops_ms_per_token": [(op, ns / 1e6 / n) for op, ns in top]}


def main(argv=None) -> dict:
    a = parse_args(argv)
    params, cfg, what = load(a)
    rt = runtime_lib.resolve(cfg, decode_attention=a.decode_attention_impl,
                             scan_layers=a.scan_layers == "true").replace(
        gather_experts=a.gather_experts == "true")
    # cast once here, so that every timed call casts nothing (generate casts again: a no-op)
    params = {**params, "weights": dsv3_jax.model.compute_weights(params["weights"], cfg, rt)}
    dev = jax.devices()[0]
    print(f"bench_generate: {what} on {dev.device_kind}, {a.max_new_tokens} new tokens after "
          f"{a.prompt_len}-token prompts; {rt.describe()}", flush=True)
    if cfg.mtp_depth < 1:
        a.modes = [m for m in a.modes if not m.endswith("speculative")]
    prompts = corpus_prompts(max(a.batches), a.prompt_len, cfg.vocab_size)
    record = {"command": "python experiments/bench_generate.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": dev.device_kind,
              "jax": jax.__version__, "model": what, "runtime": rt.describe(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "settings": vars(a), "cases": []}
    out = pathlib.Path(a.json) if a.json else RESULTS / (
        f"generate_bench_{cfg.name}_{dev.device_kind.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'batch':>5} {'mode':<20} {'ms/token':>9} {'tokens/s':>10} {'accepted':>9} "
          f"{'vs plain':>9}", flush=True)
    for b in a.batches:
        plain = {}
        for mode in a.modes:
            rec = time_case(params, cfg, rt, prompts[:b], mode, a)
            base = mode.replace("_speculative", "")
            if mode == base:
                plain[base] = rec["tokens_per_s"]
            elif base in plain:
                rec["speedup_over_plain"] = rec["tokens_per_s"] / plain[base]
            if mode == "sampled" and "greedy" in plain:
                rec["vs_greedy"] = rec["tokens_per_s"] / plain["greedy"]
            record["cases"].append(rec)
            acc = f"{rec['acceptance']:.1%}" if "acceptance" in rec else "-"
            up = f"{rec['speedup_over_plain']:.2f}x" if "speedup_over_plain" in rec else "-"
            print(f"{b:>5} {mode:<20} {rec['ms_per_token']:>9.2f} {rec['tokens_per_s']:>10,.0f} "
                  f"{acc:>9} {up:>9}", flush=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
    if a.profile:
        prof = record["profile_batch1_greedy"] = profile_batch1(params, cfg, rt, prompts, a)
        print(f"\nbatch-1 greedy, per token: wall {prof['wall_ms_per_token']:.2f} ms, device "
              f"{prof['device_ms_per_token']:.2f} ms, {prof['kernels_per_token']:.0f} kernels")
        for op, ms in prof["top_ops_ms_per_token"][:15]:
            print(f"  {ms * 1e3:8.1f} us  {op}")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
