"""Redundant-expert placement (EPLB): which physical expert slots hold which routed experts.

DeepSeek-V3 serves with copies of its hottest experts: in prefill each of 32 GPUs hosts its 8
experts plus one redundant one, the set re-chosen from measured per-expert load ([PAPER]
§3.4.1). DeepSeek published the placement policy as deepseek-ai/EPLB (README and eplb.py at
commit d52c72d); this module is our own implementation of the algorithm that README describes:

  hierarchical (n_nodes divides n_groups): pack expert groups onto nodes, balancing load, so
      group-limited routing (a token's experts in at most 4 groups) still bounds inter-node
      traffic; then, inside each node, give the node's spare slots to its hottest experts and
      pack the copies onto the node's ranks.
  global (otherwise): the same with one node and one group, i.e. replicate over all experts
      and pack the copies onto all ranks (DeepSeek's choice for decoding's large EP).

Layout: n_replicas physical slots, rank r holding slots [r*S, (r+1)*S) with S = n_replicas //
n_ranks: the contiguous layout of `sharding/ep.py` with n_replicas in place of E, so the MoE
with copies is: route to logical experts, map each (token, expert) pair to one copy with
`choose_copy`, run `expand_weights(experts, phys_to_logical)` as if it were E = n_replicas.
The output equals the model without copies: a copy is the same weights.

Host code (numpy) on logged loads, except `choose_copy`/`expand_weights`, which run under jit.
Where the greedy choices tie we take the lowest index; an expert's copies are listed in
ascending slot order.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

COPY_RULES = ("pairs", "position")


class Placement(NamedTuple):
    """One plan; arrays carry the load's leading layer axis [L] when it had one."""
    phys_to_logical: np.ndarray  # [L, n_replicas] int32: logical expert held by each slot
    logical_to_phys: np.ndarray  # [L, E, C] int32: slots of each expert's copies, -1 padded
    copies: np.ndarray  # [L, E] int32: copies per expert (>= 1; sums to n_replicas)
    rank_load: np.ndarray  # [L, n_ranks] float64: expected load, each copy taking load/copies


