"""Generate text or token ids with `dsv3_jax.generate` from a trained, a Hugging Face or a
randomly initialised model.

Command:   python experiments/generate.py --checkpoint_dir runs/a --prompt "def " --max_new_tokens 64
           python experiments/generate.py --hf path/to/DeepSeek-V3 --prompt_ids 0,1,2 --max_new_tokens 8
           python experiments/generate.py --preset small --prompt_ids 5,6,7 --batch_size 8   (random init)
           python experiments/generate.py --hf teacher/ --prompts prompts.jsonl --out distill.jsonl
               (sequence-level distillation: the teacher's completions, for experiments/sft.py)
Hardware:  any: the CPU for tiny models, one GPU for `small`.
What it does: loads the model (the newest verified checkpoint of `experiments/pretrain.py`,
a Hugging Face folder, or random weights of a preset), encodes the prompts (text through the
model's tokenizer: a Hugging Face folder's tokenizer.json, else the project's byte tokenizer;
--chat renders them with the chat template; or comma-separated ids),
generates with the latent cache (prefill on the expanded MLA path, decode on the absorbed one),
prints each continuation (decoded text where a text prompt was given) and the throughput:
generated tokens per second of the generate call, compile included in the first call, so it
runs --repeats times and reports the last.
Output: the continuations and a line of tokens/s on stdout; --json writes them with the settings.
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import dsv3_jax
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import Config, get_config
from dsv3_jax.io import chat
from dsv3_jax.io.tokenizer import ByteTokenizer, tokenizer_for
from dsv3_jax.train.checkpoint import load_params
from dsv3_jax.train.sft_data import read_jsonl


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint_dir", help="an experiments/pretrain.py checkpoint folder")
    src.add_argument("--hf", help="a Hugging Face DeepSeek-V3 folder (config.json + safetensors)")
    ap.add_argument("--preset", default="tiny", help="random init of this preset when neither "
                    "--checkpoint_dir nor --hf is given")
    ap.add_argument("--prompt", action="append", default=None,
                    help="a text prompt (through the model's tokenizer: the HF folder's "
                         "tokenizer.json, else the byte tokenizer); repeat for several")
    ap.add_argument("--chat", action="store_true",
                    help="render each text prompt as a user message with the chat template "
                         "(and stop at the end of the assistant's turn)")
    ap.add_argument("--prompts", default=None,
                    help="JSONL of {\"prompt\": text or messages, ...} records, rendered with "
                         "the chat template; with --out, writes {\"prompt\", \"completion\", "
                         "<other fields>} records: sequence-level distillation data for "
                         "experiments/sft.py")
    ap.add_argument("--out", default=None, help="the JSONL that --prompts writes")
    ap.add_argument("--gen_batch", type=int, default=64,
                    help="--prompts: prompts per generate call")
    ap.add_argument("--prompt_ids", action="append", default=None,
                    help="a prompt as comma-separated token ids; repeat for several")
    ap.add_argument("--prompt_file", default=None, help="one text prompt per line")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="repeat the prompts to this many rows (throughput runs)")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None, help="sample among the k most likely")
    ap.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and random-init seed)")
    ap.add_argument("--stop_ids", default="", help="comma-separated stop token ids")
    ap.add_argument("--cache_dtype", default="auto",
                    choices=("auto", "bfloat16", "float32", "float8_e4m3fn"),
                    help="latent cache storage: auto = the compute dtype; float8_e4m3fn: the "
                         "latent in e4m3 with per-token scales, k_rope in bf16 (1.76x smaller "
                         "than bf16 for V3)")
    ap.add_argument("--speculative", action="store_true",
                    help="MTP speculative decoding: the MTP module drafts one token per step, "
                         "the main model verifies it (same output as without, for greedy)")
    ap.add_argument("--compare_speculative", action="store_true",
                    help="also run the other mode (plain or speculative) on the same prompts in "
                         "this process and report both tokens/s, the speed-up and the acceptance "
                         "rate (greedy: the outputs must be identical, else an error)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="compute dtype (Runtime.dtype; default: the model's). float32 also sets "
                         "float32 matmuls to full precision (no TF32), so plain and speculative "
                         "greedy runs differ only by summation order")
    ap.add_argument("--tie_tolerance", type=float, default=None,
                    help="greedy --compare_speculative: outputs may fork only where the main "
                         "model's teacher-forced top logits are within this fraction of the top "
                         "logit (default 4 x the compute dtype's machine epsilon: rounding noise)")
    ap.add_argument("--decode_attention_impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="absorbed decode attention: pallas = our Mosaic GPU MLA decode kernel "
                         "(Hopper, bf16, cache length a multiple of 64), xla = einsums, auto = "
                         "pallas where it runs (Runtime.decode_attention)")
    ap.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=False,
                    help="decode with the stacked, scanned layers (faster compile for deep "
                         "models) instead of unrolled layers over per-layer weights and caches")
    ap.add_argument("--repeats", type=int, default=2,
                    help="generate calls; tokens/s is from the last (the first compiles)")
    ap.add_argument("--json", default=None, help="write the continuations and numbers here")
    return ap.parse_args(argv)


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: {text!r} is not comma-separated integers") from None


def load_model(a) -> tuple[dict, Config]:
    if a.hf:
        cfg, params = dsv3_jax.load_hf_checkpoint(a.hf)
        return params, cfg
    if a.checkpoint_dir:
        return _load_pretrain_checkpoint(a.checkpoint_dir)
    cfg = get_config(a.preset)
    return dsv3_jax.init_params(cfg, jax.random.key(a.seed)), cfg


def _load_pretrain_checkpoint(directory: str) -> tuple[dict, Config]:
    """Any run of the training loop (pretraining, SFT, GRPO): its newest verified checkpoint."""
    try:
        params, cfg, step = load_params(directory)
    except Exception as e:
        raise SystemExit(f"--checkpoint_dir {directory}: {e}") from None
    print(f"restored step {step} of {directory}", flush=True)
    return params, cfg


def distill_file(params, cfg: Config, tok, a, kw) -> dict:
    """--prompts FILE --out FILE: a completion per prompt record, written as JSONL records that
    keep the record's other fields (sequence-level distillation data)."""
    recs = [rec for _, rec in read_jsonl(a.prompts)]
    for i, rec in enumerate(recs):
        if "prompt" not in rec:
            raise SystemExit(f"--prompts {a.prompts}: record {i} has no \"prompt\" field")
    ids = [chat.tokenize_prompt(tok, [{"role": "user", "content": r["prompt"]}]
                                if isinstance(r["prompt"], str) else r["prompt"]).tolist()
           for r in recs]
    kw = {**kw, "stop_tokens": list(kw["stop_tokens"]) or list(tok.stop_ids)}
    out_path = pathlib.Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0, n_tok = time.perf_counter(), 0
    with open(out_path, "w") as fh:
        for start in range(0, len(ids), a.gen_batch):
            outs = dsv3_jax.generate(params, cfg, ids[start:start + a.gen_batch],
                                     a.max_new_tokens, **kw)
            for rec, o in zip(recs[start:start + a.gen_batch], outs):
                n_tok += len(o)
                fh.write(json.dumps({**rec, "completion": tok.decode(o)}) + "\n")
            print(f"{min(start + a.gen_batch, len(ids))}/{len(ids)} prompts", flush=True)
    seconds = time.perf_counter() - t0
    print(f"wrote {len(recs)} records to {out_path} ({n_tok} tokens in {seconds:.1f} s)")
    return {"records": len(recs), "out": str(out_path), "tokens": n_tok, "seconds": seconds}


