"""dsv3-jax: DeepSeek-V3 in JAX, pure functions over parameter pytrees.

Public API (external tools call exactly these):
    get_config(name)                      -> Config      presets: v3_671b, v2_236b, v2_lite_16b, tiny, small
    resolve_runtime(config, ...)          -> Runtime     compute dtype, remat, kernels for these devices
    init_params(config, key)              -> params      {"weights": ..., "router_state": ...}
    load_hf_checkpoint(path, dtype=...)   -> (config, params)
    forward(params, tokens, config)       -> (logits [B, T, V], aux)
    loss_fn(params, batch, config)        -> (loss, metrics)
    init_cache / forward_cached / generate: decoding over the latent cache

Every function that runs the model takes `runtime=` (a `Runtime`); without one it uses
`runtime.default(config)`, the fast paths of this process's devices, resolved once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model as _model
from dsv3_jax import runtime as _runtime
from dsv3_jax.config import PRESETS, Config, get_config
from dsv3_jax.infer.generate import generate
from dsv3_jax.io.hf import load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.model import cache_bytes_per_token, init_cache
from dsv3_jax.params import abstract_params, init_params, logical_axes_tree, split_state
from dsv3_jax.router import update_router_bias
from dsv3_jax.runtime import Fp8, Runtime
from dsv3_jax.runtime import resolve as resolve_runtime
from dsv3_jax.train.loss import LossWeights
from dsv3_jax.train.loss import loss_fn as _loss_fn

__all__ = [
    "Config", "PRESETS", "get_config", "Runtime", "Fp8", "resolve_runtime", "init_params",
    "abstract_params", "logical_axes_tree", "split_state", "load_hf_checkpoint",
    "save_hf_checkpoint", "forward", "forward_cached", "init_cache", "cache_bytes_per_token",
    "loss_fn", "LossWeights", "update_router_bias", "validate_tokens", "generate",
]


def validate_tokens(tokens, config: Config, *, name: str = "tokens"):
    """Check token ids [B, T] at the API boundary: integer dtype, 2-D, non-empty, within the
    vocabulary and the model's positions. Tracers pass through (inside jit an out-of-range id
    turns its logits into NaN instead: see `layers.embed`)."""
    if isinstance(tokens, jax.core.Tracer):
        return tokens
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [batch, seq] token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.shape[1] > config.max_seq_len:
        raise ValueError(f"{name} has {arr.shape[1]} positions, above Config.max_seq_len="
                         f"{config.max_seq_len}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(arr == bad)[0])
        raise ValueError(f"{name}{list(where)} = {bad} is outside the vocabulary "
                         f"[0, {config.vocab_size})")
    return jnp.asarray(arr, jnp.int32)


def _runtime_for(config: Config, runtime: Runtime | None) -> Runtime:
    return runtime if runtime is not None else _runtime.default(config)


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "collect_hidden", "shard"))
def _forward_jit(params, tokens, cfg, rt, positions, segment_ids, forced_experts, collect_hidden,
                 shard):
    return _model.forward(params, tokens, cfg, rt, positions=positions, segment_ids=segment_ids,
                          forced_experts=forced_experts, collect_hidden=collect_hidden,
                          shard=shard)


def forward(params: dict, tokens, config: Config, *, runtime: Runtime | None = None,
            positions=None, segment_ids=None, forced_experts: dict | None = None,
            collect_hidden: bool = False, shard=None):
    """Main-model logits [B, T, V] (float32) and an aux dict (see `model.forward`), jitted;
    `shard` (a `sharding.context.ShardingContext`) runs it on a mesh."""
    tokens = validate_tokens(tokens, config)
    return _forward_jit(params, tokens, config, _runtime_for(config, runtime), positions,
                        segment_ids, forced_experts, collect_hidden, shard)


def loss_fn(params: dict, batch: dict, config: Config, *, runtime: Runtime | None = None,
            weights: LossWeights = LossWeights(), forced_experts: dict | None = None, shard=None):
    """(total loss, metrics) for a batch (see `dsv3_jax.train.loss.loss_fn`). Traceable: call
    it inside `jax.jit` / `jax.grad`."""
    return _loss_fn(params, batch, config, _runtime_for(config, runtime), weights=weights,
                    forced_experts=forced_experts, shard=shard)


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "absorbed", "shard"))
def _forward_cached_jit(params, tokens, cache, cfg, rt, absorbed, n_valid, shard):
    return _model.forward_cached(params, tokens, cache, cfg, rt, absorbed=absorbed,
                                 n_valid=n_valid, shard=shard)


def forward_cached(params: dict, tokens, cache: dict, config: Config, *,
                   runtime: Runtime | None = None, absorbed: bool = True, n_valid=None,
                   shard=None):
    """(logits, new cache, aux) for tokens continuing each cached sequence (see
    `model.forward_cached`); raises if the tokens would run past the cache."""
    tokens = validate_tokens(tokens, config)
    stack = next(k for k in ("dense_layers", "moe_layers") if k in cache)
    room = cache[stack]["c_kv"].shape[2]
    if not isinstance(cache["length"], jax.core.Tracer):
        end = int(np.max(np.asarray(cache["length"]))) + tokens.shape[1]
        if end > room:
            raise ValueError(f"{tokens.shape[1]} new tokens after {end - tokens.shape[1]} cached "
                             f"ones exceed the cache length {room}")
    return _forward_cached_jit(params, tokens, cache, config, _runtime_for(config, runtime),
                               absorbed, n_valid, shard)
