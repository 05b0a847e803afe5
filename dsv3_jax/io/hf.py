"""Hugging Face DeepSeek-V3 checkpoints: load into our params, export back.

Reads a folder with `config.json` and safetensors weights (one file, several, or shards listed by
`model.safetensors.index.json`), tensor by tensor from memory-mapped files. FP8 e4m3 weights with
`<name>_scale_inv` 128x128 block scales are dequantized exactly as `deepseek-ai/DeepSeek-V3@9b4e978
inference/kernel.py weight_dequant`: value = fp8 * scale_inv (a multiply; reference gotcha 11),
edge blocks included (kv_a 576 rows -> 5 row blocks). Names follow the Hub layout (reference
§10.1): per-expert tensors, and the MTP module(s) at `model.layers.{num_hidden_layers + k}` with
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and copies of the embedding and head.

Every name comes from `params.declarations`; a missing, unexpected or mis-shaped tensor is an
error naming it. What we follow where references differ: transformers 5.23 (routing masks with
-inf like the official fix; YaRN cos/sin factor and softmax scale as `_compute_yarn_parameters`).
"""

import json
import os
import re
import sys
import warnings
from collections import defaultdict

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax.config import Config, to_hf
from dsv3_jax.params import HFLinear, declarations, decl_shape, hf_tensor_names
from dsv3_jax.io.safetensors import CODES, DTYPES, SafetensorsFile, write_safetensors

