"""Run a placed pipeline schedule (`sharding.schedules`) as one SPMD program over `pipeline`.

Every rank runs the same `lax.scan` over the timeline's ticks; a rank's task in a tick comes from
static tables indexed by its `axis_index`, so ranks run different work (`lax.switch`) in one
program. Between ticks, stage outputs and input gradients move one rank along the `pipeline`
axis with `ppermute` (every tick, in both directions a schedule uses: SPMD collectives are
uniform, so an idle rank sends zeros). Everything else of the mesh (FSDP, expert, tensor axes)
stays automatic inside: the executor is a `shard_map` manual over `pipeline` only.

A forward task runs its stage under `jax.vjp` and keeps the residuals the backward needs in a
buffer slot (the timeline allocates slots, so a rank holds as many microbatches as its schedule
keeps in flight, not M); residuals that are inputs (the stage's weights, its input activation,
the microbatch) are not copied but looked up again at the backward. A backward task rebuilds
the pullback from the slot and applies it to the gradient that arrived: B returns both
gradients, Bx only the input gradient (the weight part is dead code there), W only the weight
gradient. The last stage's forward task also runs the loss and its gradient at once (nothing of
the head is kept), the first stage's backward the embedding's.

This module knows stages, not models: the model supplies `StageFns`.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public spelling yet
from jax.sharding import PartitionSpec as P

from sharding.schedules import Timeline, home

AXIS = "pipeline"


@dataclasses.dataclass(frozen=True)
class StageFns:
    """What a model supplies. `mb` is one microbatch's data (a pytree, leading axis dropped).

    embed(shared, mb) -> x: the first stage's input (differentiated w.r.t. `shared`).
    stage(w, c, x, mb) -> ((y, side), aux): one stage; `w` its weights, `c` its constants
      (not differentiated), `side` a scalar term of the loss the stage adds (e.g. a balance loss)
      whose gradient seed is `side_seed(mb)`, `aux` statistics summed over microbatches.
    loss(shared, y, mb[, frozen]) -> (loss, metrics): the last stage's objective part for one
      microbatch, already scaled so that the step's loss is the sum over microbatches; metrics
      are summed. `frozen` (when `run` is given one): weights it reads but does not train (a
      distillation teacher's head), replicated over `pipeline`, never differentiated.
    act(x) -> x: the sharding constraint of a stage's input activation (on a mesh with other
      axes, XLA's conditionals need it on every branch that yields one); identity by default.
    """
    embed: Callable
    stage: Callable
    loss: Callable
    side_seed: Callable
    act: Callable = lambda x: x  # noqa: E731


# ------------------------------------------------------------------------------ the tables
_F = ("on", "v", "m", "slot", "first", "last", "send", "dest_v", "dest_slot")
_B = ("kind", "v", "m", "slot", "first", "send", "dest_v", "dest_slot")
_RX = ("act_l", "act_r", "grad_l", "grad_r")  # received from the left/right neighbour
_KINDS = {"B": 1, "Bx": 2, "W": 3}


def tables(tl: Timeline) -> dict[str, np.ndarray]:
    """Per tick and rank, int32 [T, P] arrays: the forward lane (`f_*`), the backward lane
    (`b_*`) and where each incoming message goes (`rx_<channel>_{on,v,slot}`)."""
    t_n, p = len(tl.ticks), tl.ranks
    out = {f"f_{k}": np.zeros((t_n, p), np.int32) for k in _F}
    out.update({f"b_{k}": np.zeros((t_n, p), np.int32) for k in _B})
    out.update({f"rx_{c}_{k}": np.zeros((t_n, p), np.int32) for c in _RX
                for k in ("on", "v", "slot")})
    last = tl.stages - 1

    def route(stage, micro, r):
        """(send code, dest v, dest slot) of a message to `stage` from rank r: 1 right, 2 left,
        3 local."""
        r2, v2 = home(tl.schedule, p, stage)
        code = {1: 1, -1: 2, 0: 3}[r2 - r]
        return code, v2, tl.slot[(r2, v2, micro)], r2

    def fill(lane, t, r, row, micro, dest, channels):
        """Write a task's row of `lane` ("f" or "b"); `dest` is the stage its output goes to
        (None: nowhere), received on `channels` (from the left, from the right)."""
        if dest is not None:
            code, v2, s2, r2 = route(dest, micro, r)
            row.update(send=code, dest_v=v2, dest_slot=s2)
            if code in (1, 2):
                _set(out, f"rx_{channels[code - 1]}", t, r2, on=1, v=v2, slot=s2)
        for k, val in row.items():
            out[f"{lane}_{k}"][t, r] = val

    for t, tick in enumerate(tl.ticks):
        for r, (f, b) in enumerate(tick):
            if f is not None:
                v = home(tl.schedule, p, f.stage)[1]
                fill("f", t, r, dict(on=1, v=v, m=f.micro, slot=tl.slot[(r, v, f.micro)],
                                     first=int(f.stage == 0), last=int(f.stage == last)),
                     f.micro, f.stage + 1 if f.stage < last else None, ("act_l", "act_r"))
            if b is not None:
                v = home(tl.schedule, p, b.stage)[1]
                fill("b", t, r, dict(kind=_KINDS[b.kind], v=v, m=b.micro,
                                     slot=tl.slot[(r, v, b.micro)], first=int(b.stage == 0)),
                     b.micro, b.stage - 1 if b.kind != "W" and b.stage > 0 else None,
                     ("grad_l", "grad_r"))
    return out


def _set(out, prefix, t, r, **vals):
    if out[f"{prefix}_on"][t, r]:
        raise AssertionError(f"two messages on {prefix} at tick {t}, rank {r}")
    for k, val in vals.items():
        out[f"{prefix}_{k}"][t, r] = val


# ------------------------------------------------------------------------ residual handling
@dataclasses.dataclass(frozen=True)
class _Stash:
    """A stage's forward traced once (`fwd`: input leaves -> output leaves, then the pullback's
    residual leaves) and how each residual leaf reaches the backward: ("in", j) it is input leaf
    j, looked up again; ("buf", k) it depends on the stage's input activation and is kept in
    buffer k; ("re", k) it does not (a weight's slice or cast, a rope table, a mask) and is
    recomputed at the backward by `recompute` from the inputs it needs. So a slot holds
    activations only, never a copy of the stage's weights."""
    fwd: object  # ClosedJaxpr
    in_tree: object
    out_tree: object
    n_out: int
    treedef: object  # the pullback's
    source: tuple
    shapes: tuple  # ShapeDtypeStructs of the buffered leaves
    recompute: object  # ClosedJaxpr over the inputs `re_inputs` -> the ("re", k) leaves
    re_inputs: tuple  # indices of the input leaves `recompute` takes


def _stash_of(fns: StageFns, w, c, x, mb) -> _Stash:
    leaves, in_tree = jax.tree.flatten((w, c, x, mb))
    found = {}

    def fwd(*flat):
        w, c, x, mb = jax.tree.unflatten(in_tree, flat)
        out, pull, aux = jax.vjp(lambda w_, x_: fns.stage(w_, c, x_, mb), w, x, has_aux=True)
        res, treedef = jax.tree.flatten(pull)
        outs, out_tree = jax.tree.flatten((out, aux))
        found.update(treedef=treedef, out_tree=out_tree, n_out=len(outs),
                     same=[next((j for j, a in enumerate(flat) if r is a), None) for r in res])
        return outs + res

    closed = jax.make_jaxpr(fwd)(*leaves)
    n_out, n_in = found["n_out"], len(leaves)
    n_wc = len(jax.tree.leaves((w, c)))
    n_x = len(jax.tree.leaves(x))
    source, shapes, re_idx = [], [], []
    for k, j in enumerate(found["same"]):
        if j is not None:
            source.append(("in", j))
            continue
        only = [i == n_out + k for i in range(len(closed.jaxpr.outvars))]
        _, used = pe.dce_jaxpr(closed.jaxpr, only)
        if any(used[n_wc:n_wc + n_x]):  # depends on the input activation: keep it
            source.append(("buf", len(shapes)))
            aval = closed.out_avals[n_out + k]
            shapes.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype))
        else:
            source.append(("re", len(re_idx)))
            re_idx.append(n_out + k)
    keep = [i in re_idx for i in range(len(closed.jaxpr.outvars))]
    re_jaxpr, used = pe.dce_jaxpr(closed.jaxpr, keep)
    recompute = jax.extend.core.ClosedJaxpr(re_jaxpr, closed.consts)
    re_inputs = tuple(i for i in range(n_in) if used[i])
    return _Stash(closed, in_tree, found["out_tree"], n_out, found["treedef"], tuple(source),
                  tuple(shapes), recompute, re_inputs)


