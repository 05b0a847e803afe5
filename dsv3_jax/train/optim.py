"""The V3 optimizer: AdamW with both moments stored in bf16 over fp32 master weights.

DeepSeek-V3 report §4.2 and §3.3.3: AdamW, beta1 0.9, beta2 0.95, weight decay 0.1, gradient
clipping at global norm 1.0, first and second moments *stored* in BF16. The moments are read
back into float32 before their moving averages: optax's own Adam multiplies a bf16 moment by
beta in bf16, which rounds the betas themselves (0.9 -> 0.8984375, 0.95 -> 0.94921875) and
shortens every average's memory (tests/test_data_train.py checks the update against AdamW's
formula). Weight decay applies where the parameter declarations say so (`Decl.decay`:
matrices, never norm gains); the router bias is not a weight at all and never reaches the
optimizer.
"""

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import Config
from dsv3_jax.params import fact_tree


def decay_mask(cfg: Config) -> dict:
    """The weights tree with True where AdamW decays the leaf (`Decl.decay`)."""
    return fact_tree(cfg, "decay")["weights"]


def scale_by_adam_stored_in(moment_dtype, *, b1: float, b2: float,
                            eps: float) -> optax.GradientTransformation:
    """Adam's scaling with both moments stored in `moment_dtype` and updated in float32:
    m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 on float32 copies, the update
    m_hat / (sqrt(v_hat) + eps) from those copies, then the copies rounded for storage. The
    state is optax's `ScaleByAdamState`, so checkpoints and `tree_map_params` see Adam."""

    def init(params):
        # two trees of zeros, not one tree twice: the train step donates its state, and one
        # buffer cannot be donated twice
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=optax.tree.zeros_like(params, dtype=moment_dtype),
                                      nu=optax.tree.zeros_like(params, dtype=moment_dtype))

    def update(updates, state, params=None):
        del params
        f32 = lambda tree: optax.tree.cast(tree, jnp.float32)  # noqa: E731
        mu = optax.tree.update_moment(updates, f32(state.mu), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, f32(state.nu), b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=optax.tree.cast(mu, moment_dtype),
                                               nu=optax.tree.cast(nu, moment_dtype))

    return optax.GradientTransformation(init, update)


def adamw_v3(learning_rate, cfg: Config, *, b1: float = 0.9, b2: float = 0.95,
             eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float | None = 1.0,
             moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with `moment_dtype` moments over `cfg`'s weights (see
    the module docstring)."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    # optax.adamw's own chain, with the Adam scaling above
    parts.append(optax.chain(scale_by_adam_stored_in(moment_dtype, b1=b1, b2=b2, eps=eps),
                             optax.add_decayed_weights(weight_decay, decay_mask(cfg)),
                             optax.scale_by_learning_rate(learning_rate)))
    return optax.chain(*parts)
