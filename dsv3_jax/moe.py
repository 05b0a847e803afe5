"""DeepSeekMoE layer: shared experts + dropless routed experts ([PAPER] eq 12; reference §4).

y = sum_a w_a Expert_{i_a}(x) + Shared(x). No capacity factor and no token dropping, in training
or inference ([PAPER] §2.1.2): the M0*A (token, expert) pairs are sorted by expert into
contiguous groups of whatever size routing produced, and each expert's SwiGLU runs as one
grouped matmul (`grouped`: ragged_dot, or our Pallas kernel on GPU) over exactly its rows.

On a mesh (`shard` given) the routed part runs inside `shard_map`: each device routes its own
tokens (a global sort of all tokens would force XLA to gather them), then either computes its
experts locally (no expert axis: weights gathered over fsdp) or, with expert parallelism,
dispatches pairs to the devices holding their experts (`sharding.ep`), runs its local experts
and combines. Load statistics and the balance loss are summed over every batch axis there, so
every device sees the global per-expert load and the bias update stays identical everywhere.

`p` is one layer's MoE weights: router [D, E], shared {w_gate, w_up [D, s], w_down [s, D]}
(absent with no shared experts), experts {w_gate, w_up [E, D, f], w_down [E, f, D]}.
With FP8 on (`Runtime.fp8`) the shared and routed experts' GEMMs take FP8 inputs; the router
does not.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import Config
from dsv3_jax import grouped
from dsv3_jax.layers import swiglu
from dsv3_jax.router import expert_counts, route, sequence_balance_terms
from dsv3_jax.runtime import Runtime
from pallas_kernels.rows import gather_rows
from sharding import ep, eplb
from sharding.context import ShardingContext, constrain


_XLA = Runtime()


def grouped_swiglu(p: dict, rows: jnp.ndarray, sizes: jnp.ndarray,
                   rt: Runtime | None = None) -> jnp.ndarray:
    """Each expert's SwiGLU over its contiguous rows: rows [M, D], sizes [E] -> [M, D], with
    the grouped GEMMs `rt` names (`rt.grouped`, `rt.fp8`, `rt.interpret`)."""
    rt = rt or _XLA
    with jax.named_scope("expert_gemms"):  # benchmarks attribute profile time by scope
        return grouped.grouped_swiglu(p, rows, sizes, impl=rt.grouped, fp8_impl=rt.fp8,
                                      interpret=rt.interpret)


def gathers_experts(rt: Runtime, n_pairs: int, n_experts: int) -> bool:
    """Whether the routed experts of `n_pairs` (token, expert) pairs run as `gathered_experts`:
    `rt.gather_experts` on, no FP8 (the gathered GEMMs are 16-bit), and at most half as many
    pairs as experts, so that few experts' weights are read twice (decoding: 6 pairs of 64
    experts per token of `small`)."""
    return rt.gather_experts and rt.fp8 is None and 2 * n_pairs <= n_experts


def gathered_experts(p: dict, x: jnp.ndarray, indices: jnp.ndarray,
                     weights: jnp.ndarray) -> jnp.ndarray:
    """The routed experts for few tokens: x [M0, D], indices/weights [M0, A] -> [M0, D] (fp32).
    Each pair's expert weights are gathered ([M0, A, D, f]) and multiplied as one batched
    GEMM per projection: a handful of kernels, where sorting the pairs into groups for the
    grouped kernel (argsort, bincount, the padded layout, three grouped GEMMs, the unpermute)
    launches dozens, which at one token a step cost more than the GEMMs (docs/performance.md).
    Same rounding as the grouped path: float32 products rounded to x's dtype after each
    projection, the weighted combine in float32."""
    dt = x.dtype

    def mm(spec, a, w):
        return jnp.einsum(spec, a, w.astype(dt), preferred_element_type=jnp.float32).astype(dt)

    with jax.named_scope("expert_gemms"):
        gate = mm("md,madf->maf", x, p["w_gate"][indices])
        up = mm("md,madf->maf", x, p["w_up"][indices])
        y = mm("maf,mafd->mad", jax.nn.silu(gate) * up, p["w_down"][indices])
    with jax.named_scope("combine"):
        return jnp.einsum("mad,ma->md", y.astype(jnp.float32), weights)


def routed_experts(p: dict, x: jnp.ndarray, indices: jnp.ndarray, weights: jnp.ndarray,
                   rt: Runtime | None = None) -> jnp.ndarray:
    """Dropless expert FFN on one device: x [M0, D], indices/weights [M0, A] -> [M0, D] (fp32)."""
    m0, a = indices.shape
    if gathers_experts(rt or _XLA, m0 * a, p["w_gate"].shape[0]):
        return gathered_experts(p, x, indices, weights)
    with jax.named_scope("dispatch"):
        flat = indices.reshape(-1)  # [M] with M = M0 * A
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # rows grouped by expert
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        sizes = jnp.bincount(flat, length=p["w_gate"].shape[0]).astype(jnp.int32)
        # pair j of token j // A: repeat, then permute; both directions are gathers (rows.py)
        rows = gather_rows(jnp.repeat(x, a, axis=0), order, inverse)
    ys = grouped_swiglu(p, rows, sizes, rt)  # [M, D]
    with jax.named_scope("combine"):
        y = gather_rows(ys, inverse, order).reshape(m0, a, -1)
        # combine in float32 (HF does; the official code and V3 training combine in BF16)
        return jnp.einsum("mad,ma->md", y.astype(jnp.float32), weights)


def _route_and_compute(p_router, experts, x, bias, mask, forced, cfg: Config, rt: Runtime,
                       ep_axis, impl, capacity: float = 2.0, replicas: dict | None = None):
    """Route local tokens x [B, T, D] and run the routed experts (with EP when ep_axis is set).
    Returns (y [B, T, D] float32, counts [B, E], balance terms, indices [B, T, A]).
    With `replicas` ({"table": [E, C], "copies": [E]}, `sharding.eplb`) `experts` hold the
    physical slots and each pair goes to one copy of its expert (`eplb.choose_copy`); the
    counts and the balance terms stay those of the logical experts."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    with jax.named_scope("router"):
        r = route(xf, p_router, bias, cfg, None if forced is None else forced.reshape(b * t, -1))
    with jax.named_scope("experts"):
        slots = r.indices
        if replicas is not None:
            offset = 0 if ep_axis is None else jax.lax.axis_index(ep_axis)
            slots = eplb.choose_copy(r.indices, replicas["table"], replicas["copies"],
                                     offset=offset)
        if ep_axis is None:
            y = routed_experts(experts, xf, slots, r.weights, rt)
        else:
            n_slots = experts["w_gate"].shape[0] * jax.lax.axis_size(ep_axis)
            y, _ = ep.run_experts(lambda rows, sizes: grouped_swiglu(experts, rows, sizes, rt),
                                  xf, slots, r.weights, n_experts=n_slots, axis=ep_axis,
                                  impl=impl, capacity_factor=capacity)
    indices = r.indices.reshape(b, t, -1)
    counts = expert_counts(indices, mask, cfg.n_routed_experts)
    terms = sequence_balance_terms(r.scores.reshape(b, t, -1), counts, mask, cfg)
    return y.reshape(b, t, d), counts, terms, indices


