"""Rollouts for reinforcement learning: batched sampling over the latent cache that also keeps,
for every sampled token, its log-probability under the sampling engine and, on request, the
experts each token was routed to.

    roll = rollout(params, cfg, prompts, max_new_tokens, temperature=1.0, top_p=..., seed=...)
    roll.tokens [N, M], roll.n_tokens [N], roll.logprobs [N, M], roll.routing [L, N, P + M, A]

It is `generate`'s engine (one jitted program: prefill on the expanded MLA path, then a
`lax.while_loop` of absorbed decode steps), with three differences that GRPO needs:
- prompts are right-padded to a fixed `prompt_len`, so every step of a run has one shape and
  compiles once;
- `logprobs[i, j]` = log softmax(logits / temperature)[token j] as the engine computed it
  (absorbed attention, the cache's dtype): the trainer compares it with its own forward (the
  expanded path) to measure and correct the mismatch (truncated importance sampling, as TRL
  does for vLLM). Like TRL, it is the tempered distribution before top-k/top-p filtering;
- `routing` (with `record_routing=True`) holds the experts chosen for every token of
  prompt + completion at the token's position in the row [prompt, completion, padding], in
  the layout of `forward(..., forced_experts={"moe_layers": ...})`: the training forward can
  replay the rollout's routing (routing replay, R3) instead of re-deciding it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model as _model
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import Config
from dsv3_jax.infer.prefill import whole_blocks
from dsv3_jax.infer.sampling import check_controls, limit_vocab, sample
from dsv3_jax.runtime import Runtime, jit_by_runtime


@dataclasses.dataclass
class Rollout:
    """Host (numpy) arrays of one rollout batch."""
    prompt_tokens: np.ndarray  # [N, P] int32, right-padded with 0
    prompt_lengths: np.ndarray  # [N]
    tokens: np.ndarray  # [N, M] int32 completion tokens (0 after a row's end)
    n_tokens: np.ndarray  # [N] completion length, a stop token included
    stopped: np.ndarray  # [N] bool: ended with a stop token (else truncated at M)
    logprobs: np.ndarray  # [N, M] float32 engine log-probs of the sampled tokens (0 past the end)
    routing: np.ndarray | None  # [L_moe, N, P + M, A] int32, or None

    def completions(self) -> list[list[int]]:
        return [self.tokens[i, :n].tolist() for i, n in enumerate(self.n_tokens)]


def _logprob(logits, tokens, temperature):
    """log p(token) under softmax(logits / temperature) (temperature 0: the raw logits)."""
    t = temperature if temperature > 0 else 1.0
    return jnp.take_along_axis(jax.nn.log_softmax(logits / t, axis=-1), tokens[:, None],
                               axis=-1)[:, 0]


@functools.partial(jit_by_runtime, static_argnames=(
    "cfg", "rt", "max_new", "temperature", "top_k", "top_p", "record_routing", "vocab_limit"))
def _run(params, tokens, lengths, stop, cache, key, *, cfg, rt, max_new, temperature, top_k,
         top_p, record_routing, vocab_limit):
    b, p = tokens.shape
    params = _model.decode_layout(params, rt)
    logits, cache, aux = _model.forward_cached(params, tokens, cache, cfg, rt, absorbed=False,
                                               n_valid=lengths)
    last = limit_vocab(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0],
                       vocab_limit)
    first = sample(last, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
    lp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(_logprob(last, first, temperature))
    routing = None
    if record_routing:
        pre = aux["indices"]["moe_layers"]  # [L, B, P, A]
        routing = jnp.zeros(pre.shape[:2] + (p + max_new,) + pre.shape[3:], jnp.int32)
        routing = routing.at[:, :, :p].set(pre.astype(jnp.int32))
    done = jnp.isin(first, stop) | (max_new == 1)
    n_out = jnp.ones((b,), jnp.int32)
    rows = jnp.arange(b)

    def cond(state):
        return (state[0] < max_new) & ~jnp.all(state[4])

    def body(state):
        step, cache, out, tok, done, n_out, lp, routing = state
        logits, cache, aux = _model.forward_cached(params, tok[:, None], cache, cfg, rt,
                                                   absorbed=True,
                                                   n_valid=(~done).astype(jnp.int32))
        step_logits = limit_vocab(logits[:, 0], vocab_limit)
        nxt = sample(step_logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, step].set(nxt)
        lp = lp.at[:, step].set(jnp.where(done, 0.0, _logprob(step_logits, nxt, temperature)))
        if routing is not None:
            # the token fed at this step is completion token step-1, at position length + step-1
            pos = jnp.where(done, p + max_new - 1, lengths + step - 1)
            new = aux["indices"]["moe_layers"][:, :, 0].astype(jnp.int32)  # [L, B, A]
            old = routing[:, rows, pos]
            routing = routing.at[:, rows, pos].set(jnp.where(done[None, :, None], old, new))
        n_out = n_out + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop) | (n_out >= max_new)
        return step + 1, cache, out, nxt, done, n_out, lp, routing

    state = (jnp.int32(1), cache, out, first, done, n_out, lp, routing)
    _, _, out, _, _, n_out, lp, routing = jax.lax.while_loop(cond, body, state)
    return out, n_out, lp, routing


def pad_prompts(prompts: Sequence[Sequence[int]], prompt_len: int, vocab_size: int):
    """[N, prompt_len] right-padded int32 tokens and lengths; errors name the prompt."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if not len(prompts) or lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    if lengths.max() > prompt_len:
        i = int(lengths.argmax())
        raise ValueError(f"prompt {i} has {lengths[i]} tokens, more than the prompt length "
                         f"{prompt_len} (--max_prompt_len)")
    tokens = np.zeros((len(prompts), prompt_len), np.int32)
    for i, p in enumerate(prompts):
        row = np.asarray(p, np.int64)
        if row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"prompt {i} holds a token id outside [0, {vocab_size})")
        tokens[i, :len(row)] = row
    return tokens, lengths