def _timed_generate(params, cfg, prompts, a, kw) -> tuple[list[list[int]], list[float], dict]:
    """--repeats calls of dsv3_jax.generate: (the last call's outputs, each call's seconds, the
    last call's draft statistics)."""
    times = []
    for _ in range(max(1, a.repeats)):
        t0 = time.perf_counter()
        outs, stats = dsv3_jax.generate(params, cfg, prompts, a.max_new_tokens, return_stats=True,
                                        **kw)
        times.append(time.perf_counter() - t0)
        print(f"generate{' (speculative)' if kw['speculative'] else ''} call {len(times)}: "
              f"{times[-1]:.3f} s{' (compile included)' if len(times) == 1 else ''}", flush=True)
    return outs, times, stats


def _speculative_stats(stats: dict) -> dict:
    rate = stats["accepted"] / max(stats["drafted"], 1)
    print(f"speculative: {stats['accepted']} of {stats['drafted']} drafts accepted "
          f"({rate:.1%}), {stats['steps']} verification steps")
    return {**stats, "acceptance_rate": rate}


def _divergence(params, cfg, rt, prompts, plain, spec, rel_tol: float) -> dict:
    """Where greedy plain and speculative outputs first differ, and whether the main model calls
    that token a near tie: its teacher-forced logits over prompt + the common prefix (the
    training path, a third summation order) put both chosen tokens within `rel_tol` x |top
    logit| of the top. Shapes differ between a one-token decode step and a two-token
    verification, so on 16-bit compute such ties may break either way; a fork anywhere else is
    a bug."""
    r = next(i for i, (p, s) in enumerate(zip(plain, spec)) if p != s)
    p, s = plain[r], spec[r]
    pos = next((i for i, (x, y) in enumerate(zip(p, s)) if x != y), min(len(p), len(s)))
    out = {"row": r, "position": pos, "plain_token": p[pos] if pos < len(p) else None,
           "speculative_token": s[pos] if pos < len(s) else None}
    if None in (out["plain_token"], out["speculative_token"]):  # one stopped, the other did not
        return {**out, "near_tie": False}
    logits, _ = dsv3_jax.forward(params, jnp.asarray([list(prompts[r]) + p[:pos]]), cfg,
                                 runtime=rt)
    z = np.asarray(logits[0, -1], np.float64)
    top, zp, zs = float(z.max()), float(z[p[pos]]), float(z[s[pos]])
    tol = rel_tol * max(1.0, abs(top))
    return {**out, "top_logit": top, "plain_logit": zp, "speculative_logit": zs,
            "gap": abs(zp - zs), "tolerance": tol,
            "near_tie": top - min(zp, zs) <= tol}


