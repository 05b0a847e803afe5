"""Hugging Face checkpoints: logit parity with transformers on tiny random models, export
round trips, and clear errors for broken checkpoints.

The fixtures (tests/fixtures/hf_tiny_*) are built by tests/fixtures/make_hf_fixtures.py with
torch + transformers 5.23 on CPU: tiny random DeepseekV3ForCausalLM models, their safetensors
weights in the Hub layout, and the logits / hidden states / routing / MTP logits that
transformers computes in float32. Parity tolerance: max |logit difference| <= 1e-4 (issue 2).
"""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax import model
from dsv3_jax.io.hf import (CheckpointReader, dequantize_blocks, load_hf_checkpoint, quantize_blocks,
                         save_hf_checkpoint)
from dsv3_jax.io.safetensors import SafetensorsFile, write_safetensors

VARIANTS = ["hf_tiny_bf16", "hf_tiny_fp8", "hf_tiny_noqlora"]
LOGIT_ATOL = 1e-4


def _reference(folder):
    st = SafetensorsFile(folder.parent / f"{folder.name}.reference.safetensors")
    return {k: np.array(st.get(k)) for k in st.keys()}


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request, fixtures_dir):
    folder = fixtures_dir / request.param
    cfg, params = load_hf_checkpoint(folder, dtype=jnp.float32)
    return request.param, folder, cfg, params, _reference(folder)


def test_logits_match_transformers(loaded):
    name, _, cfg, params, ref = loaded
    logits, aux = dsv3_jax.forward(params, ref["input_ids"], cfg, collect_hidden=True)
    diff = np.abs(np.asarray(logits) - ref["logits"]).max()
    assert diff <= LOGIT_ATOL, f"{name}: max |logit diff| {diff:.2e}"
    assert np.abs(ref["logits"]).max() > 1.0  # the logits are not all near zero


def test_layer_by_layer_hidden_states(loaded):
    name, _, cfg, params, ref = loaded
    _, aux = dsv3_jax.forward(params, ref["input_ids"], cfg, collect_hidden=True)
    ours = np.asarray(aux["hidden_states"])  # each layer's output
    theirs = ref["hidden_states"]  # HF: [embeddings, layer 0 .. L-2 outputs, final-normed]
    for i in range(cfg.n_layers - 1):
        d = np.abs(ours[i] - theirs[i + 1]).max()
        assert d <= 1e-4 * max(1.0, np.abs(theirs[i + 1]).max()), f"{name}: layer {i} differs by {d:.2e}"
    np.testing.assert_allclose(ours[-1], ref["last_layer_output"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["hidden"]), theirs[-1], atol=1e-4, rtol=1e-5)


def test_routing_matches_transformers(loaded):
    name, _, cfg, params, ref = loaded
    _, aux = dsv3_jax.forward(params, ref["input_ids"], cfg)
    idx = np.asarray(aux["indices"]["moe_layers"])  # [L, B, T, A]
    idx = np.sort(idx.reshape(idx.shape[0], -1, idx.shape[-1]), -1)
    np.testing.assert_array_equal(idx, ref["router_indices"])


def test_mtp_logits_match_transformers(loaded):
    name, _, cfg, params, ref = loaded
    if "mtp_logits" not in ref:
        assert cfg.mtp_depth == 0 and "mtp" not in params["weights"]
        return
    ids = ref["input_ids"]
    _, aux = dsv3_jax.forward(params, ids, cfg)
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
    mtp_logits, mtp_aux = model.mtp_forward(params, aux["hidden"], jnp.asarray(targets), cfg)
    ours = np.asarray(mtp_logits[0][:, :-1])  # the last position has no next token
    diff = np.abs(ours - ref["mtp_logits"]).max()
    assert diff <= LOGIT_ATOL, f"{name}: max |MTP logit diff| {diff:.2e}"
    idx = np.sort(np.asarray(mtp_aux["indices"][0])[:, :-1].reshape(-1, cfg.n_activated_experts), -1)
    np.testing.assert_array_equal(idx, ref["mtp_router_indices"])


def test_config_read_from_both_rope_styles(fixtures_dir):
    released = json.loads((fixtures_dir / "hf_tiny_bf16" / "config.json").read_text())
    assert "rope_scaling" in released and "rope_parameters" not in released
    new = json.loads((fixtures_dir / "hf_tiny_fp8" / "config.json").read_text())
    assert "rope_parameters" in new
    cfg = dsv3_jax.Config.from_hf(fixtures_dir / "hf_tiny_fp8")
    assert cfg.rope_cos_sin_factor != 1.0  # mscale 0.9 / mscale_all_dim 0.8 exercise HF's factor


