"""MTP speculative decoding ([PAPER] §2.2 and §5.4.3: the MTP module drafts the token after next).

Module 0 at position i combines the main model's normalised hidden state h_i with the
embedding of token i+1 and predicts token i+2 (`dsv3_jax.mtp.mtp_module`, the same function
training runs). Each verification step feeds the main model two tokens at positions p, p+1: x
(the last accepted token, not yet cached) and the draft d for p+1. Its logits at p give the
main model's own token for p+1:
  agreed (greedy: it equals d; sampled: accepted with probability min(1, P(d) / Q(d))):
      d is kept and the logits at p+1 give a bonus token for p+2: two tokens for one pass;
  otherwise: the main model's token for p+1 (sampled from max(P - Q, 0) when sampling) is kept
      and the cache keeps one new position: slot p+1 holds d's latent, masked and overwritten
      later (cache slot s holds position s, so rolling back is the length alone).
The MTP module then runs over the newly settled positions (its own latent cache, filled by the
prefill over the prompt), and its output at the last one drafts the next token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv3_jax import latent_cache
from dsv3_jax import model as _model
from dsv3_jax.config import Config
from dsv3_jax.infer.prefill import prefill
from dsv3_jax.infer.sampling import probs, sample
from dsv3_jax.mtp import mtp_module
from dsv3_jax.runtime import Runtime, jit_by_runtime


def empty_mtp_cache(cfg: Config, batch: int, max_len: int, dtype) -> dict:
    """The MTP module's own latent cache (one layer) with its per-row lengths."""
    return {"length": jnp.zeros((batch,), jnp.int32),
            **latent_cache.empty(cfg, (batch,), max_len, dtype)}


def draft_step(params, hidden, next_tokens, mtp_cache, n_valid, cfg: Config, rt: Runtime,
               absorbed: bool):
    """Module 0 over positions mtp_cache.length + t: hidden [B, T, D] (main, normalised), the
    tokens one ahead [B, T] -> (draft logits [B, T, V], new MTP cache). `params["weights"]`
    are already in the compute dtype."""
    w = params["weights"]
    lp = jax.tree.map(lambda a: a[0], w["mtp"])
    bias = _model.stack_bias(params, "mtp")
    t = next_tokens.shape[1]
    positions = mtp_cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    ctx = _model.context(cfg, rt, positions, None, jnp.ones(next_tokens.shape, bool), None,
                         with_mask=False)
    layer_cache = {k: v for k, v in mtp_cache.items() if k != "length"}
    logits, _, _, new = mtp_module(lp, w, hidden, next_tokens, ctx, cfg,
                                   None if bias is None else bias[0], None, layer_cache, absorbed)
    return logits, {**new, "length": mtp_cache["length"] + n_valid}


def verify(logits_p, logits_p1, draft, q_draft, key, temperature, top_k, top_p):
    """(accepted [B] bool, token for p+1 [B], bonus token for p+2 [B])."""
    if temperature == 0.0:
        main_tok = jnp.argmax(logits_p, -1).astype(jnp.int32)
        return main_tok == draft, main_tok, jnp.argmax(logits_p1, -1).astype(jnp.int32)
    k_acc, k_res, k_bonus = jax.random.split(key, 3)
    p = probs(logits_p, temperature, top_k, top_p)
    rows = jnp.arange(draft.shape[0])
    ratio = p[rows, draft] / jnp.maximum(q_draft[rows, draft], 1e-30)
    accepted = jax.random.uniform(k_acc, ratio.shape) < ratio
    residual = jnp.maximum(p - q_draft, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    fixed = jax.random.categorical(k_res, jnp.log(residual), axis=-1).astype(jnp.int32)
    bonus = sample(logits_p1, k_bonus, temperature, top_k, top_p)
    return accepted, jnp.where(accepted, draft, fixed), bonus


@functools.partial(jit_by_runtime, static_argnames=(
    "cfg", "rt", "max_new", "temperature", "top_k", "top_p"))
def decode(params, tokens, lengths, stop, cache, key, mtp_cache, forced_drafts, *, cfg, rt,
           max_new, temperature, top_k, top_p):
    """Prefill + the speculative decode loop (see the module docstring) in one jit. Returns
    (out [B, max_new + 2], tokens per row [B], {drafted, accepted, steps}).

    `forced_drafts` (tests only, else None): [B, >= max_new + 2] token ids drafted instead of
    the MTP module's, so that a test can force every draft to be accepted or rejected."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    params = _model.decode_layout(params, rt)
    first, cache, aux = prefill(params, tokens, lengths, cache, key, cfg, rt, temperature, top_k,
                                top_p)
    # MTP prefill: positions 0 .. len-1 with the tokens one ahead (the first generated at len-1)
    ahead = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    ahead = ahead.at[rows, lengths - 1].set(first)
    draft_logits, mtp_cache = draft_step(params, aux["hidden"], ahead, mtp_cache, lengths, cfg,
                                         rt, absorbed=False)
    draft_logits = jnp.take_along_axis(draft_logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def draft_from(logits_d, step, n_out):
        if forced_drafts is not None:  # the token n_out positions into the generation
            tok = forced_drafts[rows, n_out]
            return tok, jax.nn.one_hot(tok, logits_d.shape[-1])
        if temperature == 0.0:
            return jnp.argmax(logits_d, -1).astype(jnp.int32), None
        q = probs(logits_d, temperature, top_k, top_p)
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
        logits, new_cache, aux = _model.forward_cached(params, pair, cache, cfg, rt,
                                                       absorbed=True, n_valid=2 * live)
        k = jax.random.fold_in(jax.random.fold_in(key, step), 2)
        accepted, tok1, bonus = verify(logits[:, 0], logits[:, 1], draft, q, k, temperature,
                                       top_k, top_p)
        accepted = accepted & ~done
        kept = jnp.where(accepted, 2, 1) * live  # new tokens this step
        cache = {**new_cache, "length": cache["length"] + kept}
        out = out.at[rows, n_out].set(jnp.where(done, out[rows, n_out], tok1))
        out = out.at[rows, n_out + 1].set(jnp.where(accepted, bonus, out[rows, n_out + 1]))
        # MTP over the settled positions p (next token tok1) and, if accepted, p + 1 (bonus)
        d_logits, mtp_cache = draft_step(params, aux["hidden"], jnp.stack([tok1, bonus], 1),
                                         mtp_cache, kept, cfg, rt, absorbed=True)
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
