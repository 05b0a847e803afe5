"""The model configuration: a frozen, validated dataclass whose presets *are* the released models.

Sources (see ../shared/reference/deepseek_v3.md §1): the official configs
`deepseek-ai/DeepSeek-V3@9b4e978 inference/configs/config_{671B,236B,16B}.json` and
`ModelArgs` defaults in `inference/model.py`; the Hub `config.json` of DeepSeek-V3; Hugging Face
`transformers` 5.23 `configuration_deepseek_v3.py` and `modeling_rope_utils._compute_yarn_parameters`.

Every feature is an explicit field: nothing is inferred from another field's value (the official
code's `bias if dim == 7168` is the anti-pattern). Invalid combinations raise `ValueError` naming
the field. `Config` is the architecture, what a checkpoint needs to be read, plus the model's own
dtype and init scale (HF `torch_dtype`, `initializer_range`); how a process runs it (compute
dtype, remat, kernels) is a `dsv3_jax.runtime.Runtime`, and the training objective's weights
live with the loss (`dsv3_jax.train.loss.LossWeights`).
"""

import dataclasses
import json
import math
import os
from typing import Any, Literal

ScoreFunc = Literal["sigmoid", "softmax"]
GroupScore = Literal["top2_sum", "max"]
RopeScaling = Literal["yarn", "none"]
DType = Literal["float32", "bfloat16", "float16"]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(t) = 0.1 * m * ln(s) + 1 ([PAPER] §4.3; HF `yarn_get_mscale`)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "custom"
    # --- sizes (legend letter in brackets) ---
    vocab_size: int  # [V]
    dim: int  # [D]
    inter_dim: int  # [F] dense SwiGLU width (first n_dense_layers layers)
    moe_inter_dim: int  # [f] width of one routed expert
    n_layers: int  # main-model layers, dense + MoE (the MTP modules are extra)
    n_dense_layers: int  # layers 0..n_dense_layers-1 are dense, the rest MoE
    n_heads: int  # [N]
    q_lora_rank: int  # [Q] 0 = plain query projection (V2-Lite)
    kv_lora_rank: int  # [C]
    qk_nope_head_dim: int  # [K]
    qk_rope_head_dim: int  # [R]
    v_head_dim: int  # [H]
    # --- DeepSeekMoE ---
    n_routed_experts: int  # [E]
    n_shared_experts: int  # shared experts, stored as ONE MLP of width n_shared * moe_inter_dim
    n_activated_experts: int  # [A]
    n_expert_groups: int  # [G] 1 = no group-limited routing
    n_limited_groups: int  # groups each token may use (node limit M in the V3 report)
    score_func: ScoreFunc
    group_score: GroupScore  # V3: sum of the two best biased scores; V2: max score
    router_bias: bool  # V3's auxiliary-loss-free correction bias (selection only)
    norm_topk_prob: bool  # renormalise the chosen weights (V3: yes; V2: no)
    route_scale: float
    # --- RoPE / YaRN ---
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "yarn"
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    rope_mscale: float = 1.0  # HF rope_scaling.mscale (cos/sin factor numerator); 0 = absent
    rope_mscale_all_dim: float = 1.0  # HF rope_scaling.mscale_all_dim (softmax scale); 0 = absent
    rope_attention_factor: float | None = None  # HF rope_scaling.attention_factor override
    rope_truncate: bool = True  # floor/ceil the YaRN correction range (HF `truncate`, official)
    rope_interleave: bool = True  # released weights pair RoPE dims (2i, 2i+1) (reference §3.4)
    max_seq_len: int = 163840  # positions the model supports (HF max_position_embeddings)
    rms_norm_eps: float = 1e-6
    # --- multi-token prediction ---
    mtp_depth: int = 1  # D in the V3 report; 0 = no MTP module
    init_std: float = 0.006  # all matrices ~ N(0, 0.006) ([PAPER] §4.2; HF initializer_range)
    # --- dtypes ---
    # The model's own dtype (HF `torch_dtype`): what a Runtime computes in unless told otherwise
    # (`dsv3_jax.runtime`). `tiny` computes in float32 so CPU tests can hold tight tolerances.
    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"  # master weights, as stored in a checkpoint

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        positive = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "n_activated_experts", "n_expert_groups",
                    "n_limited_groups", "max_seq_len")
        for f in positive:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Config.{f} must be a positive int, got {v!r}")
        for f in ("n_dense_layers", "q_lora_rank", "n_shared_experts", "mtp_depth"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Config.{f} must be an int >= 0, got {v!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"Config.n_dense_layers={self.n_dense_layers} exceeds "
                             f"n_layers={self.n_layers}")
        self._check_choice("score_func", ("sigmoid", "softmax"))
        self._check_choice("group_score", ("top2_sum", "max"))
        self._check_choice("rope_scaling", ("yarn", "none"))
        self._check_choice("dtype", ("float32", "bfloat16", "float16"))
        self._check_choice("param_dtype", ("float32", "bfloat16", "float16"))
        self._validate_routing()
        self._validate_rope()
        for f in ("route_scale", "rms_norm_eps", "init_std"):
            if not getattr(self, f) > 0:
                raise ValueError(f"Config.{f} must be > 0, got {getattr(self, f)!r}")

    def _check_choice(self, field: str, choices: tuple[str, ...]):
        if getattr(self, field) not in choices:
            raise ValueError(f"Config.{field}={getattr(self, field)!r} is not one of {choices}")

    def _validate_routing(self):
        e, g = self.n_routed_experts, self.n_expert_groups
        if e % g:
            raise ValueError(f"Config.n_expert_groups={g} does not divide n_routed_experts={e}")
        if self.n_limited_groups > g:
            raise ValueError(f"Config.n_limited_groups={self.n_limited_groups} exceeds "
                             f"n_expert_groups={g}")
        reachable = self.n_limited_groups * (e // g)
        if self.n_activated_experts > reachable:
            raise ValueError(
                f"Config.n_activated_experts={self.n_activated_experts} exceeds the "
                f"{reachable} experts in the n_limited_groups={self.n_limited_groups} chosen groups")
        if self.group_score == "top2_sum" and g > 1 and e // g < 2:
            raise ValueError(f"Config.group_score='top2_sum' needs >= 2 experts per group, "
                             f"got n_routed_experts/n_expert_groups={e // g}")

    def _validate_rope(self):
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"Config.qk_rope_head_dim={self.qk_rope_head_dim} must be even "
                             "(RoPE rotates pairs of dimensions)")
        if not self.rope_theta > 0:
            raise ValueError(f"Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling == "yarn":
            if not self.rope_factor >= 1.0:
                raise ValueError(f"Config.rope_factor must be >= 1 with YaRN, got {self.rope_factor}")
            if self.original_seq_len <= 0:
                raise ValueError(f"Config.original_seq_len must be > 0, got {self.original_seq_len}")
            if not self.beta_fast > self.beta_slow > 0:
                raise ValueError(f"Config.beta_fast={self.beta_fast} must exceed "
                                 f"beta_slow={self.beta_slow} > 0")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_inter_dim(self) -> int:  # [s]: shared experts are one MLP (reference gotcha 24)
        return self.n_shared_experts * self.moe_inter_dim

    @property
    def mtp_proj_in_dim(self) -> int:  # [P]
        return 2 * self.dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN, applied to the whole
        192-wide logit (reference §3.3; HF `yarn_apply_mscale`). Always on under YaRN, whatever
        the run's sequence length (reference gotcha 2)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling == "yarn" and self.rope_mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
        return scale

    @property
    def rope_cos_sin_factor(self) -> float:
        """Factor HF applies to cos/sin (so to q_rope.k_rope twice). 1.0 for every released
        DeepSeek model (mscale == mscale_all_dim); see `_compute_yarn_parameters`."""
        if self.rope_scaling != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        if self.rope_mscale and self.rope_mscale_all_dim:
            return (yarn_mscale(self.rope_factor, self.rope_mscale)
                    / yarn_mscale(self.rope_factor, self.rope_mscale_all_dim))
        return yarn_mscale(self.rope_factor)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ accounting
    def _attn_matmul_params(self) -> int:
        d, n = self.dim, self.n_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank * n * self.qk_head_dim
        else:
            q = d * n * self.qk_head_dim
        kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim)
              + self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim))
        return q + kv + n * self.v_head_dim * d

    def _layer_norm_params(self) -> int:  # attention + FFN pre-norms, q and kv latent norms
        return 2 * self.dim + self.q_lora_rank + self.kv_lora_rank

    def _moe_matmul_params(self, n_experts: int) -> int:  # router + shared + n routed experts
        d = self.dim
        return d * self.n_routed_experts + 3 * d * (self.shared_inter_dim
                                                    + n_experts * self.moe_inter_dim)

    def param_count(self) -> dict[str, int]:
        """Analytic parameter counts (the router bias is state, not counted).

        `main`: the main model, embedding and head included (671.03B for v3_671b);
        `mtp`: the MTP modules' own parameters (embedding and head are shared, not counted;
        11.6B for v3_671b); `activated`: main-model parameters used per token (routed experts
        counted A of E; embedding and head counted whole, as README_WEIGHTS.md does);
        `embedding`, `head`: V*D each.
        """
        d, v = self.dim, self.vocab_size
        layer = self._attn_matmul_params() + self._layer_norm_params()
        dense = layer + 3 * d * self.inter_dim
        nd, nm = self.n_dense_layers, self.n_moe_layers
        outer = 2 * v * d + d  # embedding, head, final norm
        main = outer + nd * dense + nm * (layer + self._moe_matmul_params(self.n_routed_experts))
        activated = outer + nd * dense + nm * (
            layer + self._moe_matmul_params(self.n_activated_experts))
        # an MTP module: enorm, hnorm, eh_proj [2D, D], its head norm, one MoE block
        module = 3 * d + 2 * d * d + layer + self._moe_matmul_params(self.n_routed_experts)
        return {"main": main, "mtp": self.mtp_depth * module, "activated": activated,
                "embedding": v * d, "head": v * d}

    def flops_per_token(self, seq_len: int, *, training: bool = True, mtp: bool = True) -> float:
        """Model FLOPs per token at `seq_len` with a causal mask (the MFU numerator).

        Forward = 2 x (matmul weights one token meets: attention projections, dense FFN or
        router + shared + A routed experts, the head; plus eh_proj, a MoE block and the head
        again per MTP module) + attention: 2*N*(K+R) for scores and 2*N*H for the value mix
        per attended key, (seq_len + 1) / 2 keys on average under the causal mask, per layer.
        Training = 3 x forward (the backward pass costs two forwards).
        """
        d = self.dim
        attn_mm = self._attn_matmul_params()
        weights = (self.n_dense_layers * (attn_mm + 3 * d * self.inter_dim)
                   + self.n_moe_layers * (attn_mm + self._moe_matmul_params(self.n_activated_experts))
                   + d * self.vocab_size)
        layers = self.n_layers
        if mtp:
            weights += self.mtp_depth * (2 * d * d + attn_mm + d * self.vocab_size
                                         + self._moe_matmul_params(self.n_activated_experts))
            layers += self.mtp_depth
        keys = (seq_len + 1) / 2
        attn = 2 * self.n_heads * (self.qk_head_dim + self.v_head_dim) * keys * layers
        fwd = 2 * weights + attn
        return 3 * fwd if training else fwd

    # ------------------------------------------------------------------ presets
    @classmethod
    def v3_671b(cls) -> "Config":
        """DeepSeek-V3 exactly as released (config_671B.json + ModelArgs defaults + Hub config)."""
        return cls(
            name="v3_671b", vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
            n_layers=61, n_dense_layers=3, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
            n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", group_score="top2_sum",
            router_bias=True, norm_topk_prob=True, route_scale=2.5,
            rope_factor=40.0, original_seq_len=4096, max_seq_len=163840, mtp_depth=1)

    @classmethod
    def v2_236b(cls) -> "Config":
        """The DeepSeek-V2 shape (official config_236B.json): softmax scores, 8 groups top-3 by
        the max score, no bias, no renormalisation, route scale 16, no MTP."""
        return cls(
            name="v2_236b", vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536,
            n_layers=60, n_dense_layers=1, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
            n_expert_groups=8, n_limited_groups=3, score_func="softmax", group_score="max",
            router_bias=False, norm_topk_prob=False, route_scale=16.0,
            rope_factor=40.0, original_seq_len=4096, max_seq_len=163840, mtp_depth=0)

    @classmethod
    def v2_lite_16b(cls) -> "Config":
        """The DeepSeek-V2-Lite shape (official config_16B.json): no query LoRA, 16 heads,
        softmax routing without groups, YaRN mscale 0.707, no MTP."""
        return cls(
            name="v2_lite_16b", vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
            n_layers=27, n_dense_layers=1, n_heads=16, q_lora_rank=0, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
            n_expert_groups=1, n_limited_groups=1, score_func="softmax", group_score="max",
            router_bias=False, norm_topk_prob=False, route_scale=1.0,
            rope_factor=40.0, original_seq_len=4096, rope_mscale=0.707, rope_mscale_all_dim=0.707,
            max_seq_len=163840, mtp_depth=0)

    @classmethod
    def tiny(cls) -> "Config":
        """V3's structure at CPU-test size: 2 dense + 2 MoE layers, 8 experts in 4 groups with
        2 groups per token, both LoRA ranks, YaRN (factor 4 from 64 positions), MTP depth 1.
        Computes in fp32 so CPU tests can hold tight tolerances."""
        return cls(
            name="tiny", vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32,
            n_layers=4, n_dense_layers=2, n_heads=4, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=12,
            n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
            n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", group_score="top2_sum",
            router_bias=True, norm_topk_prob=True, route_scale=2.5,
            rope_factor=4.0, original_seq_len=64, max_seq_len=256, mtp_depth=1,
            init_std=0.02, dtype="float32")

    @classmethod
    def small(cls) -> "Config":
        """One-GPU benchmark size, V3's structure: about 1.3B total / 0.27B activated parameters,
        widths multiples of 128 (FP8 block tiles), 64 experts in 8 groups (top-4 groups, 6
        experts per token), V3 head dims."""
        return cls(
            name="small", vocab_size=32768, dim=1024, inter_dim=4096, moe_inter_dim=512,
            n_layers=12, n_dense_layers=1, n_heads=16, q_lora_rank=512, kv_lora_rank=256,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=64, n_shared_experts=1, n_activated_experts=6,
            n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", group_score="top2_sum",
            router_bias=True, norm_topk_prob=True, route_scale=2.5,
            rope_factor=40.0, original_seq_len=4096, max_seq_len=32768, mtp_depth=1)

    @classmethod
    def v3_proxy(cls) -> "Config":
        """DeepSeek-V3's widths at a depth one 80 GB GPU trains: everything a GEMM or the
        attention sees is V3's (hidden 7168, query/KV ranks 1536/512, 128 heads of 128 + 64 with
        values of 128, dense FFN 18432, experts of width 2048, 8 expert groups with 4 per token,
        one shared expert, MTP depth 1), with 2 layers (one dense, one MoE), 16 routed experts of
        which 4 are active, and a 32,768-token vocabulary. About 3.0B parameters (2.0B without
        the MTP module); `small`'s narrow GEMMs (dim 1024) cannot show what FP8 buys at V3's
        shapes, this preset can. Compile-time studies deepen it with `replace(n_layers=...)`."""
        return cls(
            name="v3_proxy", vocab_size=32768, dim=7168, inter_dim=18432, moe_inter_dim=2048,
            n_layers=2, n_dense_layers=1, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
            n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", group_score="top2_sum",
            router_bias=True, norm_topk_prob=True, route_scale=2.5,
            rope_factor=40.0, original_seq_len=4096, max_seq_len=32768, mtp_depth=1)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> "Config":
        """Read a Hugging Face `config.json` (a dict, the file, or its folder).

        Accepts the released checkpoints' `rope_scaling` (+ top-level `rope_theta`) and
        transformers 5's `rope_parameters`. Fields we do not model raise (e.g. attention biases).
        """
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as fh:
                    hf = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls(**{**_fields_from_hf(hf), **overrides})


