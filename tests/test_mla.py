"""MLA: expanded vs absorbed, cached decode vs full forward, and an independent numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.mla import attend_absorbed, attend_expanded, causal_mask, latent, mla, query
from dsv3_jax.rope import inv_frequencies, rope_tables
from dsv3_jax.runtime import Runtime

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
    chex.assert_trees_all_close(out, ref, rtol=1e-4, atol=2e-5)


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
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(a).max()) > 0.1  # the comparison is not between zeros


def test_segment_mask_blocks_cross_document_attention():
    pos = jnp.array([[0, 1, 2, 0, 1]])
    seg = jnp.array([[1, 1, 1, 2, 2]])
    want = np.array([[1, 0, 0, 0, 0],  # query 0..2: document 1, causal
                     [1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 1, 0],  # query 3, 4: document 2 only, from its own start
                     [0, 0, 0, 1, 1]], bool)
    chex.assert_trees_all_equal(causal_mask(pos, seg)[0], want)
    chex.assert_trees_all_equal(causal_mask(pos, None)[0],  # no segments: positions only
                                np.asarray(pos)[0][None, :] <= np.asarray(pos)[0][:, None])


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
    chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert np.asarray(cache["length"]).tolist() == [20, 20]


def test_cache_size_formula():
    v3 = get_config("v3_671b")
    assert dsv3_jax.cache_bytes_per_token(v3, jnp.bfloat16) == 61 * 576 * 2  # 70,272 B/token
    tiny = get_config("tiny")
    # the allocated cache against the formula, per storage dtype (e4m3: c_kv in FP8 with its
    # scales, k_rope in bf16)
    for dtype in (jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn):
        cache = jax.eval_shape(lambda: dsv3_jax.init_cache(tiny, 3, 50, dtype))
        leaves = jax.tree.leaves({k: v for k, v in cache.items() if k != "length"})
        per_token = sum(l.size * l.dtype.itemsize for l in leaves) / (3 * 50)
        assert per_token == dsv3_jax.cache_bytes_per_token(tiny, dtype), dtype


def test_cache_overflow_is_an_error():
    cfg = CFG
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    cache = dsv3_jax.init_cache(cfg, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="exceed the cache length 8"):
        dsv3_jax.forward_cached(params, np.zeros((1, 9), np.int32), cache, cfg)


# ------------------------------------------------------------------------------------------
# The absorbed decode path through the Pallas kernel (pallas_kernels/mla_decode.py), run in
# Pallas' GPU interpret mode on the CPU (`Runtime.interpret`).
# ------------------------------------------------------------------------------------------

# The smallest latent shapes the kernel takes (C = 64, R = 64), bf16, two layers (one dense,
# one MoE), no MTP; `init_std` 0.1 keeps greedy choices away from ties.
KCFG = CFG.replace(name="kernel", kv_lora_rank=64, qk_rope_head_dim=64, dtype="bfloat16",
                   n_layers=2, n_dense_layers=1, mtp_depth=0, init_std=0.1)
XLA = Runtime()


@pytest.fixture
def kernel_rt():
    """The decode kernel in interpret mode on a CPU; natively on a Hopper GPU."""
    on_gpu = jax.default_backend() == "gpu"
    return Runtime(decode_attention="pallas", interpret=not on_gpu)


def _random_cache(cfg, b, s, lengths, seed):
    cache = dsv3_jax.init_cache(cfg, b, s, jnp.bfloat16)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    for stack in ("dense_layers", "moe_layers"):
        for name in ("c_kv", "k_rope"):
            cache[stack][name] = jax.random.normal(next(keys), cache[stack][name].shape
                                                   ).astype(jnp.bfloat16)
    return {**cache, "length": jnp.asarray(lengths, jnp.int32)}


@pytest.mark.slow
@pytest.mark.parametrize("tq", [1, 2])
def test_absorbed_decode_with_the_pallas_kernel_equals_xla(kernel_rt, tq):
    """forward_cached(absorbed=True) with the decode kernel (interpret mode on a CPU) against
    XLA's einsums, rows at different cache lengths (one at the start of a 64-key block, one
    ending it), Tq = 1 and 2: the same logits up to bf16 rounding."""
    params = dsv3_jax.init_params(KCFG, jax.random.key(0))
    cache = _random_cache(KCFG, 2, 128, [3, 64 - tq], seed=1)
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, tq), 0, KCFG.vocab_size))
    out = {}
    for impl, rt, absorbed in (("xla", XLA, True), ("pallas", kernel_rt, True),
                               ("xla", XLA, False)):
        out[impl, absorbed] = dsv3_jax.forward_cached(params, tokens, cache, KCFG, runtime=rt,
                                                      absorbed=absorbed)[:2]  # jitted
    (lx, cx), (lp, cp) = out["xla", True], out["pallas", True]
    lx, lp, le = (np.asarray(a, np.float32) for a in (lx, lp, out["xla", False][0]))
    chex.assert_tree_all_finite(lp)
    # bf16 activations through two layers and the head: the paths round differently, so the
    # yardstick is how far XLA's absorbed logits sit from its expanded ones (the same math,
    # other rounding): observed max ~5e-2, mean ~8e-3 for both comparisons. A masking or
    # scale error moves logits by O(1).
    assert np.abs(lp - lx).max() < 2 * np.abs(le - lx).max() + 1e-2
    assert np.abs(lp - lx).mean() < 2 * np.abs(le - lx).mean() + 1e-3
    # the first layer's new latents do not depend on attention; later layers' do (rounding)
    chex.assert_trees_all_equal(cx["dense_layers"], cp["dense_layers"])
    chex.assert_trees_all_equal(cx["length"], cp["length"])


@pytest.mark.slow
def test_generate_is_the_same_with_the_pallas_kernel(kernel_rt):
    from dsv3_jax.infer.generate import generate

    params = dsv3_jax.init_params(KCFG, jax.random.key(3))
    prompts = [[5, 17, 3, 99, 41, 7, 2], [300, 12]]
    got = {impl: generate(params, KCFG, prompts, 4, max_len=64, runtime=rt)
           for impl, rt in (("xla", XLA), ("pallas", kernel_rt))}
    assert got["pallas"] == got["xla"]
    assert all(len(r) == 4 for r in got["xla"])


def test_decode_attention_dispatch_and_errors():
    """"auto" takes XLA on the CPU and the kernel on a Hopper GPU in bf16; "pallas" where the
    kernel cannot run is an error naming the choice and the reason: no Hopper GPU (without
    interpret mode), shapes the kernel refuses (tiny's C = 32, float32; a cache length not a
    multiple of 64). Where "auto" picked the kernel, shapes it refuses take XLA instead."""
    from dsv3_jax.runtime import Devices, resolve

    assert resolve(KCFG, devices=Devices("cpu", False)).decode_attention == "xla"
    assert resolve(KCFG, devices=Devices("gpu", True)).decode_attention == "pallas_if_fits"
    assert resolve(CFG, devices=Devices("gpu", True)).decode_attention == "xla"  # float32
    with pytest.raises(ValueError, match=r"decode_attention='pallas': .*Hopper GPU"):
        resolve(KCFG, decode_attention="pallas", devices=Devices("cpu", False))
    params = dsv3_jax.init_params(KCFG, jax.random.key(0))
    tokens = np.zeros((1, 1), np.int32)
    pallas = Runtime(decode_attention="pallas", interpret=True)
    with pytest.raises(ValueError, match=r"decode_attention='pallas'.*S_max \(shape\[1\]\) "
                                         r"= 96 must be a multiple of block_s = 64"):
        dsv3_jax.forward_cached(params, tokens, dsv3_jax.init_cache(KCFG, 1, 96), KCFG,
                                runtime=pallas)
    tiny_params = dsv3_jax.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"decode_attention='pallas'.*dtype float32"):
        dsv3_jax.forward_cached(tiny_params, tokens, dsv3_jax.init_cache(CFG, 1, 64), CFG,
                                runtime=pallas)
    bf16 = pallas.replace(dtype="bfloat16")
    with pytest.raises(ValueError, match=r"decode_attention='pallas'.*kv_lora_rank = 32 "
                                         "must be a multiple of 64"):
        dsv3_jax.forward_cached(tiny_params, tokens, dsv3_jax.init_cache(CFG, 1, 64, "bfloat16"),
                                CFG, runtime=bf16)
    auto = bf16.replace(decode_attention="pallas_if_fits")
    dsv3_jax.forward_cached(tiny_params, tokens, dsv3_jax.init_cache(CFG, 1, 64, "bfloat16"), CFG,
                            runtime=auto)
