"""The DeepSeek-V3 forward pass as pure functions over the params pytree (reference §2, §6).

    h = Embed(tokens)
    for each layer: h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h))   # dense SwiGLU, then MoE
    logits = Head(RMSNorm(h))

Layers of one kind are stacked (`dense_layers`, then `moe_layers`) and run with `jax.lax.scan`,
so compile time does not grow with depth, or unrolled (`Runtime.scan_layers=False`), which on a
GPU saves the scan's stacking of saved activations (docs/performance.md). The MTP modules that
follow the main model are in `dsv3_jax.mtp`.

How the model runs (compute dtype, remat, the layer loop, every kernel) is a resolved
`dsv3_jax.runtime.Runtime`, passed in as `rt` (None: `Runtime()`, the portable XLA paths in the
model's own dtype); nothing here asks the backend.

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
from dsv3_jax.params import fact_tree
from dsv3_jax.rope import rope_tables
from dsv3_jax.runtime import Runtime
from sharding.context import ShardingContext, constrain

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
    rt: Runtime  # how to run: dtype, remat, kernels (resolved: dtype set)
    causal: bool = False  # mask is exactly "key position <= query position" (default positions,
    # no segments): attention kernels may then use their built-in causal mask instead of `mask`


_RESIDUAL = ("batch", "seq", "embed")  # x: [B_(batch axes), T, D]


def runtime_for(cfg: Config, rt: Runtime | None) -> Runtime:
    """`rt` (default `Runtime()`) with its compute dtype fixed for `cfg`."""
    return (rt or Runtime()).for_model(cfg)


def compute_weights(weights: dict, cfg: Config, rt: Runtime | None = None) -> dict:
    """Cast master weights to the compute dtype, except the leaves declared `keep_fp32`
    (norm gains and the router: `params.Decl`). Takes stacks split into layers
    (`split_layers`) as well."""
    dtype = jnp.dtype(runtime_for(cfg, rt).dtype)
    keep = fact_tree(cfg, "keep_fp32")["weights"]

    def cast(keep_tree, tree):
        return jax.tree.map(lambda k, leaf: leaf if k else leaf.astype(dtype), keep_tree, tree)

    return {name: [cast(keep[name], layer) for layer in sub] if isinstance(sub, list)
            else cast(keep[name], sub) for name, sub in weights.items()}


def decode_layout(params: dict, rt: Runtime) -> dict:
    """params in the decode layout `rt` asks for: the main stacks split into layers
    (`split_layers`) unless `rt.scan_layers`; pair it with `init_cache(..., per_layer=not
    rt.scan_layers)`. Called inside a decode program's jit, so the split is one slice per
    layer before the decode loop, not eager work (and a weight copy) on every call."""
    return params if rt.scan_layers else {**params, "weights": split_layers(params["weights"])}


# The main model's layer stacks; the MTP stack stays stacked (one module per draft).
STACKS = ("dense_layers", "moe_layers")


def split_layers(weights: dict) -> dict:
    """The main model's layer stacks as lists of per-layer trees: the decode layout. A decode
    step that slices a stacked [L, ...] weight per layer copies it on a GPU (the slice feeds a
    kernel that cannot read a strided view, once per token inside the decode loop); per-layer
    arrays are read in place. `run_stack` and `forward_cached` take either layout."""
    out = dict(weights)
    for key in STACKS:
        if key in weights and not isinstance(weights[key], list):
            n = jax.tree.leaves(weights[key])[0].shape[0]
            out[key] = [jax.tree.map(lambda a, i=i: a[i], weights[key]) for i in range(n)]
    return out


def block(lp: dict, h: jnp.ndarray, ctx: Context, cfg: Config, bias=None, forced=None,
          layer_cache: dict | None = None, absorbed: bool = False):
    """One pre-norm decoder layer. Returns (h, MoE aux or None, new layer cache or None)."""
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    with jax.named_scope("mla"):
        if layer_cache is None:
            a = mla(lp["attn"], x, ctx.cos, ctx.sin, ctx.mask, cfg, ctx.rt, ctx.shard,
                    causal=ctx.causal)
            new_cache = None
        else:
            a, new_cache = mla_cached(lp["attn"], x, ctx.cos, ctx.sin, ctx.positions,
                                      layer_cache, cfg, ctx.rt, absorbed=absorbed,
                                      shard=ctx.shard)
    h = h + a
    x = rms_norm(h, lp["ffn_norm"], cfg.rms_norm_eps)
    if "moe" in lp:
        with jax.named_scope("moe"):
            f, aux = moe(lp["moe"], x, bias, ctx.token_mask, cfg, ctx.rt, forced, ctx.shard)
    else:
        with jax.named_scope("ffn"):
            ffn = lp["ffn"]
            f, aux = swiglu(x, ffn["w_gate"], ffn["w_up"], ffn["w_down"], ctx.shard,
                            fp8_impl=ctx.rt.fp8), None
    return constrain(h + f, _RESIDUAL, ctx.shard, "layer output"), aux, new_cache


def run_stack(stack: dict | list, h: jnp.ndarray, ctx: Context, cfg: Config, *, biases=None,
              forced=None, cache=None, absorbed=False, collect_hidden=False):
    """Scan `block` over a stack's leading L axis. Returns (h, (aux, new cache, hidden [L,B,T,D])).

    `stack` may also be a list of per-layer trees (`split_layers`, the decode layout), with
    `cache` then a list of per-layer caches: the layers run unrolled on their own arrays and
    the new cache comes back as a list (nothing sliced, nothing restacked)."""

    def body(h, xs):
        lp, bias, forced_l, cache_l = xs
        h, aux, new_cache = block(lp, h, ctx, cfg, bias, forced_l, cache_l, absorbed)
        return h, (aux, new_cache, h if collect_hidden else None)

    if ctx.rt.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[ctx.rt.remat])
    if isinstance(stack, list):
        if cache is not None and not isinstance(cache, list):
            raise ValueError("layers split into a list (split_layers) need a per-layer cache "
                             "(init_cache(..., per_layer=True))")
        ys, caches = [], []
        for i, lp in enumerate(stack):
            pick = lambda a: jax.tree.map(lambda v: v[i], a)  # noqa: E731 - [L, ...] -> layer i
            h, (aux, new_cache, hidden) = body(h, (lp, pick(biases), pick(forced),
                                                   None if cache is None else cache[i]))
            ys.append((aux, hidden))
            caches.append(new_cache)
        aux, hidden = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else (None, None)
        return h, (aux, caches if cache is not None else None, hidden)
    if isinstance(cache, list):
        raise ValueError("a per-layer cache (init_cache(..., per_layer=True)) needs the layers "
                         "split into a list (split_layers)")
    xs = (stack, biases, forced, cache)
    if ctx.rt.scan_layers:
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


def stack_bias(params: dict, key: str):
    """The router biases [L, E] of stack `key` ("moe_layers", "mtp"), or None without them;
    with redundant experts (`sharding.eplb.replica_state` under router_state[key]["replicas"])
    the stack's router state {"bias", "replicas"}, sliced per layer like the bias."""
    state = params["router_state"].get(key, {})
    if "replicas" in state:
        return {"bias": state.get("bias"), "replicas": state["replicas"]}
    return state.get("bias")


