"""Every parameter declared once: its path, its letters, its init and its Hugging Face name.

One `Decl` line gives a leaf's shape (letters through the legend in `axes.py`), its logical axis
names (for sharding/), its initialiser, and where it lives in a Hugging Face checkpoint (for
`hf.py`). Shapes, sharding and conversion therefore cannot drift apart (DESIGN convention 1).

The model state is one pytree with two parts:
  params = {"weights": {...},       # trained by the optimizer
            "router_state": {...}}  # V3's correction bias: state, no gradient, no weight decay
Layers of one kind are stacked on a leading `L` axis and scanned: `dense_layers`,
`moe_layers`, and `mtp` (one entry per MTP module).

Our matrices are stored input-first (`x @ w`), PyTorch `Linear` weights are `[out, in]`: the
`HFLinear` transform reshapes, slices and transposes between the two (reference §10.3).
"""

import dataclasses
import hashlib
import itertools
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.axes import LEGEND, logical_axes
from dsv3_jax.config import Config

Init = Literal["normal", "ones", "zeros"]


@dataclasses.dataclass(frozen=True)
class HFLinear:
    """A (slice of a) PyTorch Linear weight [out, in]: out unflattens to `out_shape`, in to
    `in_shape`; `out_slice` keeps part of the last out axis; our leaf is [*in, *out_sliced]."""
    name: str
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_slice: tuple[int, int] | None = None
    fp8: bool = True  # the released checkpoints store this weight FP8 block-quantized

    def to_leaf(self, w: np.ndarray) -> np.ndarray:
        w = w.reshape(self.out_shape + self.in_shape)
        if self.out_slice is not None:
            a, b = self.out_slice
            w = w[(slice(None),) * (len(self.out_shape) - 1) + (slice(a, b),)]
        n_out = len(self.out_shape)
        return np.transpose(w, tuple(range(n_out, w.ndim)) + tuple(range(n_out)))

    def from_leaf(self, leaf: np.ndarray) -> np.ndarray:
        """Inverse of `to_leaf` without the slice: [*in, *out_part] -> [*out_part, *in]."""
        n_in = len(self.in_shape)
        return np.transpose(leaf, tuple(range(n_in, leaf.ndim)) + tuple(range(n_in)))


@dataclasses.dataclass(frozen=True)
class HFVector:
    """A tensor stored as is (norm gains, the embedding [V, D], the router bias)."""
    name: str
    fp8: bool = False

    def to_leaf(self, w: np.ndarray) -> np.ndarray:
        return w

    def from_leaf(self, leaf: np.ndarray) -> np.ndarray:
        return leaf


@dataclasses.dataclass(frozen=True)
class Decl:
    path: tuple[str, ...]  # ("weights", "moe_layers", "attn", "w_uq")
    letters: str  # "L Q N K": stack letters first
    init: Init
    hf: HFLinear | HFVector
    stack: str | None = None  # "dense" | "moe" | "mtp": what the L index means
    index: tuple[str, ...] = ()  # leading letters that index separate HF tensors ("L", "E")
    dtype: str | None = None  # fixed dtype (router bias: float32); None = the param dtype
    # Per-leaf facts, read by the optimizer, the model and the sharding rules:
    decay: bool = True  # AdamW weight decay applies (matrices; never norm gains, [PAPER] §4.2)
    keep_fp32: bool = False  # computed in float32 whatever the compute dtype (norms, router:
    # the V3 report keeps them in higher precision, §3.3.1)
    replicated: bool = False  # whole on every device (gains: a few KiB; the router bias: every
    # device routes with all of it, and it must stay bitwise identical everywhere)


FACTS = ("decay", "keep_fp32", "replicated")


def letter_sizes(cfg: Config, stack: str | None) -> dict[str, int]:
    sizes = {c: getattr(cfg, l.field) for c, l in LEGEND.items() if l.field is not None}
    sizes["L"] = {"dense": cfg.n_dense_layers, "moe": cfg.n_moe_layers, "mtp": cfg.mtp_depth,
                  None: 0}[stack]
    return sizes


