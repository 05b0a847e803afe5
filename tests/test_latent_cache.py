"""The latent cache's storage (dsv3_jax/latent_cache.py): its layout and size, and the FP8
option against the bf16 cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax import latent_cache
from dsv3_jax.config import get_config
from dsv3_jax.infer.generate import generate
from dsv3_jax.testing import relative_error

CFG = get_config("tiny")
FP8 = jnp.float8_e4m3fn


def test_fp8_layout_and_size():
    v3 = get_config("v3_671b")
    # 512 e4m3 + 4 float32 scales + 64 bf16 per token and layer, against 576 x 2 in bf16
    assert dsv3_jax.cache_bytes_per_token(v3, FP8) == 61 * 656
    assert latent_cache.scale_tile(v3) == 128 and latent_cache.scale_tile(CFG) == CFG.kv_lora_rank
    cache = jax.eval_shape(lambda: dsv3_jax.init_cache(CFG, 3, 50, FP8))
    layer = cache["moe_layers"]
    assert layer["c_kv"].dtype == FP8 and layer["k_rope"].dtype == jnp.bfloat16
    chex.assert_shape(layer["c_kv_scale"], (CFG.n_moe_layers, 3, 50, 1))
    leaves = jax.tree.leaves({k: v for k, v in cache.items() if k != "length"})
    per_token = sum(l.size * l.dtype.itemsize for l in leaves) / (3 * 50)
    assert per_token == dsv3_jax.cache_bytes_per_token(CFG, FP8)
    with pytest.raises(ValueError, match="latent cache dtype int8"):
        dsv3_jax.init_cache(CFG, 1, 8, jnp.int8)


def test_quantize_round_trip_is_e4m3_rounding_per_tile():
    c = jax.random.normal(jax.random.key(0), (2, 5, 256)) * jnp.exp2(jnp.arange(256) // 128 * 6.0)
    q, s = latent_cache._quantize(c, 128)
    assert q.dtype == FP8 and s.shape == (2, 5, 2)
    back = latent_cache._dequantize(q, s, jnp.float32)
    scale = np.repeat(np.asarray(s), 128, axis=-1)
    # round to nearest: half of e4m3's 2^-3 relative spacing for normals, 2^-10 x scale below
    bound = 2.0**-4 * np.abs(np.asarray(c)) + 2.0**-10 * scale
    chex.assert_tree_all_finite(back)
    err = np.abs(np.asarray(back, np.float64) - np.asarray(c, np.float64))
    assert np.all(err <= bound), f"error up to {(err / bound).max():.3f} x its e4m3 bound"
    # one scale per 128 channels: the small first tile is not crushed by the second's 2^6
    assert float(jnp.max(s[..., 0])) < float(jnp.min(s[..., 1])) / 8


@pytest.fixture(scope="module")
def params():
    return dsv3_jax.init_params(CFG.replace(init_std=0.1), jax.random.key(0))


def test_fp8_cache_logits_track_the_fp32_cache():
    # the default init (std 0.02): logits 1.7e-2 (normwise) from an fp32 cache's, bf16's 1.3e-3,
    # about e4m3's 16x coarser rounding (measured 2026-12-01); init_std 0.1 makes the softmax
    # sharp enough to amplify the same rounding to 19%
    params = dsv3_jax.init_params(CFG, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (2, 16), 0, CFG.vocab_size))
    runs = {}
    for dtype in (jnp.float32, FP8):
        cache = dsv3_jax.init_cache(CFG, 2, 24, dtype)
        logits, cache, _ = dsv3_jax.forward_cached(params, tokens[:, :10], cache, CFG,
                                                   absorbed=False)
        steps = [logits]
        for i in range(10, 16):
            logits, cache, _ = dsv3_jax.forward_cached(params, tokens[:, i:i + 1], cache, CFG)
            steps.append(logits)
        runs[jnp.dtype(dtype).name] = (np.asarray(jnp.concatenate(steps, 1), np.float64), cache)
    (ref, ref_cache), (got, got_cache) = runs["float32"], runs["float8_e4m3fn"]
    assert got_cache["moe_layers"]["c_kv"].dtype == FP8
    # the stored latents are the fp32 ones to within e4m3's rounding
    c_ref, _ = latent_cache.load(jax.tree.map(lambda a: a[0], ref_cache["moe_layers"]),
                                 jnp.float32)
    c_got, _ = latent_cache.load(jax.tree.map(lambda a: a[0], got_cache["moe_layers"]),
                                 jnp.float32)
    rel = relative_error(c_got, c_ref)
    assert 1e-3 < rel < 5e-2  # really quantized, and not more than e4m3 rounding
    # logits after prefill and six decode steps: close, not equal
    chex.assert_tree_all_finite(got)
    rel_logits = relative_error(got, ref)
    assert 1e-3 < rel_logits < 5e-2


def test_generate_with_an_fp8_cache(params):
    prompts = [[5, 17, 3, 99, 41, 7, 2], [300, 12]]
    plain = generate(params, CFG, prompts, 6, cache_dtype=FP8)
    assert [len(r) for r in plain] == [6, 6]
    assert all(0 <= t < CFG.vocab_size for r in plain for t in r)
    # the cache quantizes each token by itself, so verifying two tokens at once stores what
    # two one-token steps store: greedy speculative output equals plain greedy output
    spec = generate(params, CFG, prompts, 6, cache_dtype=FP8, speculative=True)
    assert spec == plain


def test_generate_script_takes_the_fp8_cache():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import generate as script

    rec = script.main(["--preset", "tiny", "--prompt_ids", "5,6,7", "--max_new_tokens", "3",
                       "--repeats", "1", "--cache_dtype", "float8_e4m3fn"])
    assert len(rec["outputs"][0]) == 3
    # tiny: 4 layers x (32 e4m3 + one float32 scale + 16 bf16)
    assert rec["cache_bytes_per_token"] == 4 * (32 + 4 + 32)