def _moe_local(p, x, bias, token_mask, cfg, rt, forced, replicas=None):
    experts = p["experts"] if replicas is None else eplb.expand_weights(p["experts"],
                                                                         replicas["slots"])
    y, counts, (per_seq, has), indices = _route_and_compute(
        p["router"], experts, x, bias, token_mask, forced, cfg, rt, None, None,
        replicas=replicas)
    balance = (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)
    return y, counts.sum(0), balance, indices


def _moe_sharded(p, x, bias, token_mask, cfg: Config, rt: Runtime, forced,
                 shard: ShardingContext, replicas=None):
    batch = shard.batch_axes or None
    ep_axis = shard.expert_axis
    tp = shard.tensor_axis if "tensor" in dict(shard.strategy.params)["expert_mlp"] else None
    w_in, w_out = P(ep_axis, None, tp), P(ep_axis, tp, None)  # full D inside: gathered over fsdp
    expert_specs = {"w_gate": w_in, "w_up": w_in, "w_down": w_out}
    sum_axes = shard.batch_axes

    def local(x, mask, forced, w_router, bias, experts, copies):
        y, counts, (per_seq, has), indices = _route_and_compute(
            w_router, experts, x, bias, mask, forced, cfg, rt, ep_axis, shard.dispatch,
            shard.capacity_factor, copies)
        if tp:  # each tensor rank summed its slice of the expert width
            y = jax.lax.psum(y, tp)
        load = jax.lax.psum(counts.sum(0), sum_axes) if sum_axes else counts.sum(0)
        total = jnp.stack([(per_seq * has).sum(), has.sum()])
        total = jax.lax.psum(total, sum_axes) if sum_axes else total
        return y, load, total[0] / jnp.maximum(total[1], 1.0), indices

    tok = P(batch, None, None)
    fn = jax.shard_map(
        local, mesh=shard.shard_map_mesh(),
        in_specs=(tok, P(batch, None), None if forced is None else tok, P(),
                  None if bias is None else P(), expert_specs,
                  None if replicas is None else {"table": P(), "copies": P()}),
        out_specs=(tok, P(), P(), tok), check_vma=False)
    experts, copies = p["experts"], None
    if replicas is not None:  # the slots' weights, split over the expert axis like the experts
        if ep_axis is not None and replicas["slots"].shape[0] % shard.sizes[ep_axis]:
            raise ValueError(f"{replicas['slots'].shape[0]} expert slots do not split over the "
                             f"{shard.sizes[ep_axis]} ranks of mesh axis {ep_axis!r}")
        experts = {k: jax.lax.with_sharding_constraint(
                       v, jax.sharding.NamedSharding(shard.mesh, expert_specs[k]))
                   for k, v in eplb.expand_weights(p["experts"], replicas["slots"]).items()}
        copies = {"table": replicas["table"], "copies": replicas["copies"]}
    return fn(x, token_mask, forced, p["router"], bias, experts, copies)


