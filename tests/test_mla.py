"""MLA: expanded vs absorbed, cached decode vs full forward, and an independent numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.mla import attend_absorbed, attend_expanded, causal_mask, latent, mla, query
from dsv3_jax.rope import inv_frequencies, rope_tables

CFG = get_config("tiny")


def _layer(cfg=CFG, seed=0):
    p = dsv3_jax.init_params(cfg.replace(init_std=0.2), jax.random.key(seed))
    attn = jax.tree.map(lambda a: a[0], p["weights"]["moe_layers"]["attn"])
    # non-trivial norm gains
    return {k: (v * (1 + 0.3 * jax.random.normal(jax.random.key(9), v.shape))
                if k.endswith("norm") else v) for k, v in attn.items()}


def _numpy_mla(p, x, pos, cfg):
    """Naive MLA in float64 following reference §3.2: full 192-wide q/k per head (nope | rope),
    k_rope broadcast to every head, one softmax over the concatenated logit."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)

    def norm(v, w):
        return w * v / np.sqrt((v ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)

    def rope(v):  # interleaved pairs, complex multiplication
        ang = pos[:, :, None] * inv_frequencies(cfg).astype(np.float64)
        ang = ang.reshape(ang.shape[:2] + (1,) * (v.ndim - 3) + ang.shape[2:])
        z = (v[..., 0::2] + 1j * v[..., 1::2]) * np.exp(1j * ang)
        return np.stack([z.real, z.imag], -1).reshape(v.shape)

    cq = norm(x @ p["w_dq"], p["q_norm"])
    q = np.concatenate([np.einsum("btq,qnk->btnk", cq, p["w_uq"]),
                        rope(np.einsum("btq,qnr->btnr", cq, p["w_qr"]))], -1)
    ckv = norm(x @ p["w_dkv"], p["kv_norm"])
    kr = rope(x @ p["w_kr"])
    k_nope = np.einsum("bsc,cnk->bsnk", ckv, p["w_uk"])
    k = np.concatenate([k_nope, np.broadcast_to(kr[:, :, None], k_nope.shape[:3] + kr.shape[-1:])], -1)
    v = np.einsum("bsc,cnh->bsnh", ckv, p["w_uv"])
    s = np.einsum("btnd,bsnd->bnts", q, k) * cfg.softmax_scale
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", a, v)
    return np.einsum("btnh,nhd->btd", o, p["w_o"])


def test_expanded_matches_numpy_reference():
    p = _layer()
    t = 80  # beyond the YaRN original length (64)
    x = jax.random.normal(jax.random.key(1), (2, t, CFG.dim))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    cos, sin = rope_tables(pos, CFG)
    out = jax.jit(lambda p, x: mla(p, x, cos, sin, causal_mask(pos, None), CFG))(p, x)
    ref = _numpy_mla(p, x, np.asarray(pos), CFG)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=2e-5)


def test_absorbed_equals_expanded():
    p = _layer(seed=2)
    x = jax.random.normal(jax.random.key(3), (2, 24, CFG.dim))
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    cos, sin = rope_tables(pos, CFG)
    qn, qr = query(p, x, cos, sin, CFG)
    ckv, kr = latent(p, x, cos, sin, CFG)
    mask = causal_mask(pos, None)
    a = attend_expanded(p, qn, qr, ckv, kr, mask, CFG)
    b = attend_absorbed(p, qn, qr, ckv, kr, mask, CFG)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(a).max()) > 0.1  # the comparison is not between zeros


def test_segment_mask_blocks_cross_document_attention():
    pos = jnp.array([[0, 1, 2, 0, 1]])
    seg = jnp.array([[1, 1, 1, 2, 2]])
    m = np.asarray(causal_mask(pos, seg))[0]
    assert m[4, 3] and m[4, 4] and not m[4, 2] and not m[3, 0] and m[2, 0]


@pytest.mark.parametrize("absorbed", [True, False])
def test_prefill_then_decode_equals_full_forward(absorbed):
    cfg = CFG
    params = dsv3_jax.init_params(cfg.replace(init_std=0.1), jax.random.key(4))
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (2, 20), 0, cfg.vocab_size))
    full, _ = dsv3_jax.forward(params, tokens, cfg)
    cache = dsv3_jax.init_cache(cfg, 2, 32, jnp.float32)
    logits, cache, _ = dsv3_jax.forward_cached(params, tokens[:, :12], cache, cfg, absorbed=False)
    steps = [logits]
    for i in range(12, 20):  # one token at a time over the latent cache
        logits, cache, _ = dsv3_jax.forward_cached(params, tokens[:, i:i + 1], cache, cfg,
                                                   absorbed=absorbed)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full),
                               rtol=1e-4, atol=1e-4)
    assert np.asarray(cache["length"]).tolist() == [20, 20]


def test_cache_size_formula():
    v3 = get_config("v3_671b")
    assert dsv3_jax.cache_bytes_per_token(v3, jnp.bfloat16) == 61 * 576 * 2  # 70,272 B/token
    cache = jax.eval_shape(lambda: dsv3_jax.init_cache(get_config("tiny"), 3, 50))
    leaves = jax.tree.leaves({k: v for k, v in cache.items() if k != "length"})
    per_token = sum(l.size * l.dtype.itemsize for l in leaves) / (3 * 50)
    assert per_token == dsv3_jax.cache_bytes_per_token(get_config("tiny"))


def test_cache_overflow_is_an_error():
    cfg = CFG
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    cache = dsv3_jax.init_cache(cfg, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="exceed the cache length 8"):
        dsv3_jax.forward_cached(params, np.zeros((1, 9), np.int32), cache, cfg)
