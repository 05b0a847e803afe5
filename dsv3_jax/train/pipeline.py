"""DeepSeek-V3 on the `pipeline` mesh axis: stages of the layer stacks and the pretraining
objective's gradient through a pipeline schedule (`sharding.schedules`, `sharding.pipeline`).

Stages are contiguous runs of the main model's layers in order (the dense layers, then the MoE
layers), chosen by `partition`: the split that minimises the costliest stage, a layer costing its
matmul FLOPs per token plus its attention at the step's sequence length, with the head and the
MTP modules counted on the last stage (so the last stage gets fewer layers). The embedding runs
on the first stage, the final norm, head, MTP modules and the loss on the last. With
`dualpipev` there are 2P stages, two per rank in a V (rank 0 holds the first and the last).

The training state keeps its usual layout (`dense_layers` [L_d, ...], `moe_layers` [L_m, ...]),
so checkpoints do not depend on the pipeline: any layout restores under any other, or none. Each
step gathers every stage's layers into a [P, V, layers, ...] stack split over `pipeline` (layers
padded to the largest stage; a padded slot is skipped with `lax.cond`, costing no compute, and
gets a zero gradient) and scatters the gradients back.

Exactness: the loss is the unpipelined one (`train.loss.loss_fn`): each microbatch's cross
entropies are divided by the whole batch's target count, each sequence-wise balance term is
weighted by the microbatch's share of the sequences with tokens, and the per-expert loads of all
microbatches and stages are summed before the router-bias update, so the gradient and the bias
update equal the unpipelined step's up to float summation order (tests/test_pipeline.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import Config
from dsv3_jax.layers import embed, rms_norm
from dsv3_jax.placement import param_specs
from dsv3_jax.model import (_REMAT_POLICIES, _RESIDUAL, block, compute_weights, context,
                            default_positions, head_logits, runtime_for)
from dsv3_jax.mtp import mtp_forward, shift_left
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loss import LossWeights, cross_entropy
from sharding import pipeline as executor
from sharding import schedules
from sharding.context import ShardingContext, constrain

STACKS = ("dense_layers", "moe_layers")
_SHARED = ("embed", "head", "final_norm", "mtp")  # weights outside the stages


# ------------------------------------------------------------------------------ stages
def layer_costs(cfg: Config, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each main layer in order (dense first): its matmul weights
    one token meets and its causal attention at `seq_len` (`Config.flops_per_token`'s terms)."""
    attn_mm = cfg._attn_matmul_params()
    attn = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    dense = 2 * (attn_mm + 3 * cfg.dim * cfg.inter_dim) + attn
    moe = 2 * (attn_mm + cfg._moe_matmul_params(cfg.n_activated_experts)) + attn
    return [dense] * cfg.n_dense_layers + [moe] * cfg.n_moe_layers


def tail_cost(cfg: Config, seq_len: int, mtp: bool = True) -> float:
    """The last stage's extra forward FLOPs per token: the head, and each MTP module's
    projection, block and head."""
    attn = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    d = cfg.dim
    module = 2 * (2 * d * d + cfg._attn_matmul_params() + d * cfg.vocab_size
                  + cfg._moe_matmul_params(cfg.n_activated_experts)) + attn
    return 2 * d * cfg.vocab_size + (cfg.mtp_depth * module if mtp else 0.0)


