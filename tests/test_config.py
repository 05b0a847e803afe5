"""Config presets, validation, accounting and Hugging Face config reading."""

import dataclasses
import math

import chex
import jax
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import Config, get_config, to_hf
from dsv3_jax.runtime import Fp8, Runtime
from dsv3_jax.params import abstract_params, logical_axes_tree

# DeepSeek-V3's Hub config.json (reference §1.2), the keys that matter.
V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "vocab_size": 129280, "tie_word_embeddings": False, "attention_bias": False,
    "num_nextn_predict_layers": 1, "aux_loss_alpha": 0.001, "seq_aux": True,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}

MODEL_FIELDS = [f.name for f in dataclasses.fields(Config)
                if f.name not in ("name", "init_std", "dtype", "param_dtype")]


@pytest.mark.parametrize("name", sorted(dsv3_jax.PRESETS))
def test_presets_build_and_count_matches_eval_shape(name):
    cfg = dsv3_jax.get_config(name)
    assert cfg.name == name
    shapes = jax.eval_shape(lambda: dsv3_jax.init_params(cfg, jax.random.key(0)))
    weights = shapes["weights"]
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(weights))
    mtp = sum(math.prod(x.shape) for x in jax.tree.leaves(weights.get("mtp", {})))
    pc = cfg.param_count()
    assert counted - mtp == pc["main"]
    assert mtp == pc["mtp"]
    # abstract_params agrees with eval_shape of init, leaf by leaf
    assert jax.tree.structure(abstract_params(cfg)) == jax.tree.structure(shapes)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                                     abstract_params(cfg), shapes))


def test_v3_671b_released_counts():
    pc = get_config("v3_671b").param_count()
    assert 670.5e9 < pc["main"] < 671.5e9  # 671B (README_WEIGHTS.md; 671.03B recomputed)
    assert 11.5e9 < pc["mtp"] < 11.7e9  # 11.5B unique MTP parameters (README_WEIGHTS.md)
    assert 36.5e9 < pc["activated"] < 38e9  # 37B activated (36.7B by DeepSeek's split)
    assert pc["embedding"] == pc["head"] == 129280 * 7168


def test_other_released_counts():
    assert 235e9 < get_config("v2_236b").param_count()["main"] < 237e9  # DeepSeek-V2: 236B
    assert 15.5e9 < get_config("v2_lite_16b").param_count()["main"] < 16e9  # V2-Lite: 15.7B
    small = get_config("small").param_count()
    assert 3e8 < small["main"] < 2e9


def test_v3_proxy_has_v3_widths_and_fits_one_gpu():
    """Every width a GEMM or the attention sees is V3's; the depth and expert count are cut so
    that the training state fits an 80 GB GPU."""
    v3, proxy = get_config("v3_671b"), get_config("v3_proxy")
    widths = ("dim", "inter_dim", "moe_inter_dim", "n_heads", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_shared_experts",
              "n_expert_groups", "n_limited_groups", "score_func", "group_score", "router_bias",
              "route_scale", "mtp_depth", "softmax_scale")
    assert {f: getattr(proxy, f) for f in widths} == {f: getattr(v3, f) for f in widths}
    assert (proxy.n_layers, proxy.n_dense_layers, proxy.n_routed_experts,
            proxy.n_activated_experts) == (2, 1, 16, 4)
    pc = proxy.param_count()
    total = pc["main"] + pc["mtp"]
    # fp32 master weights + bf16 moments + fp32 gradients + bf16 compute copy: 14 bytes a
    # parameter, which must leave room for activations on an 80 GB card
    assert 2.9e9 < total < 3.1e9 and total * 14 < 45e9


def test_v3_preset_is_the_released_model():
    cfg = get_config("v3_671b")
    assert (cfg.score_func, cfg.group_score, cfg.router_bias) == ("sigmoid", "top2_sum", True)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale) == (8, 4, 2.5)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.original_seq_len) == ("yarn", 40.0, 4096)
    assert cfg.mtp_depth == 1 and cfg.norm_topk_prob
    # reference §3.3: 192^-0.5 x (0.1 x 1 x ln 40 + 1)^2
    chex.assert_trees_all_close(cfg.softmax_scale, 0.1352338, atol=1e-7, rtol=0)


def test_tiny_has_v3_structure():
    cfg = get_config("tiny")
    assert cfg.n_dense_layers >= 2 and cfg.n_moe_layers >= 2
    assert cfg.n_expert_groups >= 2 and 1 <= cfg.n_limited_groups < cfg.n_expert_groups
    assert cfg.q_lora_rank > 0 and cfg.kv_lora_rank > 0
    assert cfg.rope_scaling == "yarn" and cfg.mtp_depth == 1
    assert cfg.router_bias and cfg.score_func == "sigmoid"


def test_flops_per_token_band():
    cfg = get_config("v3_671b")
    pc = cfg.param_count()
    six_n = 6 * (pc["activated"] - pc["embedding"])
    fwd_bwd = cfg.flops_per_token(4096, mtp=False)
    attn = 3 * 2 * 128 * (192 + 128) * (4096 + 1) / 2 * 61
    # 6N over the non-embedding activated weights, plus attention (norms are negligible)
    chex.assert_trees_all_close(fwd_bwd, six_n + attn, rtol=1e-3, atol=0)
    chex.assert_trees_all_close(cfg.flops_per_token(4096, training=False, mtp=False), fwd_bwd / 3,
                                rtol=1e-12, atol=0)
    assert cfg.flops_per_token(4096) > fwd_bwd  # the MTP module adds work