def moe(p: dict, x: jnp.ndarray, bias: jnp.ndarray | None, token_mask: jnp.ndarray, cfg: Config,
        rt: Runtime | None = None, forced: jnp.ndarray | None = None,
        shard: ShardingContext | None = None):
    """x [B, T, D] -> (y [B, T, D], aux).

    `bias` is the router bias [E] or None, or a layer's router state {"bias", "replicas"}: with
    "replicas" ({"slots" [P], "table" [E, C], "copies" [E]}: `sharding.eplb.replica_state`) the
    routed experts run as P physical slots, the hottest experts in several copies, and each
    (token, expert) pair goes to one copy (`eplb.choose_copy`); the output equals the layer's
    without copies. The slots' weights are gathered from the logical experts in the step
    (autodiff sums the copies' gradients back); on a mesh the gather crosses the expert axis.
    aux: `load` [E] tokens per expert over the whole batch (masked tokens excluded), `balance`
    the unscaled sequence-wise balance loss, `indices` [B, T, A] the experts used (for replay).
    """
    rt = rt or _XLA
    replicas = None
    if isinstance(bias, dict):  # a layer's router state: its bias and redundant experts
        bias, replicas = bias.get("bias"), bias.get("replicas")
    if shard is None:
        y, load, balance, indices = _moe_local(p, x, bias, token_mask, cfg, rt, forced, replicas)
    else:
        y, load, balance, indices = _moe_sharded(p, x, bias, token_mask, cfg, rt, forced, shard,
                                                 replicas)
    y = constrain(y.astype(x.dtype), ("batch", "seq", "embed"), shard, "moe combine")
    if "shared" in p:
        with jax.named_scope("shared_experts"):
            s = p["shared"]
            y = y + swiglu(x, s["w_gate"], s["w_up"], s["w_down"], shard, "expert_mlp",
                           fp8_impl=rt.fp8)
    return y, {"load": load, "balance": balance, "indices": indices}