def decl_shape(d: Decl, cfg: Config) -> tuple[int, ...]:
    sizes = letter_sizes(cfg, d.stack)
    return tuple(sizes[c] for c in d.letters.split())


def hf_layer_index(cfg: Config, stack: str, i: int) -> int:
    """HF layer number of entry i of a stack: MTP module k is `model.layers.{n_layers + k}`."""
    return {"dense": i, "moe": cfg.n_dense_layers + i, "mtp": cfg.n_layers + i}[stack]


# ---------------------------------------------------------------------------- declarations
def _attention(cfg: Config, pre: tuple[str, ...], stack: str) -> list[Decl]:
    n, k, r, h = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    c, d, q = cfg.kv_lora_rank, cfg.dim, cfg.q_lora_rank
    at = "model.layers.{layer}.self_attn."
    p = pre + ("attn",)

    def mat(name, letters, hf):
        return Decl(p + (name,), "L " + letters, "normal", hf, stack, ("L",))

    out = []
    if q:  # low-rank query: c^Q = RMSNorm(x W^DQ), q = c^Q W^UQ (eqs 6-8)
        out += [mat("w_dq", "D Q", HFLinear(at + "q_a_proj.weight", (q,), (d,))),
                _gain(p + ("q_norm",), "L Q", at + "q_a_layernorm.weight", stack)]
        q_src, q_in, q_letter = at + "q_b_proj.weight", (q,), "Q"
    else:  # V2-Lite: one plain query projection
        q_src, q_in, q_letter = at + "q_proj.weight", (d,), "D"
    out += [
        # q per head is [nope K | rope R] (reference gotcha 4)
        mat("w_uq", f"{q_letter} N K", HFLinear(q_src, (n, k + r), q_in, (0, k))),
        mat("w_qr", f"{q_letter} N R", HFLinear(q_src, (n, k + r), q_in, (k, k + r))),
        # kv_a output is [c_kv C | k_rope R], the rope key shared by all heads
        mat("w_dkv", "D C", HFLinear(at + "kv_a_proj_with_mqa.weight", (c + r,), (d,), (0, c))),
        mat("w_kr", "D R", HFLinear(at + "kv_a_proj_with_mqa.weight", (c + r,), (d,), (c, c + r))),
        _gain(p + ("kv_norm",), "L C", at + "kv_a_layernorm.weight", stack),
        # kv_b per head is [k_nope K | v H]
        mat("w_uk", "C N K", HFLinear(at + "kv_b_proj.weight", (n, k + h), (c,), (0, k))),
        mat("w_uv", "C N H", HFLinear(at + "kv_b_proj.weight", (n, k + h), (c,), (k, k + h))),
        mat("w_o", "N H D", HFLinear(at + "o_proj.weight", (d,), (n, h))),
    ]
    return out


def _gain(path: tuple[str, ...], letters: str, hf_name: str, stack: str | None) -> Decl:
    """An RMSNorm gain: ones, no weight decay, float32, replicated."""
    return Decl(path, letters, "ones", HFVector(hf_name), stack, ("L",) if stack else (),
                decay=False, keep_fp32=True, replicated=True)


def _norms(pre: tuple[str, ...], stack: str) -> list[Decl]:
    lay = "model.layers.{layer}."
    return [_gain(pre + ("attn_norm",), "L D", lay + "input_layernorm.weight", stack),
            _gain(pre + ("ffn_norm",), "L D", lay + "post_attention_layernorm.weight", stack)]


