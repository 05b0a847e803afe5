"""Multi-token prediction ([PAPER] §2.2, eqs 21-23): the modules that follow the main model.

Module k (0-based) at position i combines the previous depth's normalised hidden state h_i
with the embedding of token i+k+1, projects [enorm(emb); hnorm(h)] back to D (the released
order, reference gotcha 13), runs its own transformer block (MLA + MoE) and predicts token
i+k+2 through the head it shares with the main model. Its normalised output feeds module k+1
(transformers' chain).

`mtp_module` is one module over any positions, with or without a latent cache: training runs
it over whole sequences (`mtp_forward`), speculative decoding over the newly settled positions
of a draft loop (`dsv3_jax.infer.speculative`). One function, so the draft is the trained
module.
"""

import jax
import jax.numpy as jnp

from dsv3_jax.config import Config
from dsv3_jax.layers import embed, rms_norm
from dsv3_jax.model import (_RESIDUAL, Context, block, compute_weights, context,
                            default_positions, head_logits, runtime_for, stack_bias)
from dsv3_jax.runtime import Runtime
from sharding.context import ShardingContext, constrain


def shift_left(x: jnp.ndarray, k: int, fill=0) -> jnp.ndarray:
    """x[:, i + k] at position i, `fill` past the end: [B, T] -> [B, T]."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_module(lp: dict, w: dict, h: jnp.ndarray, next_tokens: jnp.ndarray, ctx: Context,
               cfg: Config, bias=None, forced=None, layer_cache: dict | None = None,
               absorbed: bool = False, scope: str = "mtp_0"):
    """One MTP module. lp: its weights (one entry of the `mtp` stack, compute dtype); w: the
    model's compute weights (embedding and head); h [B, T, D]: the previous depth's normalised
    hidden state; next_tokens [B, T]: the token one ahead of each position.

    Returns (logits [B, T, V] float32, its normalised output h' [B, T, D], MoE aux, new layer
    cache or None)."""
    e = constrain(embed(w["embed"], next_tokens, sorted_grad=ctx.shard is None), _RESIDUAL,
                  ctx.shard, "MTP embedding")
    x = jnp.concatenate([rms_norm(e, lp["enorm"], cfg.rms_norm_eps),
                         rms_norm(h, lp["hnorm"], cfg.rms_norm_eps)], axis=-1)
    x = jnp.einsum("btp,pd->btd", x, lp["eh_proj"])
    with jax.named_scope(scope):
        x, aux, new_cache = block(lp, x, ctx, cfg, bias, forced, layer_cache, absorbed)
    out = rms_norm(x, lp["final_norm"], cfg.rms_norm_eps)
    return head_logits(out, w["head"], ctx.shard), out, aux, new_cache


def mtp_forward(params: dict, hidden: jnp.ndarray, targets: jnp.ndarray, cfg: Config,
                rt: Runtime | None = None, *, positions=None, segment_ids=None,
                target_mask=None, forced: jnp.ndarray | None = None,
                shard: ShardingContext | None = None):
    """MTP logits [depth, B, T, V] and aux over whole sequences (training path).

    hidden [B, T, D]: the main model's output after its final norm (what vLLM and transformers
    5.23's MtpModel feed). targets [B, T]: next tokens (targets[i] = token i+1). Module k at
    position i embeds targets[i + k] (token i+k+1) and its logits predict targets[i + k + 1].
    aux: per-module `load` [depth, E], `balance` (summed) and `balances` [depth], `indices`
    [depth, B, T, A].
    """
    rt = runtime_for(cfg, rt)
    w = compute_weights(params["weights"], cfg, rt)
    causal = positions is None and segment_ids is None
    positions = default_positions(targets) if positions is None else positions
    target_mask = jnp.ones(targets.shape, bool) if target_mask is None else target_mask
    biases = stack_bias(params, "mtp")
    logits, loads, balances, indices = [], [], [], []
    h = hidden
    for k in range(cfg.mtp_depth):
        lp = jax.tree.map(lambda a: a[k], w["mtp"])
        ctx = context(cfg, rt, positions, segment_ids, shift_left(target_mask, k, False), shard,
                      causal=causal)
        lg, h, aux, _ = mtp_module(lp, w, h, shift_left(targets, k), ctx, cfg,
                                   None if biases is None else biases[k],
                                   None if forced is None else forced[k], scope=f"mtp_{k}")
        logits.append(lg)
        loads.append(aux["load"]), balances.append(aux["balance"]), indices.append(aux["indices"])
    return jnp.stack(logits), {"load": jnp.stack(loads), "balance": jnp.stack(balances).sum(),
                               "balances": jnp.stack(balances), "indices": jnp.stack(indices)}
