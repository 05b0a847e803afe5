"""The V3 optimizer: AdamW with both moments stored in bf16 over fp32 master weights.

DeepSeek-V3 report §4.2 and §3.3.3: AdamW, beta1 0.9, beta2 0.95, weight decay 0.1, gradient
clipping at global norm 1.0, first and second moments in BF16. optax's `adamw(mu_dtype=...)`
covers the first moment only; the second is cast to bf16 right after `init` and keeps that
dtype through updates (optax computes the update in fp32 and casts back to the state's dtype;
measured on jax 0.11.2 / optax 0.2.8, ../shared/reference/gpu_facts.md). Weight decay applies
where the parameter declarations say so (`Decl.decay`: matrices, never norm gains); the router
bias is not a weight at all and never reaches the optimizer.
"""

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import Config
from dsv3_jax.params import fact_tree


def decay_mask(cfg: Config) -> dict:
    """The weights tree with True where AdamW decays the leaf (`Decl.decay`)."""
    return fact_tree(cfg, "decay")["weights"]


def _cast_second_moment(state, dtype):
    def cast(s):
        if isinstance(s, optax.ScaleByAdamState):
            return s._replace(nu=jax.tree.map(lambda a: a.astype(dtype), s.nu))
        return s

    return jax.tree.map(cast, state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def adamw_v3(learning_rate, cfg: Config, *, b1: float = 0.9, b2: float = 0.95,
             eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float | None = 1.0,
             moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with `moment_dtype` moments over `cfg`'s weights (see
    the module docstring)."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=moment_dtype,
                             weight_decay=weight_decay, mask=decay_mask(cfg)))
    inner = optax.chain(*parts)

    def init(params):
        return _cast_second_moment(inner.init(params), moment_dtype)

    return optax.GradientTransformation(init, inner.update)