def kept_shapes(fns: StageFns, w, c, x, mb) -> tuple:
    """The ShapeDtypeStructs a forward task of `fns.stage` keeps for its backward (a slot's
    contents), from abstract or concrete inputs: activations only (`_Stash`)."""
    out = {}

    def probe(w, c, x, mb):
        out["stash"] = _stash_of(fns, w, c, x, mb)
        return 0

    jax.eval_shape(probe, w, c, x, mb)
    return out["stash"].shapes


def _run_forward(stash: _Stash, w, c, x, mb):
    """(stage outputs, aux), the residual leaves to keep."""
    flat = jax.tree.leaves((w, c, x, mb))
    outs = jax.extend.core.jaxpr_as_fun(stash.fwd)(*flat)
    out, aux = jax.tree.unflatten(stash.out_tree, outs[:stash.n_out])
    res = outs[stash.n_out:]
    kept = [r for r, (kind, _) in zip(res, stash.source) if kind == "buf"]
    return out, aux, kept


def _rebuild(stash: _Stash, kept: list, w, c, x, mb):
    """The pullback from the kept leaves, the inputs and the recomputed leaves."""
    flat = jax.tree.leaves((w, c, x, mb))
    re = (jax.extend.core.jaxpr_as_fun(stash.recompute)(*[flat[i] for i in stash.re_inputs])
          if any(kind == "re" for kind, _ in stash.source) else [])
    pick = {"in": flat, "buf": kept, "re": re}
    return jax.tree.unflatten(stash.treedef, [pick[kind][j] for kind, j in stash.source])