def _swiglu(pre: tuple[str, ...], hf_prefix: str, width: str, stack: str, cfg: Config,
            index: tuple[str, ...]) -> list[Decl]:
    """gate/up [.., D, width] and down [.., width, D]; `width` is the letter F, f or s."""
    d, wide = cfg.dim, letter_sizes(cfg, stack)[width]
    lead = " ".join(index)
    return [
        Decl(pre + ("w_gate",), f"{lead} D {width}", "normal",
             HFLinear(hf_prefix + "gate_proj.weight", (wide,), (d,)), stack, index),
        Decl(pre + ("w_up",), f"{lead} D {width}", "normal",
             HFLinear(hf_prefix + "up_proj.weight", (wide,), (d,)), stack, index),
        Decl(pre + ("w_down",), f"{lead} {width} D", "normal",
             HFLinear(hf_prefix + "down_proj.weight", (d,), (wide,)), stack, index),
    ]


def _moe(cfg: Config, pre: tuple[str, ...], stack: str) -> list[Decl]:
    mlp = "model.layers.{layer}.mlp."
    p = pre + ("moe",)
    out = [Decl(p + ("router",), "L D E", "normal",
                HFLinear(mlp + "gate.weight", (cfg.n_routed_experts,), (cfg.dim,), fp8=False),
                stack, ("L",), keep_fp32=True)]
    if cfg.n_shared_experts:
        out += _swiglu(p + ("shared",), mlp + "shared_experts.", "s", stack, cfg, ("L",))
    out += _swiglu(p + ("experts",), mlp + "experts.{expert}.", "f", stack, cfg, ("L", "E"))
    return out


def _block(cfg: Config, stack: str, moe: bool) -> list[Decl]:
    pre = ("weights", {"dense": "dense_layers", "moe": "moe_layers", "mtp": "mtp"}[stack])
    out = _norms(pre, stack) + _attention(cfg, pre, stack)
    if moe:
        out += _moe(cfg, pre, stack)
    else:
        out += _swiglu(pre + ("ffn",), "model.layers.{layer}.mlp.", "F", stack, cfg, ("L",))
    return out


def declarations(cfg: Config) -> list[Decl]:
    """All leaves of the model state for `cfg`, in a fixed order."""
    out = [
        Decl(("weights", "embed"), "V D", "normal", HFVector("model.embed_tokens.weight")),
        _gain(("weights", "final_norm"), "D", "model.norm.weight", None),
        Decl(("weights", "head"), "D V", "normal",
             HFLinear("lm_head.weight", (cfg.vocab_size,), (cfg.dim,), fp8=False)),
    ]
    if cfg.n_dense_layers:
        out += _block(cfg, "dense", moe=False)
    if cfg.n_moe_layers:
        out += _block(cfg, "moe", moe=True)
    if cfg.mtp_depth:
        m, lay = ("weights", "mtp"), "model.layers.{layer}."
        out += [
            _gain(m + ("enorm",), "L D", lay + "enorm.weight", "mtp"),
            _gain(m + ("hnorm",), "L D", lay + "hnorm.weight", "mtp"),
            # input rows [0, D) multiply the normalised embedding, [D, 2D) the hidden state:
            # the released order is [emb; hidden], the reverse of eq 21 (reference gotcha 13)
            Decl(m + ("eh_proj",), "L P D", "normal",
                 HFLinear(lay + "eh_proj.weight", (cfg.dim,), (2 * cfg.dim,), fp8=False),
                 "mtp", ("L",)),
            _gain(m + ("final_norm",), "L D", lay + "shared_head.norm.weight", "mtp"),
        ] + _block(cfg, "mtp", moe=True)
    if cfg.router_bias:
        bias = "model.layers.{layer}.mlp.gate.e_score_correction_bias"
        for stack, key, depth in (("moe", "moe_layers", cfg.n_moe_layers),
                                  ("mtp", "mtp", cfg.mtp_depth)):
            if depth:
                # state, not a weight: no gradient and no decay (it never meets the optimizer)
                out.append(Decl(("router_state", key, "bias"), "L E", "zeros", HFVector(bias),
                                stack, ("L",), dtype="float32", decay=False, keep_fp32=True,
                                replicated=True))
    return out