@pytest.mark.parametrize("change, field", [
    (dict(n_expert_groups=3), "n_expert_groups"),
    (dict(n_activated_experts=3, n_limited_groups=1), "n_activated_experts"),
    (dict(n_limited_groups=5), "n_limited_groups"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(n_dense_layers=5), "n_dense_layers"),
    (dict(dim=0), "dim"),
    (dict(score_func="relu"), "score_func"),
    (dict(group_score="mean"), "group_score"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(beta_fast=0.5), "beta_fast"),
    (dict(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2), "group_score"),
    (dict(mtp_depth=-1), "mtp_depth"),
    (dict(route_scale=0.0), "route_scale"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **change)


@pytest.mark.parametrize("change, field", [
    (dict(remat="some"), "remat"), (dict(scan_layers="no"), "scan_layers"),
    (dict(dtype="int8"), "dtype"), (dict(attention="flash"), "attention"),
    (dict(grouped="dense"), "grouped"), (dict(decode_attention="auto"), "decode_attention"),
    (dict(fp8=("pallas", "xla")), "fp8"), (dict(fp8=Fp8("cuda")), "gemm"),
    (dict(fp8=Fp8("xla", "pallas"), dtype="float32"), "bfloat16"),
])
def test_invalid_runtimes_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        Runtime(**change)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'v4'"):
        get_config("v4")


def test_from_hf_released_config_equals_preset():
    cfg = Config.from_hf(V3_HUB)
    ref = get_config("v3_671b")
    for f in MODEL_FIELDS:
        assert getattr(cfg, f) == getattr(ref, f), f


def test_from_hf_transformers5_rope_parameters():
    hf = dict(V3_HUB)
    rope = hf.pop("rope_scaling")
    hf.pop("rope_theta")
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0,
                             **{k: v for k, v in rope.items() if k != "type"}}
    cfg = Config.from_hf(hf)
    ref = get_config("v3_671b")
    for f in MODEL_FIELDS:
        assert getattr(cfg, f) == getattr(ref, f), f


def test_from_hf_factor_falls_back_to_position_ratio():
    hf = dict(V3_HUB, rope_scaling={k: v for k, v in V3_HUB["rope_scaling"].items()
                                    if k != "factor"})
    assert Config.from_hf(hf).rope_factor == 163840 / 4096


def test_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="attention_bias"):
        Config.from_hf(dict(V3_HUB, attention_bias=True))
    with pytest.raises(ValueError, match="topk_method"):
        Config.from_hf(dict(V3_HUB, topk_method="random"))
    with pytest.raises(ValueError, match="rope type 'linear'"):
        Config.from_hf(dict(V3_HUB, rope_scaling={"type": "linear", "factor": 2}))
    with pytest.raises(ValueError, match="hidden_size"):
        Config.from_hf({k: v for k, v in V3_HUB.items() if k != "hidden_size"})


@pytest.mark.parametrize("name", sorted(dsv3_jax.PRESETS))
def test_to_hf_round_trip(name):
    cfg = get_config(name)
    back = Config.from_hf(to_hf(cfg))
    for f in MODEL_FIELDS:
        assert getattr(back, f) == getattr(cfg, f), f


def test_every_leaf_has_one_logical_name_per_dim():
    for name in ("tiny", "v3_671b", "v2_lite_16b"):
        cfg = get_config(name)
        names = logical_axes_tree(cfg)
        shapes = abstract_params(cfg)
        flat_n = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
        flat_s = jax.tree.leaves(shapes)
        assert len(flat_n) == len(flat_s)
        for n, s in zip(flat_n, flat_s):
            assert len(n) == len(s.shape), (n, s.shape)


def test_eval_shape_671b_is_cheap():
    # nothing allocated: 671B fp32 parameters would be 2.7 TB
    shapes = jax.eval_shape(lambda: dsv3_jax.init_params(get_config("v3_671b"),
                                                         jax.random.key(0)))
    experts = shapes["weights"]["moe_layers"]["moe"]["experts"]["w_gate"]
    assert experts.shape == (58, 256, 7168, 2048)
    assert shapes["router_state"]["moe_layers"]["bias"].dtype == np.float32


def test_auto_grouped_impl_takes_the_kernel_only_where_its_tiles_fit():
    """On a GPU in bf16, "auto" runs the routed experts on our grouped kernels when dim and
    moe_inter_dim fit its tiles (small, V3) and on ragged_dot otherwise (tiny: dim 64; V2-Lite:
    moe_inter_dim 1408), instead of failing inside the kernel; the CPU always takes ragged_dot.
    An explicit "pallas" where the tiles do not fit is an error naming the dimension."""
    from dsv3_jax.runtime import Devices, resolve

    gpu, cpu = Devices("gpu", hopper=True), Devices("cpu", hopper=False)
    assert resolve(get_config("small"), devices=cpu).grouped == "ragged_dot"
    assert resolve(get_config("small"), devices=gpu).grouped == "pallas"
    assert resolve(get_config("v3_671b"), devices=gpu).grouped == "pallas"
    assert resolve(get_config("small"), dtype="float32", devices=gpu).grouped == "ragged_dot"
    for name, dim in (("tiny", "dim = 64"), ("v2_lite_16b", "moe_inter_dim = 1408")):
        cfg = get_config(name)
        assert resolve(cfg, dtype="bfloat16", devices=gpu).grouped == "ragged_dot"
        with pytest.raises(ValueError, match=dim):
            resolve(cfg, dtype="bfloat16", grouped="pallas", devices=gpu)
