"""Training objective: main next-token loss + lambda * MTP loss + alpha * balance loss.

Main: masked mean cross-entropy. MTP ([PAPER] eqs 24-25): module k's loss is normalised by the
number of main-model targets (the paper's 1/T, not the T-k positions it can score; reference
gotcha 14), averaged over the D modules and weighted by lambda (0.3, later 0.1). Balance
([PAPER] eq 17-20): the sequence-wise loss summed over every MoE layer (MTP blocks included),
times alpha (1e-4).
"""

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.config import Config
from dsv3_jax.model import forward
from dsv3_jax.mtp import mtp_forward, shift_left
from dsv3_jax.runtime import Runtime


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossWeights:
    """The weights of the objective's parts, V3 report §4.2 by default."""
    mtp: float = 0.3  # lambda (0.3 for the first 10T tokens, then 0.1)
    balance: float = 1e-4  # alpha of the sequence-wise balance loss

    def __post_init__(self):
        for f in ("mtp", "balance"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"LossWeights.{f} must be a number >= 0, got {v!r}")


@jax.custom_vjp
def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Per-position -log p(target): logits [..., V] float32, targets [...] -> [...].

    The gradient is written out, softmax - one_hot, in one elementwise pass over the logits:
    autodiff of `take_along_axis` would scatter-add into a zero [..., V] buffer and add that
    to the softmax term (two more passes over the largest tensor of the step; measured on an
    H200 for `small`, about 1 ms per head at 16k tokens)."""
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    with jax.named_scope("head"):  # profiles count the softmax with the head matmul
        logz = jax.nn.logsumexp(logits, axis=-1)
        # the target's logit by a masked sum, not `take_along_axis`: a reduction over a
        # vocabulary split over `tensor` partitions everywhere, while XLA 0.11's partitioner
        # aborts on that gather inside the pipeline's shard_map (tests/test_pipeline.py)
        picked = jnp.where(_one_hot(targets, logits), logits, 0.0).sum(-1)
        # a target outside [0, V) poisons its loss (NaN), as the gather's fill did
        picked = jnp.where((targets >= 0) & (targets < logits.shape[-1]), picked, jnp.nan)
        return logz - picked, (logits, logz, targets)


def _one_hot(targets, logits):
    return jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1) \
        == targets[..., None]


def _cross_entropy_bwd(res, g):
    logits, logz, targets = res
    with jax.named_scope("head"):
        d = (jnp.exp(logits - logz[..., None]) - _one_hot(targets, logits)) * g[..., None]
        return d.astype(logits.dtype), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def loss_fn(params: dict, batch: dict, cfg: Config, rt: Runtime | None = None, *,
            weights: LossWeights = LossWeights(), forced_experts: dict | None = None,
            shard=None, keep_hidden: bool = False):
    """(total loss, metrics) for a batch: main + weights.mtp * MTP + weights.balance * balance.

    batch: `inputs` [B, T] token ids, `targets` [B, T] the next token of each position,
    optional `mask` [B, T] (1 where the target counts), `segment_ids` [B, T] (attention within a
    segment; 0 = padding), `positions` [B, T]. metrics carry the unweighted parts, the per-layer
    expert `load` [L, E] (and `mtp_load`), and the routing `indices` for replay. `rt`: how to
    run it (`dsv3_jax.runtime`); `shard` (a `sharding.context.ShardingContext`) runs it on a
    mesh. With `weights.mtp == 0` the MTP modules are not run at all (no loss, no router
    statistics for their biases). `keep_hidden`: metrics also carry `hidden`, the final-normed
    hidden state [B, T, D] (what distillation feeds the head).
    """
    inputs, targets = batch["inputs"], batch["targets"]
    mask = batch.get("mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    seg, pos = batch.get("segment_ids"), batch.get("positions")
    logits, aux = forward(params, inputs, cfg, rt, positions=pos, segment_ids=seg,
                          forced_experts=forced_experts, shard=shard)
    n_targets = jnp.maximum(mask.sum(), 1.0)
    main = (cross_entropy(logits, targets) * mask).sum() / n_targets
    balance = aux["balance"]
    metrics = {"main_loss": main, "load": aux["load"], "indices": dict(aux["indices"])}
    total = main
    if keep_hidden:
        metrics["hidden"] = aux["hidden"]
    if cfg.mtp_depth and weights.mtp > 0:
        forced = (forced_experts or {}).get("mtp")
        mtp_logits, mtp_aux = mtp_forward(params, aux["hidden"], targets, cfg, rt, positions=pos,
                                          segment_ids=seg, target_mask=mask > 0, forced=forced,
                                          shard=shard)
        # module k at position i predicts targets[i + k + 1]: it counts where that target does
        # and position i is a real token (a padding position has nothing to predict from)
        real = 1.0 if seg is None else (seg != 0).astype(jnp.float32)
        per_depth = jnp.stack([
            (cross_entropy(mtp_logits[k], shift_left(targets, k + 1))
             * shift_left(mask, k + 1) * real).sum() / n_targets for k in range(cfg.mtp_depth)])
        mtp = per_depth.mean()
        total = total + weights.mtp * mtp
        balance = balance + mtp_aux["balance"]
        metrics.update(mtp_loss=mtp, mtp_load=mtp_aux["load"])
        metrics["indices"]["mtp"] = mtp_aux["indices"]
    total = total + weights.balance * balance
    metrics.update(balance_loss=balance, loss=total)
    return total, metrics