def rollout(params: dict, cfg: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
            prompt_len: int | None = None, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
            record_routing: bool = False, cache_dtype=None, runtime: Runtime | None = None,
            compute_weights: bool = True, vocab_limit: int | None = None) -> Rollout:
    """Sample a completion of up to `max_new_tokens` after each prompt (see the module
    docstring). prompt_len: the padded prompt length (default: the longest prompt), fixed by
    callers that want one compiled shape. compute_weights=False when `params["weights"]` are
    already cast for the runtime (saves a cast per call). vocab_limit: ids >= it are never
    sampled and the log-probs are over the ids below it (`sampling.limit_vocab`; the trainer
    must score with the same limit)."""
    check_controls(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if record_routing and not cfg.n_moe_layers:
        raise ValueError("record_routing=True: the model has no MoE layers to record")
    prompt_len = prompt_len or max(len(p) for p in prompts)
    tokens, lengths = pad_prompts(prompts, prompt_len, cfg.vocab_size)
    need = prompt_len + max_new_tokens
    if need > cfg.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceed "
                         f"the model's max_seq_len {cfg.max_seq_len}")
    # decoding runs unrolled layers over per-layer weights and caches, whatever the training
    # step's layer loop (`model.split_layers`: a stacked layout copies weights per token)
    rt = (runtime or runtime_lib.resolve(cfg)).for_model(cfg).replace(scan_layers=False)
    if compute_weights:
        params = {**params, "weights": _model.compute_weights(params["weights"], cfg, rt)}
    max_len = min(whole_blocks(need), cfg.max_seq_len)
    cache = _model.init_cache(cfg, len(prompts), max_len, rt.dtype if cache_dtype is None
                              else cache_dtype, per_layer=True)
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    out, n_out, lp, routing = _run(
        params, jnp.asarray(tokens), jnp.asarray(lengths), stop, cache, jax.random.key(seed),
        cfg=cfg, rt=rt, max_new=max_new_tokens, temperature=float(temperature), top_k=top_k,
        top_p=top_p, record_routing=record_routing,
        vocab_limit=None if vocab_limit is None or vocab_limit >= cfg.vocab_size
        else int(vocab_limit))
    out, n_out, lp = np.asarray(out), np.asarray(n_out), np.asarray(lp)
    stops = np.asarray(list(stop_tokens), np.int32)
    last = out[np.arange(len(out)), np.maximum(n_out - 1, 0)]
    return Rollout(prompt_tokens=tokens, prompt_lengths=lengths, tokens=out, n_tokens=n_out,
                   stopped=np.isin(last, stops), logprobs=lp,
                   routing=None if routing is None else np.asarray(routing))
