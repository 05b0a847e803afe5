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
   samples the next token, and marks a row done at a stop token or its token budget; the loop
   ends when every row is done.
Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted
to the top_k most likely tokens and to the smallest set whose probability reaches top_p,
sampled with jax.random from `seed` (the same seed gives the same tokens).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model as _model
from dsv3_jax.config import Config


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
           top_p: float | None) -> jax.Array:
    """Next tokens [B] from logits [B, V] (float32)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    masked = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, masked, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass before it is below top_p (the most likely is always kept)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, masked)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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
    longest = max(len(r) for r in rows)
    need = longest + max_new_tokens
    max_len = need if max_len is None else max_len
    if need > max_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {need} exceeds the cache length max_len={max_len}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds Config.max_seq_len={cfg.max_seq_len}")
    return rows, max_len


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "temperature", "top_k", "top_p"))
def _run(params, tokens, lengths, stop, cache, key, *, cfg, max_new, temperature, top_k, top_p):
    b = tokens.shape[0]
    logits, cache, _ = _model.forward_cached(params, tokens, cache, cfg, absorbed=False,
                                             n_valid=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = sample(last, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop) | (max_new == 1)
    n_out = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, cache, out, tok, done, n_out = state
        logits, cache, _ = _model.forward_cached(params, tok[:, None], cache, cfg, absorbed=True,
                                                 n_valid=(~done).astype(jnp.int32))
        nxt = sample(logits[:, 0], jax.random.fold_in(key, step), temperature, top_k, top_p)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, step].set(nxt)
        n_out = n_out + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop) | (n_out >= max_new)
        return step + 1, cache, out, nxt, done, n_out

    state = (jnp.int32(1), cache, out, first, done, n_out)
    _, cache, out, _, _, n_out = jax.lax.while_loop(cond, body, state)
    return out, n_out


def generate(params: dict, config: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_tokens: Sequence[int] = (), speculative: bool = False,
             max_len: int | None = None, cache_dtype=jnp.bfloat16) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens after each prompt; returns the new token-id lists
    (prompt excluded; a row ends with its stop token when it meets one).

    prompts: token-id lists of any lengths. temperature 0 = greedy; top_k / top_p restrict the
    sampled set; `seed` makes sampling reproducible. max_len: the cache length (default: the
    longest prompt + max_new_tokens). cache_dtype: the latent cache's dtype."""
    if speculative:
        raise NotImplementedError("speculative=True (MTP speculative decoding) is not built yet")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    rows, max_len = _validate(prompts, config, max_new_tokens, max_len)
    lengths = np.array([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    # cast the master weights once, not once per token inside the loop
    params = {**params, "weights": _model.compute_weights(params["weights"], config)}
    cache = _model.init_cache(config, len(rows), max_len, cache_dtype)
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    out, n_out = _run(params, jnp.asarray(tokens), jnp.asarray(lengths), stop, cache,
                      jax.random.key(seed), cfg=config, max_new=max_new_tokens,
                      temperature=float(temperature), top_k=top_k, top_p=top_p)
    out, n_out = np.asarray(out), np.asarray(n_out)
    return [out[i, :n_out[i]].tolist() for i in range(len(rows))]
