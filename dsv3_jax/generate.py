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

from dsv3_jax import latent_cache
from dsv3_jax import model as _model
from dsv3_jax.config import Config


def _filtered_logits(logits: jax.Array, temperature: float, top_k: int | None,
                     top_p: float | None) -> jax.Array:
    """logits / temperature with the tokens outside top_k and outside the top_p mass masked."""
    logits = logits / temperature
    masked = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, masked, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # keep a token if the mass before it is below top_p (the most likely is always kept)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, masked)
    return logits


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
           top_p: float | None) -> jax.Array:
    """Next tokens [B] from logits [B, V] (float32)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, _filtered_logits(logits, temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)


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
    if max_len is None:
        # whole 64-slot blocks, the cache tiles of the Pallas decode kernel (mla_decode), so
        # that decode_attention_impl "auto" can use it; the extra slots stay masked
        max_len = min(_whole_blocks(need), max(cfg.max_seq_len, need))
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
             max_len: int | None = None, cache_dtype=jnp.bfloat16,
             _draft_oracle=None) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens after each prompt; returns the new token-id lists
    (prompt excluded; a row ends with its stop token when it meets one).

    prompts: token-id lists of any lengths. temperature 0 = greedy; top_k / top_p restrict the
    sampled set; `seed` makes sampling reproducible. max_len: the cache length (default: the
    longest prompt + max_new_tokens, rounded up to a multiple of 64 within Config.max_seq_len).
    cache_dtype: the latent cache's dtype: float32, bfloat16, float16, or float8_e4m3fn (the
    latent in e4m3 with per-token scales, k_rope in bf16: 1.76x smaller than bf16 for V3;
    dsv3_jax/latent_cache.py).
    speculative: draft one token per step with the MTP module and verify it with the main model
    (greedy: the output is the plain greedy output; sampled: standard speculative sampling, the
    same distribution); `LAST_STATS` then holds the drafted / accepted counts.
    `_draft_oracle` (tests only): [B, >= max_new_tokens + 2] token ids drafted instead."""
    if speculative and config.mtp_depth < 1:
        raise ValueError("speculative=True drafts with the MTP module: Config.mtp_depth is 0")
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
    args = (params, jnp.asarray(tokens), jnp.asarray(lengths), stop, cache, jax.random.key(seed))
    static = dict(cfg=config, max_new=max_new_tokens, temperature=float(temperature), top_k=top_k,
                  top_p=top_p)
    if not speculative:
        out, n_out = _run(*args, **static)
        return _rows(out, n_out, stop_tokens, max_new_tokens)
    # one slot more than the main cache (the draft's position), in whole 64-slot blocks too
    mtp_cache = _mtp_cache(config, len(rows), _whole_blocks(max_len + 1), cache_dtype)
    oracle = None if _draft_oracle is None else jnp.asarray(_draft_oracle, jnp.int32)
    out, n_out, stats = _run_speculative(*args, mtp_cache, oracle, **static)
    LAST_STATS.clear()
    LAST_STATS.update({k: int(v) for k, v in stats.items()})
    return _rows(out, n_out, stop_tokens, max_new_tokens)


CACHE_BLOCK = 64  # default cache lengths are multiples of this (the decode kernel's key block)