# ------------------------------------------------------------------------------ the executor
def run(tl: Timeline, fns: StageFns, stage_w, stage_c, shared, micro, *, mesh=None,
        frozen=None):
    """Run the timeline. stage_w / stage_c: pytrees with leading [P, V] axes (ranks, stages per
    rank; `stage_w` in the compute dtype: its gradients come back in float32, summed over
    microbatches); shared: the weights `embed` and `loss` use, replicated over `pipeline`;
    micro: the microbatches, leading axis M. mesh: a mesh with a `pipeline` axis of size P, or
    None for P = 1 (no collectives). frozen: passed to `fns.loss` (see `StageFns`).

    Returns (grads of stage_w [P, V, ...] float32, grads of shared, loss, metrics, aux
    [P, V, ...]): loss and metrics summed over microbatches; aux per stage, summed."""
    body = functools.partial(_program, tl, fns, tables(tl))
    frozen = {} if frozen is None else frozen
    if tl.ranks == 1:
        return body(stage_w, stage_c, shared, micro, frozen)
    if mesh is None or dict(mesh.shape).get(AXIS, 1) != tl.ranks:
        raise ValueError(f"a {tl.ranks}-rank pipeline needs a mesh whose {AXIS!r} axis has "
                         f"size {tl.ranks}")
    pipe = P(AXIS)
    fn = jax.shard_map(
        body, mesh=mesh, axis_names={AXIS},
        in_specs=(pipe, pipe, P(), P(), P()),
        out_specs=(pipe, P(), P(), P(), pipe), check_vma=False)
    return fn(stage_w, stage_c, shared, micro, frozen)


def _zeros(tree):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _put(buf, v, slot, value, on):
    """buf[v, slot] = value where `on` (an in-place update of one slot)."""
    old = buf[v, slot]
    return buf.at[v, slot].set(jnp.where(on, value, old).astype(buf.dtype))


