"""Placing the model state and batches on a mesh (the model side of sharding/).

The specs come from the parameter declarations' logical names (`params.logical_axes_tree`)
through the strategy's parameter table (`sharding.rules`); nothing is replicated unless its
declaration says so (`Decl.replicated`: norm gains and the router bias).
"""

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.config import Config
from dsv3_jax.params import abstract_params, fact_tree, init_tree, logical_axes_tree, shapes_key
from sharding.context import ShardingContext


def param_specs(cfg: Config, shard: ShardingContext) -> dict:
    """PartitionSpec tree of the model state (same structure as `init_params`)."""
    return shard.param_specs(abstract_params(cfg), logical_axes_tree(cfg),
                             fact_tree(cfg, "replicated"))


def param_shardings(cfg: Config, shard: ShardingContext) -> dict:
    return jax.tree.map(shard.named, param_specs(cfg, shard), is_leaf=lambda x: isinstance(x, P))


def optimizer_specs(cfg: Config, shard: ShardingContext) -> dict:
    """PartitionSpec tree, like the weights', of how their optimizer moments (and the update)
    are split: the strategy's optimizer table (ZeRO-1: finer than the weights)."""
    return shard.optimizer_specs(abstract_params(cfg)["weights"], logical_axes_tree(cfg)["weights"],
                                 fact_tree(cfg, "replicated")["weights"])


def optimizer_shardings(cfg: Config, shard: ShardingContext) -> dict:
    return jax.tree.map(shard.named, optimizer_specs(cfg, shard), is_leaf=lambda x: isinstance(x, P))


def place(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds whole: each device takes its slice, so
    this works on meshes that span several processes."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: dict, cfg: Config, shard: ShardingContext) -> dict:
    """Move an existing state (the same on every process) onto the mesh."""
    return jax.tree.map(place, params, param_shardings(cfg, shard))


def init_params_sharded(cfg: Config, key: jax.Array, shard: ShardingContext) -> dict:
    """`init_params` computed directly into its shards: each device draws only its part (per-leaf
    keys with partitionable threefry), so no device ever holds the whole state."""
    fn = jax.jit(functools.partial(init_tree, shapes_key(cfg)),
                 out_shardings=param_shardings(cfg, shard))
    return fn(key, np.float32(cfg.init_std))


def batch_sharding(shard: ShardingContext, ndim: int = 2) -> NamedSharding:
    """[B, ...] arrays split over the strategy's batch axes."""
    return shard.named(P(shard.batch_axes or None, *([None] * (ndim - 1))))


def shard_batch(batch: dict, shard: ShardingContext) -> dict:
    """Split a global batch (the same on every process) over the batch axes."""
    return {k: place(v, batch_sharding(shard, np.ndim(v))) for k, v in batch.items()}
