"""Row gathers whose gradients are gathers too: how rows move between token order, expert order
and the grouped kernels' padded layout.

`x[idx]` differentiates to a scatter-add into x, which XLA cannot prove collision-free and runs
with atomics: in a profile of the `small` preset's MoE at 16k tokens two such scatters of the
rows cost several milliseconds each per step, where a gather reads and writes the rows once
(docs/kernels.md#row-gathers). Every row movement in the MoE is a bijection between the rows
that exist (a permutation, or a placement into padding), so its transpose is a gather through
the inverse map, which the caller has anyway.
"""

import jax
import jax.numpy as jnp


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0, unique_indices=True)


@jax.custom_vjp
def gather_rows(x: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """out[i] = x[idx[i]], or zeros where idx[i] is out of range; x [R, ...], idx [S] int.

    `inv` [R] must invert idx on the rows it reaches: inv[idx[i]] = i for every in-range idx[i],
    and inv[j] out of range for a row j no output takes. The gradient is then the gather
    dx = dy[inv] (zeros where inv is out of range), with no scatter.
    """
    return _take(x, idx)


def _fwd(x, idx, inv):
    return _take(x, idx), (idx, inv)


def _bwd(res, g):
    idx, inv = res
    zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)  # integer inputs: no cotangent
    return _take(g, inv), zero_int(idx), zero_int(inv)


gather_rows.defvjp(_fwd, _bwd)
