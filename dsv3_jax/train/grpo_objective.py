"""The GRPO objective as pure functions: group advantages, the k3 KL, rollout importance weights
and the clipped policy loss with TRL's aggregations.

The objective is DeepSeekMath's (arXiv 2402.03300 §4.1) with the variants TRL's GRPOTrainer
(`trl/trainer/grpo_trainer.py`) exposes: Dr. GRPO (arXiv 2503.20783), DAPO's clip-higher and
token-level loss (arXiv 2503.14476), GSPO's sequence-level ratio (arXiv 2507.18071) and the
truncated / masked importance sampling TRL applies against a rollout engine's numerics.

Layout: N = P * G completions, rows g*G .. g*G+G-1 are the G completions of prompt g. Per-token
arrays are [N, T] over completion tokens only, with `mask` [N, T] (1 = a token that counts).
"""

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "off")
ZERO_STD = 1e-6  # a group whose reward std is below this has no learning signal


def _choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def group_advantages(rewards: jnp.ndarray, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> tuple[jnp.ndarray, dict]:
    """Advantages [N] = reward - its group's mean, divided by (std + eps) unless scale="none".

    scale "group" divides by the group's std (DeepSeekMath), "batch" by the std over the whole
    batch (Lite-PPO), "none" not at all (Dr. GRPO). Stds are unbiased (ddof=1) as torch's
    default `.std()` that TRL uses. stats: `reward_mean`; `reward_std`, the mean over groups of
    the group std (older TRL's log; current TRL logs the batch std); `frac_reward_zero_std`,
    the fraction of groups whose std is below 1e-6 (always the group std, whatever the scale).
    """
    _choice("group_advantages: scale", scale, SCALES)
    n = rewards.shape[0]
    if rewards.ndim != 1 or group_size < 2 or n % group_size:
        raise ValueError(f"group_advantages: rewards must be [N] with N a multiple of group_size "
                         f">= 2; got rewards shape {rewards.shape} (N={n}), group_size="
                         f"{group_size}")
    grouped = rewards.astype(jnp.float32).reshape(n // group_size, group_size)
    group_std = jnp.std(grouped, axis=1, ddof=1)
    adv = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (group_std[:, None] + eps)
    elif scale == "batch":
        adv = adv / (jnp.std(grouped, ddof=1) + eps)
    stats = {"reward_mean": jnp.mean(grouped), "reward_std": jnp.mean(group_std),
             "frac_reward_zero_std": jnp.mean((jnp.abs(group_std) < ZERO_STD).astype(jnp.float32))}
    return adv.reshape(n), stats


def k3_kl(logp: jnp.ndarray, ref_logp: jnp.ndarray) -> jnp.ndarray:
    """Per-token KL(pi || pi_ref) estimate, Schulman's k3: exp(d) - d - 1 with d = ref - logp.

    Unbiased for samples from pi, >= 0 everywhere and 0 where the policies agree (the
    estimator DeepSeekMath and TRL put in the loss)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def rollout_is_weights(old_logp: jnp.ndarray, rollout_logp: jnp.ndarray, mask: jnp.ndarray,
                       mode: str = "token_truncate", cap: float = 3.0) -> jnp.ndarray:
    """Importance weights [N, T] correcting for the rollout engine's numerics (no gradient).

    ratio = exp(old_logp - rollout_logp): the training forward's probability of each sampled
    token over the engine's (TRL's vllm_importance_sampling_*). "token_truncate": min(ratio,
    cap); "token_mask": ratio, or 0 where ratio > cap; "sequence_truncate" / "sequence_mask": the
    same on the sequence ratio exp(sum_t mask * (old - rollout)), broadcast over its tokens;
    "off": ones. Positions outside `mask` get weight 0 (TRL gives them 1; the losses multiply
    by the mask anyway, so only metrics that do not mask could tell).
    """
    _choice("rollout_is_weights: mode", mode, IS_MODES)
    mask = mask.astype(jnp.float32)
    diff = (old_logp.astype(jnp.float32) - rollout_logp.astype(jnp.float32)) * mask
    if mode == "off":
        return mask
    if mode.startswith("sequence"):
        diff = jnp.sum(diff, axis=1, keepdims=True)
    ratio = jnp.exp(diff)
    w = jnp.minimum(ratio, cap) if mode.endswith("truncate") else jnp.where(ratio <= cap, ratio, 0.)
    return jax.lax.stop_gradient(w * mask)


def _masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def policy_loss(logp: jnp.ndarray, old_logp: jnp.ndarray, advantages: jnp.ndarray,
                mask: jnp.ndarray, *, loss_type: str = "dapo", epsilon: float = 0.2,
                epsilon_high: float | None = None, importance_sampling_level: str = "token",
                beta: float = 0.0, ref_logp: jnp.ndarray | None = None,
                is_weights: jnp.ndarray | None = None, max_completion_length: int | None = None,
                num_items: float | jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
    """(loss, metrics) of the clipped GRPO surrogate, aggregated as TRL's `loss_type`.

    Per token: -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A), times `is_weights` if
    given, plus beta * k3_kl(logp, ref_logp) if beta > 0. r = exp(logp - old_logp) per token,
    or at importance_sampling_level="sequence" (GSPO) exp of the sequence's masked mean log
    ratio, with the gradient through that mean as in TRL. Aggregation: "grpo" the mean over
    sequences of each one's token mean; "bnpo" the token mean of this batch; "dr_grpo" the token
    sum / (N * max_completion_length); "dapo" the token sum / num_items, the completion-token
    count of the whole optimizer batch (TRL's num_items_in_batch), so that the losses of its
    micro-batches (and processes) sum to the loss of the whole; num_items=None counts this
    batch, and then dapo equals bnpo (they differ only when a batch is split).

    metrics, masked means over completion tokens (at sequence level each sequence weighs its
    length): clip_frac_low / _high / clip_frac (tokens the clip zeroes the gradient of),
    ratio_mean, ratio_std (ddof=0), `kl` (mean k3) whenever ref_logp is given, and
    is_weight_mean when is_weights is given.
    """
    _choice("policy_loss: loss_type", loss_type, LOSS_TYPES)
    _choice("policy_loss: importance_sampling_level", importance_sampling_level, LEVELS)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"policy_loss: beta={beta} > 0 needs ref_logp (the reference policy's "
                         "per-token log-probs); pass it or set beta=0")
    n, t = logp.shape
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < t):
        raise ValueError(f"policy_loss: loss_type='dr_grpo' needs max_completion_length >= T={t} "
                         f"(its constant normaliser), got {max_completion_length}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.astype(jnp.float32)
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = (jnp.sum(log_ratio * mask, axis=1, keepdims=True)
                     / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0))
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - epsilon, 1 + eps_high) * adv)
    per_token = jnp.broadcast_to(per_token, (n, t))
    if is_weights is not None:
        per_token = per_token * is_weights
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta > 0:
            per_token = per_token + beta * kl

    masked = per_token * mask
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    elif loss_type == "bnpo":
        loss = jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0)
    elif loss_type == "dr_grpo":
        loss = jnp.sum(masked) / (n * max_completion_length)
    else:  # dapo
        count = jnp.sum(mask) if num_items is None else jnp.asarray(num_items, jnp.float32)
        loss = jnp.sum(masked) / jnp.maximum(count, 1.0)

    ratio = jax.lax.stop_gradient(jnp.broadcast_to(ratio, (n, t)))
    low = ((ratio < 1 - epsilon) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1 + eps_high) & (adv > 0)).astype(jnp.float32)
    ratio_mean = _masked_mean(ratio, mask)
    metrics = {"clip_frac_low": _masked_mean(low, mask), "clip_frac_high": _masked_mean(high, mask),
               "clip_frac": _masked_mean(jnp.maximum(low, high), mask), "ratio_mean": ratio_mean,
               "ratio_std": jnp.sqrt(_masked_mean((ratio - ratio_mean) ** 2, mask))}
    if ref_logp is not None:
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl), mask)
    if is_weights is not None:
        metrics["is_weight_mean"] = _masked_mean(is_weights, mask)
    return loss, metrics
