"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
top_k most likely tokens and to the smallest set whose probability reaches top_p, sampled with
`jax.random` (the same key gives the same tokens). `probs` is the same distribution as
probabilities, which speculative sampling needs for its acceptance test.
"""

import jax
import jax.numpy as jnp


def limit_vocab(logits: jax.Array, vocab_limit: int | None) -> jax.Array:
    """Logits [..., V] with ids >= vocab_limit masked out (never sampled, zero probability):
    checkpoints pad the embedding beyond their tokenizer's vocabulary (DeepSeek-V3: 129,280
    rows for a smaller tokenizer), and an id the tokenizer cannot decode must not be drawn."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(ids < vocab_limit, logits, jnp.finfo(logits.dtype).min)


def filtered_logits(logits: jax.Array, temperature: float, top_k: int | None,
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
    return jax.random.categorical(key, filtered_logits(logits, temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)


def probs(logits: jax.Array, temperature: float, top_k: int | None,
          top_p: float | None) -> jax.Array:
    """The distribution `sample` draws from, as probabilities [B, V]."""
    return jax.nn.softmax(filtered_logits(logits, temperature, top_k, top_p), axis=-1)


def check_controls(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Sampling controls at the API boundary: errors that name the argument."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
