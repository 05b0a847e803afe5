"""Multi-head Latent Attention ([PAPER] §2.1.1, eqs 1-11; reference §3).

Two paths with equal results (exact algebra, different rounding):
  expanded (training, prefill): up-project the latent to per-head keys and values,
    scores BTNK,BSNK->BNTS + BTNR,BSR->BNTS, out BNTS,BSNH->BTNH;
  absorbed (decode): fold W^UK into the query and W^UV into the output, attending directly over
    the latent cache of C + R numbers per token: BTNK,CNK->BTNC, BTNC,BSC->BNTS (+ rope),
    BNTS,BSC->BTNC, BTNC,CNH->BTNH.
The cache holds the *normalised* latent c_kv and the *rotated* shared key k_rope (reference
gotcha 5). Softmax in float32 with the YaRN-corrected scale on the whole logit (gotcha 3).

`p` is one layer's attention weights: w_dq [D, Q], q_norm [Q] (absent when q_lora_rank = 0),
w_uq [Q|D, N, K], w_qr [Q|D, N, R], w_dkv [D, C], w_kr [D, R], kv_norm [C], w_uk [C, N, K],
w_uv [C, N, H], w_o [N, H, D].

How each piece runs is the `rt` argument (a resolved `dsv3_jax.runtime.Runtime`; None =
`Runtime()`, XLA everywhere): the training/prefill attention core as einsums or through cuDNN
(`rt.attention`), the absorbed form's core as einsums or as our Mosaic GPU kernel over the two
cache arrays (`rt.decode_attention`; pallas_kernels/mla_decode.py `mla_decode_latent`,
Hopper); see `mla_cached`.

With FP8 on (`rt.fp8`) the projections (w_dq, w_uq, w_qr, w_dkv, w_kr, w_uk, w_uv of the expanded and
cuDNN forms, and w_o) take FP8 inputs (`dsv3_jax.fp8`); the attention core does not (the V3
report keeps it in BF16, §3.3.1), nor do the absorbed form's folded w_uk / w_uv products.
The projections that share an input (w_uq and w_qr, w_dkv and w_kr, w_uk and w_uv) run as one
FP8 GEMM each pair (`fp8.matmul_parts`: the input quantized and re-tiled once; the same outputs
and weight gradients as separate layers). On a mesh each FP8 projection runs in its own
shard_map, split as its declared logical axes say (`_project`; tensor parallelism splits the
heads).
"""

import jax
import jax.numpy as jnp

from dsv3_jax import latent_cache
from dsv3_jax.axes import logical_axes
from dsv3_jax.config import Config
from dsv3_jax.fp8 import matmul_parts
from dsv3_jax.layers import rms_norm
from dsv3_jax.rope import apply_rope
from dsv3_jax.runtime import Runtime
from pallas_kernels import mla_decode as decode_kernel
from sharding.context import ShardingContext, constrain

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row stays NaN-free
_XLA = Runtime()

# 64-key cache blocks, the size measured on the GPU (the kernel's 32-key blocks are not used
# here: not measured); so the cache length must be a multiple of 64.
DECODE_BLOCK_S = 64


def _project(spec: str, x, p: dict, names: tuple[str, ...], letters: tuple[str, ...],
             rt: Runtime | None, shard) -> list:
    """The projections `names` of x (einsum `spec`; `letters`: each weight's declaration in
    params.py without the layer axis, which on a mesh says how its FP8 GEMM is split)."""
    return matmul_parts(spec, x, [p[n] for n in names], (rt or _XLA).fp8, shard=shard,
                        axes=[logical_axes(a) for a in letters], names=list(names))


