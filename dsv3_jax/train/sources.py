"""Where a fine-tuning run (SFT, GRPO, a distillation teacher) gets its model and tokenizer:
random weights of a preset, the newest checkpoint of one of our runs, or a Hugging Face folder.

Exactly one source is used: `--init_checkpoint DIR` (our orbax checkpoints; the model config
comes from the checkpoint's metadata), `--hf DIR` (config.json + safetensors; the tokenizer
from the folder's tokenizer.json when it has one) or, with neither, `--preset` at `--seed`.
The byte tokenizer serves presets and our checkpoints (its 259 ids must fit the vocabulary).
"""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import Config, get_config
from dsv3_jax.io.hf import load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.io.tokenizer import ByteTokenizer, tokenizer_for
from dsv3_jax.params import init_params
from dsv3_jax.train.checkpoint import load_params

# the files of a Hugging Face folder that describe its tokenizer (copied along on export)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass
class Source:
    cfg: Config
    params: dict  # {"weights", "router_state"}
    tokenizer: object
    description: str
    hf_dir: str | None = None


def load_source(*, preset: str, seed: int, init_checkpoint: str | None = None,
                hf: str | None = None, mtp_depth: int | None = None,
                flag: str = "--init_checkpoint / --hf") -> Source:
    """The model to start from (see the module docstring). `mtp_depth` changes a preset's MTP
    depth; a loaded model keeps its own (asking for another is an error naming `flag`)."""
    if init_checkpoint and hf:
        raise ValueError(f"{flag}: give one starting point, not both")
    if init_checkpoint:
        params, cfg, step = load_params(init_checkpoint)
        what = f"checkpoint {init_checkpoint} (step {step}, {cfg.name})"
        tok = _byte_tokenizer(cfg, what)
        hf_dir = None
    elif hf:
        cfg, params = load_hf_checkpoint(hf)
        params = jax.tree.map(np.asarray, params)
        tok = tokenizer_for(hf, cfg.vocab_size)
        what, hf_dir = f"Hugging Face model {hf}", hf
    else:
        cfg = get_config(preset, **({} if mtp_depth is None else {"mtp_depth": mtp_depth}))
        params = init_params(cfg, jax.random.key(seed))
        tok = _byte_tokenizer(cfg, f"preset {preset}")
        return Source(cfg, params, tok, f"preset {preset} (random weights, seed {seed})")
    if mtp_depth is not None and mtp_depth != cfg.mtp_depth:
        raise ValueError(f"--mtp_depth {mtp_depth}: the {what} has mtp_depth {cfg.mtp_depth}")
    return Source(cfg, params, tok, what, hf_dir)


def _byte_tokenizer(cfg: Config, what: str) -> ByteTokenizer:
    tok = ByteTokenizer()
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"the {what} has vocab_size {cfg.vocab_size}, below the byte "
                         f"tokenizer's {tok.vocab_size} ids: text needs a model with a larger "
                         "vocabulary or a Hugging Face folder with its own tokenizer")
    return tok


def export_hf(params: dict, cfg: Config, out_dir: str, source: Source) -> str:
    """Write `params` as a Hugging Face folder (bf16 safetensors + config.json), with the source
    folder's tokenizer files when it came from one."""
    params = jax.tree.map(np.asarray, jax.device_get(params))
    save_hf_checkpoint(params, cfg, out_dir, dtype=jnp.bfloat16)
    if source.hf_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(source.hf_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, name))
    return out_dir
