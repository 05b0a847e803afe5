"""The latent KV cache's storage: its arrays per layer, bf16/fp32 or FP8 (issue 6's option).

A layer's cache holds, per token, the compressed latent c_kv [C] and the shared RoPE key k_rope
[R] ([PAPER] §2.1.2: C + R = 576 numbers for V3). In 16 or 32 bits both are stored as they are.
In FP8 (`dtype=jnp.float8_e4m3fn`) the latent is e4m3 with one float32 scale per token and
128 channels (amax / 448, as DeepSeek-V3's activation tiles, pallas_kernels/fp8_quant.py), and
k_rope stays bf16: the RoPE part is 64 numbers and carries position, the layout FlashMLA's FP8
cache uses too (../shared/reference/kernels.md §3). V3: 512 + 4 x 4 + 64 x 2 = 656 bytes per
token per layer against 1152 in bf16 (1.76x smaller). Latents narrower than 128 (or not a
multiple of it, the `tiny` preset) take one scale per token.

On the XLA decode path the cache is dequantized before attention: the FP8 cache saves memory
(longer contexts, larger batches), not time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.config import Config
from pallas_kernels import fp8_quant as q8

FP8 = q8.FP8
TILE = q8.BLOCK


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(FP8)


def scale_tile(cfg: Config) -> int:
    """Channels per scale: 128, or the whole latent when it is not a multiple of 128."""
    return TILE if cfg.kv_lora_rank % TILE == 0 else cfg.kv_lora_rank


def layout(cfg: Config, dtype) -> dict[str, tuple[int, jnp.dtype]]:
    """name -> (numbers per token, dtype) of one layer's cache arrays."""
    dtype = jnp.dtype(dtype)
    if is_fp8(dtype):
        return {"c_kv": (cfg.kv_lora_rank, jnp.dtype(FP8)),
                "c_kv_scale": (cfg.kv_lora_rank // scale_tile(cfg), jnp.dtype(jnp.float32)),
                "k_rope": (cfg.qk_rope_head_dim, jnp.dtype(jnp.bfloat16))}
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
        raise ValueError(f"latent cache dtype {dtype.name}: use float32, bfloat16, float16 or "
                         f"float8_e4m3fn")
    return {"c_kv": (cfg.kv_lora_rank, dtype), "k_rope": (cfg.qk_rope_head_dim, dtype)}


def empty(cfg: Config, lead: tuple[int, ...], max_len: int, dtype) -> dict:
    """One layer's (or a stack's, `lead` = (layers, batch)) zero cache arrays."""
    return {name: jnp.zeros((*lead, max_len, width), dt)
            for name, (width, dt) in layout(cfg, dtype).items()}


def bytes_per_token(cfg: Config, dtype) -> int:
    """Bytes of one token's cache in one layer."""
    return sum(width * dt.itemsize for width, dt in layout(cfg, dtype).values())


def _write(cache: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
    """new [B, T, X] into cache [B, S, X] at per-row offsets start [B]."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        cache, new.astype(cache.dtype), start)


def _quantize(c: jnp.ndarray, tile: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """c [..., C] -> (e4m3 [..., C], float32 scales [..., C / tile]): the activations' 1 x 128
    recipe (amax / 448, the amax floored so unused all-zero slots get a finite scale)."""
    return q8.quantize_rows(c, block=tile, name="c_kv")


def _dequantize(q: jnp.ndarray, s: jnp.ndarray, dtype) -> jnp.ndarray:
    # through the FP8 values behind an optimization barrier (fp8_quant._fp8_values): XLA on GPU
    # would otherwise fold a quantize -> dequantize pair back to the unrounded values
    return q8.dequantize_rows(q, s, dtype)


def store(layer_cache: dict, c_new: jnp.ndarray, k_new: jnp.ndarray, start: jnp.ndarray) -> dict:
    """The layer's cache with c_new [B, T, C] and k_new [B, T, R] written at offsets start."""
    out = {"k_rope": _write(layer_cache["k_rope"], k_new, start)}
    if "c_kv_scale" in layer_cache:
        tile = layer_cache["c_kv"].shape[-1] // layer_cache["c_kv_scale"].shape[-1]
        q, s = _quantize(c_new, tile)
        out["c_kv"] = _write(layer_cache["c_kv"], q, start)
        out["c_kv_scale"] = _write(layer_cache["c_kv_scale"], s, start)
    else:
        out["c_kv"] = _write(layer_cache["c_kv"], c_new, start)
    return out


def load(layer_cache: dict, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(c_kv [B, S, C], k_rope [B, S, R]) in `dtype`, dequantized from FP8 where stored so."""
    if "c_kv_scale" in layer_cache:
        c_kv = _dequantize(layer_cache["c_kv"], layer_cache["c_kv_scale"], dtype)
    else:
        c_kv = layer_cache["c_kv"].astype(dtype)
    return c_kv, layer_cache["k_rope"].astype(dtype)
