"""Batched generation over the latent KV cache (reference §3: absorbed MLA for decode).

    generate(params, cfg, prompts, max_new_tokens, temperature=..., top_k=..., top_p=...)

1. Prefill: the prompts, right-padded to one length, run once through the expanded MLA path
   (`model.forward_cached(absorbed=False)`), which fills each layer's cache with the normalised
   latent c_kv and the rotated shared key: C + R numbers per token per layer. Each row's cache
   length is its own prompt length (`n_valid`); the padding written past it is masked out and
   overwritten by that row's next tokens.
2. Decode: one `lax.while_loop` in one jit (compiled once per batch/cache/length shape, no
   recompilation per token, no host round trip per token). Each step feeds every row's last
   token at its own position through the absorbed path (attention over the latent cache),
   samples the next token (`sampling`), and marks a row done at a stop token or its token
   budget; the loop ends when every row is done.
With `speculative=True` the decode loop is `speculative.decode` (MTP drafts, main-model
verification).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model as _model
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import Config
from dsv3_jax.infer import speculative as spec
from dsv3_jax.infer.prefill import prefill, whole_blocks
from dsv3_jax.infer.sampling import check_controls, limit_vocab, sample
from dsv3_jax.runtime import Runtime, jit_by_runtime

def _validate(prompts, cfg: Config, max_new_tokens: int, max_len: int | None) -> tuple[list, int]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got shape "
                             f"{arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must hold integer token ids, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        if bad.size:
            j = int(np.argwhere(arr == bad[0])[0, 0])
            raise ValueError(f"prompts[{i}][{j}] = {int(bad[0])} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        rows.append(arr.astype(np.int32))
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    longest = int(np.argmax([len(r) for r in rows]))
    need = len(rows[longest]) + max_new_tokens
    what = (f"prompts[{longest}] ({len(rows[longest])} tokens) + max_new_tokens "
            f"({max_new_tokens}) = {need} positions")
    if need > cfg.max_seq_len:
        raise ValueError(f"{what} exceed the model's max_seq_len={cfg.max_seq_len}; shorten the "
                         "prompt or ask for fewer tokens")
    if max_len is None:
        # whole 64-slot blocks, the cache tiles of the Pallas decode kernel (mla_decode), so
        # that it can run; the extra slots stay masked
        max_len = min(whole_blocks(need), cfg.max_seq_len)
    if need > max_len:
        raise ValueError(f"{what} exceed the cache length max_len={max_len}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length max_len={max_len} exceeds Config.max_seq_len="
                         f"{cfg.max_seq_len}")
    return rows, max_len


@functools.partial(jit_by_runtime, static_argnames=(
    "cfg", "rt", "max_new", "temperature", "top_k", "top_p", "vocab_limit"))
def _run(params, tokens, lengths, stop, cache, key, *, cfg, rt, max_new, temperature, top_k,
         top_p, vocab_limit=None):
    b = tokens.shape[0]
    params = _model.decode_layout(params, rt)
    first, cache, _ = prefill(params, tokens, lengths, cache, key, cfg, rt, temperature, top_k,
                              top_p, vocab_limit)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop) | (max_new == 1)
    n_out = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, cache, out, tok, done, n_out = state
        logits, cache, _ = _model.forward_cached(params, tok[:, None], cache, cfg, rt,
                                                 absorbed=True,
                                                 n_valid=(~done).astype(jnp.int32))
        nxt = sample(limit_vocab(logits[:, 0], vocab_limit), jax.random.fold_in(key, step),
                     temperature, top_k, top_p)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, step].set(nxt)
        n_out = n_out + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop) | (n_out >= max_new)
        return step + 1, cache, out, nxt, done, n_out

    state = (jnp.int32(1), cache, out, first, done, n_out)
    steps, cache, out, _, _, n_out = jax.lax.while_loop(cond, body, state)
    return out, n_out, {"drafted": jnp.int32(0), "accepted": jnp.int32(0), "steps": steps - 1}


def generate(params: dict, config: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_tokens: Sequence[int] = (), speculative: bool = False,
             max_len: int | None = None, cache_dtype=None, runtime: Runtime | None = None,
             return_stats: bool = False, tokenizer=None, vocab_limit: int | None = None):
    """Generate up to `max_new_tokens` tokens after each prompt; returns the new token-id lists
    (prompt excluded; a row ends with its stop token when it meets one), and with
    `return_stats` also a dict: `drafted` and `accepted` draft tokens and `steps` (forward
    passes of the main model after the prefill).

    prompts: token-id lists of any lengths. temperature 0 = greedy; top_k / top_p restrict the
    sampled set; `seed` makes sampling reproducible. max_len: the cache length (default: the
    longest prompt + max_new_tokens, rounded up to a multiple of 64 within Config.max_seq_len).
    cache_dtype: the latent cache's dtype; None = the compute dtype, so a float32 model decodes
    exactly as its teacher-forced forward; bfloat16 or float16 halve a float32 cache;
    float8_e4m3fn stores the latent in e4m3 with per-token scales and k_rope in bf16 (1.76x
    smaller than bf16 for V3; dsv3_jax/latent_cache.py).
    runtime: how to run the model (`dsv3_jax.runtime`); None resolves the fast paths of this
    process's devices once (`runtime.resolve(config, scan_layers=False)`). Its `scan_layers`
    picks the decode layout: False (the default) runs the layers unrolled over per-layer
    weights and caches (`model.split_layers`; on a GPU a stacked layout copies every layer's
    weights and cache per token), True the stacked, scanned layers (a faster compile for a
    very deep model).
    speculative: draft one token per step with the MTP module and verify it with the main model
    (greedy: the output is the plain greedy output; sampled: standard speculative sampling, the
    same distribution; `dsv3_jax.infer.speculative`).
    tokenizer: any `dsv3_jax.io.tokenizer` tokenizer; with it, prompts may be strings (encoded
    as they are: render a conversation first with `io.chat.tokenize_prompt`) and the outputs
    are then decoded strings; ids at or above its vocab_size are never generated.
    vocab_limit: never generate ids >= this (a checkpoint's embedding padded beyond its
    tokenizer; `sampling.limit_vocab`)."""
    text = any(isinstance(p, str) for p in prompts) if isinstance(prompts, (list, tuple)) else False
    if text:
        if tokenizer is None:
            raise ValueError("text prompts need tokenizer= (e.g. dsv3_jax.io.tokenizer."
                             "ByteTokenizer() or load_tokenizer(folder))")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts mix text and token ids: give one kind")
        prompts = [np.asarray(tokenizer.encode(p)).tolist() for p in prompts]
        out = generate(params, config, prompts, max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                       speculative=speculative, max_len=max_len, cache_dtype=cache_dtype,
                       runtime=runtime, return_stats=return_stats,
                       vocab_limit=min(vocab_limit or tokenizer.vocab_size,
                                       tokenizer.vocab_size))
        outs, stats = out if return_stats else (out, None)
        texts = [tokenizer.decode(o) for o in outs]
        return (texts, stats) if return_stats else texts
    if vocab_limit is not None and vocab_limit >= config.vocab_size:
        vocab_limit = None
    if speculative and vocab_limit is not None:
        raise ValueError("speculative=True with a vocab_limit below the model's vocabulary is "
                         "not supported yet: drop one of them")
    if speculative and config.mtp_depth < 1:
        raise ValueError("speculative=True drafts with the MTP module: Config.mtp_depth is 0")
    check_controls(temperature, top_k, top_p)
    rows, max_len = _validate(prompts, config, max_new_tokens, max_len)
    # unrolled layers over per-layer weights and caches unless a runtime says otherwise
    # (`model.split_layers`: a stacked layout copies weights per token on a GPU)
    rt = (runtime or runtime_lib.resolve(config, scan_layers=False)).for_model(config)
    cache_dtype = rt.dtype if cache_dtype is None else cache_dtype
    lengths = np.array([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    # cast the master weights once, not once per token inside the loop
    params = {**params, "weights": _model.compute_weights(params["weights"], config, rt)}
    cache = _model.init_cache(config, len(rows), max_len, cache_dtype,
                              per_layer=not rt.scan_layers)
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    args = (params, jnp.asarray(tokens), jnp.asarray(lengths), stop, cache, jax.random.key(seed))
    static = dict(cfg=config, rt=rt, max_new=max_new_tokens, temperature=float(temperature),
                  top_k=top_k, top_p=top_p)
    if vocab_limit is not None:
        static["vocab_limit"] = int(vocab_limit)
    if speculative:
        # one slot more than the main cache (the draft's position), in whole 64-slot blocks too
        mtp_cache = spec.empty_mtp_cache(config, len(rows), whole_blocks(max_len + 1),
                                                cache_dtype)
        out, n_out, stats = spec.decode(*args, mtp_cache, None, **static)
    else:
        out, n_out, stats = _run(*args, **static)
    outs = rows_of(out, n_out, stop_tokens, max_new_tokens)
    if return_stats:
        return outs, {k: int(v) for k, v in stats.items()}
    return outs


def rows_of(out, n_out, stop_tokens, max_new) -> list[list[int]]:
    """Per row: the generated tokens up to the budget, cut after the first stop token."""
    out, n_out = np.asarray(out), np.asarray(n_out)
    stops = set(int(t) for t in stop_tokens)
    rows = []
    for i in range(out.shape[0]):
        row = out[i, :min(int(n_out[i]), max_new)].tolist()
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows
