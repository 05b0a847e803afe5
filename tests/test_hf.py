"""Hugging Face checkpoints: logit parity with transformers on tiny random models, export
round trips, and clear errors for broken checkpoints.

The fixtures (tests/fixtures/hf_tiny_*) are built by tests/fixtures/make_hf_fixtures.py with
torch + transformers 5.23 on CPU: tiny random DeepseekV3ForCausalLM models, their safetensors
weights in the Hub layout, and the logits / hidden states / routing / MTP logits that
transformers computes in float32. Parity tolerance: max |logit difference| <= 1e-4 (issue 2).
"""

import json
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.mtp import mtp_forward
from dsv3_jax.io.hf import (CheckpointReader, dequantize_blocks, load_hf_checkpoint, quantize_blocks,
                         save_hf_checkpoint)
from dsv3_jax.io.safetensors import CODES, SafetensorsFile, write_safetensors

VARIANTS = ["hf_tiny_bf16", "hf_tiny_fp8", "hf_tiny_noqlora"]
LOGIT_ATOL = 1e-4
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
E4M3_HALF_STEP = 2.0 ** -4  # 3 mantissa bits: round to nearest is within 2^-4 of the value
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # below 2^-6 the step is 2^-9: within 2^-10 (x scale)


def _reference(folder):
    st = SafetensorsFile(folder.parent / f"{folder.name}.reference.safetensors")
    return {k: np.array(st.get(k)) for k in st.keys()}


_mtp_forward = jax.jit(mtp_forward, static_argnums=3)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request, fixtures_dir):
    """(variant, folder, cfg, params, transformers' reference, our outputs): the model's
    forward (with every layer's hidden state) and MTP logits computed once per variant."""
    folder = fixtures_dir / request.param
    cfg, params = load_hf_checkpoint(folder, dtype=jnp.float32)
    ref = _reference(folder)
    logits, aux = dsv3_jax.forward(params, ref["input_ids"], cfg, collect_hidden=True)
    ours = {"logits": logits, "aux": aux}
    if cfg.mtp_depth:
        ids = ref["input_ids"]
        targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
        ours["mtp"] = _mtp_forward(params, aux["hidden"], jnp.asarray(targets), cfg)
    return request.param, folder, cfg, params, ref, ours


def test_logits_match_transformers(loaded):
    name, _, cfg, params, ref, ours = loaded
    chex.assert_shape(ours["logits"], ref["logits"].shape)
    chex.assert_trees_all_close(ours["logits"], ref["logits"], atol=LOGIT_ATOL, rtol=0)
    assert np.abs(ref["logits"]).max() > 1.0  # the logits are not all near zero


