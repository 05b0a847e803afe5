"""The GRPO objective (`dsv3_jax.train.grpo_objective`) against float64 numpy computations written
out by hand: advantages per scale, k3, each loss aggregation, GSPO's sequence ratio, DAPO's
global token normaliser over micro-batches, rollout importance weights and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.train.grpo_objective import (group_advantages, k3_kl, policy_loss,
                                           rollout_is_weights)

TOL = dict(rtol=2e-6, atol=1e-6)

# Fixed batch: 2 prompts x G=2, T=6, lengths 6, 3, 4, 2. Token ratios chosen to land on both
# sides of the clip range (epsilon=0.2, epsilon_high=0.28); row 0's 1.25 (A > 0) clips at 1.2
# but not at 1.28, so a bug that ignores epsilon_high shows.
LENGTHS = np.array([6, 3, 4, 2])
RATIOS = np.array([[0.5, 0.9, 1.0, 1.25, 1.5, 0.7],
                   [1.1, 0.75, 1.4, 9.0, 9.0, 9.0],    # past the length: must not count
                   [0.6, 1.3, 1.0, 0.85, 0.1, 0.1],
                   [1.6, 0.5, 5.0, 5.0, 5.0, 5.0]])
ADV = np.array([1.0, -1.0, -0.5, 2.0])
EPS, EPS_HIGH = 0.2, 0.28


def _mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, RATIOS.shape)
    logp = old + np.log(RATIOS)
    return logp, old, _mask(LENGTHS, RATIOS.shape[1])


def _per_token_ref(ratios, adv, eps_low, eps_high):
    """-min(r A, clip(r) A) token by token, in python floats."""
    out = np.zeros(ratios.shape)
    for i in range(ratios.shape[0]):
        for t in range(ratios.shape[1]):
            r, a = ratios[i, t], adv[i]
            out[i, t] = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    return out


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


# ---------------------------------------------------------------- advantages

def test_group_advantages_each_scale_against_hand_computation():
    r = np.array([1.0, 0.0, 0.5, 2.0,   0.7, 0.7, 0.7, 0.7,   3.0, -1.0, 0.25, 0.0])
    g = 4
    groups = [r[i:i + g] for i in range(0, len(r), g)]
    means = [sum(x) / g for x in groups]
    stds = [np.sqrt(sum((v - m) ** 2 for v in x) / (g - 1)) for x, m in zip(groups, means)]
    mean_all = sum(r) / len(r)
    std_all = np.sqrt(sum((v - mean_all) ** 2 for v in r) / (len(r) - 1))
    centred = np.array([v - means[i // g] for i, v in enumerate(r)])
    want = {"none": centred,
            "group": np.array([c / (stds[i // g] + 1e-4) for i, c in enumerate(centred)]),
            "batch": centred / (std_all + 1e-4)}
    for scale, expect in want.items():
        adv, stats = group_advantages(jnp.asarray(r, jnp.float32), g, scale=scale)
        np.testing.assert_allclose(np.asarray(adv), expect, rtol=2e-6, atol=2e-6, err_msg=scale)
        np.testing.assert_allclose(np.asarray(adv[4:8]), 0.0, atol=1e-6)  # equal rewards
        np.testing.assert_allclose(float(stats["reward_mean"]), mean_all, **TOL)
        np.testing.assert_allclose(float(stats["reward_std"]), np.mean(stds), **TOL)
        assert float(stats["frac_reward_zero_std"]) == pytest.approx(1 / 3)
    adv, _ = group_advantages(jnp.asarray(r, jnp.float32), g, scale="group", eps=0.5)
    np.testing.assert_allclose(np.asarray(adv[:4]), centred[:4] / (stds[0] + 0.5), **TOL)


def test_group_advantages_groups_are_contiguous_rows():
    r = jnp.array([0.0, 1.0, 10.0, 30.0])  # G=2: groups {0, 1} and {10, 30}
    adv, stats = group_advantages(r, 2, scale="none")
    np.testing.assert_allclose(np.asarray(adv), [-0.5, 0.5, -10.0, 10.0], **TOL)
    assert float(stats["frac_reward_zero_std"]) == 0.0


# ---------------------------------------------------------------- k3

def test_k3_nonnegative_matches_formula_and_zero_when_equal():
    rng = np.random.default_rng(1)
    logp, ref = -rng.uniform(0, 6, (8, 32)), -rng.uniform(0, 6, (8, 32))
    k = np.asarray(k3_kl(*_f32(logp, ref)))
    assert (k >= 0).all() and k.max() > 1.0
    np.testing.assert_allclose(k, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-6)
    same = jnp.asarray(logp, jnp.float32)
    assert np.all(np.asarray(k3_kl(same, same)) == 0.0)


# ---------------------------------------------------------------- on-policy: loss 0, grad not

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_loss_is_zero_but_gradient_is_not(loss_type):
    rng = np.random.default_rng(2)
    n, t, length, max_len = 6, 5, 4, 8  # 2 prompts x G=3, every completion 4 tokens
    logp0 = jnp.asarray(-rng.uniform(0.1, 3.0, (n, t)), jnp.float32)
    mask = jnp.asarray(_mask([length] * n, t), jnp.float32)
    adv, _ = group_advantages(jnp.array([1.0, 0.0, 0.5, 2.0, -1.0, 0.0]), 3)

    def f(logp):
        return policy_loss(logp, jax.lax.stop_gradient(logp), adv, mask, loss_type=loss_type,
                           max_completion_length=max_len)[0]

    loss, grad = jax.value_and_grad(f)(logp0)
    assert abs(float(loss)) < 1e-6
    a = np.asarray(adv, np.float64)[:, None]
    denom = {"bnpo": n * length, "dapo": n * length, "grpo": n * length, "dr_grpo": n * max_len}
    want = -a * np.asarray(mask) / denom[loss_type]
    np.testing.assert_allclose(np.asarray(grad), want, **TOL)
    assert np.abs(np.asarray(grad)).max() > 1e-3


# ---------------------------------------------------------------- each loss type's formula

def test_each_loss_type_equals_its_formula_with_clipping_on_both_sides():
    logp, old, mask = _batch()
    per_tok = _per_token_ref(RATIOS, ADV, EPS, EPS_HIGH)
    n, t = RATIOS.shape
    m_sum = mask.sum()
    want = {"grpo": np.mean([(per_tok[i] * mask[i]).sum() / LENGTHS[i] for i in range(n)]),
            "bnpo": (per_tok * mask).sum() / m_sum,
            "dr_grpo": (per_tok * mask).sum() / (n * 10),
            "dapo": (per_tok * mask).sum() / m_sum}
    low = (RATIOS < 1 - EPS) & (ADV[:, None] < 0)
    high = (RATIOS > 1 + EPS_HIGH) & (ADV[:, None] > 0)
    assert (low * mask).sum() >= 2 and (high * mask).sum() >= 2  # both sides clip in this batch
    r_mean = (RATIOS * mask).sum() / m_sum
    for loss_type, expect in want.items():
        loss, met = policy_loss(*_f32(logp, old, ADV, mask), loss_type=loss_type, epsilon=EPS,
                                epsilon_high=EPS_HIGH, max_completion_length=10)
        np.testing.assert_allclose(float(loss), expect, **TOL, err_msg=loss_type)
        np.testing.assert_allclose(float(met["clip_frac_low"]), (low * mask).sum() / m_sum, **TOL)
        np.testing.assert_allclose(float(met["clip_frac_high"]), (high * mask).sum() / m_sum,
                                   **TOL)
        np.testing.assert_allclose(float(met["clip_frac"]), ((low | high) * mask).sum() / m_sum,
                                   **TOL)
        np.testing.assert_allclose(float(met["ratio_mean"]), r_mean, **TOL)
        np.testing.assert_allclose(float(met["ratio_std"]),
                                   np.sqrt(((RATIOS - r_mean) ** 2 * mask).sum() / m_sum), **TOL)
        assert "kl" not in met and "is_weight_mean" not in met
    # epsilon_high defaults to epsilon: the 1.25 token of row 0 now clips
    loss, _ = policy_loss(*_f32(logp, old, ADV, mask), loss_type="bnpo", epsilon=EPS)
    np.testing.assert_allclose(float(loss),
                               (_per_token_ref(RATIOS, ADV, EPS, EPS) * mask).sum() / m_sum, **TOL)
    assert abs(float(loss) - want["bnpo"]) > 1e-3


def test_beta_adds_k3_per_token_and_logs_kl():
    logp, old, mask = _batch()
    ref = logp + np.random.default_rng(3).normal(0, 0.5, logp.shape)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    per_tok = _per_token_ref(RATIOS, ADV, EPS, EPS) + 0.04 * k3
    loss, met = policy_loss(*_f32(logp, old, ADV, mask), loss_type="grpo", beta=0.04,
                            ref_logp=jnp.asarray(ref, jnp.float32))
    want = np.mean([(per_tok[i] * mask[i]).sum() / LENGTHS[i] for i in range(4)])
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(met["kl"]), (k3 * mask).sum() / mask.sum(), rtol=1e-5)
    # beta=0 with ref_logp: logged, not in the loss
    loss0, met0 = policy_loss(*_f32(logp, old, ADV, mask), loss_type="grpo",
                              ref_logp=jnp.asarray(ref, jnp.float32))
    want0 = np.mean([(_per_token_ref(RATIOS, ADV, EPS, EPS)[i] * mask[i]).sum() / LENGTHS[i]
                     for i in range(4)])
    np.testing.assert_allclose(float(loss0), want0, **TOL)
    np.testing.assert_allclose(float(met0["kl"]), float(met["kl"]), **TOL)


# ---------------------------------------------------------------- GSPO

def test_gspo_sequence_ratio_is_geometric_mean_and_gradient_flows():
    logp, old, mask = _batch()
    n = len(LENGTHS)
    geo = np.array([np.prod(RATIOS[i, :LENGTHS[i]]) ** (1 / LENGTHS[i]) for i in range(n)])
    lr = (logp - old) * mask
    np.testing.assert_allclose(np.exp(lr.sum(1) / LENGTHS), geo, rtol=1e-12)  # the identity
    args = _f32(logp, old, mask)

    # no clipping and a one-hot advantage: the grpo loss is -s_i / N, exposing each s_i
    for i in range(n):
        adv = jnp.zeros(n).at[i].set(1.0)
        loss, _ = policy_loss(args[0], args[1], adv, args[2], loss_type="grpo", epsilon=50.0,
                              importance_sampling_level="sequence")
        np.testing.assert_allclose(-float(loss) * n, geo[i], rtol=2e-6)

    # with clipping, per sequence: -min(s A, clip(s) A), every token of the sequence alike
    s = geo[:, None] * np.ones_like(RATIOS)
    per_tok = _per_token_ref(s, ADV, EPS, EPS_HIGH)
    loss, met = policy_loss(args[0], args[1], jnp.asarray(ADV, jnp.float32), args[2],
                            loss_type="bnpo", epsilon=EPS, epsilon_high=EPS_HIGH,
                            importance_sampling_level="sequence")
    np.testing.assert_allclose(float(loss), (per_tok * mask).sum() / mask.sum(), **TOL)
    np.testing.assert_allclose(float(met["ratio_mean"]), (s * mask).sum() / mask.sum(), **TOL)

    # gradient of the grpo loss, unclipped: d(-s_i A_i / N)/dlogp_it = -A_i s_i / (N L_i)
    grad = jax.grad(lambda lp: policy_loss(lp, args[1], jnp.asarray(ADV, jnp.float32), args[2],
                                           loss_type="grpo", epsilon=50.0,
                                           importance_sampling_level="sequence")[0])(args[0])
    want = -(ADV * geo / (n * LENGTHS))[:, None] * mask
    np.testing.assert_allclose(np.asarray(grad), want, **TOL)


# ---------------------------------------------------------------- DAPO over micro-batches

def test_dapo_global_num_items_sums_over_micro_batches():
    logp, old, mask = _batch()
    per_tok = _per_token_ref(RATIOS, ADV, EPS, EPS_HIGH)
    total = float(mask.sum())  # 15 tokens: 6 in row 0, 9 in rows 1-3
    kw = dict(epsilon=EPS, epsilon_high=EPS_HIGH)
    whole, _ = policy_loss(*_f32(logp, old, ADV, mask), loss_type="dapo", **kw)
    bnpo, _ = policy_loss(*_f32(logp, old, ADV, mask), loss_type="bnpo", **kw)
    np.testing.assert_allclose(float(whole), float(bnpo), **TOL)
    np.testing.assert_allclose(float(whole), (per_tok * mask).sum() / total, **TOL)

    parts, bnpo_parts = [], []
    for rows in (slice(0, 1), slice(1, 4)):  # uneven token counts, as micro-batches have
        args = _f32(logp[rows], old[rows], ADV[rows], mask[rows])
        part, _ = policy_loss(*args, loss_type="dapo", num_items=total, **kw)
        np.testing.assert_allclose(float(part),
                                   (per_tok[rows] * mask[rows]).sum() / total, **TOL)
        local, _ = policy_loss(*args, loss_type="bnpo", **kw)
        assert abs(float(part) - float(local)) > 1e-3  # dapo with num_items != bnpo
        parts.append(float(part))
        bnpo_parts.append(float(local))
    np.testing.assert_allclose(sum(parts), float(whole), **TOL)
    # averaging per-micro-batch token means (what trl#3231 reports) is not the whole-batch loss
    assert abs(np.mean(bnpo_parts) - float(whole)) > 1e-3


# ---------------------------------------------------------------- rollout importance weights

def test_rollout_is_weights_each_mode():
    rng = np.random.default_rng(4)
    n, t, cap = 3, 5, 2.0
    mask = _mask([5, 4, 2], t)
    rollout = -rng.uniform(0.1, 3.0, (n, t))
    tok = np.array([[0.5, 1.5, 2.5, 1.0, 3.5],
                    [1.2, 0.9, 1.1, 1.3, 7.0],
                    [0.8, 0.9, 50., 50., 50.]])
    old = rollout + np.log(tok)
    seq = np.array([np.prod(tok[i, :l]) for i, l in enumerate([5, 4, 2])])  # 6.5625, 1.5444, .72
    assert seq[0] > cap > seq[1]
    want = {"token_truncate": np.minimum(tok, cap) * mask,
            "token_mask": np.where(tok <= cap, tok, 0.0) * mask,
            "sequence_truncate": np.minimum(seq, cap)[:, None] * mask,
            "sequence_mask": np.where(seq <= cap, seq, 0.0)[:, None] * mask,
            "off": mask}
    o, r, m = _f32(old, rollout, mask)
    for mode, expect in want.items():
        w = rollout_is_weights(o, r, m, mode=mode, cap=cap)
        assert w.shape == (n, t)
        np.testing.assert_allclose(np.asarray(w), expect, rtol=2e-6, atol=1e-6, err_msg=mode)
    grad = jax.grad(lambda x: jnp.sum(rollout_is_weights(x, r, m, mode="token_truncate")))(o)
    assert np.all(np.asarray(grad) == 0.0)  # no gradient through the weights


def test_policy_loss_scales_per_token_losses_by_is_weights():
    logp, old, mask = _batch()
    w = np.random.default_rng(5).uniform(0.0, 3.0, RATIOS.shape)
    per_tok = _per_token_ref(RATIOS, ADV, EPS, EPS_HIGH) * w
    loss, met = policy_loss(*_f32(logp, old, ADV, mask), loss_type="bnpo", epsilon=EPS,
                            epsilon_high=EPS_HIGH, is_weights=jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(float(loss), (per_tok * mask).sum() / mask.sum(), **TOL)
    np.testing.assert_allclose(float(met["is_weight_mean"]), (w * mask).sum() / mask.sum(), **TOL)


def test_jit_with_static_config():
    logp, old, mask = _batch()
    f = jax.jit(functools.partial(policy_loss, loss_type="dapo", epsilon=EPS,
                                  epsilon_high=EPS_HIGH, importance_sampling_level="sequence"))
    eager = policy_loss(*_f32(logp, old, ADV, mask), loss_type="dapo", epsilon=EPS,
                        epsilon_high=EPS_HIGH, importance_sampling_level="sequence")
    jitted = f(*_f32(logp, old, ADV, mask), num_items=jnp.float32(15.0))
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), **TOL)
    adv = jax.jit(group_advantages, static_argnums=(1, 2))(jnp.arange(6.0), 3, "batch")[0]
    want = np.array([-1, 0, 1, -1, 0, 1]) / (np.std(np.arange(6.0), ddof=1) + 1e-4)
    np.testing.assert_allclose(np.asarray(adv), want, **TOL)


# ---------------------------------------------------------------- errors

def test_errors_name_the_argument():
    logp, old, mask = _f32(*_batch())
    adv = jnp.asarray(ADV, jnp.float32)
    with pytest.raises(ValueError, match="loss_type.*'grpo'.*'dapo'.*got 'ppo'"):
        policy_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level.*'sequence'"):
        policy_loss(logp, old, adv, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="beta=0.04.*ref_logp"):
        policy_loss(logp, old, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
        policy_loss(logp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="max_completion_length >= T=6.*got 4"):
        policy_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    with pytest.raises(ValueError, match="mode.*'sequence_mask'.*got 'clip'"):
        rollout_is_weights(old, old, mask, mode="clip")
    with pytest.raises(ValueError, match=r"N=6.*group_size=4"):
        group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match=r"N=6.*group_size=1"):
        group_advantages(jnp.zeros(6), 1)
    with pytest.raises(ValueError, match="scale.*'group'.*got 'std'"):
        group_advantages(jnp.zeros(6), 3, scale="std")