def context(cfg: Config, rt: Runtime, positions, segment_ids, token_mask, shard,
            with_mask=True, causal=False) -> Context:
    cos, sin = rope_tables(positions, cfg)
    mask = causal_mask(positions, segment_ids) if with_mask else None
    return Context(cos, sin, mask, positions, token_mask, shard, rt, causal)


def default_positions(tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def forward(params: dict, tokens: jnp.ndarray, cfg: Config, rt: Runtime | None = None, *,
            positions=None, segment_ids=None, forced_experts: dict | None = None,
            collect_hidden: bool = False, shard: ShardingContext | None = None):
    """Main-model logits [B, T, V] (float32) and aux for tokens [B, T] (training path).

    segment_ids [B, T]: tokens attend within their segment only; id 0 marks padding, which is
    left out of the router statistics. aux: `hidden` [B, T, D] after the final norm (the MTP
    input), `load` [L, E], `balance` (sum over MoE layers, unscaled), `indices`
    {"moe_layers": [L, B, T, A]}, and with `collect_hidden` `hidden_states` [n_layers, B, T, D]
    (each layer's output before the final norm). `shard` runs it on a mesh (see sharding/).
    """
    rt = runtime_for(cfg, rt)
    check_plain_mesh(shard)
    w = compute_weights(params["weights"], cfg, rt)
    causal = positions is None and segment_ids is None
    positions = default_positions(tokens) if positions is None else positions
    token_mask = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids != 0
    ctx = context(cfg, rt, positions, segment_ids, token_mask, shard, causal=causal)
    forced = (forced_experts or {}).get("moe_layers")
    h = constrain(embed(w["embed"], tokens, sorted_grad=shard is None), _RESIDUAL, shard,
                  "embedding")
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
                                            biases=stack_bias(params, "moe_layers"),
                                            collect_hidden=collect_hidden)
        hidden.append(hs)
        aux = {"load": moe_aux["load"], "balance": moe_aux["balance"].sum(),
               "indices": {"moe_layers": moe_aux["indices"]}}
    aux["hidden"] = rms_norm(h, w["final_norm"], cfg.rms_norm_eps)
    if collect_hidden:
        aux["hidden_states"] = jnp.concatenate(hidden, axis=0)
    return head_logits(aux["hidden"], w["head"], shard), aux