FP8_BLOCK = 128  # weight_block_size [128, 128] of the released quantization_config
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
# Tensors some exporters add that carry no weights (recomputed RoPE buffers).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------- FP8 blocks
def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, name: str = "tensor") -> np.ndarray:
    """float32 [out, in] = fp8 [out, in] * scale_inv [ceil(out/128), ceil(in/128)] per block."""
    rows, cols = q.shape
    want = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if scale_inv.shape != want:
        raise ValueError(f"{name}{SCALE_SUFFIX}: shape {scale_inv.shape}, expected {want} for a "
                         f"{q.shape} weight in {FP8_BLOCK}x{FP8_BLOCK} blocks")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)
    return q.astype(np.float32) * s[:rows, :cols]


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp8 e4m3 [out, in], scale_inv float32 [ceil(out/128), ceil(in/128)]): per 128x128 block
    scale = amax / 448, as the released checkpoints; an all-zero block gets scale 1."""
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = np.zeros((br * FP8_BLOCK, bc * FP8_BLOCK), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(br, FP8_BLOCK, bc, FP8_BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_E4M3_MAX, 1.0).astype(np.float32)
    q = np.clip(blocks / scale[:, None, :, None], -FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.reshape(padded.shape)[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return q, scale


# ---------------------------------------------------------------------------- reading
class CheckpointReader:
    """Name -> tensor over all safetensors files of a checkpoint folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        index = os.path.join(self.folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"{self.folder}: no .safetensors files")
        self.files = {f: SafetensorsFile(os.path.join(self.folder, f)) for f in files}
        self.where: dict[str, str] = {}
        for f, st in self.files.items():
            for name in st.keys():
                if name in self.where:
                    raise ValueError(f"tensor {name!r} is stored twice ({self.where[name]}, {f})")
                self.where[name] = f
        if weight_map is not None:
            for name, f in weight_map.items():
                if self.where.get(name) != f:
                    raise ValueError(f"index lists {name!r} in {f}, but that file does not hold it")

    def names(self) -> set[str]:
        return set(self.where)

    def raw(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(name)
        return self.files[self.where[name]].get(name)

    def read(self, name: str) -> np.ndarray:
        """The tensor, FP8 block-dequantized to float32 when it has a scale companion."""
        w = self.raw(name)
        if w.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
            scale = name + SCALE_SUFFIX
            if scale not in self.where:
                raise ValueError(f"{name}: FP8 tensor without its {scale!r} block scales")
            if w.ndim != 2:
                raise ValueError(f"{name}: FP8 block scales need a 2-D weight, got {w.shape}")
            return dequantize_blocks(w, self.raw(scale), name)
        return w


def _expected_hf_shape(hf, piece_shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(hf, HFLinear):
        return (int(np.prod(hf.out_shape)), int(np.prod(hf.in_shape)))
    return piece_shape


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def _load_leaf(reader: CheckpointReader, d, cfg: Config, used: set[str]) -> np.ndarray:
    shape = decl_shape(d, cfg)
    leaf = np.empty(shape, _np_dtype(d.dtype or cfg.param_dtype))
    piece_shape = shape[len(d.index):]
    missing = []
    for idx, name in hf_tensor_names(d, cfg):
        if name not in reader.where:
            missing.append(name)
            continue
        w = reader.read(name)
        want = _expected_hf_shape(d.hf, piece_shape)
        if w.shape != want:
            raise ValueError(f"checkpoint tensor {name!r} has shape {list(w.shape)}, expected "
                             f"{list(want)} for this config")
        leaf[idx] = d.hf.to_leaf(w)
        used.add(name)
        if name + SCALE_SUFFIX in reader.where:
            used.add(name + SCALE_SUFFIX)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {reader.folder} is missing tensor {missing[0]!r}{more}, "
                         f"needed for {'/'.join(d.path)}")
    return leaf


def _check_mtp_copies(reader: CheckpointReader, cfg: Config, weights: dict, used: set[str]):
    """The released checkpoints repeat the embedding and head inside each MTP layer; we share
    them physically ([PAPER] §3.2.3), so a copy that differs cannot be represented."""
    for k in range(cfg.mtp_depth):
        layer = f"model.layers.{cfg.n_layers + k}."
        for name, ours, transpose in ((layer + "embed_tokens.weight", weights["embed"], False),
                                      (layer + "shared_head.head.weight", weights["head"], True)):
            if name not in reader.where:
                continue
            theirs = reader.read(name).astype(np.float32)
            mine = np.asarray(ours, np.float32)
            if theirs.shape != (mine.T if transpose else mine).shape or not np.array_equal(
                    theirs, mine.T if transpose else mine):
                raise ValueError(f"{name} differs from the main model's tensor; MTP shares the "
                                 "embedding and head with the main model")
            used.add(name)


def _mtp_present(reader: CheckpointReader, cfg: Config) -> Config:
    """Checkpoints converted without their MTP layer (the official convert.py drops
    `model.layers.61`) still say num_nextn_predict_layers=1: load them without MTP, and say so.
    A partly present MTP layer is not this case: its missing tensors raise as usual."""
    if not cfg.mtp_depth:
        return cfg
    prefix = f"model.layers.{cfg.n_layers}."
    if any(n.startswith(prefix) for n in reader.names()):
        return cfg
    warnings.warn(f"{reader.folder}: config.json declares {cfg.mtp_depth} MTP module(s) but the "
                  f"checkpoint has no {prefix}* tensors; loading without MTP (mtp_depth=0)",
                  stacklevel=3)
    return cfg.replace(mtp_depth=0)


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.float32, *, progress: bool = False,
                       **config_overrides):
    """(config, params) from a Hugging Face DeepSeek-V2/V3 checkpoint folder.

    `dtype` is the parameter dtype and the config's compute dtype (the router bias stays
    float32). Keyword overrides go to the Config. Tensors are read one at a time from the
    memory-mapped files; host memory peaks at the loaded params plus one leaf. `progress`
    prints a line per leaf to stderr (a 671B checkpoint takes a while).
    """
    name = jnp.dtype(dtype).name
    cfg = Config.from_hf(path, **{"dtype": name, "param_dtype": name, **config_overrides})
    reader = CheckpointReader(path)
    cfg = _mtp_present(reader, cfg)
    used: set[str] = set()
    params: dict = {"weights": {}, "router_state": {}}
    decls = declarations(cfg)
    loaded_bytes = 0
    for i, d in enumerate(decls):
        tree = params
        for key in d.path[:-1]:
            tree = tree.setdefault(key, {})
        leaf = _load_leaf(reader, d, cfg, used)
        tree[d.path[-1]] = jnp.asarray(leaf)
        loaded_bytes += leaf.nbytes
        del leaf
        if progress:
            print(f"[{i + 1}/{len(decls)}] {'/'.join(d.path)} {tuple(tree[d.path[-1]].shape)} "
                  f"({loaded_bytes / 2**30:.2f} GiB so far)", file=sys.stderr, flush=True)
    _check_mtp_copies(reader, cfg, params["weights"], used)
    unexpected = sorted(n for n in reader.names() - used if not _IGNORED.match(n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"checkpoint {reader.folder} has unexpected tensor {unexpected[0]!r}"
                         f"{more}: the config does not describe it")
    return cfg, params


# ---------------------------------------------------------------------------- export
def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _hf_tensors(params: dict, cfg: Config) -> dict[str, list]:
    """HF name -> [(hf transform, leaf piece)] in declaration order."""
    out: dict[str, list] = defaultdict(list)
    for d in declarations(cfg):
        leaf = _get(params, d.path)
        for idx, name in hf_tensor_names(d, cfg):
            out[name].append((d.hf, leaf[idx]))
    return out


def _assemble(pieces: list) -> np.ndarray:
    """Rebuild one HF tensor from the leaf slices that share it (e.g. q_b_proj = [w_uq | w_qr])."""
    hf = pieces[0][0]
    if not isinstance(hf, HFLinear):
        return np.asarray(pieces[0][1], np.float32)
    pieces = sorted(pieces, key=lambda p: p[0].out_slice[0] if p[0].out_slice else 0)
    parts = [p[0].from_leaf(np.asarray(p[1], np.float32)) for p in pieces]
    full = np.concatenate(parts, axis=len(hf.out_shape) - 1)
    return full.reshape(int(np.prod(hf.out_shape)), int(np.prod(hf.in_shape)))


def _entries(params: dict, cfg: Config, dtype: np.dtype, fp8: bool):
    """(name, code, shape, producer) for every tensor of the export, in a stable order."""
    groups = _hf_tensors(params, cfg)
    for k in range(cfg.mtp_depth):  # the released layout repeats embedding and head per module
        layer = f"model.layers.{cfg.n_layers + k}."
        groups[layer + "embed_tokens.weight"] = groups["model.embed_tokens.weight"]
        groups[layer + "shared_head.head.weight"] = groups["lm_head.weight"]
    entries = []
    for name, pieces in groups.items():
        hf = pieces[0][0]
        keep_f32 = name.endswith("e_score_correction_bias")  # fp32 in every release
        if fp8 and hf.fp8:
            rows, cols = _assemble_shape(pieces)
            blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
            # the scale is written right after its weight: quantize once, hand the scale over
            held: dict = {}

            def weight(p=pieces, held=held):
                q, held["scale"] = quantize_blocks(_assemble(p))
                return q

            entries.append((name, "F8_E4M3", (rows, cols), weight))
            entries.append((name + SCALE_SUFFIX, "F32", blocks, lambda held=held: held.pop("scale")))
        else:
            out_dtype = np.dtype(np.float32) if keep_f32 else dtype
            shape = _assemble_shape(pieces)
            entries.append((name, CODES[out_dtype], shape,
                            lambda p=pieces, t=out_dtype: _assemble(p).astype(t)))
    return entries


def _assemble_shape(pieces: list) -> tuple[int, ...]:
    hf = pieces[0][0]
    if isinstance(hf, HFLinear):
        return (int(np.prod(hf.out_shape)), int(np.prod(hf.in_shape)))
    return tuple(np.shape(pieces[0][1]))


def save_hf_checkpoint(params: dict, cfg: Config, path: str | os.PathLike, *,
                       dtype=jnp.bfloat16, fp8: bool = False,
                       max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write params as a Hugging Face checkpoint folder (config.json + safetensors shards +
    index). `fp8=True` block-quantizes the weights the released checkpoints store in FP8.
    Tensors are produced one at a time. Returns the shard file names."""
    os.makedirs(path, exist_ok=True)
    hf_cfg = to_hf(cfg)
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                         "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    entries = _entries(params, cfg, _np_dtype(dtype), fp8)
    shards, current, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[2])) * DTYPES[e[1]].itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        total += write_safetensors(os.path.join(path, fname), shard, {"format": "pt"})
        weight_map.update({e[0]: fname for e in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf_cfg, fh, indent=1)
    return names