def test_layer_by_layer_hidden_states(loaded):
    name, _, cfg, params, ref, ours = loaded
    aux = ours["aux"]
    got = np.asarray(aux["hidden_states"])  # each layer's output
    theirs = ref["hidden_states"]  # HF: [embeddings, layer 0 .. L-2 outputs, final-normed]
    for i in range(cfg.n_layers - 1):  # 1e-4 relative to the layer's scale
        atol = 1e-4 * max(1.0, np.abs(theirs[i + 1]).max())
        chex.assert_trees_all_close(got[i], theirs[i + 1], atol=atol, rtol=0,
                                    custom_message=f"{name}: layer {i}")
    chex.assert_trees_all_close(got[-1], ref["last_layer_output"], atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(aux["hidden"], theirs[-1], atol=1e-4, rtol=1e-5)


def test_routing_matches_transformers(loaded):
    name, _, cfg, params, ref, ours = loaded
    idx = np.asarray(ours["aux"]["indices"]["moe_layers"])  # [L, B, T, A]
    idx = np.sort(idx.reshape(idx.shape[0], -1, idx.shape[-1]), -1)
    chex.assert_trees_all_equal(idx, ref["router_indices"].astype(idx.dtype))


def test_mtp_logits_match_transformers(loaded):
    name, _, cfg, params, ref, ours = loaded
    if "mtp_logits" not in ref:
        assert cfg.mtp_depth == 0 and "mtp" not in params["weights"]
        return
    mtp_logits, mtp_aux = ours["mtp"]
    got = mtp_logits[0][:, :-1]  # the last position has no next token
    chex.assert_trees_all_close(got, ref["mtp_logits"], atol=LOGIT_ATOL, rtol=0)
    idx = np.asarray(mtp_aux["indices"][0])[:, :-1].reshape(-1, cfg.n_activated_experts)
    idx = np.sort(idx, -1)
    chex.assert_trees_all_equal(idx, ref["mtp_router_indices"].astype(idx.dtype))


def test_config_read_from_both_rope_styles(fixtures_dir):
    released = json.loads((fixtures_dir / "hf_tiny_bf16" / "config.json").read_text())
    assert "rope_scaling" in released and "rope_parameters" not in released
    new = json.loads((fixtures_dir / "hf_tiny_fp8" / "config.json").read_text())
    assert "rope_parameters" in new
    cfg = dsv3_jax.Config.from_hf(fixtures_dir / "hf_tiny_fp8")
    assert cfg.rope_cos_sin_factor != 1.0  # mscale 0.9 / mscale_all_dim 0.8 exercise HF's factor


def test_invalid_config_json_is_a_value_error_naming_the_file(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path)
    (folder / "config.json").write_text('{"hidden_size": 64,\n "vocab_size": }')
    path = str(folder / "config.json")
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: not valid JSON \(.*line 2"):
        dsv3_jax.Config.from_hf(folder)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: not valid JSON"):
        dsv3_jax.Config.from_hf(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: not valid JSON"):
        load_hf_checkpoint(folder)


def test_fp8_fixture_really_is_fp8_and_sharded(fixtures_dir):
    folder = fixtures_dir / "hf_tiny_fp8"
    reader = CheckpointReader(folder)
    assert len(reader.files) == 2
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert reader.raw(name).dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert reader.raw(name + "_scale_inv").shape == (1, 2)  # [ceil(128/128), ceil(160/128)]


def _assert_within_block_rounding(back, w, scale_inv=None, name=""):
    """back = the e4m3 block quantization of w [out, in] dequantized: every 128 x 128 block is
    quantized with its own scale s = amax(block) / 448, so each element is within e4m3's
    rounding of its value, 2^-4 |w| (normals) + 2^-10 s (subnormals), s the *block's* scale;
    and the block's largest error is at most its own amax x 2^-4. `scale_inv`, if given, is
    the saved per-block scale: it must be that s."""
    w, back = np.asarray(w, np.float64), np.asarray(back, np.float64)
    chex.assert_equal_shape([w, back])
    rows, cols = w.shape
    for i in range(0, rows, 128):
        for j in range(0, cols, 128):
            blk, got = w[i:i + 128, j:j + 128], back[i:i + 128, j:j + 128]
            amax = np.abs(blk).max()
            s = amax / E4M3_MAX if amax > 0 else 1.0
            err = np.abs(got - blk)
            where = f"{name} block ({i // 128}, {j // 128})"
            assert err.max() <= E4M3_HALF_STEP * amax, (where, err.max(), amax)
            bound = E4M3_HALF_STEP * np.abs(blk) + E4M3_SUBNORMAL_HALF_STEP * s
            assert np.all(err <= bound * (1 + 1e-6)), (where, (err / bound).max())
            if scale_inv is not None:
                chex.assert_trees_all_close(np.float64(scale_inv[i // 128, j // 128]), s,
                                            rtol=1e-6, atol=0, custom_message=where)


def test_dequantize_blocks_partial_edges():
    rng = np.random.default_rng(0)
    # each 128 x 128 block on its own scale (1e-6 .. 3): a scale shared by the tensor would
    # crush the small blocks to zero
    spread = np.array([[1.0, 1e-2], [1e-6, 3.0]])
    w = (rng.normal(size=(200, 130)) * np.kron(spread, np.ones((128, 128)))[:200, :130])
    w = w.astype(np.float32)
    q, s = quantize_blocks(w)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.shape == (2, 2)
    back = dequantize_blocks(q, s)
    _assert_within_block_rounding(back, w, s)
    # the last block holds rows 128..199 and columns 128..129 only
    chex.assert_trees_all_close(s[1, 1], np.abs(w[128:, 128:]).max() / 448, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        dequantize_blocks(q, s[:1])


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    """`loaded`'s params exported twice, in float32 and in FP8 (sharded, with an index)."""
    name, _, cfg, params, ref, _ = loaded
    out = {}
    for fp8 in (False, True):
        folder = tmp_path_factory.mktemp(f"{name}_{'fp8' if fp8 else 'f32'}")
        save_hf_checkpoint(params, cfg, folder, dtype=jnp.float32, fp8=fp8,
                           max_shard_bytes=200_000)
        assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
        out[fp8] = folder
    return out


def test_float32_export_round_trip_is_bitwise(loaded, exported):
    name, _, cfg, params, ref, _ = loaded
    cfg2, params2 = load_hf_checkpoint(exported[False], dtype=jnp.float32)
    assert cfg2.replace(name=cfg.name) == cfg
    chex.assert_trees_all_equal(params2, params)


def test_fp8_export_round_trip_is_block_rounding(loaded, exported):
    """The FP8 export holds, for each weight the releases store in FP8, e4m3 values and one
    scale per 128 x 128 block, each block within its own rounding of the float32 export's
    tensor; everything else is the float32 export's tensor; loading it back gives those
    values in our layout."""
    name, _, cfg, params, ref, _ = loaded
    exact, fp8 = CheckpointReader(exported[False]), CheckpointReader(exported[True])
    scaled = {n[:-len("_scale_inv")] for n in fp8.names() if n.endswith("_scale_inv")}
    assert scaled and fp8.names() == exact.names() | {n + "_scale_inv" for n in scaled}
    for n in sorted(exact.names()):
        if n in scaled:
            assert fp8.raw(n).dtype == np.dtype(ml_dtypes.float8_e4m3fn)
            _assert_within_block_rounding(fp8.read(n), exact.raw(n), fp8.raw(n + "_scale_inv"), n)
        else:
            chex.assert_trees_all_equal(fp8.raw(n), exact.raw(n), custom_message=n)
    cfg2, params2 = load_hf_checkpoint(exported[True], dtype=jnp.float32)
    assert cfg2.replace(name=cfg.name) == cfg
    # loading applies the same layout as the float32 round trip: each leaf within e4m3
    # rounding (2^-4 of its largest value, the loosest block's bound) of the original
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        b = params2
        for k in path:
            b = b[k.key]
        chex.assert_trees_all_close(b, a, rtol=0, atol=E4M3_HALF_STEP * float(jnp.abs(a).max()),
                                    custom_message=jax.tree_util.keystr(path))
    if name == "hf_tiny_fp8":  # re-quantizing dequantized FP8 weights is (nearly) lossless
        logits, _ = dsv3_jax.forward(params2, ref["input_ids"], cfg2)
        chex.assert_trees_all_close(logits, ref["logits"], atol=1e-3, rtol=0)


def _copy(fixtures_dir, tmp_path, variant="hf_tiny_noqlora"):
    dst = tmp_path / variant
    shutil.copytree(fixtures_dir / variant, dst)
    return dst


def _rewrite_file(path, edit):
    """Rewrite the safetensors file `path` with edit(dict name -> array) applied."""
    st = SafetensorsFile(path)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    write_safetensors(path, [(k, CODES[v.dtype], v.shape, lambda v=v: v)
                             for k, v in tensors.items()])


def _rewrite(folder, edit):
    """Rewrite a one-file checkpoint's model.safetensors with edit(dict name -> array) applied."""
    _rewrite_file(folder / "model.safetensors", edit)


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


SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _both_refuse(folder, message: str) -> None:
    """The shard reader and the loader both reject `folder` with `message`."""
    with pytest.raises(ValueError, match=message):
        CheckpointReader(folder)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize("with_index", [True, False])
def test_tensor_stored_in_two_shards_is_named_with_both_files(fixtures_dir, tmp_path, with_index):
    folder = _copy(fixtures_dir, tmp_path, "hf_tiny_fp8")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n, f in sorted(index.items()) if f == SHARD_1 and n.endswith("norm.weight"))
    copy = CheckpointReader(folder).raw(name)
    _rewrite_file(folder / SHARD_2, lambda t: t.update({name: copy}))
    if not with_index:
        (folder / "model.safetensors.index.json").unlink()
    message = rf"tensor '{re.escape(name)}' is stored twice \({SHARD_1}, {SHARD_2}\)"
    _both_refuse(folder, message)


def test_index_listing_a_tensor_in_the_wrong_shard_is_named(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path, "hf_tiny_fp8")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = next(n for n, f in sorted(index["weight_map"].items()) if f == SHARD_2)
    index["weight_map"][name] = SHARD_1  # the tensor really is in shard 2
    path.write_text(json.dumps(index))
    message = rf"index lists '{re.escape(name)}' in {SHARD_1}, but that file does not hold it"
    _both_refuse(folder, message)


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
    chex.assert_trees_all_close(logits, ref["logits"], atol=LOGIT_ATOL, rtol=0)


def test_partial_mtp_layer_is_a_missing_tensor(fixtures_dir, tmp_path):
    folder = _copy(fixtures_dir, tmp_path, "hf_tiny_bf16")
    _rewrite(folder, lambda t: t.pop("model.layers.4.eh_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.4\.eh_proj\.weight'"):
        load_hf_checkpoint(folder)


def test_progress_lines(fixtures_dir, capsys):
    load_hf_checkpoint(fixtures_dir / "hf_tiny_noqlora", progress=True)
    err = capsys.readouterr().err
    assert "weights/embed (256, 64)" in err and "GiB so far" in err
