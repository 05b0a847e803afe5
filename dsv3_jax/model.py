"""The DeepSeek-V3 forward pass as pure functions over the params pytree (reference §2, §6).

    h = Embed(tokens)
    for each layer: h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h))   # dense SwiGLU, then MoE
    logits = Head(RMSNorm(h))

Layers of one kind are stacked (`dense_layers`, then `moe_layers`) and run with `jax.lax.scan`,
so compile time does not grow with depth, or unrolled (`Config.scan_layers=False`), which on a
GPU saves the scan's stacking of saved activations (`small` on an H200: 112 against 147 ms per
step, experiments/bench_train.py). MTP modules ([PAPER] §2.2) follow the main model: module k
combines the previous depth's hidden state with the embedding of token i+k+1, runs its own MoE
block and predicts token i+k+2 through the shared head.

Router biases and forced expert choices are arguments, per stack:
`forced_experts = {"moe_layers": [L, B, T, A], "mtp": [depth, B, T, A]}` (either key optional),
the same structure as the `indices` this module returns, so a rollout's routing replays as is.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax import latent_cache
from dsv3_jax.config import Config
from dsv3_jax.layers import embed, head, rms_norm, swiglu
from dsv3_jax.mla import causal_mask, mla, mla_cached
from dsv3_jax.moe import moe
from dsv3_jax.rope import rope_tables
from sharding.context import ShardingContext, constrain

# Kept in float32 whatever the compute dtype: norms and the router (V3 report §3.3.1 keeps
# norms and gating in higher precision; the router bias is float32 state already).
_KEEP_FP32 = frozenset({"router", "attn_norm", "ffn_norm", "q_norm", "kv_norm", "final_norm",
                        "enorm", "hnorm"})

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Context(NamedTuple):
    """What every layer of one forward pass shares."""
    cos: jnp.ndarray  # [B, T, R/2]
    sin: jnp.ndarray  # [B, T, R/2]
    mask: jnp.ndarray | None  # [B, T, T] attention mask (training path)
    positions: jnp.ndarray  # [B, T]
    token_mask: jnp.ndarray  # [B, T] tokens counted in router statistics
    shard: ShardingContext | None  # the mesh and strategy; None on one device
    causal: bool = False  # mask is exactly "key position <= query position" (default positions,
    # no segments): attention kernels may then use their built-in causal mask instead of `mask`


_RESIDUAL = ("batch", "seq", "embed")  # x: [B_(batch axes), T, D]


def compute_weights(weights: dict, cfg: Config) -> dict:
    """Cast master weights to the compute dtype, norms and router excepted."""
    dtype = jnp.dtype(cfg.dtype)

    def cast(path, leaf):
        return leaf if path[-1].key in _KEEP_FP32 else leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, weights)


def block(lp: dict, h: jnp.ndarray, ctx: Context, cfg: Config, bias=None, forced=None,
          layer_cache: dict | None = None, absorbed: bool = False):
    """One pre-norm decoder layer. Returns (h, MoE aux or None, new layer cache or None)."""
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    with jax.named_scope("mla"):
        if layer_cache is None:
            a = mla(lp["attn"], x, ctx.cos, ctx.sin, ctx.mask, cfg, ctx.shard, causal=ctx.causal)
            new_cache = None
        else:
            a, new_cache = mla_cached(lp["attn"], x, ctx.cos, ctx.sin, ctx.positions,
                                      layer_cache, cfg, absorbed=absorbed, shard=ctx.shard)
    h = h + a
    x = rms_norm(h, lp["ffn_norm"], cfg.rms_norm_eps)
    if "moe" in lp:
        with jax.named_scope("moe"):
            f, aux = moe(lp["moe"], x, bias, ctx.token_mask, cfg, forced, ctx.shard)
    else:
        with jax.named_scope("ffn"):
            ffn = lp["ffn"]
            f, aux = swiglu(x, ffn["w_gate"], ffn["w_up"], ffn["w_down"], ctx.shard,
                            fp8_impl=cfg.fp8_gemm_impl()), None
    return constrain(h + f, _RESIDUAL, ctx.shard, "layer output"), aux, new_cache


def run_stack(stack: dict, h: jnp.ndarray, ctx: Context, cfg: Config, *, biases=None,
              forced=None, cache=None, absorbed=False, collect_hidden=False):
    """Scan `block` over a stack's leading L axis. Returns (h, (aux, new cache, hidden [L,B,T,D]))."""

    def body(h, xs):
        lp, bias, forced_l, cache_l = xs
        h, aux, new_cache = block(lp, h, ctx, cfg, bias, forced_l, cache_l, absorbed)
        return h, (aux, new_cache, h if collect_hidden else None)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
    xs = (stack, biases, forced, cache)
    if cfg.scan_layers:
        return jax.lax.scan(body, h, xs)
    # Unrolled: `unstack` (not L slices) so the weight gradients come back as one `stack`
    # rather than L zero-padded full-size adds.
    n = jax.tree.leaves(stack)[0].shape[0]
    leaves, treedef = jax.tree.flatten(xs)
    columns = [jnp.unstack(a) for a in leaves]
    ys = []
    for i in range(n):
        h, y = body(h, jax.tree.unflatten(treedef, [c[i] for c in columns]))
        ys.append(y)
    return h, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _stack_bias(params: dict, key: str):
    return params["router_state"].get(key, {}).get("bias")