def query(p: dict, x: jnp.ndarray, cos, sin, cfg: Config, rt: Runtime | None = None,
          shard=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """q_nope [B, T, N, K] and rotated q_rope [B, T, N, R] from x [B, T, D]."""
    q = "D"  # the query projections' input: the normalised latent, or x itself (V2-Lite)
    if cfg.q_lora_rank:
        (c_q,) = _project("btd,dq->btq", x, p, ("w_dq",), ("D Q",), rt, shard)
        x, q = rms_norm(c_q, p["q_norm"], cfg.rms_norm_eps), "Q"
    heads = ("batch", "seq", "heads", None)  # tensor parallelism splits the heads
    q_nope, q_rope = _project("btq,qnk->btnk", x, p, ("w_uq", "w_qr"), (f"{q} N K", f"{q} N R"),
                              rt, shard)
    q_nope = constrain(q_nope, heads, shard, "q_nope")
    q_rope = constrain(q_rope, heads, shard, "q_rope")
    return q_nope, apply_rope(q_rope, cos, sin, interleave=cfg.rope_interleave)


def latent(p: dict, x: jnp.ndarray, cos, sin, cfg: Config, rt: Runtime | None = None,
           shard=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """What the cache stores: normalised c_kv [B, S, C] and rotated shared k_rope [B, S, R]."""
    c_kv, k_rope = _project("bsd,dc->bsc", x, p, ("w_dkv", "w_kr"), ("D C", "D R"), rt, shard)
    c_kv = rms_norm(c_kv, p["kv_norm"], cfg.rms_norm_eps)
    return c_kv, apply_rope(k_rope, cos, sin, interleave=cfg.rope_interleave)


def _softmax(scores: jnp.ndarray, mask: jnp.ndarray, cfg: Config, dtype) -> jnp.ndarray:
    """scores [B, N, T, S] float32, mask [B, T, S] bool -> probabilities in `dtype`."""
    scores = jnp.where(mask[:, None], scores * cfg.softmax_scale, _MASKED)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _output(p: dict, out: jnp.ndarray, rt: Runtime | None, shard) -> jnp.ndarray:
    """[B, T, N, H] -> [B, T, D]; with heads split, the partial sums are reduced here (by XLA,
    or in FP8 by fp8.matmul's float32 psum)."""
    out = constrain(out, ("batch", "seq", "heads", None), shard, "attention output")
    (y,) = _project("btnh,nhd->btd", out, p, ("w_o",), ("N H D",), rt, shard)
    return constrain(y, ("batch", "seq", "embed"), shard, "attention projection")


def _keys_values(p: dict, c_kv, rt: Runtime | None, shard) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-head k_nope [B, S, N, K] and v [B, S, N, H] from the latent c_kv [B, S, C]."""
    kv_heads = ("batch", "kv_seq", "heads", None)
    k_nope, v = _project("bsc,cnk->bsnk", c_kv, p, ("w_uk", "w_uv"), ("C N K", "C N H"), rt,
                         shard)
    return constrain(k_nope, kv_heads, shard, "k_nope"), constrain(v, kv_heads, shard, "v")


def attend_expanded(p: dict, q_nope, q_rope, c_kv, k_rope, mask, cfg: Config,
                    rt: Runtime | None = None, shard=None) -> jnp.ndarray:
    """Training / prefill form: per-head keys and values from the latent. Returns [B, T, D]."""
    k_nope, v = _keys_values(p, c_kv, rt, shard)
    f32 = jnp.float32
    with jax.named_scope("attention_core"):  # benchmarks attribute profile time by scope
        scores = (jnp.einsum("btnk,bsnk->bnts", q_nope, k_nope, preferred_element_type=f32)
                  + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=f32))
        probs = _softmax(scores, mask, cfg, v.dtype)
        out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    return _output(p, out, rt, shard)


def attend_absorbed(p: dict, q_nope, q_rope, c_kv, k_rope, mask, cfg: Config,
                    rt: Runtime | None = None, shard=None) -> jnp.ndarray:
    """Decode form over the latent cache: W^UK folded into q, W^UV into the output. [B, T, D]."""
    f32 = jnp.float32
    q_lat = jnp.einsum("btnk,cnk->btnc", q_nope, p["w_uk"])
    with jax.named_scope("attention_core"):
        scores = (jnp.einsum("btnc,bsc->bnts", q_lat, c_kv, preferred_element_type=f32)
                  + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=f32))
        probs = _softmax(scores, mask, cfg, c_kv.dtype)
        o_lat = jnp.einsum("bnts,bsc->btnc", probs, c_kv)
    return _output(p, jnp.einsum("btnc,cnh->btnh", o_lat, p["w_uv"]), rt, shard)


def use_decode_kernel(rt: Runtime | None, c_kv, k_rope, shard) -> bool:
    """Whether the absorbed form's attention core runs in the Pallas decode kernel.

    `rt.decode_attention` "pallas_if_fits" takes it where the kernel takes the cache's shapes
    and the program runs on one device, XLA's einsums elsewhere; "pallas" where it cannot run
    is an error that names the reason (no silent fallback). Only shapes are looked at here:
    whether the devices can run it was settled when the Runtime was resolved."""
    choice = (rt or _XLA).decode_attention
    if choice == "xla":
        return False
    if shard is not None and shard.mesh.size > 1:
        why = (f"the kernel is not partitioned over a mesh yet (this one has "
               f"{shard.mesh.size} devices)")
    else:
        why = decode_kernel.kernel_refusal(c_kv.shape[2], k_rope.shape[2], c_kv.shape[1],
                                           c_kv.dtype, DECODE_BLOCK_S, c_name="kv_lora_rank",
                                           r_name="qk_rope_head_dim")
    if why is None:
        return True
    if choice == "pallas":
        raise ValueError(f"Runtime.decode_attention='pallas' cannot run here: {why} (latent "
                         f"cache c_kv {c_kv.dtype}{list(c_kv.shape)}, k_rope "
                         f"{list(k_rope.shape)}); use 'auto' or 'xla'")
    return False


def attend_absorbed_kernel(p: dict, q_nope, q_rope, c_kv, k_rope, positions, cfg: Config,
                           rt: Runtime | None = None, shard=None) -> jnp.ndarray:
    """attend_absorbed through the Pallas decode kernel: the same W^UK fold and W^UV / W^O
    output, the attention core over the two cache arrays with no [S] mask. The mask
    `slots <= positions` is the kernel's causal rule with lengths = positions[:, -1] + 1,
    because each row's new tokens sit at consecutive positions (mla_cached writes them at
    positions[:, 0] onwards). [B, T, D]."""
    q_lat = jnp.einsum("btnk,cnk->btnc", q_nope, p["w_uk"])
    with jax.named_scope("attention_core"):
        o_lat = decode_kernel.mla_decode_latent(
            q_lat.astype(c_kv.dtype), q_rope.astype(c_kv.dtype), c_kv, k_rope,
            positions[:, -1] + 1, scale=cfg.softmax_scale, impl="pallas",
            block_s=DECODE_BLOCK_S, interpret=(rt or _XLA).interpret)
    return _output(p, jnp.einsum("btnc,cnh->btnh", o_lat, p["w_uv"]), rt, shard)


def causal_mask(positions: jnp.ndarray, segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """[B, T, T]: query t sees key s iff pos_s <= pos_t and both lie in the same segment.

    Pre-training packs documents with no cross-document masking ([PAPER] §4.1): pass no
    segment ids there; SFT passes them (sample masking, §5.1).
    """
    mask = positions[:, None, :] <= positions[:, :, None]
    if segment_ids is not None:
        mask &= segment_ids[:, None, :] == segment_ids[:, :, None]
    return mask


def attend_cudnn(p: dict, q_nope, q_rope, c_kv, k_rope, mask, cfg: Config,
                 rt: Runtime | None = None, shard=None, *, causal: bool = False) -> jnp.ndarray:
    """attend_expanded through cuDNN's fused attention (GPU): the same math, no [T, S] scores
    in memory. Queries and keys become [nope | rope] heads of width K + R (the rope key part
    broadcast over heads); values keep their own width H. cuDNN >= 9.10 runs qk != v widths
    ("MLA") on Hopper, forward and backward; jax 0.11.2's public `jax.nn.dot_product_attention`
    refuses them (it checks value against key shape), so we call the cuDNN primitive it wraps.
    """
    k_nope, v = _keys_values(p, c_kv, rt, shard)
    with jax.named_scope("attention_core"):
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3]
                                                       + k_rope.shape[-1:])], axis=-1)
        out = _cudnn_attention(q, k, v, None if causal else mask[:, None], cfg.softmax_scale)
    return _output(p, out, rt, shard)


def _cudnn_attention(q, k, v, mask, scale: float) -> jnp.ndarray:
    """cuDNN flash attention, BTNH layout; mask None = causal. v's width may differ from q's
    (measured on an H200 for `small`: 10 ms of a 157 ms step saved against padding V to 192)."""
    # jax 0.11.2's cuDNN primitive (pinned in constraints.txt); it raises a clear error when
    # the installed cuDNN is older than 9.10 or the GPU older than Hopper.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention(q, k, v, None, mask, scale=scale,
                                 mask_type=MaskType.CAUSAL if mask is None else MaskType.NO_MASK)


def mla(p: dict, x: jnp.ndarray, cos, sin, mask: jnp.ndarray, cfg: Config,
        rt: Runtime | None = None, shard: ShardingContext | None = None, *,
        causal: bool = False) -> jnp.ndarray:
    """Self-attention of x [B, T, D] over itself (training path). `causal`: `mask` is the plain
    causal mask (lets cuDNN use its own)."""
    q_nope, q_rope = query(p, x, cos, sin, cfg, rt, shard)
    c_kv, k_rope = latent(p, x, cos, sin, cfg, rt, shard)
    if (rt or _XLA).attention == "cudnn":
        return attend_cudnn(p, q_nope, q_rope, c_kv, k_rope, mask, cfg, rt, shard, causal=causal)
    return attend_expanded(p, q_nope, q_rope, c_kv, k_rope, mask, cfg, rt, shard)


def mla_cached(p: dict, x: jnp.ndarray, cos, sin, positions: jnp.ndarray, layer_cache: dict,
               cfg: Config, rt: Runtime | None = None, *, absorbed: bool,
               shard=None) -> tuple[jnp.ndarray, dict]:
    """Attention of new tokens x [B, T, D] at `positions` [B, T] over a latent cache.

    layer_cache = {"c_kv": [B, S_max, C], "k_rope": [B, S_max, R]} (plus "c_kv_scale" for an
    FP8 cache, dsv3_jax/latent_cache.py); cache slot s holds absolute
    position s, so writing at positions[:, 0] and masking slots > the query position is the whole
    bookkeeping (a general [T, start + T] mask, reference gotcha 18). The absorbed form runs
    its attention core in the Pallas kernel where `rt.decode_attention` asks for it and the
    kernel takes these shapes (`use_decode_kernel`).
    """
    q_nope, q_rope = query(p, x, cos, sin, cfg, rt, shard)
    c_new, k_new = latent(p, x, cos, sin, cfg, rt, shard)
    start = positions[:, 0]
    cache = latent_cache.store(layer_cache, c_new, k_new, start)  # FP8-quantized if stored so
    slots = jnp.arange(cache["c_kv"].shape[1])
    mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S_max]
    c_kv, k_rope = latent_cache.load(cache, x.dtype)
    if absorbed and use_decode_kernel(rt, c_kv, k_rope, shard):
        return attend_absorbed_kernel(p, q_nope, q_rope, c_kv, k_rope, positions, cfg, rt,
                                      shard), cache
    attend = attend_absorbed if absorbed else attend_expanded
    return attend(p, q_nope, q_rope, c_kv, k_rope, mask, cfg, rt, shard), cache