def _program(tl: Timeline, fns: StageFns, np_tab, stage_w, stage_c, shared, micro, frozen):
    multi = tl.ranks > 1

    def loss_fn(s, y, mb):
        return fns.loss(s, y, mb, frozen) if frozen else fns.loss(s, y, mb)

    # this rank's block [1, V, ...] -> [V, ...] (with one rank, the whole [1, V, ...])
    stage_w, stage_c = (jax.tree.map(lambda a: a[0], t) for t in (stage_w, stage_c))
    tab = {k: jnp.asarray(v) for k, v in np_tab.items()}
    r = jax.lax.axis_index(AXIS) if multi else 0
    n_v, n_k = tl.per_rank, tl.n_slots
    mb0 = _take(micro, 0)
    w0, c0 = _take(stage_w, 0), _take(stage_c, 0)
    x_shape = jax.eval_shape(fns.embed, shared, mb0)
    stash = _stash_of(fns, w0, c0, x_shape, mb0)
    (y_s, side_s), aux_s = jax.eval_shape(lambda w, c, x, mb: fns.stage(w, c, x, mb),
                                          w0, c0, x_shape, mb0)
    loss_s, metrics_s = jax.eval_shape(loss_fn, shared, y_s, mb0)
    act = jax.ShapeDtypeStruct(y_s.shape, y_s.dtype)

    def slots(s):
        return jnp.zeros((n_v, n_k) + s.shape, s.dtype)

    carry = {
        "x": slots(act), "dy": slots(act), "res": [slots(s) for s in stash.shapes],
        "g_stage": jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), stage_w),
        "g_shared": jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shared),
        "loss": jnp.zeros((), jnp.float32), "metrics": _zeros(metrics_s),
        "aux": jax.tree.map(lambda s: jnp.zeros((n_v,) + s.shape, s.dtype), aux_s),
    }

    def row(t_tab, name):
        return t_tab[name][r]

    def f32_zeros(tree):
        return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)

    # The lanes' conditionals take only what their branches read (one slot's input, one
    # microbatch, the accumulators they add to), never the whole carry: an XLA conditional
    # copies its operands, and the carry holds every slot's residuals.
    def forward_lane(c, t_tab):
        on, v, m, slot = (row(t_tab, f"f_{k}") for k in ("on", "v", "m", "slot"))
        first, last = row(t_tab, "f_first"), row(t_tab, "f_last")
        mb = _take(micro, m)

        def branch(vi):
            def go(x_in, mb, g_shared):
                w, cc = _take(stage_w, vi), _take(stage_c, vi)
                x = jax.lax.cond(first > 0,
                                 lambda: fns.act(fns.embed(shared, mb).astype(act.dtype)),
                                 lambda: fns.act(x_in))
                (y, side), aux, kept = _run_forward(stash, w, cc, x, mb)

                def head(y, g_shared):
                    (loss, pull_l, metrics) = jax.vjp(lambda s, y_: loss_fn(s, y_, mb),
                                                      shared, y, has_aux=True)
                    g_s, dy = pull_l(jnp.ones((), loss.dtype))
                    g_shared = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32),
                                            g_shared, g_s)
                    return loss, metrics, g_shared, dy

                def no_head(y, g_shared):
                    return (jnp.zeros((), loss_s.dtype), _zeros(metrics_s), g_shared,
                            jnp.zeros(y.shape, y.dtype))

                loss, metrics, g_shared, dy = jax.lax.cond(last > 0, head, no_head, y,
                                                           g_shared)
                # the stage's side term (its balance loss) counts in the loss with its seed
                loss = loss + (side * fns.side_seed(mb)).astype(loss.dtype)
                return x, y, kept, aux, loss, metrics, g_shared, dy
            return go

        def off(x_in, mb, g_shared):
            return (jnp.zeros(act.shape, act.dtype), jnp.zeros(act.shape, act.dtype),
                    [jnp.zeros(s.shape, s.dtype) for s in stash.shapes], _zeros(aux_s),
                    jnp.zeros((), loss_s.dtype), _zeros(metrics_s), g_shared,
                    jnp.zeros(act.shape, act.dtype))

        idx = jnp.where(on > 0, 1 + v, 0)
        x, y, kept, aux, loss, metrics, g_shared, dy = jax.lax.switch(
            idx, [off] + [branch(i) for i in range(n_v)], c["x"][v, slot], mb, c["g_shared"])
        on_b = on > 0
        c = dict(c)
        c["x"] = _put(c["x"], v, slot, x, on_b)
        c["res"] = [_put(b, v, slot, k, on_b) for b, k in zip(c["res"], kept)]
        c["dy"] = _put(c["dy"], v, slot, dy, on_b & (last > 0))
        c["aux"] = jax.tree.map(lambda acc, a: acc.at[v].add(jnp.where(on_b, a, 0).astype(
            acc.dtype)), c["aux"], aux)
        c["loss"] = c["loss"] + loss.astype(jnp.float32)
        c["metrics"] = jax.tree.map(jnp.add, c["metrics"], metrics)
        c["g_shared"] = g_shared
        return c, y

    def backward_lane(c, t_tab):
        kind, v, m, slot = (row(t_tab, f"b_{k}") for k in ("kind", "v", "m", "slot"))
        first = row(t_tab, "b_first")
        mb = _take(micro, m)
        zero_w = f32_zeros(_take(stage_w, 0))

        def branch(kind_i, vi):
            def go(kept, x, dy, mb, g_shared):
                w, cc = _take(stage_w, vi), _take(stage_c, vi)
                pull = _rebuild(stash, kept, w, cc, x, mb)
                dw, dx = pull((dy, fns.side_seed(mb)))
                dw = jax.tree.map(lambda a: a.astype(jnp.float32), dw)
                if kind_i == _KINDS["Bx"]:
                    dw = zero_w
                if kind_i == _KINDS["W"]:
                    return dw, jnp.zeros(act.shape, act.dtype), g_shared
                g_shared = jax.lax.cond(
                    first > 0, lambda g: jax.tree.map(jnp.add, g, _embed_grad(fns, shared, mb, dx)),
                    lambda g: g, g_shared)
                return dw, dx, g_shared
            return go

        def off(kept, x, dy, mb, g_shared):
            return zero_w, jnp.zeros(act.shape, act.dtype), g_shared

        # only the kinds this schedule uses get a branch (1F1B: B; zero bubble: Bx and W)
        used = [k for k in (1, 2, 3) if (np_tab["b_kind"] == k).any()]
        branches = [off] + [branch(k, vi) for k in used for vi in range(n_v)]
        slot_of = np.zeros(4, np.int32)
        for j, k in enumerate(used):
            slot_of[k] = j
        idx = jnp.where(kind > 0, 1 + jnp.asarray(slot_of)[kind] * n_v + v, 0)
        dw, dx, g_shared = jax.lax.switch(
            idx, branches, [b[v, slot] for b in c["res"]], c["x"][v, slot], c["dy"][v, slot],
            mb, c["g_shared"])
        c = dict(c)
        c["g_stage"] = jax.tree.map(lambda acc, g: acc.at[v].add(g), c["g_stage"], dw)
        c["g_shared"] = g_shared
        return c, dx

    def shift(x, direction):
        """Every rank's x to its right (direction 1) or left (-1) neighbour; the end ranks
        receive zeros."""
        if not multi:
            return jnp.zeros_like(x)
        p = tl.ranks
        perm = ([(i, i + 1) for i in range(p - 1)] if direction > 0
                else [(i + 1, i) for i in range(p - 1)])
        return jax.lax.ppermute(x, AXIS, perm)

    uses = {ch: bool(np_tab[f"rx_{ch}_on"].any()) for ch in _RX}

    def tick(c, t_tab):
        c, y = forward_lane(c, t_tab)
        c, dx = backward_lane(c, t_tab)
        f_send, b_send = row(t_tab, "f_send"), row(t_tab, "b_send")
        zero = jnp.zeros(act.shape, act.dtype)
        msgs = {"act_l": (y, f_send, 1), "act_r": (y, f_send, -1),
                "grad_l": (dx, b_send, 1), "grad_r": (dx, b_send, -1)}
        for ch, (val, send, direction) in msgs.items():
            if not uses[ch]:
                continue
            code = 1 if direction > 0 else 2
            got = shift(jnp.where(send == code, val, zero), direction)
            buf = "x" if ch.startswith("act") else "dy"
            on = row(t_tab, f"rx_{ch}_on") > 0
            c[buf] = _put(c[buf], row(t_tab, f"rx_{ch}_v"), row(t_tab, f"rx_{ch}_slot"), got, on)
        # the V's turn (and any stage handing to one on its own rank): no collective
        c["x"] = _put(c["x"], row(t_tab, "f_dest_v"), row(t_tab, "f_dest_slot"), y, f_send == 3)
        c["dy"] = _put(c["dy"], row(t_tab, "b_dest_v"), row(t_tab, "b_dest_slot"), dx,
                       b_send == 3)
        return c, None

    carry, _ = jax.lax.scan(tick, carry, tab)
    out = (carry["g_stage"], carry["g_shared"], carry["loss"], carry["metrics"], carry["aux"])
    if not multi:
        return (jax.tree.map(lambda a: a[None], out[0]),) + out[1:4] + (
            jax.tree.map(lambda a: a[None], out[4]),)
    g_shared, loss, metrics = jax.lax.psum((out[1], out[2], out[3]), AXIS)
    return (jax.tree.map(lambda a: a[None], out[0]), g_shared, loss, metrics,
            jax.tree.map(lambda a: a[None], out[4]))


def _embed_grad(fns: StageFns, shared, mb, dx):
    _, pull = jax.vjp(lambda s: fns.embed(s, mb), shared)
    (g,) = pull(dx.astype(jax.eval_shape(fns.embed, shared, mb).dtype))
    return jax.tree.map(lambda a: a.astype(jnp.float32), g)
