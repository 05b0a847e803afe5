"""The first pass of every generation: the prompts through the expanded MLA path into the latent
cache, and the first token sampled from each prompt's last position."""

import jax
import jax.numpy as jnp

from dsv3_jax import model as _model
from dsv3_jax.config import Config
from dsv3_jax.infer.sampling import limit_vocab, sample
from dsv3_jax.runtime import Runtime

CACHE_BLOCK = 64  # default cache lengths are multiples of this (the decode kernel's key block)


def whole_blocks(n: int) -> int:
    """n rounded up to whole CACHE_BLOCKs."""
    return -(-n // CACHE_BLOCK) * CACHE_BLOCK


def prefill(params, tokens, lengths, cache, key, cfg: Config, rt: Runtime, temperature, top_k,
            top_p, vocab_limit=None):
    """The prompts through the expanded path into the cache. Returns (first sampled tokens [B],
    cache, aux of the pass: its `hidden` feeds the MTP drafter)."""
    logits, cache, aux = _model.forward_cached(params, tokens, cache, cfg, rt, absorbed=False,
                                               n_valid=lengths)
    last = limit_vocab(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0],
                       vocab_limit)
    return sample(last, jax.random.fold_in(key, 0), temperature, top_k, top_p), cache, aux