def _whole_blocks(n: int) -> int:
    """n rounded up to whole CACHE_BLOCKs."""
    return -(-n // CACHE_BLOCK) * CACHE_BLOCK

# Draft statistics of the last speculative `generate` call: drafted and accepted tokens, and
# verification steps (forward passes of the main model after the prefill).
LAST_STATS: dict = {}


def _rows(out, n_out, stop_tokens, max_new) -> list[list[int]]:
    """Per row: the generated tokens up to the budget, cut after the first stop token."""
    out, n_out = np.asarray(out), np.asarray(n_out)
    stops = set(int(t) for t in stop_tokens)
    rows = []
    for i in range(out.shape[0]):
        row = out[i, :min(int(n_out[i]), max_new)].tolist()
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


# --------------------------------------------------------------------------------------------
# MTP speculative decoding ([PAPER] §2.2 and §5.4.3: the MTP module drafts the token after next)
# --------------------------------------------------------------------------------------------
#
# Module 0 at position i combines the main model's normalised hidden state h_i with the
# embedding of token i+1 and predicts token i+2. Each verification step feeds the main model two
# tokens at positions p, p+1: x (the last accepted token, not yet cached) and the draft d for
# p+1. Its logits at p give the main model's own token for p+1:
#   agreed (greedy: it equals d; sampled: accepted with probability min(1, P(d) / Q(d))):
#       d is kept and the logits at p+1 give a bonus token for p+2: two tokens for one pass;
#   otherwise: the main model's token for p+1 (sampled from max(P - Q, 0) when sampling) is kept
#       and the cache keeps one new position: slot p+1 holds d's latent, masked and overwritten
#       later (cache slot s holds position s, so rolling back is the length alone).
# The MTP module then runs over the newly settled positions (its own latent cache, filled by the
# prefill over the prompt), and its output at the last one drafts the next token.


def _mtp_cache(cfg: Config, batch: int, max_len: int, dtype) -> dict:
    return {"length": jnp.zeros((batch,), jnp.int32),
            **latent_cache.empty(cfg, (batch,), max_len, dtype)}


def _mtp_step(params, hidden, next_tokens, mtp_cache, n_valid, cfg: Config, absorbed: bool):
    """Module 0 over positions mtp_cache.length + t: hidden [B, T, D] (main, normalised), the
    tokens one ahead [B, T] -> (draft logits [B, T, V], new MTP cache)."""
    w = params["weights"]
    lp = jax.tree.map(lambda a: a[0], w["mtp"])
    bias = _model._stack_bias(params, "mtp")
    t = next_tokens.shape[1]
    positions = mtp_cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    ctx = _model._context(cfg, positions, None, jnp.ones(next_tokens.shape, bool), None,
                          with_mask=False)
    e = _model.embed(w["embed"], next_tokens)
    x = jnp.concatenate([_model.rms_norm(e, lp["enorm"], cfg.rms_norm_eps),
                         _model.rms_norm(hidden, lp["hnorm"], cfg.rms_norm_eps)], axis=-1)
    x = jnp.einsum("btp,pd->btd", x, lp["eh_proj"])
    layer_cache = {k: v for k, v in mtp_cache.items() if k != "length"}
    x, _, new = _model.block(lp, x, ctx, cfg, None if bias is None else bias[0], None,
                             layer_cache, absorbed)
    h = _model.rms_norm(x, lp["final_norm"], cfg.rms_norm_eps)
    logits = _model._logits(h, w["head"], None)
    return logits, {**new, "length": mtp_cache["length"] + n_valid}


def _probs(logits, temperature, top_k, top_p):
    """The distribution `sample` draws from, as probabilities [B, V]."""
    return jax.nn.softmax(_filtered_logits(logits, temperature, top_k, top_p), axis=-1)


def _verify(logits_p, logits_p1, draft, q_draft, key, temperature, top_k, top_p):
    """(accepted [B] bool, token for p+1 [B], bonus token for p+2 [B])."""
    if temperature == 0.0:
        main_tok = jnp.argmax(logits_p, -1).astype(jnp.int32)
        return main_tok == draft, main_tok, jnp.argmax(logits_p1, -1).astype(jnp.int32)
    k_acc, k_res, k_bonus = jax.random.split(key, 3)
    p = _probs(logits_p, temperature, top_k, top_p)
    rows = jnp.arange(draft.shape[0])
    ratio = p[rows, draft] / jnp.maximum(q_draft[rows, draft], 1e-30)
    accepted = jax.random.uniform(k_acc, ratio.shape) < ratio
    residual = jnp.maximum(p - q_draft, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    fixed = jax.random.categorical(k_res, jnp.log(residual), axis=-1).astype(jnp.int32)
    bonus = sample(logits_p1, k_bonus, temperature, top_k, top_p)
    return accepted, jnp.where(accepted, draft, fixed), bonus


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "temperature", "top_k", "top_p"))
def _run_speculative(params, tokens, lengths, stop, cache, key, mtp_cache, oracle, *, cfg,
                     max_new, temperature, top_k, top_p):
    """`oracle` (tests only): [B, max_new + 2] tokens to draft instead of the MTP module's."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    logits, cache, aux = _model.forward_cached(params, tokens, cache, cfg, absorbed=False,
                                               n_valid=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = sample(last, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    # MTP prefill: positions 0 .. len-1 with the tokens one ahead (the first generated at len-1)
    ahead = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    ahead = ahead.at[rows, lengths - 1].set(first)
    draft_logits, mtp_cache = _mtp_step(params, aux["hidden"], ahead, mtp_cache, lengths, cfg,
                                        absorbed=False)
    draft_logits = jnp.take_along_axis(draft_logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def draft_from(logits_d, step, n_out):
        if oracle is not None:  # the token n_out positions into the generation
            return oracle[rows, n_out], jax.nn.one_hot(oracle[rows, n_out], logits_d.shape[-1])
        if temperature == 0.0:
            return jnp.argmax(logits_d, -1).astype(jnp.int32), None
        q = _probs(logits_d, temperature, top_k, top_p)
        k = jax.random.fold_in(jax.random.fold_in(key, step), 1)
        return jax.random.categorical(k, jnp.log(q), axis=-1).astype(jnp.int32), q

    out = jnp.zeros((b, max_new + 2), jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((b,), jnp.int32)
    done = jnp.isin(first, stop) | (max_new == 1)
    draft, q = draft_from(draft_logits, 0, n_out)
    stats = {"drafted": jnp.int32(0), "accepted": jnp.int32(0), "steps": jnp.int32(0)}

    def cond(state):
        return ~jnp.all(state[5])

    def body(state):
        step, cache, mtp_cache, out, x, done, n_out, draft, q, stats = state
        live = (~done).astype(jnp.int32)
        pair = jnp.stack([x, draft], axis=1)  # positions p, p + 1
        logits, new_cache, aux = _model.forward_cached(params, pair, cache, cfg, absorbed=True,
                                                       n_valid=2 * live)
        k = jax.random.fold_in(jax.random.fold_in(key, step), 2)
        accepted, tok1, bonus = _verify(logits[:, 0], logits[:, 1], draft, q, k, temperature,
                                        top_k, top_p)
        accepted = accepted & ~done
        kept = jnp.where(accepted, 2, 1) * live  # new tokens this step
        cache = {**new_cache, "length": cache["length"] + kept}
        out = out.at[rows, n_out].set(jnp.where(done, out[rows, n_out], tok1))
        out = out.at[rows, n_out + 1].set(jnp.where(accepted, bonus, out[rows, n_out + 1]))
        # MTP over the settled positions p (next token tok1) and, if accepted, p + 1 (bonus)
        d_logits, mtp_new = _mtp_step(params, aux["hidden"], jnp.stack([tok1, bonus], 1),
                                      mtp_cache, kept, cfg, absorbed=True)
        mtp_cache = mtp_new
        d_logits = jnp.where(accepted[:, None], d_logits[:, 1], d_logits[:, 0])
        emitted_stop = jnp.isin(tok1, stop) | (accepted & jnp.isin(bonus, stop))
        n_out = n_out + kept
        done = done | emitted_stop | (n_out >= max_new)
        nxt_x = jnp.where(accepted, bonus, tok1)
        draft, q = draft_from(d_logits, step, n_out)
        stats = {"drafted": stats["drafted"] + live.sum(),
                 "accepted": stats["accepted"] + accepted.sum(), "steps": stats["steps"] + 1}
        return step + 1, cache, mtp_cache, out, nxt_x, done, n_out, draft, q, stats

    state = (jnp.int32(1), cache, mtp_cache, out, first, done, n_out, draft, q, stats)
    state = jax.lax.while_loop(cond, body, state)
    return state[3], state[6], state[9]