def _context(cfg: Config, positions, segment_ids, token_mask, shard, with_mask=True,
             causal=False) -> Context:
    cos, sin = rope_tables(positions, cfg)
    mask = causal_mask(positions, segment_ids) if with_mask else None
    return Context(cos, sin, mask, positions, token_mask, shard, causal)


def _default_positions(tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def forward(params: dict, tokens: jnp.ndarray, cfg: Config, *, positions=None, segment_ids=None,
            forced_experts: dict | None = None, collect_hidden: bool = False,
            shard: ShardingContext | None = None):
    """Main-model logits [B, T, V] (float32) and aux for tokens [B, T] (training path).

    segment_ids [B, T]: tokens attend within their segment only; id 0 marks padding, which is
    left out of the router statistics. aux: `hidden` [B, T, D] after the final norm (the MTP
    input), `load` [L, E], `balance` (sum over MoE layers, unscaled), `indices`
    {"moe_layers": [L, B, T, A]}, and with `collect_hidden` `hidden_states` [n_layers, B, T, D]
    (each layer's output before the final norm). `shard` runs it on a mesh (see sharding/).
    """
    _check_fp8_kernels_on_mesh(cfg, shard)
    w = compute_weights(params["weights"], cfg)
    causal = positions is None and segment_ids is None
    positions = _default_positions(tokens) if positions is None else positions
    token_mask = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids != 0
    ctx = _context(cfg, positions, segment_ids, token_mask, shard, causal=causal)
    forced = (forced_experts or {}).get("moe_layers")
    h = constrain(embed(w["embed"], tokens), _RESIDUAL, shard, "embedding")
    hidden = []
    if cfg.n_dense_layers:
        with jax.named_scope("dense_layers"):
            h, (_, _, hs) = run_stack(w["dense_layers"], h, ctx, cfg, collect_hidden=collect_hidden)
        hidden.append(hs)
    e = cfg.n_routed_experts
    aux = {"load": jnp.zeros((0, e)), "balance": jnp.zeros(()), "indices": {}}
    if cfg.n_moe_layers:
        with jax.named_scope("moe_layers"):
            h, (moe_aux, _, hs) = run_stack(w["moe_layers"], h, ctx, cfg, forced=forced,
                                            biases=_stack_bias(params, "moe_layers"),
                                            collect_hidden=collect_hidden)
        hidden.append(hs)
        aux = {"load": moe_aux["load"], "balance": moe_aux["balance"].sum(),
               "indices": {"moe_layers": moe_aux["indices"]}}
    aux["hidden"] = rms_norm(h, w["final_norm"], cfg.rms_norm_eps)
    if collect_hidden:
        aux["hidden_states"] = jnp.concatenate(hidden, axis=0)
    return _logits(aux["hidden"], w["head"], shard), aux


def _check_fp8_kernels_on_mesh(cfg: Config, shard: ShardingContext | None) -> None:
    """The dense FP8 linears' Pallas kernels (fp8_gemm, fp8_quant_kernel) carry no sharding
    rule, so on a mesh of several devices XLA's partitioner would gather their operands onto
    every device: a silent replication. The routed experts run inside shard_map and are fine;
    until the dense calls get a shard_map of their own, a mesh needs the XLA path, for the
    GEMMs and for the activation quantizers alike."""
    if shard is None or not cfg.fp8 or all(n == 1 for n in shard.sizes.values()):
        return
    for field, resolved in (("fp8_impl", cfg.resolved_fp8_impl()),
                            ("fp8_quant_impl", cfg.resolved_fp8_quant_impl())):
        if resolved == "pallas":
            raise ValueError(f"Config.{field} resolves to 'pallas' on a mesh of {shard.sizes}: "
                             "the dense FP8 kernels have no sharding rule yet and would be "
                             "replicated on every device; run them on one device, or set "
                             f"{field}='xla' (--{field} xla) on a mesh")


def _logits(h, w_head, shard):
    with jax.named_scope("head"):
        return constrain(head(h, w_head), ("batch", "seq", "vocab"), shard, "logits")


def shift_left(x: jnp.ndarray, k: int, fill=0) -> jnp.ndarray:
    """x[:, i + k] at position i, `fill` past the end: [B, T] -> [B, T]."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_forward(params: dict, hidden: jnp.ndarray, targets: jnp.ndarray, cfg: Config, *,
                positions=None, segment_ids=None, target_mask=None, forced: jnp.ndarray | None = None,
                shard: ShardingContext | None = None):
    """MTP logits [depth, B, T, V] and aux ([PAPER] eqs 21-23).

    hidden [B, T, D]: the main model's output after its final norm (what vLLM and transformers
    5.23's MtpModel feed). targets [B, T]: next tokens (targets[i] = token i+1). Module k
    (0-based) at position i embeds targets[i + k] (token i+k+1) and its logits predict
    targets[i + k + 1]. Each module's normalised output feeds the next (transformers' chain).
    """
    w = compute_weights(params["weights"], cfg)
    causal = positions is None and segment_ids is None
    positions = _default_positions(targets) if positions is None else positions
    target_mask = jnp.ones(targets.shape, bool) if target_mask is None else target_mask
    biases = _stack_bias(params, "mtp")
    logits, loads, balances, indices = [], [], [], []
    h = hidden
    for k in range(cfg.mtp_depth):
        lp = jax.tree.map(lambda a: a[k], w["mtp"])
        ctx = _context(cfg, positions, segment_ids, shift_left(target_mask, k, False), shard,
                       causal=causal)
        e = constrain(embed(w["embed"], shift_left(targets, k)), _RESIDUAL, shard, "MTP embedding")
        x = jnp.concatenate([rms_norm(e, lp["enorm"], cfg.rms_norm_eps),
                             rms_norm(h, lp["hnorm"], cfg.rms_norm_eps)], axis=-1)
        x = jnp.einsum("btp,pd->btd", x, lp["eh_proj"])
        with jax.named_scope(f"mtp_{k}"):
            x, aux, _ = block(lp, x, ctx, cfg, None if biases is None else biases[k],
                              None if forced is None else forced[k])
        h = rms_norm(x, lp["final_norm"], cfg.rms_norm_eps)
        logits.append(_logits(h, w["head"], shard))
        loads.append(aux["load"]), balances.append(aux["balance"]), indices.append(aux["indices"])
    return jnp.stack(logits), {"load": jnp.stack(loads), "balance": jnp.stack(balances).sum(),
                               "indices": jnp.stack(indices)}


# ---------------------------------------------------------------------------- latent cache
def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """An empty latent cache: per layer c_kv [B, S, C] and k_rope [B, S, R] (C + R numbers per
    token per layer: 576 for V3, against 40,960 for expanded keys and values). dtype
    float8_e4m3fn stores c_kv in e4m3 with per-token scales (`c_kv_scale`) and k_rope in bf16
    (dsv3_jax/latent_cache.py)."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds Config.max_seq_len={cfg.max_seq_len}")
    cache = {"length": jnp.zeros((batch,), jnp.int32)}
    if cfg.n_dense_layers:
        cache["dense_layers"] = latent_cache.empty(cfg, (cfg.n_dense_layers, batch), max_len, dtype)
    if cfg.n_moe_layers:
        cache["moe_layers"] = latent_cache.empty(cfg, (cfg.n_moe_layers, batch), max_len, dtype)
    return cache


