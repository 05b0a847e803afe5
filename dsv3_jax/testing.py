"""Numerics checks for users of dsv3-jax, built on chex: each asserts one claim of the project
about *your* weights, kernels or mesh, with tolerances you choose, and fails with chex's report
(which leaf, how far, where).

    from dsv3_jax import testing
    testing.assert_logits_match(params, cfg, ids, reference_logits, atol=1e-4)  # a checkpoint
    testing.assert_absorbed_matches_expanded(params, cfg, ids, atol=1e-4)       # MLA's two forms
    testing.assert_kernel_matches_reference(kernel, reference, x, w, atol=1e-2)  # any kernel
    testing.assert_sharded_matches_single_device(params, batch, cfg, shard)       # a mesh

Each returns what it compared, so a caller can log it. The project's own test suite uses
them too (tests/test_testing.py shows each one failing on a broken input).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model
from dsv3_jax.config import Config
from dsv3_jax.placement import shard_batch, shard_params
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loss import loss_fn


def relative_error(got, want) -> float:
    """Norm-wise relative error ||got - want|| / ||want|| over whole arrays (float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_logits_match(params: dict, cfg: Config, tokens, reference_logits, *,
                        atol: float = 1e-4, rtol: float = 0.0, runtime: Runtime | None = None,
                        precision: str = "highest"):
    """The model's logits for `tokens` [B, T] equal `reference_logits` [B, T, V] (e.g. saved
    from transformers for the same checkpoint). `precision` sets float32 matmuls ("highest":
    no TF32 on a GPU, where the default would add ~1e-2). Returns the logits."""
    tokens = jnp.asarray(tokens, jnp.int32)
    reference_logits = jnp.asarray(reference_logits, jnp.float32)
    chex.assert_shape(reference_logits, (*tokens.shape, cfg.vocab_size))
    with jax.default_matmul_precision(precision):
        logits, _ = jax.jit(model.forward, static_argnums=(2, 3))(params, tokens, cfg, runtime)
    chex.assert_tree_all_finite(logits)
    chex.assert_trees_all_close(logits, reference_logits, atol=atol, rtol=rtol)
    return logits


def assert_absorbed_matches_expanded(params: dict, cfg: Config, tokens, *, atol: float = 1e-4,
                                     rtol: float = 0.0, runtime: Runtime | None = None,
                                     cache_len: int | None = None):
    """MLA's decode form (attention over the latent cache, W^UK and W^UV folded) equals its
    training form on `tokens` [B, T]: the same logits and the same cache, since both store the
    same latents. Returns (absorbed logits, expanded logits)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    rt = model.runtime_for(cfg, runtime)
    cache = model.init_cache(cfg, tokens.shape[0], cache_len or tokens.shape[1], rt.dtype)
    run = jax.jit(lambda p, t, c, a: model.forward_cached(p, t, c, cfg, rt, absorbed=a)[:2],
                  static_argnums=3)
    absorbed, cache_a = run(params, tokens, cache, True)
    expanded, cache_e = run(params, tokens, cache, False)
    chex.assert_tree_all_finite(absorbed)
    chex.assert_trees_all_close(absorbed, expanded, atol=atol, rtol=rtol)
    chex.assert_trees_all_close(cache_a, cache_e, atol=atol, rtol=rtol)
    return absorbed, expanded


def assert_kernel_matches_reference(kernel: Callable, reference: Callable, *args,
                                    atol: float, rtol: float = 0.0, grads: bool = False) -> Any:
    """`kernel(*args)` equals `reference(*args)` (every output leaf: shape, dtype, values).
    With `grads`, also the gradients of sum(outputs * a fixed random cotangent) with respect
    to every floating-point argument. Returns the kernel's outputs."""
    got, want = kernel(*args), reference(*args)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, atol=atol, rtol=rtol)
    if grads:
        floats = [i for i, a in enumerate(args) if jnp.issubdtype(jnp.asarray(a).dtype,
                                                                    jnp.floating)]
        cot = jax.tree.map(lambda y: jax.random.normal(jax.random.key(0), y.shape, jnp.float32),
                           want)

        def scalar(fn):
            def f(*xs):
                full = list(args)
                for i, x in zip(floats, xs):
                    full[i] = x
                out = fn(*full)
                return sum(jnp.sum(y.astype(jnp.float32) * c)
                           for y, c in zip(jax.tree.leaves(out), jax.tree.leaves(cot)))
            return jax.grad(f, argnums=tuple(range(len(floats))))(*[args[i] for i in floats])

        g_got, g_want = scalar(kernel), scalar(reference)
        chex.assert_tree_all_finite(g_got)
        chex.assert_trees_all_close(g_got, g_want, atol=atol, rtol=rtol)
    return got


def assert_sharded_matches_single_device(params: dict, batch: dict, cfg: Config, shard, *,
                                         runtime: Runtime | None = None, atol: float = 1e-6,
                                         rtol: float = 1e-5, precision: str = "highest"):
    """Loss, metrics and gradients of the training objective on the mesh of `shard` equal
    those on one device (`params` and `batch` are whole, host-side or on one device). Returns
    (loss on the mesh, loss on one device)."""

    def value_and_grad(s):
        f = lambda p, b: loss_fn(p, b, cfg, runtime, shard=s)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with jax.default_matmul_precision(precision):
        (loss_1, m_1), g_1 = value_and_grad(None)(jax.device_put(params, one),
                                                 jax.device_put(batch, one))
        (loss_n, m_n), g_n = value_and_grad(shard)(shard_params(params, cfg, shard),
                                                  shard_batch(batch, shard))
    chex.assert_tree_all_finite((loss_n, g_n))
    chex.assert_trees_all_close(loss_n, loss_1, atol=atol, rtol=rtol)
    chex.assert_trees_all_equal(m_n["load"], m_1["load"])  # integer counts: exact
    chex.assert_trees_all_close(jax.device_get(g_n), jax.device_get(g_1), atol=atol, rtol=rtol)
    return loss_n, loss_1