def replicate(load: np.ndarray, n_slots: int,
              max_copies: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """load [E] -> (slot_to_expert [n_slots], copies [E]).

    Slots 0..E-1 hold one copy of each expert; each further slot goes to the expert whose load
    per copy is highest at that moment. Greedy like this minimises the largest load per copy
    (each step lowers the current maximum; EPLB README, "replicate the experts").
    `max_copies` (plan passes the ranks it packs onto) stops an expert gaining copies beyond
    one per rank: a second copy on a rank lowers no rank's load, so that slot serves another
    expert better. DeepSeek's EPLB has no such cap (a deviation; it binds only when one expert
    outweighs a rank many times over). Ignored once every expert is at the cap.
    """
    e = load.shape[0]
    copies = np.ones(e, np.int64)
    extra = []
    for _ in range(n_slots - e):
        per_copy = load / copies
        if max_copies is not None and np.any(copies < max_copies):
            per_copy = np.where(copies < max_copies, per_copy, -np.inf)
        hot = int(np.argmax(per_copy))  # ties: lowest expert id
        copies[hot] += 1
        extra.append(hot)
    return np.concatenate([np.arange(e), np.asarray(extra, np.int64)]), copies


def pack(weights: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """weights [n] -> (bin [n], position in bin [n]): n // n_bins items per bin.

    Greedy: items heaviest first, each into the lightest bin that still has room (ties: lowest
    bin). Equal counts per bin because every rank has the same number of slots and every node
    the same number of groups.
    """
    n = weights.shape[0]
    per_bin = n // n_bins
    bin_of, pos = np.empty(n, np.int64), np.empty(n, np.int64)
    total, count = np.zeros(n_bins), np.zeros(n_bins, np.int64)
    for item in np.argsort(-weights, kind="stable"):
        b = int(np.argmin(np.where(count < per_bin, total, np.inf)))
        bin_of[item], pos[item] = b, count[b]
        total[b] += weights[item]
        count[b] += 1
    return bin_of, pos


def _plan_layer(load: np.ndarray, n_replicas: int, n_groups: int, n_nodes: int,
                n_ranks: int) -> np.ndarray:
    """One layer, load [E] -> phys_to_logical [n_replicas] (arguments already validated)."""
    e = load.shape[0]
    node_slots = n_replicas // n_nodes
    slots_per_rank = n_replicas // n_ranks
    # 1. groups to nodes: node n gets n_groups // n_nodes whole groups
    groups = np.arange(e).reshape(n_groups, e // n_groups)  # [G, E/G] expert ids
    node_of_group, _ = pack(load[groups].sum(1), n_nodes)
    p2l = np.empty(n_replicas, np.int64)
    for node in range(n_nodes):
        experts = groups[node_of_group == node].reshape(-1)  # this node's logical experts
        # 2. the node's slots to its experts; 3. the copies onto the node's ranks
        slot_expert, copies = replicate(load[experts], node_slots, n_ranks // n_nodes)
        rank, pos = pack(load[experts][slot_expert] / copies[slot_expert], n_ranks // n_nodes)
        p2l[node * node_slots + rank * slots_per_rank + pos] = experts[slot_expert]
    return p2l


def _check(load: np.ndarray, n_replicas: int, n_groups: int, n_nodes: int, n_ranks: int):
    if load.ndim not in (1, 2) or load.shape[-1] == 0:
        raise ValueError(f"load must be [E] or [L, E] with E >= 1, got shape {load.shape}")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise ValueError("load must be finite and >= 0 (tokens per expert)")
    e = load.shape[-1]
    for name, v in (("n_replicas", n_replicas), ("n_groups", n_groups),
                    ("n_nodes", n_nodes), ("n_ranks", n_ranks)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if e % n_groups:
        raise ValueError(f"n_groups {n_groups} does not divide the {e} experts")
    if n_ranks % n_nodes:
        raise ValueError(f"n_ranks {n_ranks} is not a multiple of n_nodes {n_nodes}")
    if n_replicas % n_ranks:
        raise ValueError(f"n_replicas {n_replicas} is not a multiple of n_ranks {n_ranks}")
    if n_replicas < e:
        raise ValueError(f"n_replicas {n_replicas} is fewer than the {e} experts")


def plan(load, n_replicas: int, n_groups: int, n_nodes: int, n_ranks: int) -> Placement:
    """Place n_replicas physical slots for load [L, E] or [E] (tokens per expert, measured).

    Hierarchical when n_nodes divides n_groups, global otherwise (module docstring).
    """
    load = np.asarray(load, np.float64)
    _check(load, n_replicas, n_groups, n_nodes, n_ranks)
    layers = np.atleast_2d(load)
    if n_groups % n_nodes:  # global policy: one node of one group (EPLB README)
        n_groups, n_nodes = 1, 1
    p2l = np.stack([_plan_layer(w, n_replicas, n_groups, n_nodes, n_ranks) for w in layers])
    out = _derive(layers, p2l, n_ranks)
    return out if load.ndim == 2 else Placement(*(a[0] for a in out))


def _derive(load: np.ndarray, p2l: np.ndarray, n_ranks: int) -> Placement:
    """The copy table, counts and rank loads of phys_to_logical p2l [L, P] for load [L, E]."""
    n_layers, e = load.shape
    copies = np.stack([np.bincount(row, minlength=e) for row in p2l])  # [L, E]
    table = np.full((n_layers, e, copies.max()), -1, np.int64)
    for layer, row in enumerate(p2l):
        seen = np.zeros(e, np.int64)
        for slot, expert in enumerate(row):  # ascending slot order
            table[layer, expert, seen[expert]] = slot
            seen[expert] += 1
    per_slot = np.take_along_axis(load / copies, p2l, axis=1)  # [L, P]
    rank_load = per_slot.reshape(n_layers, n_ranks, -1).sum(-1)
    # ids as int32: what choose_copy and the dispatch index with under jit
    return Placement(p2l.astype(np.int32), table.astype(np.int32), copies.astype(np.int32),
                     rank_load)


def rank_load_plain(load, n_ranks: int) -> np.ndarray:
    """load [..., E] -> [..., n_ranks]: the layout without copies (E / n_ranks experts per
    rank, contiguous, as `sharding/ep.py` places them)."""
    load = np.asarray(load, np.float64)
    if load.shape[-1] % n_ranks:
        raise ValueError(f"n_ranks {n_ranks} does not divide the {load.shape[-1]} experts")
    return load.reshape(*load.shape[:-1], n_ranks, -1).sum(-1)


def imbalance(rank_load) -> np.ndarray:
    """rank_load [..., n_ranks] -> [...]: busiest rank over the mean (1 = perfect; 1 where a
    layer saw no tokens). The MoE step waits for the busiest rank, so this is its slowdown."""
    rank_load = np.asarray(rank_load, np.float64)
    mean = rank_load.mean(-1)
    return np.where(mean > 0, rank_load.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def choose_copy(experts: jax.Array, table: jax.Array, copies: jax.Array, *, rule: str = "pairs",
                offset: int | jax.Array = 0) -> jax.Array:
    """Physical slot of each (token, expert) pair: experts [M, A] logical ids (int32), one
    layer's table [E, C] and copies [E] (`Placement`) -> slots [M, A] (int32). Jit-safe.

    rule "pairs": the i-th pair of expert e, counting row-major over `experts`, goes to copy
        (i + offset) mod copies[e]. Deterministic, and an expert's copies receive counts that
        differ by at most 1 whatever the routing. Costs one stable argsort of M*A ids.
    rule "position": pair (m, k) goes to copy (m*A + k + offset) mod copies[e]. No sort, and
        even over a contiguous run of pairs; but it aliases: an expert that top-k places at
        the same k for every token (A = 8) with 2 copies sends every pair to one copy.
    `offset` (e.g. the device's index on the EP axis) keeps shards that choose separately
    from all starting at copy 0.
    """
    if rule not in COPY_RULES:
        raise ValueError(f"rule {rule!r} is not one of {COPY_RULES}")
    m, a = experts.shape
    flat = experts.reshape(-1)  # [M*A]
    if rule == "position":
        index = jnp.arange(m * a, dtype=jnp.int32)
    else:
        order = jnp.argsort(flat, stable=True)
        first = jnp.cumsum(jnp.bincount(flat, length=table.shape[0])) - jnp.bincount(
            flat, length=table.shape[0])  # [E] where each expert's run starts in sorted order
        rank_sorted = jnp.arange(m * a, dtype=jnp.int32) - first[flat[order]].astype(jnp.int32)
        index = jnp.zeros(m * a, jnp.int32).at[order].set(rank_sorted)
    copy = (index + offset) % copies[flat]
    return table[flat, copy].reshape(m, a).astype(jnp.int32)


def expand_weights(w, phys_to_logical):
    """Expert weights in physical layout: each leaf [E, ...] -> [n_replicas, ...] (a gather by
    phys_to_logical [n_replicas]); works on one array or a pytree such as {w_gate, w_up,
    w_down}. Sharded over EP like the logical weights, rank r then holds slots [r*S, (r+1)*S)."""
    return jax.tree.map(lambda x: x[phys_to_logical], w)


def replica_state(placement: Placement) -> dict:
    """The arrays the MoE takes for a placement (`dsv3_jax.moe.moe`'s router state
    "replicas"), stacked over layers like the router bias: slots [L, P], table [L, E, C],
    copies [L, E], all int32. The table is padded (-1) to C = P - E + 1 copies, the most any
    expert can have, so that every placement of P slots has the same shapes (a compiled step
    takes a new placement without recompiling)."""
    table = placement.logical_to_phys
    n_experts, n_slots = table.shape[-2], placement.phys_to_logical.shape[-1]
    width = n_slots - n_experts + 1
    pad = [(0, 0)] * (table.ndim - 1) + [(0, width - table.shape[-1])]
    return {"slots": jnp.asarray(placement.phys_to_logical, jnp.int32),
            "table": jnp.asarray(np.pad(table, pad, constant_values=-1), jnp.int32),
            "copies": jnp.asarray(placement.copies, jnp.int32)}