PRESETS = {
    "v3_671b": Config.v3_671b,
    "v2_236b": Config.v2_236b,
    "v2_lite_16b": Config.v2_lite_16b,
    "tiny": Config.tiny,
    "small": Config.small,
    "v3_proxy": Config.v3_proxy,
}


def get_config(name: str, **overrides) -> Config:
    """A preset by name (`v3_671b`, `v2_236b`, `v2_lite_16b`, `tiny`, `small`, `v3_proxy`), with
    overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


# HF topk_method -> (group score, bias). V3's `noaux_tc` scores groups by the sum of each group's
# two best biased scores; V2's `group_limited_greedy` by the max; `greedy` has one group.
_TOPK_METHODS = {"noaux_tc": ("top2_sum", True), "group_limited_greedy": ("max", False),
                 "greedy": ("max", False)}


def _require(hf: dict, key: str):
    if key not in hf or hf[key] is None:
        raise ValueError(f"Hugging Face config has no {key!r}")
    return hf[key]


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"Hugging Face config model_type={model_type!r} is not deepseek_v3/v2")
    for key in ("attention_bias", "tie_word_embeddings"):
        if hf.get(key):
            raise ValueError(f"Hugging Face config {key}=true is not supported by this model")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Hugging Face config hidden_act={hf['hidden_act']!r}: only 'silu'")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"Hugging Face config moe_layer_freq={hf['moe_layer_freq']}: only 1")
    # transformers' DeepseekV3 always routes the V3 way; V2 configs name their method.
    default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
    method = hf.get("topk_method", default_method)
    if method not in _TOPK_METHODS:
        raise ValueError(f"Hugging Face config topk_method={method!r} is not one of "
                         f"{sorted(_TOPK_METHODS)}")
    group_score, bias = _TOPK_METHODS[method]
    score_func = hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax")
    fields = dict(
        name=hf.get("_name_or_path") or model_type,
        vocab_size=_require(hf, "vocab_size"),
        dim=_require(hf, "hidden_size"),
        inter_dim=_require(hf, "intermediate_size"),
        moe_inter_dim=_require(hf, "moe_intermediate_size"),
        n_layers=_require(hf, "num_hidden_layers"),
        n_dense_layers=hf.get("first_k_dense_replace", 0) or 0,
        n_heads=_require(hf, "num_attention_heads"),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=_require(hf, "kv_lora_rank"),
        qk_nope_head_dim=_require(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_require(hf, "qk_rope_head_dim"),
        v_head_dim=_require(hf, "v_head_dim"),
        n_routed_experts=_require(hf, "n_routed_experts"),
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=_require(hf, "num_experts_per_tok"),
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        score_func=score_func, group_score=group_score, router_bias=bias,
        # transformers' V3 renormalises iff norm_topk_prob (default True there)
        norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "deepseek_v3")),
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        max_seq_len=_require(hf, "max_position_embeddings"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_interleave=bool(hf.get("rope_interleave", True)),
        mtp_depth=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0),
    )
    fields.update(_rope_from_hf(hf))
    return fields


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields from `rope_scaling` (released checkpoints) or `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling="none", rope_mscale=0.0, rope_mscale_all_dim=0.0)
    if kind != "yarn":
        raise ValueError(f"Hugging Face rope type {kind!r} is not supported (only yarn/default)")
    original = int(_require(params, "original_max_position_embeddings"))
    # HF falls back to max_position_embeddings / original when factor is absent (reference §1.2)
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    return dict(
        rope_theta=theta, rope_scaling="yarn", rope_factor=float(factor), original_seq_len=original,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        rope_mscale=float(params.get("mscale") or 0.0),
        rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        rope_attention_factor=params.get("attention_factor"),
        rope_truncate=bool(params.get("truncate", True)))


def to_hf(cfg: Config) -> dict[str, Any]:
    """The Hugging Face `config.json` of `cfg` (transformers 5 `rope_parameters` style)."""
    if cfg.router_bias and cfg.group_score == "top2_sum":
        method = "noaux_tc"
    elif cfg.n_expert_groups > 1:
        method = "group_limited_greedy"
    else:
        method = "greedy"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope_factor,
                    original_max_position_embeddings=cfg.original_seq_len,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow,
                    mscale=cfg.rope_mscale, mscale_all_dim=cfg.rope_mscale_all_dim)
        if cfg.rope_attention_factor is not None:
            rope["attention_factor"] = cfg.rope_attention_factor
        if not cfg.rope_truncate:
            rope["truncate"] = False
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "moe_layer_freq": 1,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups, "topk_method": method,
        "scoring_func": cfg.score_func, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.route_scale, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_interleave": cfg.rope_interleave,
        "rope_parameters": rope, "num_nextn_predict_layers": cfg.mtp_depth,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1,
    }