def check_plain_mesh(shard: ShardingContext | None) -> None:
    """The plain forward's mesh: any but one with a pipeline axis, which runs the model only
    through a pipeline schedule. (The FP8 kernels run on any mesh: each dense FP8 GEMM in its
    own shard_map, `fp8.matmul`; the routed experts inside the MoE's.)"""
    if shard is not None and shard.pipeline > 1:
        raise ValueError(f"a mesh with pipeline={shard.pipeline} runs the model only through a "
                         "pipeline schedule (dsv3_jax.train.pipeline, --pipeline_schedule); "
                         "the plain forward would repeat every layer on every pipeline rank")


def head_logits(h, w_head, shard):
    """Head logits [B, T, V] in float32 from the normalised hidden state h [B, T, D]."""
    with jax.named_scope("head"):
        return constrain(head(h, w_head), ("batch", "seq", "vocab"), shard, "logits")


# ---------------------------------------------------------------------------- latent cache
def init_cache(cfg: Config, batch: int, max_len: int, dtype=None, *,
               per_layer: bool = False) -> dict:
    """An empty latent cache: per layer c_kv [B, S, C] and k_rope [B, S, R] (C + R numbers per
    token per layer: 576 for V3, against 40,960 for expanded keys and values). dtype: None =
    the model's own dtype (`Config.dtype`, what it computes in by default); bfloat16 or
    float16 halve a float32 model's cache; float8_e4m3fn stores c_kv in e4m3 with per-token
    scales (`c_kv_scale`) and k_rope in bf16 (dsv3_jax/latent_cache.py). per_layer: each stack
    as a list of per-layer caches (the decode layout, with `split_layers` weights: each token
    writes its layer's arrays in place, where a stacked cache is re-stacked every step)."""
    dtype = cfg.dtype if dtype is None else dtype
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds Config.max_seq_len={cfg.max_seq_len}")
    cache = {"length": jnp.zeros((batch,), jnp.int32)}
    for key, n in (("dense_layers", cfg.n_dense_layers), ("moe_layers", cfg.n_moe_layers)):
        if n:
            cache[key] = ([latent_cache.empty(cfg, (batch,), max_len, dtype) for _ in range(n)]
                          if per_layer else latent_cache.empty(cfg, (n, batch), max_len, dtype))
    return cache


def cache_bytes_per_token(cfg: Config, dtype=None) -> int:
    """Bytes of one token's latent cache over all main layers, in `dtype` (None: the model's
    own dtype, as `init_cache`)."""
    return cfg.n_layers * latent_cache.bytes_per_token(cfg, cfg.dtype if dtype is None else dtype)


def forward_cached(params: dict, tokens: jnp.ndarray, cache: dict, cfg: Config,
                   rt: Runtime | None = None, *, absorbed: bool = True,
                   n_valid: jnp.ndarray | None = None, forced_experts: dict | None = None,
                   shard: ShardingContext | None = None):
    """Logits [B, T, V] for tokens [B, T] that continue each cached sequence, and the new cache.

    Token t of row b sits at position cache["length"][b] + t. `absorbed` picks the decode form
    (attention over the latent cache) or the expanded form (prefill); both give the same logits.
    n_valid [B] (default T) is how many of the new tokens are real; the rest are padding that
    later tokens overwrite.
    """
    rt = runtime_for(cfg, rt)
    check_plain_mesh(shard)
    w = compute_weights(params["weights"], cfg, rt)
    b, t = tokens.shape
    positions = cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    ctx = context(cfg, rt, positions, None, jnp.ones(tokens.shape, bool), shard,
                  with_mask=False)
    h = embed(w["embed"], tokens)
    new_cache = {"length": cache["length"] + (t if n_valid is None else n_valid)}
    aux = {"indices": {}}
    for key, biases in (("dense_layers", None), ("moe_layers", stack_bias(params, "moe_layers"))):
        if key not in w:
            continue
        forced = (forced_experts or {}).get(key)
        h, (stack_aux, new_cache[key], _) = run_stack(
            w[key], h, ctx, cfg, biases=biases, forced=forced, cache=cache[key], absorbed=absorbed)
        if stack_aux is not None:
            aux["indices"][key] = stack_aux["indices"]
    aux["hidden"] = rms_norm(h, w["final_norm"], cfg.rms_norm_eps)
    return head_logits(aux["hidden"], w["head"], shard), new_cache, aux
