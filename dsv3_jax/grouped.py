"""The grouped matmul behind every routed-expert FFN: one function, one switch.

Rows of x are sorted by group (expert); group e multiplies its own weight matrix w[e]. On CPU
`jax.lax.ragged_dot` is the right primitive. On GPU XLA lowers `ragged_dot` to a dense masked
product costing about (number of groups) x the useful work (measured on an H100: 25 TFLOP/s at
32 groups against 760 for the same work as a dense batched einsum; ../shared/reference/gpu_facts.md),
so GPU runs must switch to a Pallas grouped kernel: that kernel plugs in here as another `impl`
(the bf16 one with the pretraining benchmark, the FP8 one with the FP8 issue). Until then a GPU
run says plainly, once, that it is on the slow path.
"""

import logging

import jax
import jax.numpy as jnp

IMPLS = ("ragged_dot",)
_log = logging.getLogger(__name__)
_warned = False


def _warn_if_gpu() -> None:
    global _warned
    if not _warned and jax.default_backend() == "gpu":
        _warned = True
        _log.warning("grouped_matmul: jax.lax.ragged_dot on GPU costs about (experts) x the "
                     "useful FLOPs; fine for correctness, not for speed")


def grouped_matmul(x: jnp.ndarray, w: jnp.ndarray, group_sizes: jnp.ndarray, *,
                   impl: str = "ragged_dot") -> jnp.ndarray:
    """x [M, K] (rows sorted by group), w [E, K, N], group_sizes [E] int32 summing to M -> [M, N].

    Output in x's dtype, accumulated in float32.
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r} is not one of {IMPLS}")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != w.shape[:1]:
        raise ValueError(f"grouped_matmul shapes: x {x.shape} must be [M, K], w {w.shape} "
                         f"[E, K, N], group_sizes {group_sizes.shape} [E]")
    _warn_if_gpu()
    out = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
