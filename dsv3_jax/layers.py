"""Small building blocks: RMSNorm, SwiGLU, the embedding lookup and the output head."""

import jax
import jax.numpy as jnp

from dsv3_jax.fp8 import matmul, matmul_parts
from sharding.context import ShardingContext, constrain


def rms_norm(x: jnp.ndarray, w: jnp.ndarray, eps: float) -> jnp.ndarray:
    """w * x / sqrt(mean(x^2) + eps), computed in float32, cast back to x's dtype.

    The gain multiplies in float32 before the cast, as the official fix (PR #969) does; HF casts
    first and multiplies after, which differs only below fp32 (reference gotcha 20).
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def swiglu(x: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray,
           shard: ShardingContext | None = None, width: str = "mlp", *,
           fp8_impl=None) -> jnp.ndarray:
    """down(silu(x gate) * x up): x [B, T, D], w_gate/w_up [D, F], w_down [F, D] (reference
    §2.1). On a mesh the hidden [B, T, F] is constrained by `width`'s rule (tensor parallelism).
    `fp8_impl` (`Runtime.fp8`: an `Fp8` or None): FP8 GEMM inputs through `fp8.matmul`;
    None: plain. `width` is F's logical name: "mlp" (the dense FFN) or "expert_mlp" (the
    shared experts); on a mesh each FP8 GEMM runs in its own shard_map split by it (column
    parallel gate and up, row parallel down)."""
    # FP8: gate and up as one GEMM (x quantized once; fp8.matmul_parts)
    g, u = matmul_parts("btd,df->btf", x, [w_gate, w_up], fp8_impl, shard=shard,
                        axes=[("embed", width)] * 2,
                        names=[f"w_gate ({width})", f"w_up ({width})"])
    h = constrain(jax.nn.silu(g) * u, ("batch", "seq", width), shard, f"{width} hidden")
    return matmul("btf,fd->btd", h, w_down, fp8_impl, shard=shard, axes=(width, "embed"),
                  name=f"w_down ({width})")


def embed(table: jnp.ndarray, tokens: jnp.ndarray, sorted_grad: bool = True) -> jnp.ndarray:
    """Rows of table [V, D] for tokens [B, T]. An id outside [0, V) gives NaN, not a clamped row:
    inside jit we cannot raise, so a bad id must poison the result visibly (the public API checks
    concrete inputs and raises before this); its gradient is dropped.

    `sorted_grad` takes the table's gradient through `_embed_grad_sorted` instead of autodiff's
    scatter-add: the scatter adds every token's row into the table with atomics, and when few
    ids recur (the byte-level corpus: 16k tokens over ~100 ids) the adds serialize on the same
    rows -- 43.8 ms of a 199 ms `small` step on an H100, against 0.4 ms with uniform random ids
    (docs/performance.md). The model passes False on a mesh, where XLA's partitioner splits the
    scatter over the batch axes and the sort below would gather the tokens."""
    with jax.named_scope("embedding"):
        if sorted_grad:
            return _embed_sorted(table, tokens)
        return _lookup(table, tokens)


def _lookup(table, tokens):
    return jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan)


@jax.custom_vjp
def _embed_sorted(table, tokens):
    return _lookup(table, tokens)


def _embed_sorted_fwd(table, tokens):
    # the table rides along for its shape and dtype only (it is a live parameter: no copy)
    return _lookup(table, tokens), (table, tokens)


def _embed_sorted_bwd(res, g):
    table, tokens = res
    return _embed_grad_sorted(tokens, g, table.shape, table.dtype), None


_embed_sorted.defvjp(_embed_sorted_fwd, _embed_sorted_bwd)


def _embed_grad_sorted(tokens, g, shape, dtype):
    """d table [V, D] = sum over tokens of g's rows by id, without atomics: sort the ids, sum
    each run of equal ids with a segmented scan (float32), write each run's total once."""
    v, d = shape
    ids = tokens.reshape(-1)
    ids = jnp.where(ids < 0, ids + v, ids)  # jnp.take's reading of a negative id
    order = jnp.argsort(ids, stable=True)
    ids = ids[order]
    rows = g.reshape(-1, d).astype(jnp.float32)[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    last = jnp.concatenate([ids[1:] != ids[:-1], jnp.ones((1,), bool)])

    def add_within_runs(a, b):  # (run starts here, sum): a later start resets the sum
        return a[0] | b[0], jnp.where(b[0][:, None], b[1], a[1] + b[1])

    _, sums = jax.lax.associative_scan(add_within_runs, (first, rows))
    valid = last & (ids >= 0) & (ids < v)  # one write per id; out-of-range ids add nothing
    target = jnp.where(valid, ids, v)
    return jnp.zeros(shape, dtype).at[target].set(sums.astype(dtype), mode="drop",
                                                  unique_indices=False)


@jax.custom_vjp
def head(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """Logits [B, T, V] in float32 from x [B, T, D] and w [D, V] (the head stays in BF16 or
    better in V3; logits in fp32 for a stable softmax).

    The backward pass casts the float32 logit gradient to x's dtype before its two matmuls, as
    the forward's inputs are: left to autodiff they would run as float32 x 16-bit GEMMs, which
    XLA executes in TF32 (measured on an H200 for `small`: 13 ms of a 184 ms step)."""
    return _head(x, w)


def _head(x, w):
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)


def _head_fwd(x, w):
    return _head(x, w), (x, w)


def _head_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("btv,dv->btd", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("btd,btv->dv", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


head.defvjp(_head_fwd, _head_bwd)
