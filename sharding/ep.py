"""Dropless expert-parallel dispatch and combine, for use inside `shard_map`.

Tokens live on the devices of a mesh axis (`axis`, the expert axis); routed experts are split
contiguously over the same axis (device i holds experts [i*E_l, (i+1)*E_l)). `dispatch` moves
every (token, expert) pair to the device holding its expert and returns the received rows
sorted by local expert, ready for one grouped matmul; `combine` brings the results back and
sums them with the routing weights. Nothing is ever dropped: every implementation either sizes
its buffers for the worst case or checks, on the devices, that the pairs fit and otherwise takes
an exact worst-case path. `run_experts` is the whole round trip (dispatch, the caller's expert
FFN, combine) and the entry point the MoE uses.

Implementations (one interface, chosen by name; none is picked behind the caller's back):
  a2a                  one dense `all_to_all` each way over per-peer buffers of C pairs, C =
                       capacity_factor x the mean M*A / ep rounded up to 8 (a dense exchange of
                       fixed size is what NCCL moves at full speed; `ragged_all_to_all` ran 20x
                       slower per byte in jax 0.11.2, reference/gpu_facts.md). The pair counts
                       are exchanged first; when any device of the axis would send more than C
                       pairs to one peer, every device of the axis takes the same round trip
                       with C = M*A (the worst case, `lax.cond` on the axis-wide max), so an
                       overflow costs time, never a token. Runs everywhere. It saves time, not
                       memory: the worst-case branch's buffers (ep x the fast ones) are in the
                       program, and XLA sizes a conditional by its larger branch. (Bounding the
                       memory too needs the exchange in rounds of C pairs, each through the
                       experts, with a custom backward: not built.)
  allgather            all-gather the tokens over the axis, compute the local experts' pairs,
                       reduce-scatter the weighted results back ("ring of experts"). Exact
                       buffers; runs everywhere, XLA:CPU included.
  ragged_a2a           `jax.lax.ragged_all_to_all` both ways (send only the pairs each peer
                       needs). GPU only: XLA:CPU does not implement it.
  ragged_a2a_emulated  the same bookkeeping with the ragged exchange emulated by a padded
                       `all_to_all`, so the ragged path's offsets and layouts are tested on CPU.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.rows import gather_rows

DISPATCH_IMPLS = ("a2a", "allgather", "ragged_a2a", "ragged_a2a_emulated")


def _inverse(perm: jax.Array) -> jax.Array:
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


class Plan(NamedTuple):
    """What combine needs to undo a dispatch (all arrays; shapes static)."""
    order: jax.Array  # local (token, expert) pairs sorted by expert
    order_recv: jax.Array  # received rows sorted by local expert (ragged only)
    valid: jax.Array  # allgather: which gathered pairs belong to this device's experts
    send_sizes: jax.Array  # [ep] pairs sent to each peer (ragged)
    recv_sizes: jax.Array  # [ep] pairs received from each peer (ragged)
    sends: jax.Array  # [ep, ep] sender x receiver pair counts (ragged)


def run_experts(ffn, x: jax.Array, experts: jax.Array, weights: jax.Array, *, n_experts: int,
                axis: str, impl: str, capacity_factor: float = 2.0):
    """The expert-parallel round trip: x [M, D] local tokens, experts / weights [M, A] ->
    (y [M, D] float32, overflowed: bool, true when `a2a` took its worst-case path).
    `ffn(rows [R, D], group_sizes [E_local]) -> [R, D]` runs this device's experts on rows
    sorted by local expert (rows past the groups are padding; their outputs are ignored)."""
    if impl != "a2a":
        with jax.named_scope("dispatch"):
            rows, sizes, plan = dispatch(x, experts, n_experts=n_experts, axis=axis, impl=impl)
        ys = ffn(rows, sizes)
        with jax.named_scope("combine"):
            return combine(ys, weights, plan, axis=axis, impl=impl), jnp.bool_(False)
    m, a = experts.shape
    fast = a2a_capacity(m * a, jax.lax.axis_size(axis), capacity_factor)
    per_expert = _pairs_per_expert(experts, n_experts, jax.lax.axis_size(axis))
    over = jax.lax.pmax(jnp.max(per_expert.sum(1)), axis) > fast

    def trip(capacity):
        def go(x, experts, weights):
            with jax.named_scope("dispatch"):
                rows, sizes, plan = _dispatch_a2a(x, experts, n_experts, axis, capacity)
            ys = ffn(rows, sizes)
            with jax.named_scope("combine"):
                return _combine_a2a(ys, weights, plan, axis, capacity)
        return go

    if fast >= m * a:  # the fast buffers already hold the worst case
        return trip(m * a)(x, experts, weights), jnp.bool_(False)
    return jax.lax.cond(over, trip(m * a), trip(fast), x, experts, weights), over


def a2a_capacity(pairs: int, ep: int, capacity_factor: float) -> int:
    """Pairs each device sends each peer in `a2a`'s fast path: capacity_factor x the mean
    pairs / ep, rounded up to a multiple of 8 and at most `pairs` (the worst case)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    c = math.ceil(capacity_factor * pairs / ep)
    return min(pairs, -(-c // 8) * 8)


def dispatch(x: jax.Array, experts: jax.Array, *, n_experts: int, axis: str, impl: str):
    """x [M, D] local tokens, experts [M, A] global expert ids -> (rows [R, D] sorted by local
    expert, group_sizes [E_local], plan). R is the static worst-case row count. (`a2a` runs
    through `run_experts`, which holds both of its capacities.)"""
    if impl == "allgather":
        return _dispatch_allgather(x, experts, n_experts, axis)
    if impl in ("ragged_a2a", "ragged_a2a_emulated"):
        return _dispatch_ragged(x, experts, n_experts, axis, impl)
    raise ValueError(f"dispatch impl {impl!r} is not one of {DISPATCH_IMPLS}")


def combine(y: jax.Array, weights: jax.Array, plan: Plan, *, axis: str, impl: str) -> jax.Array:
    """y [R, D] expert outputs in dispatch order, weights [M, A] -> [M, D] (float32 sum)."""
    if impl == "allgather":
        return _combine_allgather(y, weights, plan, axis)
    return _combine_ragged(y, weights, plan, axis, impl)


# ---------------------------------------------------------------------------- all-gather
def _dispatch_allgather(x, experts, n_experts, axis):
    ep, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    e_local = n_experts // ep
    a = experts.shape[1]
    x_all = jax.lax.all_gather(x, axis, tiled=True)  # [ep*M, D]
    local = jax.lax.all_gather(experts, axis, tiled=True) - me * e_local  # [ep*M, A]
    valid = (local >= 0) & (local < e_local)
    key = jnp.where(valid, local, e_local).reshape(-1)  # other devices' experts sort last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    # pair j of token j // A: repeat, then permute (gathers both ways: pallas_kernels/rows.py)
    rows = gather_rows(jnp.repeat(x_all, a, axis=0), order, _inverse(order))  # [ep*M*A, D]
    sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    none = jnp.zeros((0,), jnp.int32)
    return rows, sizes, Plan(order, none, valid, none, none, none)


def _combine_allgather(y, weights, plan, axis):
    m, a = weights.shape
    w_all = jnp.where(plan.valid, jax.lax.all_gather(weights, axis, tiled=True), 0.0)
    pairs = gather_rows(y, _inverse(plan.order), plan.order).reshape(-1, a, y.shape[-1])
    partial = jnp.einsum("mad,ma->md", pairs.astype(jnp.float32), w_all)  # [ep*M, D]
    return jax.lax.psum_scatter(partial, axis, scatter_dimension=0, tiled=True)  # [M, D]


# ---------------------------------------------------------------------------- dense a2a
def _pairs_per_expert(experts, n_experts, ep):
    """[ep, E_local] this device's pairs per destination device and its local expert."""
    counts = jnp.bincount(experts.reshape(-1), length=n_experts)
    return counts.reshape(ep, n_experts // ep).astype(jnp.int32)


def _sorted_pairs(x, experts, n_experts, ep):
    """(order, xs [M*A, D] the pairs sorted by expert = by destination, per_expert [ep, E_l])."""
    a = experts.shape[1]
    order = jnp.argsort(experts.reshape(-1), stable=True).astype(jnp.int32)
    xs = gather_rows(jnp.repeat(x, a, axis=0), order, _inverse(order))
    return order, xs, _pairs_per_expert(experts, n_experts, ep)


def _grouped_by_local_expert(recv, local):
    """Received rows recv [R, D] with their local expert local [R] (E_l on padding) ->
    (rows sorted by local expert, that order)."""
    order_recv = jnp.argsort(local, stable=True).astype(jnp.int32)
    return gather_rows(recv, order_recv, _inverse(order_recv)), order_recv


def _dispatch_a2a(x, experts, n_experts, axis, capacity):
    ep = jax.lax.axis_size(axis)
    m, a = experts.shape
    order, xs, per_expert = _sorted_pairs(x, experts, n_experts, ep)
    send_sizes = per_expert.sum(1)  # [ep]
    send_offsets = _exclusive_cumsum(send_sizes)
    # peer j's buffer: my sorted pairs send_offsets[j] .. + send_sizes[j], zero-padded to C
    c = jnp.arange(capacity)
    src = send_offsets[:, None] + c[None]  # [ep, C]
    sent = c[None] < send_sizes[:, None]
    chunks = jnp.where(sent[..., None], jnp.take(xs, jnp.minimum(src, m * a - 1), axis=0), 0)
    got = jax.lax.all_to_all(chunks, axis, 0, 0, tiled=True)  # [ep, C, D]: [i] from peer i
    recv_counts = jax.lax.all_to_all(per_expert, axis, 0, 0, tiled=True)  # [ep, E_l] per sender
    # row (i, c) holds local expert k when c is past sender i's first k groups
    bounds = jnp.cumsum(recv_counts, axis=1)  # [ep, E_l]
    local = (c[None, :, None] >= bounds[:, None, :]).sum(-1)  # [ep, C], E_l on padding
    rows, order_recv = _grouped_by_local_expert(got.reshape(ep * capacity, -1), local.reshape(-1))
    sizes = recv_counts.sum(0).astype(jnp.int32)
    none = jnp.zeros((0,), jnp.int32)
    plan = Plan(order, order_recv, jnp.zeros((0,), bool), send_sizes, none, none)
    return rows, sizes, plan


def _combine_a2a(y, weights, plan, axis, capacity):
    ep = jax.lax.axis_size(axis)
    m, a = weights.shape
    y_recv = gather_rows(y, _inverse(plan.order_recv), plan.order_recv)  # sender-major again
    back = jax.lax.all_to_all(y_recv.reshape(ep, capacity, -1), axis, 0, 0, tiled=True)
    # sorted pair s went to peer j = the chunk holding s, slot s - send_offsets[j]
    s = jnp.arange(m * a)
    dest = jnp.searchsorted(jnp.cumsum(plan.send_sizes), s, side="right")
    slot = s - _exclusive_cumsum(plan.send_sizes)[jnp.minimum(dest, ep - 1)]
    ys = jnp.take(back.reshape(ep * capacity, -1), dest * capacity + slot, axis=0)
    pairs = gather_rows(ys, _inverse(plan.order), plan.order).reshape(m, a, -1)
    return jnp.einsum("mad,ma->md", pairs.astype(jnp.float32), weights)


# ---------------------------------------------------------------------------- ragged
def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all`'s semantics from a padded all_to_all: chunk j of operand
    (rows input_offsets[j] .. + send_sizes[j]) lands in peer j's output at output_offsets[j]."""
    n, d = operand.shape
    r = jnp.arange(n)
    src = jnp.clip(input_offsets[:, None] + r[None], 0, n - 1)
    chunks = jnp.where((r[None] < send_sizes[:, None])[..., None], jnp.take(operand, src, axis=0), 0)
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [ep, N, D], [i] from peer i
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where peer i writes
    target = jnp.where(r[None] < recv_sizes[:, None], offsets[:, None] + r[None], output.shape[0])
    return output.at[target.reshape(-1)].set(got.reshape(-1, d).astype(output.dtype), mode="drop")


def _exchange(impl, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis):
    fn = jax.lax.ragged_all_to_all if impl == "ragged_a2a" else ragged_all_to_all_emulated
    return fn(operand, output, input_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32),
              output_offsets.astype(jnp.int32), recv_sizes.astype(jnp.int32), axis_name=axis)


def _dispatch_ragged(x, experts, n_experts, axis, impl):
    ep, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    e_local = n_experts // ep
    m, a = experts.shape
    order, xs, per_expert = _sorted_pairs(x, experts, n_experts, ep)
    send_sizes = per_expert.sum(1)  # [ep]
    recv_counts = jax.lax.all_to_all(per_expert, axis, 0, 0, tiled=True)  # [ep, E_l] per sender
    recv_sizes = recv_counts.sum(1)
    sends = jax.lax.all_gather(send_sizes, axis)  # [sender, receiver]
    output_offsets = _exclusive_cumsum(sends, 0)[me]  # where my chunk lands in each receiver
    buf = jnp.zeros((ep * m * a, x.shape[1]), x.dtype)  # worst case: every pair lands here
    recv = _exchange(impl, xs, buf, _exclusive_cumsum(send_sizes), send_sizes, output_offsets,
                     recv_sizes, axis)
    # received rows come sender by sender, each sender's sorted by local expert
    row = jnp.arange(buf.shape[0])
    sender = jnp.searchsorted(jnp.cumsum(recv_sizes), row, side="right")
    pos = row - _exclusive_cumsum(recv_sizes)[jnp.clip(sender, 0, ep - 1)]
    bounds = jnp.cumsum(recv_counts, axis=1)[jnp.clip(sender, 0, ep - 1)]  # [R, E_l]
    local = jnp.where(sender < ep, (pos[:, None] >= bounds).sum(1), e_local)
    rows, order_recv = _grouped_by_local_expert(recv, local)
    sizes = recv_counts.sum(0).astype(jnp.int32)
    plan = Plan(order, order_recv, jnp.zeros((0,), bool), send_sizes, recv_sizes, sends)
    return rows, sizes, plan


def _combine_ragged(y, weights, plan, axis, impl):
    me = jax.lax.axis_index(axis)
    m, a = weights.shape
    y_recv = gather_rows(y, _inverse(plan.order_recv), plan.order_recv)  # sender-major again
    # my rows from sender i return to where sender i took them: its offset toward me
    back_offsets = _exclusive_cumsum(plan.sends, 1)[:, me]
    out = jnp.zeros((m * a, y.shape[1]), y.dtype)
    back = _exchange(impl, y_recv, out, _exclusive_cumsum(plan.recv_sizes), plan.recv_sizes,
                     back_offsets, plan.send_sizes, axis)
    pairs = gather_rows(back, _inverse(plan.order), plan.order).reshape(m, a, -1)
    return jnp.einsum("mad,ma->md", pairs.astype(jnp.float32), weights)
