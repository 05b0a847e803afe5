"""Routing invariants, balance loss, bias update, and dropless MoE against a per-expert loop."""

import functools

import chex
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
    chex.assert_trees_all_close(biased.weights, ref, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(biased.weights.sum(-1), np.full(64, CFG.route_scale), rtol=1e-6,
                                atol=0)
    chex.assert_trees_all_equal(biased.scores, plain.scores)  # the bias never enters the scores


def test_forced_routing_keeps_the_weight_rule():
    x = jax.random.normal(jax.random.key(4), (16, CFG.dim))
    w = jax.random.normal(jax.random.key(5), (CFG.dim, 8))
    forced = jnp.tile(jnp.array([[6, 1]]), (16, 1))
    r = route(x, w, None, CFG, forced=forced)
    chex.assert_trees_all_equal(r.indices, forced.astype(jnp.int32))
    s = np.asarray(affinities(x, w, CFG))[:, [6, 1]]
    chex.assert_trees_all_close(r.weights, s / s.sum(-1, keepdims=True) * 2.5, rtol=1e-6, atol=0)


def test_v2_softmax_routing_is_not_renormalised():
    v2 = get_config("tiny", score_func="softmax", group_score="max", router_bias=False,
                    norm_topk_prob=False, route_scale=16.0)
    x = jax.random.normal(jax.random.key(6), (32, v2.dim))
    w = jax.random.normal(jax.random.key(7), (v2.dim, 8))
    r = route(x, w, None, v2)
    s = np.asarray(jax.nn.softmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64), -1))
    chex.assert_trees_all_close(r.weights, np.take_along_axis(s, np.asarray(r.indices), 1) * 16,
                                rtol=1e-5, atol=0)


def _paper_balance(scores: np.ndarray, idx: np.ndarray, mask: np.ndarray, e: int, a: int):
    """[PAPER] eqs 17-20 per sequence in float64, averaged over the sequences: f_i = E / (A T)
    * (tokens choosing i), P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}, loss = sum_i f_i P_i, over
    the T unmasked tokens of each sequence."""
    per_seq = []
    for b in range(scores.shape[0]):
        keep = mask[b]
        f = np.bincount(idx[b][keep].ravel(), minlength=e) * e / (a * keep.sum())
        s = scores[b][keep].astype(np.float64)
        per_seq.append((f * (s / s.sum(-1, keepdims=True)).mean(0)).sum())
    return np.mean(per_seq)


def _paper_balance_grad(scores: np.ndarray, idx: np.ndarray, mask: np.ndarray, e: int, a: int):
    """d loss / d s_{b,t,j} of `_paper_balance` with f held constant (it carries no gradient):
    (1 / B) (m_{b,t} / (T_b S_{b,t})) (f_{b,j} - sum_i f_{b,i} s'_{b,t,i}), S = sum_j s_j."""
    s = scores.astype(np.float64)
    grad = np.zeros_like(s)
    for b in range(s.shape[0]):
        keep = mask[b]
        f = np.bincount(idx[b][keep].ravel(), minlength=e) * e / (a * keep.sum())
        total = s[b].sum(-1, keepdims=True)  # [T, 1]
        inner = (f * s[b] / total).sum(-1, keepdims=True)
        grad[b] = keep[:, None] / (keep.sum() * total) * (f - inner) / s.shape[0]
    return grad


@functools.cache
def _balance_case():
    """Scores [3, 10, 8], their experts [3, 10, 2] and a mask with a padded tail (float64)."""
    scores = np.asarray(_scores(3 * 10, 8, 8), np.float64).reshape(3, 10, 8)
    idx = np.asarray(choose_experts(jnp.asarray(scores.reshape(30, 8), jnp.float32), None, CFG))
    mask = np.ones((3, 10), bool)
    mask[2, 6:] = False  # padding is excluded
    return scores, idx.reshape(3, 10, 2), mask


def _model_balance(scores, counts, mask):
    return sequence_balance_loss(scores, counts, mask, CFG)


