"""DeepSeekMoE layer: shared experts + dropless routed experts ([PAPER] eq 12; reference §4).

y = sum_a w_a Expert_{i_a}(x) + Shared(x). No capacity factor and no token dropping, in training
or inference ([PAPER] §2.1.2): the M0*A (token, expert) pairs are sorted by expert into
contiguous groups of whatever size routing produced, and each expert's SwiGLU runs as one
grouped matmul (`grouped.grouped_matmul`) over exactly its rows.

`p` is one layer's MoE weights: router [D, E], shared {w_gate, w_up [D, s], w_down [s, D]}
(absent with no shared experts), experts {w_gate, w_up [E, D, f], w_down [E, f, D]}.
"""

import jax
import jax.numpy as jnp

from dsv3_jax.config import Config
from dsv3_jax.grouped import grouped_matmul
from dsv3_jax.layers import swiglu
from dsv3_jax.router import expert_counts, route, sequence_balance_loss


def routed_experts(p: dict, x: jnp.ndarray, indices: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """Dropless expert FFN: x [M0, D], indices/weights [M0, A] -> [M0, D]."""
    m0, a = indices.shape
    n_experts = p["w_gate"].shape[0]
    flat = indices.reshape(-1)  # [M] with M = M0 * A
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    xs = jnp.take(x, order // a, axis=0)  # [M, D]
    h = jax.nn.silu(grouped_matmul(xs, p["w_gate"], sizes)) * grouped_matmul(xs, p["w_up"], sizes)
    ys = grouped_matmul(h, p["w_down"], sizes)  # [M, D]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = jnp.take(ys, inverse, axis=0).reshape(m0, a, -1)
    # combine in float32 (HF does; the official code and V3 training combine in BF16)
    return jnp.einsum("mad,ma->md", y.astype(jnp.float32), weights).astype(x.dtype)


def moe(p: dict, x: jnp.ndarray, bias: jnp.ndarray | None, token_mask: jnp.ndarray, cfg: Config,
        forced: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
    """x [B, T, D] -> (y [B, T, D], aux).

    aux: `load` [E] tokens per expert (masked tokens excluded), `balance` the unscaled
    sequence-wise balance loss, `indices` [B, T, A] the experts used (for routing replay).
    """
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    forced_flat = None if forced is None else forced.reshape(b * t, -1)
    with jax.named_scope("router"):
        r = route(xf, p["router"], bias, cfg, forced_flat)
    with jax.named_scope("experts"):
        y = routed_experts(p["experts"], xf, r.indices, r.weights)
    if "shared" in p:
        with jax.named_scope("shared_experts"):
            s = p["shared"]
            y = y + swiglu(xf, s["w_gate"], s["w_up"], s["w_down"])
    indices = r.indices.reshape(b, t, -1)
    counts = expert_counts(indices, token_mask, cfg.n_routed_experts)  # [B, E]
    balance = sequence_balance_loss(r.scores.reshape(b, t, -1), counts, token_mask, cfg)
    return y.reshape(b, t, d), {"load": counts.sum(0), "balance": balance, "indices": indices}