def test_fp8_fixture_really_is_fp8_and_sharded(fixtures_dir):
    folder = fixtures_dir / "hf_tiny_fp8"
    reader = CheckpointReader(folder)
    assert len(reader.files) == 2
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert reader.raw(name).dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert reader.raw(name + "_scale_inv").shape == (1, 2)  # [ceil(128/128), ceil(160/128)]


def test_dequantize_blocks_partial_edges():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 130)).astype(np.float32)
    q, s = quantize_blocks(w)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.shape == (2, 2)
    back = dequantize_blocks(q, s)
    # per-block relative error of e4m3 (3 mantissa bits): |err| <= amax_block / 448 * 16
    assert np.abs(back - w).max() <= np.abs(w).max() * 2 ** -4
    # the last block holds rows 128..199 and columns 128..129 only
    np.testing.assert_allclose(s[1, 1], np.abs(w[128:, 128:]).max() / 448, rtol=1e-6)
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        dequantize_blocks(q, s[:1])


@pytest.mark.parametrize("fp8", [False, True])
def test_export_round_trip(loaded, tmp_path, fp8):
    name, _, cfg, params, ref = loaded
    save_hf_checkpoint(params, cfg, tmp_path, dtype=jnp.float32, fp8=fp8, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded, with an index
    cfg2, params2 = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert cfg2.replace(name=cfg.name) == cfg
    if not fp8:  # float32 export: bit-exact
        for a, b in zip(jax_leaves(params), jax_leaves(params2)):
            np.testing.assert_array_equal(a, b)
    else:  # every leaf within e4m3 block rounding (3 mantissa bits) of the original
        for a, b in zip(jax_leaves(params), jax_leaves(params2)):
            assert np.abs(a - b).max() <= 2 ** -4 * np.abs(a).max()
        if name == "hf_tiny_fp8":  # re-quantizing dequantized FP8 weights is (nearly) lossless
            logits, _ = dsv3_jax.forward(params2, ref["input_ids"], cfg2)
            assert np.abs(np.asarray(logits) - ref["logits"]).max() < 1e-3


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _copy(fixtures_dir, tmp_path, variant="hf_tiny_noqlora"):
    dst = tmp_path / variant
    shutil.copytree(fixtures_dir / variant, dst)
    return dst


def _rewrite(folder, edit):
    """Rewrite model.safetensors with edit(dict name -> array) applied."""
    path = folder / "model.safetensors"
    st = SafetensorsFile(path)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    from dsv3_jax.io.safetensors import CODES
    write_safetensors(path, [(k, CODES[v.dtype], v.shape, lambda v=v: v) for k, v in tensors.items()])


def test_missing_tensor_is_named(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        load_hf_checkpoint(folder)


def test_unexpected_tensor_is_named(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path)
    _rewrite(folder, lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.9\.extra\.weight'"):
        load_hf_checkpoint(folder)


def test_misshaped_tensor_is_named(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    _rewrite(folder, lambda t: t.update({name: t[name][:-4]}))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}' has shape \[108, 32\], expected \[112, 32\]"):
        load_hf_checkpoint(folder)


def test_fp8_without_scale_is_an_error(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(folder, lambda t: t.update({name: t[name].astype(ml_dtypes.float8_e4m3fn)}))
    with pytest.raises(ValueError, match=f"{name}: FP8 tensor without its"):
        load_hf_checkpoint(folder)


def test_truncated_file_is_an_error(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_hf_checkpoint(folder)


def test_no_weights_is_an_error(tmp_path, fixtures_dir):
    shutil.copy(fixtures_dir / "hf_tiny_noqlora" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_hf_checkpoint(tmp_path)


def test_checkpoint_without_its_mtp_layer_loads_without_mtp(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path, "hf_tiny_bf16")
    _rewrite(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.4.")])
    with pytest.warns(UserWarning, match=r"no model\.layers\.4\.\* tensors; loading without MTP"):
        cfg, params = load_hf_checkpoint(folder)
    assert cfg.mtp_depth == 0 and "mtp" not in params["weights"]
    ref = _reference(fixtures_dir / "hf_tiny_bf16")
    logits, _ = dsv3_jax.forward(params, ref["input_ids"], cfg)
    assert np.abs(np.asarray(logits) - ref["logits"]).max() <= LOGIT_ATOL


def test_partial_mtp_layer_is_a_missing_tensor(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path, "hf_tiny_bf16")
    _rewrite(folder, lambda t: t.pop("model.layers.4.eh_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.4\.eh_proj\.weight'"):
        load_hf_checkpoint(folder)


def test_progress_lines(fixtures_dir, capsys):
    load_hf_checkpoint(fixtures_dir / "hf_tiny_noqlora", progress=True)
    err = capsys.readouterr().err
    assert "weights/embed (256, 64)" in err and "GiB so far" in err