def cache_bytes_per_token(cfg: Config, dtype=jnp.bfloat16) -> int:
    """Bytes of one token's latent cache over all main layers."""
    return cfg.n_layers * latent_cache.bytes_per_token(cfg, dtype)


def forward_cached(params: dict, tokens: jnp.ndarray, cache: dict, cfg: Config, *,
                   absorbed: bool = True, n_valid: jnp.ndarray | None = None,
                   forced_experts: dict | None = None, shard: ShardingContext | None = None):
    """Logits [B, T, V] for tokens [B, T] that continue each cached sequence, and the new cache.

    Token t of row b sits at position cache["length"][b] + t. `absorbed` picks the decode form
    (attention over the latent cache) or the expanded form (prefill); both give the same logits.
    n_valid [B] (default T) is how many of the new tokens are real; the rest are padding that
    later tokens overwrite.
    """
    w = compute_weights(params["weights"], cfg)
    b, t = tokens.shape
    positions = cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    ctx = _context(cfg, positions, None, jnp.ones(tokens.shape, bool), shard, with_mask=False)
    h = embed(w["embed"], tokens)
    new_cache = {"length": cache["length"] + (t if n_valid is None else n_valid)}
    aux = {"indices": {}}
    for key, biases in (("dense_layers", None), ("moe_layers", _stack_bias(params, "moe_layers"))):
        if key not in w:
            continue
        forced = (forced_experts or {}).get(key)
        h, (stack_aux, new_cache[key], _) = run_stack(
            w[key], h, ctx, cfg, biases=biases, forced=forced, cache=cache[key], absorbed=absorbed)
        if stack_aux is not None:
            aux["indices"][key] = stack_aux["indices"]
    aux["hidden"] = rms_norm(h, w["final_norm"], cfg.rms_norm_eps)
    return _logits(aux["hidden"], w["head"], shard), new_cache, aux
