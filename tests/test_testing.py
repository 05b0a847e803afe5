"""dsv3_jax.testing: each check passes on what the project promises and fails on a broken input
(a check that cannot fail would be worse than none)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax import testing
from dsv3_jax.io.safetensors import SafetensorsFile
from sharding.context import ShardingContext
from sharding.mesh import make_mesh


@pytest.fixture(scope="module")
def hf_tiny(fixtures_dir):
    cfg, params = dsv3_jax.load_hf_checkpoint(fixtures_dir / "hf_tiny_bf16")
    st = SafetensorsFile(fixtures_dir / "hf_tiny_bf16.reference.safetensors")
    return cfg, params, np.array(st.get("input_ids")), np.array(st.get("logits"))


def test_logits_match_a_checkpoints_reference_and_catch_a_changed_weight(hf_tiny):
    cfg, params, ids, ref = hf_tiny
    testing.assert_logits_match(params, cfg, ids, ref, atol=1e-4)
    broken = jax.tree.map(lambda a: a, params)
    broken["weights"]["final_norm"] = params["weights"]["final_norm"] * 1.01
    with pytest.raises(AssertionError):
        testing.assert_logits_match(broken, cfg, ids, ref, atol=1e-4)


def test_absorbed_matches_expanded_and_catches_a_wrong_fold(hf_tiny, monkeypatch):
    cfg, params, ids, _ = hf_tiny
    testing.assert_absorbed_matches_expanded(params, cfg, ids[:, :16], atol=1e-4)
    from dsv3_jax import mla

    real = mla.attend_absorbed

    def wrong_fold(p, *a, **k):  # W^UV folded with the wrong sign: the decode form breaks
        return real({**p, "w_uv": -p["w_uv"]}, *a, **k)

    monkeypatch.setattr(mla, "attend_absorbed", wrong_fold)
    with pytest.raises(AssertionError):
        testing.assert_absorbed_matches_expanded(params, cfg, ids[:, :16], atol=1e-4)


def test_kernel_matches_reference_with_gradients_and_catches_an_off_by_one():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    w = jax.random.normal(jax.random.key(1), (16, 4))
    ref = lambda x, w: x @ w  # noqa: E731
    kernel = lambda x, w: jnp.einsum("mk,kn->mn", x, w)  # noqa: E731
    out = testing.assert_kernel_matches_reference(kernel, ref, x, w, atol=1e-5, grads=True)
    assert out.shape == (8, 4)
    shifted = lambda x, w: jnp.roll(x, 1, axis=0) @ w  # noqa: E731
    with pytest.raises(AssertionError):
        testing.assert_kernel_matches_reference(shifted, ref, x, w, atol=1e-5)
    wrong_grad = jax.custom_vjp(ref)
    wrong_grad.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (2 * g @ r[1].T, r[0].T @ g))
    testing.assert_kernel_matches_reference(wrong_grad, ref, x, w, atol=1e-5)  # outputs agree
    with pytest.raises(AssertionError):
        testing.assert_kernel_matches_reference(wrong_grad, ref, x, w, atol=1e-5, grads=True)


def test_sharded_matches_single_device_and_catches_a_broken_combine(monkeypatch):
    cfg = dsv3_jax.get_config("tiny")
    params = dsv3_jax.init_params(cfg.replace(init_std=0.1), jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    shard = ShardingContext(make_mesh("fsdp=2,expert=4"), "fsdp_ep")
    loss_n, loss_1 = testing.assert_sharded_matches_single_device(params, batch, cfg, shard)
    assert np.isfinite(float(loss_n)) and float(loss_n) == pytest.approx(float(loss_1), rel=1e-5)
    from sharding import ep

    combine = ep.combine
    monkeypatch.setattr(ep, "combine", lambda *a, **k: combine(*a, **k) * 1.001)
    with pytest.raises(AssertionError):
        testing.assert_sharded_matches_single_device(params, batch, cfg, shard)