def _compare(params, cfg, prompts, a, kw, outs, tokens_per_s) -> dict:
    """The other mode (speculative or plain) on the same prompts, timed the same way in the same
    process: tokens/s of both, the speed-up, the acceptance rate, and (greedy) whether the
    outputs are identical, and where not, whether they fork at a near tie (`_divergence`)."""
    other_kw = {**kw, "speculative": not kw["speculative"]}
    other, times, stats = _timed_generate(params, cfg, prompts, a, other_kw)
    other_rate = sum(len(o) for o in other) / times[-1]
    spec_stats = _speculative_stats(stats) if other_kw["speculative"] else None
    plain, spec = (tokens_per_s, other_rate) if other_kw["speculative"] else (other_rate,
                                                                              tokens_per_s)
    same = other == outs
    print(f"plain {plain:,.1f} tokens/s, speculative {spec:,.1f} tokens/s: {spec / plain:.2f}x; "
          f"outputs {'identical' if same else 'DIFFER'}")
    record = {"plain_tokens_per_s": plain, "speculative_tokens_per_s": spec,
              "speedup": spec / plain, "identical_outputs": same, "other_call_seconds": times,
              **({"speculative": spec_stats} if spec_stats else {})}
    if a.temperature == 0.0 and not same:
        plain_out, spec_out = (outs, other) if other_kw["speculative"] else (other, outs)
        rt = kw["runtime"]
        rel_tol = (a.tie_tolerance if a.tie_tolerance is not None
                   else 4 * float(jnp.finfo(jnp.dtype(rt.dtype)).eps))
        d = record["divergence"] = _divergence(params, cfg, rt, prompts, plain_out, spec_out,
                                               rel_tol)
        where = f"row {d['row']}, new token {d['position']}"
        if "gap" in d:
            print(f"first fork at {where}: plain {d['plain_token']} (logit {d['plain_logit']:.4f}), "
                  f"speculative {d['speculative_token']} (logit {d['speculative_logit']:.4f}), "
                  f"top {d['top_logit']:.4f}, tolerance {d['tolerance']:.4f} ({rt.dtype}): "
                  f"{'a near tie (rounding), not a bug' if d['near_tie'] else 'NOT a near tie'}")
        if not d["near_tie"]:
            record["error"] = (f"greedy speculative output differs from plain greedy output at "
                               f"{where}, where the main model sees no near tie (a bug)")
    return record