def hf_tensor_names(d: Decl, cfg: Config) -> Iterator[tuple[tuple[int, ...], str]]:
    """(leaf index, HF tensor name) for every HF tensor feeding leaf `d`."""
    shape = decl_shape(d, cfg)
    for idx in itertools.product(*(range(n) for n in shape[:len(d.index)])):
        fields = {}
        for letter, i in zip(d.index, idx):
            if letter == "L":
                fields["layer"] = hf_layer_index(cfg, d.stack, i)
            else:
                fields["expert"] = i
        yield idx, d.hf.name.format(**fields)


# ---------------------------------------------------------------------------- trees
def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _empty_state() -> dict:
    return {"weights": {}, "router_state": {}}


def logical_axes_tree(cfg: Config) -> dict:
    """The params pytree with each leaf replaced by its tuple of logical axis names."""
    tree = _empty_state()
    for d in declarations(cfg):
        _set(tree, d.path, logical_axes(d.letters))
    return tree


def fact_tree(cfg: Config, fact: str) -> dict:
    """The state tree with each leaf replaced by its `Decl` fact (`decay`, `keep_fp32` or
    `replicated`): what the optimizer's decay mask, the model's casts and the sharding rules
    read, so no code picks leaves by name."""
    if fact not in FACTS:
        raise ValueError(f"unknown parameter fact {fact!r}; facts are {FACTS}")
    tree = _empty_state()
    for d in declarations(cfg):
        _set(tree, d.path, getattr(d, fact))
    return tree


def _leaf_dtype(d: Decl, cfg: Config):
    return jnp.dtype(d.dtype or cfg.param_dtype)


def _leaf_key(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """A key per leaf derived from its path, so adding a leaf never reshuffles the others."""
    digest = hashlib.sha256("/".join(path).encode()).digest()
    return jax.random.fold_in(key, int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)


def _init_leaf(d: Decl, cfg: Config, key: jax.Array, std) -> jax.Array:
    shape, dtype = decl_shape(d, cfg), _leaf_dtype(d, cfg)
    if d.init == "ones":
        return jnp.ones(shape, dtype)
    if d.init == "zeros":
        return jnp.zeros(shape, dtype)
    w = std * jax.random.normal(_leaf_key(key, d.path), shape, jnp.float32)
    return w.astype(dtype)


def init_params(cfg: Config, key: jax.Array) -> dict:
    """Fresh model state {"weights", "router_state"}: matrices ~ N(0, cfg.init_std) (V3 report
    §4.2: 0.006), norm gains 1, router bias 0. Jitted (one compile per set of shapes); works
    under `jax.eval_shape` without allocating."""
    return _init_jit(shapes_key(cfg), key, jnp.float32(cfg.init_std))


def shapes_key(cfg: Config) -> Config:
    """`cfg` with every field that cannot change a leaf reset: the jit key of `init_tree`, so
    configs that differ only in such fields share one compile (on CPU, XLA spends ~50 ms per
    leaf compiling the random draws)."""
    return cfg.replace(init_std=1.0, dtype="float32", name="")


def init_tree(cfg: Config, key: jax.Array, std: jax.Array) -> dict:
    """The state with standard deviation `std` for the normal leaves (traceable)."""
    tree = _empty_state()
    for d in declarations(cfg):
        _set(tree, d.path, _init_leaf(d, cfg, key, std))
    return tree


_init_jit = jax.jit(init_tree, static_argnums=0)


def abstract_params(cfg: Config) -> dict:
    """`jax.ShapeDtypeStruct` tree of the state, nothing allocated."""
    tree = _empty_state()
    for d in declarations(cfg):
        _set(tree, d.path, jax.ShapeDtypeStruct(decl_shape(d, cfg), _leaf_dtype(d, cfg)))
    return tree


def split_state(params: dict) -> tuple[dict, dict]:
    """(weights, router_state): what the optimizer trains, and what it must never touch."""
    return params["weights"], params["router_state"]
