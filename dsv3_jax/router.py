"""DeepSeekMoE routing, the sequence-wise balance loss and the auxiliary-loss-free bias update.

V3 routing ([PAPER] eqs 12-16, §2.1.2; reference §4.1; `deepseek-ai/DeepSeek-V3@9b4e978
inference/model.py Gate.forward`): affinities s = sigmoid(x W) in float32; the correction bias b
is added *for choosing only*; a group's score is the sum of its two best biased scores; the top
`n_limited_groups` groups stay, the others are masked with -inf (the official fix 1398800; HF
5.23 does the same); the top-A experts of the rest are chosen; their weights come from the
*unbiased* s, renormalised over the chosen A and multiplied by the route scale.
V2 routing (reference §4.2): softmax scores, group score = max, no bias, no renormalisation.

Forced routing (`forced` indices) skips the choice and keeps the weight rule: GRPO replays the
experts a rollout used, so the policy ratio is computed on the same sub-network.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.config import Config


class Routing(NamedTuple):
    indices: jnp.ndarray  # [M0, A] int32 chosen experts
    weights: jnp.ndarray  # [M0, A] float32 combine weights (route scale included)
    scores: jnp.ndarray  # [M0, E] float32 unbiased affinities s


def affinities(x: jnp.ndarray, w_router: jnp.ndarray, cfg: Config) -> jnp.ndarray:
    """s [M0, E] in float32 from x [M0, D] (HF computes the gate in fp32; reference gotcha 9)."""
    logits = jnp.einsum("md,de->me", x.astype(jnp.float32), w_router.astype(jnp.float32))
    return jax.nn.sigmoid(logits) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits, -1)


def choose_experts(scores: jnp.ndarray, bias: jnp.ndarray | None, cfg: Config) -> jnp.ndarray:
    """Group-limited top-A over biased scores: [M0, E] -> indices [M0, A]."""
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    g = cfg.n_expert_groups
    if g > 1:
        grouped = choice.reshape(choice.shape[0], g, cfg.experts_per_group)
        if cfg.group_score == "top2_sum":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        keep = jax.lax.top_k(group_scores, cfg.n_limited_groups)[1]  # [M0, n_limited]
        group_mask = jnp.zeros(group_scores.shape, bool).at[
            jnp.arange(choice.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, cfg.experts_per_group, axis=1), choice, -jnp.inf)
    return jax.lax.top_k(choice, cfg.n_activated_experts)[1].astype(jnp.int32)


def route(x: jnp.ndarray, w_router: jnp.ndarray, bias: jnp.ndarray | None, cfg: Config,
          forced: jnp.ndarray | None = None) -> Routing:
    """Route tokens x [M0, D]; `forced` [M0, A] replaces the choice (routing replay)."""
    scores = affinities(x, w_router, cfg)
    indices = choose_experts(scores, bias, cfg) if forced is None else forced.astype(jnp.int32)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if cfg.norm_topk_prob:
        # the tiny epsilon only guards sigmoid underflow to 0 (HF adds the same 1e-20)
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(indices, weights * cfg.route_scale, scores)


def expert_counts(indices: jnp.ndarray, token_mask: jnp.ndarray, n_experts: int) -> jnp.ndarray:
    """Tokens routed to each expert per sequence: indices [B, T, A], mask [B, T] -> [B, E] f32."""
    b = jnp.arange(indices.shape[0])[:, None, None]
    weight = jnp.broadcast_to(token_mask[:, :, None], indices.shape).astype(jnp.float32)
    return jnp.zeros((indices.shape[0], n_experts), jnp.float32).at[b, indices].add(weight)


def sequence_balance_terms(scores: jnp.ndarray, counts: jnp.ndarray, token_mask: jnp.ndarray,
                           cfg: Config) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per sequence: (Sum_i f_i P_i [B], whether the sequence has tokens [B]) ([PAPER] eqs 17-20).

    scores [B, T, E] unbiased affinities, counts [B, E] from `expert_counts`, token_mask [B, T].
    f_i = E / (A T) * (tokens choosing i) carries no gradient; P_i = mean_t s'_{i,t} with s
    normalised over all E experts (reference §5.2, gotcha 15). Alpha is applied by the loss.
    """
    mask = token_mask.astype(jnp.float32)
    n_tok = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)  # [B, 1]
    f = jax.lax.stop_gradient(counts * cfg.n_routed_experts / (cfg.n_activated_experts * n_tok))
    s_norm = scores / scores.sum(-1, keepdims=True)
    p = (s_norm * mask[..., None]).sum(1) / n_tok  # [B, E]
    return (f * p).sum(-1), (mask.sum(-1) > 0).astype(jnp.float32)


def sequence_balance_loss(scores: jnp.ndarray, counts: jnp.ndarray, token_mask: jnp.ndarray,
                          cfg: Config) -> jnp.ndarray:
    """The sequence-wise balance loss averaged over sequences that have tokens, without alpha."""
    per_seq, has_tokens = sequence_balance_terms(scores, counts, token_mask, cfg)
    return (per_seq * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


def update_router_bias(bias: jnp.ndarray, load: jnp.ndarray, gamma: float) -> jnp.ndarray:
    """b_i += gamma * sign(mean load - load_i) ([PAPER] §2.1.2): overloaded experts get less
    attractive, underloaded more. `load` [..., E] must be the *global* per-expert token count of
    the step (summed over every data shard); the result stays float32."""
    load = load.astype(jnp.float32)
    step = jnp.sign(load.mean(-1, keepdims=True) - load)
    return (bias.astype(jnp.float32) + gamma * step).astype(jnp.float32)