def partition(cfg: Config, n_stages: int, seq_len: int = 4096,
              mtp: bool = True) -> tuple[tuple[int, int], ...]:
    """[lo, hi) layer ranges of `n_stages` contiguous stages minimising the costliest stage
    (`layer_costs`, the last stage also paying `tail_cost`), then, among splits with that
    maximum, the most layers any stage has (every stage's slots are padded to the widest, so
    when the head makes the last stage the costliest, the others share the layers evenly
    instead of the first ones taking all they may); then the earliest stages take the most.
    Every stage gets at least one layer."""
    costs = layer_costs(cfg, seq_len)
    n = len(costs)
    if n_stages > n:
        raise ValueError(f"{n_stages} pipeline stages for {n} layers: every stage needs a "
                         f"layer; use pipeline <= {n} (dualpipev has two stages per rank: "
                         f"pipeline <= {n // 2})")
    tail = tail_cost(cfg, seq_len, mtp)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])

    def better(a, b) -> bool:  # (max cost, max layers) compared with a float tolerance
        if b is None or a[0] < b[0] * (1 - 1e-9):
            return True
        return a[0] <= b[0] * (1 + 1e-9) and a[1] < b[1]

    @functools.lru_cache(maxsize=None)
    def best(start: int, k: int) -> tuple[float, int, tuple]:
        """(max cost, max layers, ranges) splitting layers [start, n) into k stages."""
        if k == 1:
            return prefix[n] - prefix[start] + tail, n - start, ((start, n),)
        out = None
        for hi in range(n - k + 1, start, -1):  # earliest stages as long as possible first
            head = prefix[hi] - prefix[start]
            rest_cost, rest_width, ranges = best(hi, k - 1)
            cand = (max(head, rest_cost), max(hi - start, rest_width),
                    ((start, hi),) + ranges)
            if better(cand, out):
                out = cand
        return out

    return best(0, n_stages)[2]


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Where every layer runs: for each rank and local stage v, the indices of its dense and MoE
    layers in their stacks (padded with -1 to the largest stage)."""
    schedule: str
    ranks: int
    micro: int
    ranges: tuple  # per virtual stage, [lo, hi) over the main layers
    dense: np.ndarray  # [P, V, D_max] int, -1 = padding
    moe: np.ndarray  # [P, V, M_max] int, -1 = padding

    @functools.cached_property
    def timeline(self) -> schedules.Timeline:
        return schedules.place(self.schedule, self.ranks, self.micro)


def stage_plan(cfg: Config, schedule: str, ranks: int, micro: int, seq_len: int = 4096,
               mtp: bool = True) -> StagePlan:
    s = schedules.n_stages(schedule, ranks)
    ranges = partition(cfg, s, seq_len, mtp)
    per = schedules.stages_per_rank(schedule)
    nd = cfg.n_dense_layers
    dense_of = [[i for i in range(lo, hi) if i < nd] for lo, hi in ranges]
    moe_of = [[i - nd for i in range(lo, hi) if i >= nd] for lo, hi in ranges]

    def table(of):
        width = max(len(x) for x in of)
        out = -np.ones((ranks, per, width), np.int64)
        for stage, idx in enumerate(of):
            r, v = schedules.home(schedule, ranks, stage)
            out[r, v, :len(idx)] = idx
        return out

    return StagePlan(schedule, ranks, micro, ranges, table(dense_of), table(moe_of))


def to_stages(idx: np.ndarray, stack):
    """[L, ...] leaves -> [P, V, width, ...] by the plan's indices (padding repeats layer 0).
    Built from static slices, not a gather: each stage is a contiguous run of layers, and XLA's
    partitioner handles slices of a ZeRO-split stack where its gather aborts (XLA 0.11.2)."""
    def one(a):
        rows = [a[i:i + 1] if i >= 0 else a[:1] for i in idx.reshape(-1)]
        return jnp.concatenate(rows).reshape(idx.shape + a.shape[1:])
    return jax.tree.map(one, stack)


def from_stages(idx: np.ndarray, tree, n: int):
    """[P, V, width, ...] leaves -> [L, ...]: each layer's entry, padding dropped (static
    slices, as `to_stages`)."""
    flat = idx.reshape(-1)
    where = {int(layer): j for j, layer in enumerate(flat) if layer >= 0}
    assert sorted(where) == list(range(n)), "every layer belongs to one stage"

    def one(a):
        a = a.reshape((-1,) + a.shape[3:])
        return jnp.concatenate([a[where[i]:where[i] + 1] for i in range(n)])
    return jax.tree.map(one, tree)


# -------------------------------------------------------------------- stage functions
def _ctx(cfg, rt, shard, mb):
    causal = "positions" not in mb and "segment_ids" not in mb
    pos = mb.get("positions", default_positions(mb["inputs"]))
    seg = mb.get("segment_ids")
    token_mask = jnp.ones(mb["inputs"].shape, bool) if seg is None else seg != 0
    return context(cfg, rt, pos, seg, token_mask, shard, causal=causal)


def _run_layers(w, valid, biases, h, ctx, cfg):
    """A stage's layers of one stack; padded slots (valid False) are skipped. Returns (h, load
    [n, E] or None, summed balance)."""
    e = cfg.n_routed_experts

    def body(h, xs):
        lp, ok, bias = xs

        def run(h):
            h2, aux, _ = block(lp, h, ctx, cfg, bias)
            if aux is None:
                return h2, jnp.zeros((e,), jnp.float32), jnp.zeros((), jnp.float32)
            return h2, aux["load"].astype(jnp.float32), aux["balance"].astype(jnp.float32)

        def skip(h):
            return h, jnp.zeros((e,), jnp.float32), jnp.zeros((), jnp.float32)

        h, load, bal = jax.lax.cond(ok, run, skip, h)
        return h, (load, bal)

    if ctx.rt.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[ctx.rt.remat])
    xs = (w, valid, biases)
    if ctx.rt.scan_layers:
        h, (load, bal) = jax.lax.scan(body, h, xs)
    else:
        n = valid.shape[0]
        ys = []
        for i in range(n):
            h, y = body(h, jax.tree.map(lambda a, i=i: a[i], xs))
            ys.append(y)
        load, bal = (jnp.stack(z) for z in zip(*ys))
    return h, load, bal.sum()


def stage_fn(cfg: Config, rt: Runtime, shard):
    def stage(w, c, x, mb):
        ctx = _ctx(cfg, rt, shard, mb)
        h = x
        bal = jnp.zeros((), jnp.float32)
        load = None
        if "dense_layers" in w:
            with jax.named_scope("dense_layers"):
                h, _, _ = _run_layers(w["dense_layers"], c["dense_valid"], None, h, ctx, cfg)
        if "moe_layers" in w:
            with jax.named_scope("moe_layers"):
                h, load, bal = _run_layers(w["moe_layers"], c["moe_valid"], c.get("bias"), h,
                                           ctx, cfg)
        aux = {} if load is None else {"load": load, "balance": bal * mb["balance_weight"]}
        return (h, bal), aux
    return stage


def _embed_fn(cfg: Config, rt: Runtime, shard):
    def fn(shared, mb):
        w = compute_weights({"embed": shared["embed"]}, cfg, rt)
        return constrain(embed(w["embed"], mb["inputs"]), _RESIDUAL, shard, "embedding")
    return fn


def _loss_fn(cfg: Config, rt: Runtime, shard, weights: LossWeights, extra=None):
    """The last stage's part of `loss.loss_fn` for one microbatch, scaled to sum to the
    batch's loss: cross entropies over the batch's target count, balance terms by the
    microbatch's share of sequences; plus `extra(hidden, head, mb, frozen) -> (term,
    metrics)` when given (a term over the final-normed hidden state, e.g. distillation's,
    scaled the same way by its maker)."""
    use_mtp = bool(cfg.mtp_depth) and weights.mtp > 0

    def fn(shared, y, mb, frozen=None):
        w = compute_weights({k: shared[k] for k in ("final_norm", "head")}, cfg, rt)
        targets, mask = mb["targets"], mb["mask"]
        hidden = rms_norm(y, w["final_norm"], cfg.rms_norm_eps)
        logits = head_logits(hidden, w["head"], shard)
        main = (cross_entropy(logits, targets) * mask).sum() / mb["n_targets"]
        metrics = {"main_loss": main}
        total = main
        if extra is not None:
            term, more = extra(hidden, w["head"], mb, frozen)
            total = total + term
            metrics.update(more)
        if use_mtp:
            params = {"weights": {k: shared[k] for k in ("embed", "head", "mtp")},
                      "router_state": {"mtp": {"bias": shared["mtp_bias"]}}
                      if "mtp_bias" in shared else {}}
            pos, seg = mb.get("positions"), mb.get("segment_ids")
            mtp_logits, aux = mtp_forward(params, hidden, targets, cfg, rt, positions=pos,
                                          segment_ids=seg, target_mask=mask > 0, shard=shard)
            real = 1.0 if seg is None else (seg != 0).astype(jnp.float32)
            per_depth = jnp.stack([
                (cross_entropy(mtp_logits[k], shift_left(targets, k + 1))
                 * shift_left(mask, k + 1) * real).sum() / mb["n_targets"]
                for k in range(cfg.mtp_depth)])
            mtp = per_depth.mean()
            balance = (aux["balances"] * mb["mtp_balance_weight"]).sum()
            total = total + weights.mtp * mtp + weights.balance * balance
            metrics.update(mtp_loss=mtp, mtp_load=aux["load"].astype(jnp.float32),
                           mtp_balance=balance)
        return total, metrics
    return fn


# ----------------------------------------------------------------------- the gradient
def microbatches(batch: dict, micro: int, cfg: Config, use_mtp: bool) -> dict:
    """[B, ...] -> [M, B/M, ...] (microbatch j: rows j, j + M, ...; no data movement when B is
    split over devices), with the whole batch's normalisers each microbatch needs."""
    b = batch["inputs"].shape[0]
    if b % micro:
        raise ValueError(f"microbatches={micro} does not divide the batch of {b} sequences "
                         "(per step, on this process)")
    mask = batch.get("mask")
    mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else \
        mask.astype(jnp.float32)
    seg = batch.get("segment_ids")
    tokens = jnp.ones(batch["inputs"].shape, bool) if seg is None else seg != 0

    def split(x):
        return jnp.moveaxis(x.reshape((b // micro, micro) + x.shape[1:]), 1, 0)

    def share(has):  # [B] sequences with tokens -> [M] each microbatch's share
        return split(has.astype(jnp.float32)).sum(1) / jnp.maximum(has.sum(), 1.0)

    out = {k: split(v) for k, v in batch.items() if k != "mask"}
    out["mask"] = split(mask)
    out["n_targets"] = jnp.full((micro,), jnp.maximum(mask.sum(), 1.0))
    out["balance_weight"] = share(tokens.any(-1))
    if use_mtp:
        out["mtp_balance_weight"] = jnp.stack(
            [share(shift_left(mask > 0, k, False).any(-1)) for k in range(cfg.mtp_depth)], -1)
    return out


def pipelined_grads(params: dict, batch: dict, cfg: Config, plan: StagePlan,
                    rt: Runtime | None = None, shard: ShardingContext | None = None, *,
                    weights: LossWeights = LossWeights(), extra=None, frozen=None):
    """(loss, metrics, grads of params["weights"]) of V3's pretraining objective through the
    plan's schedule: the same values as `jax.value_and_grad(loss.loss_fn)` on the whole batch
    (metrics: main_loss, balance_loss, load [L_m, E], and mtp_loss / mtp_load with MTP).
    `extra` / `frozen`: a further term of the last stage and the untrained weights it reads
    (`_loss_fn`); per-row arrays it needs travel in `batch` and are split like the tokens."""
    rt = runtime_for(cfg, rt)
    use_mtp = bool(cfg.mtp_depth) and weights.mtp > 0
    w = params["weights"]
    stage_w, stage_c = _stage_inputs(cfg, plan, params, rt, shard)
    shared = {k: w[k] for k in _SHARED if k in w}
    if not use_mtp:
        shared.pop("mtp", None)
    bias = params["router_state"].get("mtp", {}).get("bias")
    if use_mtp and bias is not None:
        shared["mtp_bias"] = bias
    micro = microbatches(batch, plan.micro, cfg, use_mtp)
    fns = executor.StageFns(embed=_embed_fn(cfg, rt, shard), stage=stage_fn(cfg, rt, shard),
                            loss=_loss_fn(cfg, rt, shard, weights, extra),
                            side_seed=lambda mb: weights.balance * mb["balance_weight"],
                            act=lambda x: constrain(x, _RESIDUAL, shard, "stage activation"))
    g_stage, g_shared, loss, metrics, aux = executor.run(
        plan.timeline, fns, stage_w, stage_c, shared, micro,
        mesh=None if shard is None else shard.mesh, frozen=frozen)
    grads = {k: g_shared[k] for k in _SHARED if k in g_shared}
    if "mtp" in w and "mtp" not in grads:
        grads["mtp"] = jax.tree.map(jnp.zeros_like, w["mtp"])
    for key, idx, n in (("dense_layers", plan.dense, cfg.n_dense_layers),
                        ("moe_layers", plan.moe, cfg.n_moe_layers)):
        if key in g_stage:
            grads[key] = from_stages(idx, g_stage[key], n)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), {k: grads[k] for k in w}, w)
    # the last stage's metrics (main_loss, mtp_loss/mtp_load, an extra term's) as they are;
    # its MTP balance joins the stages' balance terms
    out = {k: v for k, v in metrics.items() if k != "mtp_balance"}
    out["loss"] = loss
    balance = jnp.zeros((), jnp.float32)
    if "load" in aux:
        out["load"] = from_stages(plan.moe, aux["load"], cfg.n_moe_layers)
        balance = aux["balance"].sum()
    else:
        out["load"] = jnp.zeros((0, cfg.n_routed_experts), jnp.float32)
    if use_mtp:
        balance = balance + metrics["mtp_balance"]
    out["balance_loss"] = balance
    return loss, out, grads


def _stage_inputs(cfg: Config, plan: StagePlan, params: dict, rt: Runtime, shard):
    """The stages' weights [P, V, width, ...] in the compute dtype, split over `pipeline`, and
    their constants (which slots are real layers, the router biases)."""
    w = compute_weights({k: params["weights"][k] for k in STACKS if k in params["weights"]},
                        cfg, rt)
    stage_w, stage_c = {}, {}
    for key, idx in (("dense_layers", plan.dense), ("moe_layers", plan.moe)):
        if key not in w or idx.shape[-1] == 0:
            continue
        stage_w[key] = _on_stages(to_stages(idx, w[key]), shard,
                                  None if shard is None else param_specs(cfg, shard)["weights"][key])
        stage_c[key.split("_")[0] + "_valid"] = jnp.asarray(idx >= 0)
    bias = params["router_state"].get("moe_layers", {}).get("bias")
    if "moe_layers" in stage_w and bias is not None:
        stage_c["bias"] = to_stages(plan.moe, bias)
    return stage_w, stage_c


def _on_stages(tree, shard, specs):
    """[P, V, width, ...] leaves split over `pipeline` on P and, on their own dims, as the
    parameters are over the other axes (`specs`: the stacks' PartitionSpecs [L, ...], whose
    ZeRO entries name `pipeline` too: here it moves to the leading dim). So each rank gathers
    its stages' layers from the ZeRO split once per step, and no more: experts stay split over
    `expert`, widths over `tensor`."""
    if shard is None or shard.pipeline == 1:
        return tree

    def one(a, spec):
        rest = [_without(e, "pipeline") for e in tuple(spec)[1:]]
        if shard.sizes.get("tensor", 1) > 1:
            # with a tensor axis, XLA partitions the stage's computation with collective-
            # permutes that deadlock inside the ranks' diverging branches (CPU, XLA 0.11.2):
            # there the stage's weights are whole on each pipeline rank
            rest = []
        rest += [None] * (a.ndim - 3 - len(rest))
        return jax.lax.with_sharding_constraint(a, shard.named(P("pipeline", None, None, *rest)))
    return jax.tree.map(one, tree, specs, is_leaf=lambda x: isinstance(x, P))


def _without(entry, axis):
    if entry is None or entry == axis:
        return None
    if isinstance(entry, str):
        return entry
    kept = tuple(a for a in entry if a != axis)
    return kept if len(kept) > 1 else (kept[0] if kept else None)


def check(cfg: Config, schedule: str, ranks: int, micro: int, batch_per_step: int) -> None:
    """Refuse what a pipeline cannot run, naming the flag."""
    schedules.check(schedule, ranks, micro)
    stages = schedules.n_stages(schedule, ranks)
    if stages > cfg.n_layers:
        raise ValueError(f"--pipeline_schedule {schedule} on pipeline={ranks} needs {stages} "
                         f"stages but the model has {cfg.n_layers} layers")
    if batch_per_step % micro:
        raise ValueError(f"--microbatches {micro} must divide the global batch "
                         f"({batch_per_step} sequences)")