def main(argv=None) -> dict:
    a = parse_args(argv)
    params, cfg = load_model(a)
    rt = runtime_lib.resolve(cfg, dtype=a.dtype, decode_attention=a.decode_attention_impl,
                             scan_layers=a.scan_layers)
    if rt.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    texts = list(a.prompt or [])
    if a.prompt_file:
        texts += [ln for ln in pathlib.Path(a.prompt_file).read_text().splitlines() if ln]
    try:
        tok = tokenizer_for(a.hf, cfg.vocab_size)
    except ValueError as e:
        if texts or a.prompts:
            raise SystemExit(f"text prompts: {e}; use --prompt_ids") from None
        tok = ByteTokenizer()
    if (a.prompts is None) != (a.out is None):
        raise SystemExit("--prompts and --out go together")
    stop = _ids(a.stop_ids, "--stop_ids") or (list(tok.stop_ids) if a.chat else [])
    if a.prompts:
        kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                  stop_tokens=_ids(a.stop_ids, "--stop_ids"), speculative=a.speculative,
                  cache_dtype=None if a.cache_dtype == "auto" else jnp.dtype(a.cache_dtype),
                  runtime=rt, vocab_limit=tok.vocab_size)
        return distill_file(params, cfg, tok, a, kw)
    prompts = [(chat.tokenize_prompt(tok, [{"role": "user", "content": t}]) if a.chat
                else tok.encode(t)).tolist() for t in texts]
    prompts += [_ids(p, "--prompt_ids") for p in (a.prompt_ids or [])]
    if not prompts:
        prompts = [tok.encode("def ").tolist()] if cfg.vocab_size >= tok.vocab_size else [[1]]
        texts = ["def "] if cfg.vocab_size >= tok.vocab_size else []
        a.chat = False
    if a.batch_size:
        prompts = [prompts[i % len(prompts)] for i in range(a.batch_size)]
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
              stop_tokens=stop, speculative=a.speculative,
              cache_dtype=None if a.cache_dtype == "auto" else jnp.dtype(a.cache_dtype),
              runtime=rt)
    if texts and not a.speculative and not a.compare_speculative:
        kw["vocab_limit"] = tok.vocab_size  # never an id the tokenizer cannot decode
    cache_dtype = rt.dtype if a.cache_dtype == "auto" else a.cache_dtype
    outs, times, stats = _timed_generate(params, cfg, prompts, a, kw)
    seconds = times[-1]
    n_new = sum(len(o) for o in outs)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        shown = (repr(tok.decode(o) if a.chat else tok.decode(p + o))
                 if i < len(texts) or (texts and a.batch_size) else o)
        print(f"[{i}] {shown}")
    print(f"{n_new} tokens in {seconds:.3f} s: {n_new / seconds:,.1f} tokens/s "
          f"({len(prompts)} rows, {jax.devices()[0].device_kind})")
    latent = dsv3_jax.cache_bytes_per_token(cfg, jnp.dtype(cache_dtype))
    # what per-head keys and values (qk and v widths) of every layer would take, in bf16
    expanded = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
    print(f"latent cache: {latent:,} bytes per token in {cache_dtype} against {expanded:,} for "
          f"expanded keys and values in bfloat16 ({expanded / latent:.1f}x smaller)")
    record = {"settings": vars(a), "prompts": prompts, "outputs": outs, "tokens": n_new,
              "seconds": seconds, "tokens_per_s": n_new / seconds, "call_seconds": times,
              "device": jax.devices()[0].device_kind,
              "resolved": {"decode_attention_impl": rt.decode_attention,
                           "grouped_impl": rt.grouped, "dtype": rt.dtype,
                           "cache_dtype": cache_dtype},
              "cache_bytes_per_token": latent, "expanded_bytes_per_token": expanded}
    if a.speculative:
        record["speculative"] = _speculative_stats(stats)
    if a.compare_speculative:
        record["comparison"] = _compare(params, cfg, prompts, a, kw, outs, n_new / seconds)
    if a.json:  # written before any failure below, so the run's numbers are kept
        pathlib.Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    if "error" in record.get("comparison", {}):
        raise SystemExit(f"--compare_speculative: {record['comparison']['error']}")
    return record


if __name__ == "__main__":
    main()
