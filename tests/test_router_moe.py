"""Routing invariants, balance loss, bias update, and dropless MoE against a per-expert loop."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.moe import moe, routed_experts
from dsv3_jax.router import (affinities, choose_experts, expert_counts, route,
                             sequence_balance_loss, update_router_bias)

CFG = get_config("tiny")  # 8 experts, 4 groups of 2, top-2 groups, top-2 experts, scale 2.5


def _scores(n=256, e=8, seed=0):
    return jax.nn.sigmoid(jax.random.normal(jax.random.key(seed), (n, e)) * 2)


def _brute_force_choice(s_biased: np.ndarray, cfg) -> set[int]:
    """V3 routing by enumeration: best groups by their top-2 sum, best experts inside."""
    g, per = cfg.n_expert_groups, cfg.experts_per_group
    groups = s_biased.reshape(g, per)
    group_score = np.sort(groups, -1)[:, -2:].sum(-1)
    keep = np.argsort(-group_score, kind="stable")[:cfg.n_limited_groups]
    allowed = [e for e in range(g * per) if e // per in keep]
    return set(sorted(allowed, key=lambda e: -s_biased[e])[:cfg.n_activated_experts])


def test_choice_matches_brute_force_and_stays_in_chosen_groups():
    s = _scores()
    bias = jax.random.uniform(jax.random.key(1), (8,), minval=-0.2, maxval=0.2)
    idx = np.asarray(choose_experts(s, bias, CFG))
    sb = np.asarray(s + bias, np.float64)
    for t in range(s.shape[0]):
        assert set(idx[t]) == _brute_force_choice(sb[t], CFG)
        assert len({e // CFG.experts_per_group for e in idx[t]}) <= CFG.n_limited_groups


def test_group_score_is_top2_sum_not_max():
    # group 0 = experts {0,1}: one big score; group 1 = {2,3}: two good ones (sum wins)
    s = jnp.array([[0.9, 0.0, 0.6, 0.6, 0.1, 0.1, 0.1, 0.1]])
    cfg = CFG.replace(n_limited_groups=1)
    assert sorted(np.asarray(choose_experts(s, None, cfg))[0].tolist()) == [2, 3]
    v2 = cfg.replace(group_score="max")
    assert 0 in np.asarray(choose_experts(s, None, v2))[0].tolist()


def test_bias_changes_choice_not_weights():
    x = jax.random.normal(jax.random.key(2), (64, CFG.dim))
    w = jax.random.normal(jax.random.key(3), (CFG.dim, 8)) * 0.3
    plain = route(x, w, None, CFG)
    bias = jnp.array([0.5, 0, 0, 0, 0, 0, 0, 0.5])
    biased = route(x, w, bias, CFG)
    assert (np.asarray(biased.indices) != np.asarray(plain.indices)).any()
    # weights are the unbiased scores of the chosen experts, renormalised, times the scale
    ref = np.take_along_axis(np.asarray(plain.scores), np.asarray(biased.indices), 1)
    ref = ref / ref.sum(-1, keepdims=True) * CFG.route_scale
    np.testing.assert_allclose(np.asarray(biased.weights), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(biased.weights).sum(-1), CFG.route_scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(biased.scores), np.asarray(plain.scores))


def test_forced_routing_keeps_the_weight_rule():
    x = jax.random.normal(jax.random.key(4), (16, CFG.dim))
    w = jax.random.normal(jax.random.key(5), (CFG.dim, 8))
    forced = jnp.tile(jnp.array([[6, 1]]), (16, 1))
    r = route(x, w, None, CFG, forced=forced)
    assert (np.asarray(r.indices) == np.asarray(forced)).all()
    s = np.asarray(affinities(x, w, CFG))[:, [6, 1]]
    np.testing.assert_allclose(np.asarray(r.weights), s / s.sum(-1, keepdims=True) * 2.5, rtol=1e-6)


def test_v2_softmax_routing_is_not_renormalised():
    v2 = get_config("tiny", score_func="softmax", group_score="max", router_bias=False,
                    norm_topk_prob=False, route_scale=16.0)
    x = jax.random.normal(jax.random.key(6), (32, v2.dim))
    w = jax.random.normal(jax.random.key(7), (v2.dim, 8))
    r = route(x, w, None, v2)
    s = np.asarray(jax.nn.softmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64), -1))
    np.testing.assert_allclose(np.asarray(r.weights),
                               np.take_along_axis(s, np.asarray(r.indices), 1) * 16, rtol=1e-5)


def test_balance_loss_matches_paper_formula():
    b, t, e, a = 3, 10, 8, 2
    scores = _scores(b * t, e, 8).reshape(b, t, e)
    idx = np.asarray(choose_experts(scores.reshape(-1, e), None, CFG)).reshape(b, t, a)
    mask = np.ones((b, t), bool)
    mask[2, 6:] = False  # padding is excluded
    counts = expert_counts(jnp.asarray(idx), jnp.asarray(mask), e)
    got = float(sequence_balance_loss(scores, counts, jnp.asarray(mask), CFG))
    ref = []
    for bi in range(b):
        tt = mask[bi].sum()
        f = np.array([(idx[bi][mask[bi]] == i).sum() for i in range(e)]) * e / (a * tt)
        sn = np.asarray(scores[bi])[mask[bi]]
        p = (sn / sn.sum(-1, keepdims=True)).mean(0)
        ref.append((f * p).sum())
    assert got == pytest.approx(np.mean(ref), rel=1e-5)
    # gradients flow through P only, not through the counts
    g = jax.grad(lambda s: sequence_balance_loss(s, counts, jnp.asarray(mask), CFG))(scores)
    assert float(jnp.abs(g).max()) > 0


def test_bias_update_sign_rule():
    load = jnp.array([[10.0, 2, 4, 4, 4, 4, 4, 0]])
    new = update_router_bias(jnp.zeros((1, 8)), load, 0.001)
    assert new.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(new)[0], [-0.001, 0.001, 0, 0, 0, 0, 0, 0.001])


def _moe_params(cfg=CFG, seed=0):
    p = dsv3_jax.init_params(cfg.replace(init_std=0.2), jax.random.key(seed))
    return jax.tree.map(lambda a: a[0], p["weights"]["moe_layers"]["moe"])


def _loop_reference(p, x, idx, w):
    """Every expert applied to every token, kept where chosen: no sorting, no grouping."""
    out = np.zeros_like(np.asarray(x, np.float64))
    ex = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
    xs = np.asarray(x, np.float64)
    for e in range(ex["w_gate"].shape[0]):
        g = xs @ ex["w_gate"][e]
        h = (g / (1 + np.exp(-g))) * (xs @ ex["w_up"][e]) @ ex["w_down"][e]
        weight = (np.asarray(w) * (np.asarray(idx) == e)).sum(-1, keepdims=True)
        out += weight * h
    return out


@pytest.mark.parametrize("skew", [False, True])
def test_dropless_moe_equals_per_expert_loop(skew):
    p = _moe_params()
    x = jax.random.normal(jax.random.key(11), (37, CFG.dim))  # odd token count
    if skew:  # almost everything on expert 3, several experts empty: nothing may drop
        idx = jnp.stack([jnp.full((37,), 3), jnp.where(jnp.arange(37) % 5 == 0, 7, 0)], 1)
    else:
        idx = route(x, p["router"], None, CFG).indices
    w = jax.random.uniform(jax.random.key(12), idx.shape)
    got = routed_experts(p["experts"], x, idx, w)
    np.testing.assert_allclose(np.asarray(got), _loop_reference(p, x, idx, w), rtol=1e-4, atol=1e-5)
    # gradients through the sorted grouped matmul equal the loop's
    gx = jax.grad(lambda x: (routed_experts(p["experts"], x, idx, w) ** 2).sum())(x)

    def loop_loss(x):
        out = 0
        for e in range(8):
            ex = jax.tree.map(lambda a: a[e], p["experts"])
            h = jax.nn.silu(x @ ex["w_gate"]) * (x @ ex["w_up"]) @ ex["w_down"]
            out = out + (w * (idx == e)).sum(-1, keepdims=True) * h
        return (out ** 2).sum()

    np.testing.assert_allclose(np.asarray(gx), np.asarray(jax.grad(loop_loss)(x)), rtol=1e-4,
                               atol=1e-5)


def test_moe_layer_adds_shared_expert_and_reports_load():
    p = _moe_params(seed=3)
    x = jax.random.normal(jax.random.key(13), (2, 9, CFG.dim))
    mask = jnp.ones((2, 9), bool).at[1, 7:].set(False)
    y, aux = moe(p, x, None, mask, CFG)
    r = route(x.reshape(18, -1), p["router"], None, CFG)
    s = p["shared"]
    shared = jax.nn.silu(x @ s["w_gate"]) * (x @ s["w_up"]) @ s["w_down"]
    ref = _loop_reference(p, x.reshape(18, -1), r.indices, r.weights).reshape(2, 9, -1)
    np.testing.assert_allclose(np.asarray(y), ref + np.asarray(shared), rtol=1e-4, atol=1e-5)
    assert float(aux["load"].sum()) == 16 * CFG.n_activated_experts  # masked tokens excluded
    assert aux["indices"].shape == (2, 9, CFG.n_activated_experts)
