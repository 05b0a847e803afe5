"""Whole-model behaviour: the public API, MTP, the loss, remat, routing replay, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.mtp import mtp_forward, shift_left
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loss import LossWeights, cross_entropy, loss_fn

CFG = get_config("tiny")
# Jitted once per config: op-by-op dispatch of a whole model costs seconds of compiles on CPU.
jit_loss = jax.jit(loss_fn, static_argnums=(2, 3))


@pytest.fixture(scope="module")
def params():
    return dsv3_jax.init_params(CFG.replace(init_std=0.1), jax.random.key(0))


def _batch(b=2, t=24, seed=1):
    toks = np.asarray(jax.random.randint(jax.random.key(seed), (b, t + 1), 0, CFG.vocab_size))
    return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}


def test_public_api_shapes(params):
    tokens = np.zeros((2, 11), np.int32)
    logits, aux = dsv3_jax.forward(params, tokens, CFG)
    assert logits.shape == (2, 11, CFG.vocab_size) and logits.dtype == jnp.float32
    assert aux["load"].shape == (CFG.n_moe_layers, CFG.n_routed_experts)
    assert aux["indices"]["moe_layers"].shape == (CFG.n_moe_layers, 2, 11, CFG.n_activated_experts)
    assert aux["hidden"].shape == (2, 11, CFG.dim)
    assert set(params) == {"weights", "router_state"}


@pytest.mark.parametrize("tokens, message", [
    (np.array([[1, 2, 512]]), r"tokens\[0, 2\] = 512 is outside the vocabulary \[0, 512\)"),
    (np.array([[-1, 2]]), r"= -1 is outside the vocabulary"),
    (np.array([1, 2, 3]), r"must be \[batch, seq\]"),
    (np.array([[1.0, 2.0]]), "integer"),
    (np.zeros((1, 0), np.int32), "empty"),
    (np.zeros((1, 257), np.int32), "max_seq_len=256"),
])
def test_bad_tokens_are_clear_errors(params, tokens, message):
    with pytest.raises(ValueError, match=message):
        dsv3_jax.forward(params, tokens, CFG)


def test_out_of_vocabulary_inside_jit_poisons_logits(params):
    from dsv3_jax import model
    tokens = jnp.array([[3, 4], [3, 9999]])
    logits, _ = jax.jit(lambda p, t: model.forward(p, t, CFG))(params, tokens)
    assert np.isfinite(np.asarray(logits[0])).all()  # the good sequence is untouched
    assert np.isnan(np.asarray(logits[1, 1])).all()  # the bad id is visible, never a clamped row


def test_loss_is_main_plus_weighted_mtp_and_balance(params):
    batch = _batch()
    total, m = jit_loss(params, batch, CFG)
    logits, aux = dsv3_jax.forward(params, batch["inputs"], CFG)
    main = float(cross_entropy(logits, batch["targets"]).mean())
    assert float(m["main_loss"]) == pytest.approx(main, rel=1e-6)
    mtp_logits, mtp_aux = jax.jit(mtp_forward, static_argnums=(3, 4))(params, aux["hidden"],
                                                                  batch["targets"], CFG)
    t = batch["targets"].shape[1]
    # module 0 predicts targets[i + 1]; normalised by all T targets (the paper's 1/T)
    ce = cross_entropy(mtp_logits[0][:, :-1], batch["targets"][:, 1:])
    assert float(m["mtp_loss"]) == pytest.approx(float(ce.sum() / (2 * t)), rel=1e-6)
    balance = float(aux["balance"] + mtp_aux["balance"])
    assert float(m["balance_loss"]) == pytest.approx(balance, rel=1e-6)
    assert float(total) == pytest.approx(
        main + LossWeights().mtp * float(m["mtp_loss"]) + LossWeights().balance * balance,
        rel=1e-6)
    # balance per MoE layer is >= 1 by Cauchy-Schwarz-like argument only when balanced; here > 0
    assert 0 < balance < 3 * CFG.n_routed_experts / CFG.n_activated_experts


def test_mtp_module_uses_embedding_of_next_token(params):
    """Changing token i+1 changes module-0 logits at i, not before."""
    batch = _batch(1, 16)
    _, aux = dsv3_jax.forward(params, batch["inputs"], CFG)
    mtp = jax.jit(mtp_forward, static_argnums=(3, 4))
    a, _ = mtp(params, aux["hidden"], batch["targets"], CFG)
    targets2 = batch["targets"].at[0, 8].set((batch["targets"][0, 8] + 1) % CFG.vocab_size)
    b, _ = mtp(params, aux["hidden"], targets2, CFG)
    diff = np.abs(np.asarray(a - b))[0, 0].max(-1)
    assert diff[:8].max() == 0 and diff[8] > 1e-4
    assert a.shape == (CFG.mtp_depth, 1, 16, CFG.vocab_size)


def test_mtp_depth_zero_and_two():
    batch = _batch()
    for depth in (0, 2):
        cfg = CFG.replace(mtp_depth=depth)
        p = dsv3_jax.init_params(cfg, jax.random.key(1))
        assert ("mtp" in p["weights"]) == (depth > 0)
        total, m = jit_loss(p, batch, cfg)
        assert np.isfinite(float(total))
        assert ("mtp_loss" in m) == (depth > 0)
        if depth:
            assert m["mtp_load"].shape == (2, CFG.n_routed_experts)


def test_remat_policies_give_identical_loss_and_grads(params):
    batch = _batch()
    def value_and_grad(rt):
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, CFG, rt)[0]))(params)

    ref_l, ref_g = value_and_grad(Runtime())
    for policy in ("full", "dots", "dots_no_batch"):
        l, g = value_and_grad(Runtime(remat=policy))
        assert float(l) == pytest.approx(float(ref_l), rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, ref_g)


def test_unrolled_layers_equal_the_scan(params):
    """scan_layers=False (each layer its own code) against the lax.scan: same loss, metrics,
    gradients (remat included) and the same latent cache on the decode path."""
    batch = _batch()

    def value_and_grad(rt):
        f = lambda p: loss_fn(p, batch, CFG, rt)
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    for remat in ("none", "full"):
        (ref_l, ref_m), ref_g = value_and_grad(Runtime(remat=remat))
        (l, m), g = value_and_grad(Runtime(remat=remat, scan_layers=False))
        assert float(l) == pytest.approx(float(ref_l), rel=1e-6)
        np.testing.assert_array_equal(m["indices"]["moe_layers"], ref_m["indices"]["moe_layers"])
        np.testing.assert_allclose(m["load"], ref_m["load"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, ref_g)
    tokens = batch["inputs"][:, :8]
    outs = []
    for scan in (True, False):
        rt = Runtime(scan_layers=scan)
        cache = dsv3_jax.init_cache(CFG, 2, 16, jnp.float32)
        logits, cache, _ = jax.jit(
            lambda p, t, c: dsv3_jax.forward_cached(p, t, c, CFG, runtime=rt))(
            params, tokens, cache)
        outs.append((logits, cache))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *outs)


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
    """The hand-written backward of cross_entropy against autodiff of the plain formula."""
    logits = jax.random.normal(jax.random.key(0), (3, 5, 40)) * 4
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 40)
    w = jax.random.normal(jax.random.key(2), (3, 5))
    plain = lambda l: (jax.nn.logsumexp(l, -1)
                       - jnp.take_along_axis(l, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(cross_entropy(logits, targets), plain(logits), rtol=1e-6)
    grad = lambda f: jax.grad(lambda l: (f(l) * w).sum())(logits)
    np.testing.assert_allclose(grad(lambda l: cross_entropy(l, targets)), grad(plain),
                               rtol=1e-5, atol=1e-6)


def test_router_bias_gets_no_gradient(params):
    batch = _batch()
    g = jax.jit(jax.grad(lambda p: loss_fn(p, batch, CFG)[0]))(params)
    assert float(jnp.abs(g["router_state"]["moe_layers"]["bias"]).max()) == 0.0
    assert float(jnp.abs(g["weights"]["moe_layers"]["moe"]["router"]).max()) > 0


def test_routing_replay_reproduces_logits_under_a_different_bias(params):
    batch = _batch()
    _, m = jit_loss(params, batch, CFG)
    moved = jax.tree.map(lambda b: b + jax.random.uniform(jax.random.key(3), b.shape, maxval=0.5),
                         params["router_state"])
    p2 = {"weights": params["weights"], "router_state": moved}
    free, _ = dsv3_jax.forward(p2, batch["inputs"], CFG)
    replay, _ = dsv3_jax.forward(p2, batch["inputs"], CFG, forced_experts=m["indices"])
    orig, _ = dsv3_jax.forward(params, batch["inputs"], CFG)
    np.testing.assert_array_equal(np.asarray(replay), np.asarray(orig))
    assert np.abs(np.asarray(free - orig)).max() > 1e-4  # the bias did move choices
    l_replay, _ = jit_loss(p2, batch, CFG, forced_experts=m["indices"])
    assert float(l_replay) == pytest.approx(float(m["loss"]), rel=1e-6)


def test_shift_left():
    x = jnp.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(shift_left(x, 2), [[2, 3, 4, 0, 0], [7, 8, 9, 0, 0]])


def test_bf16_compute_tracks_fp32(params):
    batch = _batch()
    l32, _ = jit_loss(params, batch, CFG)
    l16, _ = jit_loss(params, batch, CFG, Runtime(dtype="bfloat16"))
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