def test_balance_loss_matches_paper_formula():
    scores, idx, mask = _balance_case()
    counts = expert_counts(jnp.asarray(idx), jnp.asarray(mask), 8)
    chex.assert_trees_all_equal(  # counts: tokens per expert per sequence, padding left out
        counts, np.stack([np.bincount(idx[b][mask[b]].ravel(), minlength=8)
                          for b in range(3)]).astype(np.float32))
    got = _model_balance(jnp.asarray(scores, jnp.float32), counts, jnp.asarray(mask))
    chex.assert_trees_all_close(got, _paper_balance(scores, idx, mask, 8, 2), rtol=1e-6, atol=0)


def test_balance_loss_gradient_is_the_formulas():
    """The gradient flows through P only: against the formula's own derivative (checked here by
    central differences of the float64 formula), and zero with respect to the counts."""
    scores, idx, mask = _balance_case()
    counts = expert_counts(jnp.asarray(idx), jnp.asarray(mask), 8)
    g_scores, g_counts = jax.grad(_model_balance, argnums=(0, 1))(
        jnp.asarray(scores, jnp.float32), counts, jnp.asarray(mask))
    want = _paper_balance_grad(scores, idx, mask, 8, 2)
    # the analytic derivative is the formula's: central differences in float64
    h, fd = 1e-6, np.zeros_like(scores)
    for i in np.ndindex(scores.shape):
        up, down = scores.copy(), scores.copy()
        up[i] += h
        down[i] -= h
        fd[i] = (_paper_balance(up, idx, mask, 8, 2)
                 - _paper_balance(down, idx, mask, 8, 2)) / (2 * h)
    chex.assert_trees_all_close(fd, want, rtol=1e-6, atol=1e-9)
    assert np.abs(want).max() > 1e-3 and (want[2, 6:] == 0).all()  # padding gets none
    chex.assert_trees_all_close(g_scores, want, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_equal(g_counts, np.zeros((3, 8), np.float32))


def test_bias_update_follows_the_load():
    """b_i += gamma * sign(mean_j load_j - load_i) per layer ([PAPER] §2.1.2): an overloaded
    expert's bias goes down by gamma, an underloaded one's up, one exactly at its layer's mean
    stays; the old bias is kept, each layer uses its own mean, the result is float32."""
    load = np.array([[10, 2, 4, 4, 4, 4, 4, 0],  # mean 4
                     [0, 0, 0, 0, 8, 8, 8, 8],  # mean 4: nobody at it
                     [3, 3, 3, 3, 3, 3, 3, 3],  # balanced: nothing moves
                     [1, 9, 5, 5, 5, 5, 5, 5]], np.float32)  # mean 5
    old = np.asarray(jax.random.uniform(jax.random.key(0), (4, 8), minval=-0.1, maxval=0.1))
    gamma = 1e-3
    new = update_router_bias(jnp.asarray(old), jnp.asarray(load), gamma)
    assert new.dtype == jnp.float32
    mean = load.mean(-1, keepdims=True)
    step = np.where(load > mean, -1.0, np.where(load < mean, 1.0, 0.0))
    chex.assert_trees_all_close(new, old.astype(np.float64) + gamma * step, rtol=0, atol=1e-8)
    moved = np.asarray(new, np.float64) - old
    assert (moved[load > mean] < 0).all() and (moved[load < mean] > 0).all()
    chex.assert_trees_all_equal(np.asarray(new)[load == mean], old[load == mean])
    # a bf16 bias in, float32 out (the update is kept in float32)
    assert update_router_bias(jnp.asarray(old, jnp.bfloat16), jnp.asarray(load), gamma
                              ).dtype == jnp.float32


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
    chex.assert_trees_all_close(got, _loop_reference(p, x, idx, w), rtol=1e-4, atol=1e-5)
    # gradients through the sorted grouped matmul equal the loop's
    gx = jax.grad(lambda x: (routed_experts(p["experts"], x, idx, w) ** 2).sum())(x)

    def loop_loss(x):
        out = 0
        for e in range(8):
            ex = jax.tree.map(lambda a: a[e], p["experts"])
            h = jax.nn.silu(x @ ex["w_gate"]) * (x @ ex["w_up"]) @ ex["w_down"]
            out = out + (w * (idx == e)).sum(-1, keepdims=True) * h
        return (out ** 2).sum()

    chex.assert_trees_all_close(gx, jax.grad(loop_loss)(x), rtol=1e-4, atol=1e-5)


def test_few_tokens_take_the_gathered_experts_with_the_same_result():
    """Decoding's few (token, expert) pairs (at most half the experts) run as gathered
    per-pair GEMMs (`gathered_experts`): the same output as the per-expert loop, in float32
    and in bf16 as close as the grouped path (the same roundings); more pairs, FP8, or
    `gather_experts=False` keep the grouped path."""
    from dsv3_jax import moe as moe_lib

    p = _moe_params()
    x = jax.random.normal(jax.random.key(21), (2, CFG.dim))  # 2 tokens x 2 experts = 4 pairs
    idx = route(x, p["router"], None, CFG).indices
    w = jax.random.uniform(jax.random.key(22), idx.shape)
    rt = dsv3_jax.Runtime()
    assert moe_lib.gathers_experts(rt, 4, 8) and not moe_lib.gathers_experts(rt, 5, 8)
    assert not moe_lib.gathers_experts(rt.replace(gather_experts=False), 4, 8)
    assert not moe_lib.gathers_experts(rt.replace(fp8=dsv3_jax.runtime.Fp8()), 4, 8)
    got = routed_experts(p["experts"], x, idx, w, rt)
    chex.assert_trees_all_close(got, _loop_reference(p, x, idx, w), rtol=1e-4, atol=1e-5)
    grouped = routed_experts(p["experts"], x, idx, w, rt.replace(gather_experts=False))
    chex.assert_trees_all_close(got, grouped, rtol=1e-5, atol=1e-6)
    bf = jnp.bfloat16
    got16 = routed_experts(p["experts"], x.astype(bf), idx, w, rt)
    grouped16 = routed_experts(p["experts"], x.astype(bf), idx, w,
                               rt.replace(gather_experts=False))
    chex.assert_trees_all_close(got16, grouped16, rtol=2e-2, atol=2e-2 * float(
        jnp.abs(grouped16).max()))


def test_moe_layer_adds_shared_expert_and_reports_load():
    p = _moe_params(seed=3)
    x = jax.random.normal(jax.random.key(13), (2, 9, CFG.dim))
    mask = jnp.ones((2, 9), bool).at[1, 7:].set(False)
    y, aux = moe(p, x, None, mask, CFG)
    r = route(x.reshape(18, -1), p["router"], None, CFG)
    s = p["shared"]
    shared = jax.nn.silu(x @ s["w_gate"]) * (x @ s["w_up"]) @ s["w_down"]
    ref = _loop_reference(p, x.reshape(18, -1), r.indices, r.weights).reshape(2, 9, -1)
    chex.assert_trees_all_close(y, ref + np.asarray(shared), rtol=1e-4, atol=1e-5)
    # load and balance loss count the 16 unmasked tokens only
    idx = np.asarray(r.indices).reshape(2, 9, -1)
    keep = np.asarray(mask)
    chex.assert_trees_all_equal(aux["indices"], idx)
    chex.assert_trees_all_equal(aux["load"], np.bincount(idx[keep].ravel(), minlength=8)
                                .astype(np.float32))
    assert float(aux["load"].sum()) == 16 * CFG.n_activated_experts
    scores = np.asarray(r.scores, np.float64).reshape(2, 9, -1)
    chex.assert_trees_all_close(aux["balance"], _paper_balance(scores, idx, keep, 8, 2),
                                rtol=1e-6, atol=0)
