"""Whole-model behaviour: the public API; the objective (main loss, MTP, balance loss) against the
V3 report's formulas written out in numpy float64; padding, segments and positions; the router
biases in the train step; remat, unrolled layers, routing replay, bf16 compute, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import get_config
from dsv3_jax.mtp import mtp_forward, shift_left
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loss import LossWeights, cross_entropy, loss_fn
# independent float64 references of one MLA layer (reference §3.2), the group-limited expert choice
# and the sequence-wise balance loss ([PAPER] eqs 17-20), shared with the unit tests
from test_mla import _numpy_mla
from test_router_moe import _brute_force_choice, _paper_balance

CFG = get_config("tiny")
T = 16
E, A = CFG.n_routed_experts, CFG.n_activated_experts

# Jitted once per config and runtime, shared by every test: op-by-op dispatch of a whole model
# costs seconds of compiles on CPU, and each inline jax.jit(lambda ...) compiles anew.
jit_loss = jax.jit(loss_fn, static_argnums=(2, 3))
jit_value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(2, 3))
jit_mtp = jax.jit(mtp_forward, static_argnums=(3, 4))


@pytest.fixture(scope="module")
def params():
    """tiny at init_std 0.1 with non-trivial norm gains and router biases (the defaults, ones
    and zeros, would hide a swapped or skipped norm and a bias left out of the choice)."""
    p = dsv3_jax.init_params(CFG.replace(init_std=0.1), jax.random.key(0))
    rng = np.random.default_rng(0)

    def perturb(path, a):
        if jax.tree_util.keystr(path).endswith("norm']"):
            return a * (1 + 0.3 * rng.normal(size=a.shape)).astype(np.float32)
        return a

    return {"weights": jax.tree_util.tree_map_with_path(perturb, p["weights"]),
            "router_state": jax.tree.map(
                lambda b: jnp.asarray(rng.uniform(-0.05, 0.05, b.shape), jnp.float32),
                p["router_state"])}


def _batch(b=2, t=T, seed=1):
    toks = np.asarray(jax.random.randint(jax.random.key(seed), (b, t + 1), 0, CFG.vocab_size))
    return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}


# ------------------------------------------------------------------------------------------
# The model and its objective in numpy float64, one sequence at a time, from the V3 report
# ([PAPER] eqs 12-25) and the reference notes: nothing from dsv3_jax but the weights.
# ------------------------------------------------------------------------------------------

def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _layer(stack, i):
    return jax.tree.map(lambda a: a[i], stack)


def _rms(x, w):
    return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + CFG.rms_norm_eps)


def _swiglu(x, p):
    g = x @ p["w_gate"]
    return g / (1 + np.exp(-g)) * (x @ p["w_up"]) @ p["w_down"]


def _moe(p, x, bias):
    """DeepSeekMoE on x [n, D] ([PAPER] eqs 12-16): sigmoid affinities s, the group-limited
    top-A of s + b (by enumeration), gates from the unbiased s renormalised over the chosen
    experts times the route scale, plus the shared expert. (y, s [n, E], chosen [n, A])."""
    s = 1 / (1 + np.exp(-(x @ p["router"])))
    chosen = np.array([sorted(_brute_force_choice(s[t] + bias, CFG)) for t in range(len(x))])
    y = _swiglu(x, p["shared"])
    for t, experts in enumerate(chosen):
        gates = s[t, experts] / s[t, experts].sum() * CFG.route_scale
        for g, e in zip(gates, experts):
            y[t] += g * _swiglu(x[t], _layer(p["experts"], e))
    return y, s, chosen


def _block(lp, h, bias=None):
    """One pre-norm layer on h [n, D] at positions 0..n-1, causal. (out, (s, chosen) or None)."""
    x = h + _numpy_mla(lp["attn"], _rms(h, lp["attn_norm"])[None], np.arange(len(h))[None],
                       CFG)[0]
    z = _rms(x, lp["ffn_norm"])
    if "moe" not in lp:
        return x + _swiglu(z, lp["ffn"]), None
    y, s, chosen = _moe(lp["moe"], z, bias)
    return x + y, (s, chosen)


def _main(w, b, tokens):
    """The main model: (logits [n, V], final-normed hidden [n, D], [(s, chosen)] per MoE layer)."""
    h, routes = w["embed"][tokens], []
    for i in range(CFG.n_dense_layers):
        h, _ = _block(_layer(w["dense_layers"], i), h)
    for i in range(CFG.n_moe_layers):
        h, route = _block(_layer(w["moe_layers"], i), h, b["moe_layers"]["bias"][i])
        routes.append(route)
    h = _rms(h, w["final_norm"])
    return h @ w["head"], h, routes


def _mtp(w, b, h, targets, depth):
    """The MTP chain ([PAPER] eqs 21-23): module k at position i < n - k projects
    [RMSNorm(Emb(t_{i+k+1})) ; RMSNorm(h^{k-1}_i)] (embedding first: the released eh_proj order,
    reference gotcha 13), with t_{i+k+1} = targets[i + k], runs its block over those n - k positions
    and predicts targets[i + k + 1] through the shared head; h^0 is the main model's final-normed
    hidden state and h^k module k's final-normed output. [(logits [n - k, V], (s, chosen))]."""
    out = []
    for k in range(depth):
        lp, n = _layer(w["mtp"], k), len(targets) - k
        e = w["embed"][targets[k:]]
        x = np.concatenate([_rms(e, lp["enorm"]), _rms(h[:n], lp["hnorm"])], -1) @ lp["eh_proj"]
        x, route = _block(lp, x, b["mtp"]["bias"][k])
        h = _rms(x, lp["final_norm"])
        out.append((h @ w["head"], route))
    return out


def _ce(logits, targets):
    m = logits.max(-1)
    logz = np.log(np.exp(logits - m[:, None]).sum(-1)) + m
    return logz - logits[np.arange(len(targets)), targets]


def _balance(s, chosen):
    """sum_i f_i P_i of one sequence's counted tokens ([PAPER] eqs 17-20)."""
    return _paper_balance(s[None], chosen[None], np.ones((1, len(s)), bool), E, A)


def _reference_objective(params, rows, depth=CFG.mtp_depth, weights=LossWeights()):
    """V3's objective over sequences given without their padding: rows = [(inputs [n],
    targets [n], mask [n] (1 where the target counts))].

    main: the mean CE over the counted targets. MTP ([PAPER] eqs 24-25): module k's CE of
    targets[i + k + 1] where that target counts, over the number of counted main targets (the
    paper's 1/T, not the n - k - 1 positions it scores), averaged over the modules. Balance
    (eqs 17-20): per MoE layer and MTP module, sum_i f_i P_i per sequence, averaged over the
    sequences, summed; an MTP module's router statistics count its positions whose input token
    (targets[i + k]) counts. Returns the parts, the per-layer loads and each row's experts."""
    w, b = _f64(params["weights"]), _f64(params["router_state"])
    n_targets = sum(m.sum() for _, _, m in rows)
    main, mtp = 0.0, np.zeros(depth)
    balance = np.zeros(CFG.n_moe_layers + depth)
    load, mtp_load = np.zeros((CFG.n_moe_layers, E)), np.zeros((depth, E))
    chosen_main, chosen_mtp = [], []
    for inputs, targets, mask in rows:
        logits, h, routes = _main(w, b, inputs)
        main += (_ce(logits, targets) * mask).sum()
        for i, (s, chosen) in enumerate(routes):
            balance[i] += _balance(s, chosen) / len(rows)
            load[i] += np.bincount(chosen.ravel(), minlength=E)
        chosen_main.append(np.stack([c for _, c in routes]))
        chosen_mtp.append([])
        for k, (lg, (s, chosen)) in enumerate(_mtp(w, b, h, targets, depth)):
            mtp[k] += (_ce(lg[:-1], targets[k + 1:]) * mask[k + 1:]).sum()
            keep = mask[k:] > 0
            balance[CFG.n_moe_layers + k] += _balance(s[keep], chosen[keep]) / len(rows)
            mtp_load[k] += np.bincount(chosen[keep].ravel(), minlength=E)
            chosen_mtp[-1].append(chosen)
    main, mtp = main / n_targets, (mtp / n_targets).mean() if depth else 0.0
    total = main + weights.mtp * mtp + weights.balance * balance.sum()
    return {"main_loss": main, "mtp_loss": mtp, "balance_loss": balance.sum(), "loss": total,
            "load": load, "mtp_load": mtp_load, "chosen": chosen_main, "chosen_mtp": chosen_mtp}


def _rows(batch, lengths=None, mask=None):
    """The batch's sequences without their padding: row r keeps positions lengths[r] (a slice)."""
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    mask = np.ones(inputs.shape) if mask is None else np.asarray(mask, np.float64)
    lengths = lengths or [slice(None)] * len(inputs)
    return [(inputs[r, s], targets[r, s], mask[r, s]) for r, s in enumerate(lengths)]


_PARTS = ("main_loss", "mtp_loss", "balance_loss", "loss")


def _assert_objective_matches(metrics, ref, lengths=None, parts=_PARTS):
    """The step's metrics against the reference: the loss parts to float32 accuracy, the loads
    exactly, each counted token's experts as a set."""
    chex.assert_trees_all_close({k: metrics[k] for k in parts}, {k: ref[k] for k in parts},
                                rtol=2e-6, atol=0)
    chex.assert_trees_all_equal(metrics["load"], ref["load"].astype(np.float32))
    chex.assert_trees_all_equal(metrics["mtp_load"], ref["mtp_load"].astype(np.float32))
    lengths = lengths or [slice(None)] * len(ref["chosen"])
    got = np.sort(np.asarray(metrics["indices"]["moe_layers"]), -1)
    got_mtp = np.sort(np.asarray(metrics["indices"]["mtp"]), -1)
    for r, keep in enumerate(lengths):
        chex.assert_trees_all_equal(got[:, r, keep], ref["chosen"][r])
        for k, chosen in enumerate(ref["chosen_mtp"][r]):
            chex.assert_trees_all_equal(got_mtp[k, r, keep][:len(chosen)], chosen)


def _padded(batch, valid):
    """batch with row r real over positions `valid[r]` (a slice) and padding elsewhere:
    segment id 0 and mask 0 there, positions 0.. over the real tokens. The padding keeps its
    random token ids."""
    seg = np.zeros(batch["inputs"].shape, np.int32)
    positions = np.tile(np.arange(seg.shape[1]), (seg.shape[0], 1))
    for r, keep in enumerate(valid):
        seg[r, keep] = 1
        positions[r, keep] = np.arange(len(positions[r, keep]))
    return {**batch, "mask": jnp.asarray(seg > 0), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(positions)}


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.fixture(scope="module")
def reference(params, batch):
    """The float64 objective of the default batch (every target counts)."""
    return _reference_objective(params, _rows(batch))


# ------------------------------------------------------------------------------------------

def test_public_api_shapes(params, batch):
    logits, aux = dsv3_jax.forward(params, batch["inputs"], CFG)
    chex.assert_shape(logits, (2, T, CFG.vocab_size))
    assert logits.dtype == jnp.float32
    chex.assert_shape(aux["load"], (CFG.n_moe_layers, E))
    chex.assert_shape(aux["indices"]["moe_layers"], (CFG.n_moe_layers, 2, T, A))
    chex.assert_shape(aux["hidden"], (2, T, CFG.dim))
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
    logits, _ = jax.jit(model.forward, static_argnums=(2,))(params, tokens, CFG)
    chex.assert_tree_all_finite(logits[0])  # the good sequence is untouched
    assert np.isnan(np.asarray(logits[1, 1])).all()  # the bad id is visible, never a clamped row


def test_main_model_matches_the_float64_reference(params, batch):
    """The reference model itself against the model's logits (it backs the tests below)."""
    logits, _ = dsv3_jax.forward(params, batch["inputs"], CFG)
    w, b = _f64(params["weights"]), _f64(params["router_state"])
    want = np.stack([_main(w, b, row)[0] for row in np.asarray(batch["inputs"])])
    chex.assert_trees_all_close(logits, want, rtol=0, atol=2e-5)


def test_loss_is_main_plus_weighted_mtp_and_balance(params, batch, reference):
    """loss = main + lambda * MTP + alpha * balance, each part against the report's formula in
    float64 ([PAPER] eqs 17-20, 21-25; MTP normalised by T), with the same experts chosen and
    the same per-layer loads."""
    total, m = jit_loss(params, batch, CFG)
    _assert_objective_matches(m, reference)
    chex.assert_trees_all_close(total, m["loss"], rtol=0, atol=0)
    # balance per MoE layer is 1 for uniform routing and at most E / A (all on A experts)
    assert 0 < float(m["balance_loss"]) < 3 * E / A


def test_mtp_logits_match_the_reference(params, batch):
    """Module 0's logits at every position whose input token exists (i < T; [PAPER] eq 23)."""
    _, aux = dsv3_jax.forward(params, batch["inputs"], CFG)
    logits, _ = jit_mtp(params, aux["hidden"], batch["targets"], CFG)
    chex.assert_shape(logits, (CFG.mtp_depth, 2, T, CFG.vocab_size))
    w, b = _f64(params["weights"]), _f64(params["router_state"])
    for r in range(2):
        h = _main(w, b, np.asarray(batch["inputs"][r]))[1]
        want = _mtp(w, b, h, np.asarray(batch["targets"][r]), 1)[0][0]
        chex.assert_trees_all_close(logits[0, r], want, rtol=0, atol=2e-5)


def test_mtp_module_uses_embedding_of_next_token(params, batch):
    """Changing token i+1 changes module-0 logits at i, not before."""
    _, aux = dsv3_jax.forward(params, batch["inputs"], CFG)
    a, _ = jit_mtp(params, aux["hidden"], batch["targets"], CFG)
    targets2 = batch["targets"].at[0, 8].set((batch["targets"][0, 8] + 1) % CFG.vocab_size)
    b, _ = jit_mtp(params, aux["hidden"], targets2, CFG)
    chex.assert_trees_all_equal(a[:, :, :8], b[:, :, :8])
    chex.assert_trees_all_equal(a[:, 1], b[:, 1])  # the other sequence
    assert np.abs(np.asarray(a - b))[0, 0, 8].max() > 1e-4


def test_mtp_depth_zero_and_two(params, batch):
    """Depth 0: no MTP anywhere, loss = main + alpha * balance of the main layers. Depth 2:
    module 1 takes module 0's normalised output and the token two ahead; its loss, experts,
    load and balance against the float64 chain."""
    for depth in (0, 2):
        cfg = CFG.replace(mtp_depth=depth)
        shapes = jax.eval_shape(lambda: dsv3_jax.init_params(cfg, jax.random.key(0)))
        assert ("mtp" in shapes["weights"]) == ("mtp" in shapes["router_state"]) == (depth > 0)
    assert shapes["weights"]["mtp"]["eh_proj"].shape == (2, 2 * CFG.dim, CFG.dim)
    # depth 0: the same main weights without the MTP stack
    p0 = {k: {n: v for n, v in params[k].items() if n != "mtp"} for k in params}
    total, m = jit_loss(p0, batch, CFG.replace(mtp_depth=0))
    assert "mtp_loss" not in m and "mtp_load" not in m and "mtp" not in m["indices"]
    ref0 = _reference_objective(p0, _rows(batch), depth=0)
    chex.assert_trees_all_close((m["main_loss"], m["balance_loss"], total),
                                (ref0["main_loss"], ref0["balance_loss"], ref0["loss"]),
                                rtol=2e-6, atol=0)
    # depth 2: module 1 a perturbed copy of module 0, its own router bias
    rng = np.random.default_rng(2)
    second = jax.tree.map(lambda a: a[:1] * (1 + 0.5 * rng.normal(size=a[:1].shape))
                          .astype(np.float32), params["weights"]["mtp"])
    p2 = {"weights": {**params["weights"], "mtp": jax.tree.map(
              lambda a, b: jnp.concatenate([a, b]), params["weights"]["mtp"], second)},
          "router_state": {**params["router_state"], "mtp": {"bias": jnp.concatenate([
              params["router_state"]["mtp"]["bias"],
              jnp.asarray(rng.uniform(-0.05, 0.05, (1, E)), jnp.float32)])}}}
    total, m = jit_loss(p2, batch, CFG.replace(mtp_depth=2))
    chex.assert_shape(m["mtp_load"], (2, E))
    ref2 = _reference_objective(p2, _rows(batch), depth=2)
    _assert_objective_matches(m, ref2)
    # the chain's second module scores T - 2 positions per sequence and counts T - 1 tokens
    assert float(m["mtp_load"][1].sum()) == 2 * (T - 1) * A


def test_padding_is_left_out_of_loss_load_and_balance(params):
    """A padded row (segment id 0 and mask 0 over the padding, whose tokens are random ids, not
    zeros) gives the objective of its unpadded sequence: the main and MTP losses over its
    targets only (normalised by the counted targets), expert loads and both balance losses
    from its tokens only, attention (main and MTP) that never reaches the padding. Padding at
    the end and, for attention and router statistics, at the start (where causality alone
    would not hide it)."""
    batch = _batch(seed=5)
    right = [slice(None), slice(0, T - 5)]
    _, m = jit_loss(params, _padded(batch, right), CFG)
    _assert_objective_matches(m, _reference_objective(params, _rows(batch, right)), right)
    assert float(m["load"][0].sum()) == (2 * T - 5) * A
    left = [slice(None), slice(5, None)]
    _, m = jit_loss(params, _padded(batch, left), CFG)
    # the MTP loss with left padding: test_left_padding_scores_no_mtp_prediction
    _assert_objective_matches(m, _reference_objective(params, _rows(batch, left)), left,
                              parts=("main_loss", "balance_loss"))


def test_left_padding_scores_no_mtp_prediction(params):
    """A padding position makes no prediction: the MTP loss of a left-padded row is that of its
    unpadded sequence (module 0 predicts real target i + 1 from real position i only)."""
    batch = _batch(seed=5)
    left = [slice(None), slice(5, None)]
    _, m = jit_loss(params, _padded(batch, left), CFG)
    ref = _reference_objective(params, _rows(batch, left))
    chex.assert_trees_all_close(m["mtp_loss"], ref["mtp_loss"], rtol=2e-6, atol=0)


def test_masked_target_is_left_out_of_the_mtp_loss(params):
    """Targets masked inside a sequence: the main loss skips them, module 0 skips the positions
    that predict them (CE of targets[i + 1] weighted by mask[i + 1]), both normalise by the
    counted targets, and the MTP router statistics skip the positions that embed them."""
    batch = _batch(seed=6)
    mask = np.ones((2, T), bool)
    mask[0, [3, 9]] = False
    mask[1, T - 4:] = False
    # the same structure as the padding test (one compiled program): one segment, positions
    masked = {**batch, "mask": jnp.asarray(mask), "segment_ids": jnp.ones((2, T), jnp.int32),
              "positions": jnp.tile(jnp.arange(T), (2, 1))}
    _, m = jit_loss(params, masked, CFG)
    ref = _reference_objective(params, _rows(batch, mask=mask))
    _assert_objective_matches(m, ref)
    assert float(m["mtp_load"][0].sum()) == mask.sum() * A
    # a masked target's value is not read by the main loss (it still feeds module 0's input
    # at its position, so the MTP loss may move)
    moved = {**masked, "targets": masked["targets"].at[0, 3].set(
        (masked["targets"][0, 3] + 1) % CFG.vocab_size)}
    _, m2 = jit_loss(params, moved, CFG)
    chex.assert_trees_all_close(m2["main_loss"], m["main_loss"], rtol=1e-7, atol=0)


def test_segments_and_positions(params):
    """Tokens attend within their segment only, and RoPE reads `positions`:
    row 0 = [4 other tokens | x (12)] in two segments; row 1 = row 0 with a token of segment 1
    changed; row 2 = x at positions 4..15 then padding: x alone at an offset equals the longer
    sequence's tail (no earlier token visible); row 3 = [x[:4] | 4 others | x[4:]], the middle
    in another segment; row 4 = x at positions 0..3, 8..15: a gap in the positions equals
    invisible tokens in between, and differs from x at contiguous positions."""
    rng = np.random.default_rng(7)
    x, other, other2, pad = (rng.integers(0, CFG.vocab_size, n) for n in (12, 4, 4, 4))
    other2[1] = (other[1] + 1) % CFG.vocab_size
    other2[[0, 2, 3]] = other[[0, 2, 3]]
    ar = np.arange(16)
    tokens = np.stack([np.r_[other, x], np.r_[other2, x], np.r_[x, pad],
                       np.r_[x[:4], other, x[4:]], np.r_[x, pad]])
    seg = np.stack([np.r_[[1] * 4, [2] * 12], np.r_[[1] * 4, [2] * 12], np.r_[[1] * 12, [0] * 4],
                    np.r_[[1] * 4, [2] * 4, [1] * 8], np.r_[[1] * 12, [0] * 4]])
    pos = np.stack([ar, ar, np.r_[ar[4:], ar[:4]], ar, np.r_[ar[:4], ar[8:], ar[:4]]])
    logits, _ = dsv3_jax.forward(params, tokens, CFG, positions=jnp.asarray(pos),
                                 segment_ids=jnp.asarray(seg))
    logits = np.asarray(logits)
    # segment 2 of row 0 is x run alone (float64 reference at positions 0..11)
    w, b = _f64(params["weights"]), _f64(params["router_state"])
    chex.assert_trees_all_close(logits[0, 4:], _main(w, b, x)[0], rtol=0, atol=2e-5)
    # changing a token of segment 1 leaves segment 2 unchanged, and does change segment 1
    chex.assert_trees_all_close(logits[1, 4:], logits[0, 4:], rtol=0, atol=1e-6)
    assert np.abs(logits[1, 1:4] - logits[0, 1:4]).max() > 1e-2
    # offset positions: the tail of the longer sequence
    chex.assert_trees_all_close(logits[2, :12], logits[0, 4:], rtol=0, atol=1e-5)
    # a gap in the positions: the same as tokens in between that nobody sees
    kept = np.r_[ar[:4], ar[8:]]
    chex.assert_trees_all_close(logits[4, :12], logits[3, kept], rtol=0, atol=1e-5)
    assert np.abs(logits[4, 4:12] - logits[2, 4:12]).max() > 1e-2


@pytest.mark.slow
def test_train_step_moves_every_router_bias_by_its_load(params, batch, reference):
    """make_train_step: each MoE layer's and the MTP layer's bias moves by gamma against its own
    load of the step ([PAPER] §2.1.2): down where the expert is above its layer's mean load,
    up below it, unchanged at it; the loads are the reference's, counted in float64."""
    from dsv3_jax.train.step import make_optimizer, make_train_step, no_guard, v3_schedule

    schedule = v3_schedule(1e-3, 10, 2)
    optimizer = make_optimizer(CFG, schedule)
    state = {"params": params, "opt_state": optimizer.init(params["weights"]),
             "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32)}
    gamma = 1e-3
    step = make_train_step(CFG, optimizer, schedule, bias_gamma=gamma, donate=False)
    new, metrics = step(state, batch, no_guard())
    assert bool(metrics["applied"])
    chex.assert_trees_all_equal(metrics["mtp_load"], reference["mtp_load"].astype(np.float32))
    for key, load in (("moe_layers", reference["load"]), ("mtp", reference["mtp_load"])):
        old = np.asarray(params["router_state"][key]["bias"], np.float64)
        got = np.asarray(new["params"]["router_state"][key]["bias"], np.float64)
        mean = load.mean(-1, keepdims=True)
        assert (load > mean).any() and (load < mean).any()  # the step has something to move
        want = old + gamma * np.where(load > mean, -1, np.where(load < mean, 1, 0))
        chex.assert_trees_all_close(got, want, rtol=0, atol=1e-8)


@pytest.fixture(scope="module")
def reference_grads(params, batch):
    """(loss, metrics), grads of the default runtime: shared by the remat, unrolled and bias
    tests (one compile)."""
    return jit_value_and_grad(params, batch, CFG, Runtime())


@pytest.mark.slow
def test_remat_policies_give_identical_loss_and_grads(params, batch, reference_grads):
    (ref_l, _), ref_g = reference_grads
    for policy in ("full", "dots", "dots_no_batch"):
        (l, _), g = jit_value_and_grad(params, batch, CFG, Runtime(remat=policy))
        chex.assert_trees_all_close(l, ref_l, rtol=1e-6, atol=0)
        chex.assert_trees_all_close(g, ref_g, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_unrolled_layers_equal_the_scan(params, batch, reference_grads):
    """scan_layers=False (each layer its own code) against the lax.scan: same loss, metrics,
    gradients (remat included) and the same latent cache on the decode path."""
    for remat in ("none", "full"):
        (ref_l, ref_m), ref_g = (reference_grads if remat == "none" else
                                 jit_value_and_grad(params, batch, CFG, Runtime(remat=remat)))
        (l, m), g = jit_value_and_grad(params, batch, CFG,
                                       Runtime(remat=remat, scan_layers=False))
        chex.assert_trees_all_close(l, ref_l, rtol=1e-6, atol=0)
        chex.assert_trees_all_equal(m["indices"], ref_m["indices"])
        chex.assert_trees_all_equal(m["load"], ref_m["load"])
        chex.assert_trees_all_close(g, ref_g, rtol=1e-4, atol=1e-7)
    tokens = batch["inputs"][:, :8]
    outs = []
    for scan in (True, False):
        cache = dsv3_jax.init_cache(CFG, 2, 16, jnp.float32)
        outs.append(dsv3_jax.forward_cached(params, tokens, cache, CFG,
                                            runtime=Runtime(scan_layers=scan))[:2])
    chex.assert_trees_all_close(*outs, rtol=1e-5, atol=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
    """The hand-written backward of cross_entropy against the formula in float64."""
    logits = jax.random.normal(jax.random.key(0), (3, 5, 40)) * 4
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 40)
    w = jax.random.normal(jax.random.key(2), (3, 5))
    l64, t, w64 = np.asarray(logits, np.float64), np.asarray(targets), np.asarray(w, np.float64)
    m = l64.max(-1, keepdims=True)
    logz = np.log(np.exp(l64 - m).sum(-1, keepdims=True)) + m
    one_hot = np.arange(40) == t[..., None]
    chex.assert_trees_all_close(cross_entropy(logits, targets),
                                (logz - l64)[one_hot].reshape(3, 5), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda l: (cross_entropy(l, targets) * w).sum())(logits)
    chex.assert_trees_all_close(grad, (np.exp(l64 - logz) - one_hot) * w64[..., None],
                                rtol=1e-5, atol=1e-6)


def test_router_bias_gets_no_gradient(reference_grads):
    _, g = reference_grads
    chex.assert_trees_all_equal(g["router_state"],
                                jax.tree.map(jnp.zeros_like, g["router_state"]))
    assert float(jnp.abs(g["weights"]["moe_layers"]["moe"]["router"]).max()) > 0
    assert float(jnp.abs(g["weights"]["mtp"]["moe"]["router"]).max()) > 0


def test_routing_replay_reproduces_logits_under_a_different_bias(params, batch):
    _, m = jit_loss(params, batch, CFG)
    moved = jax.tree.map(lambda b: b + jax.random.uniform(jax.random.key(3), b.shape, maxval=0.5),
                         params["router_state"])
    p2 = {"weights": params["weights"], "router_state": moved}
    free, _ = dsv3_jax.forward(p2, batch["inputs"], CFG)
    replay, _ = dsv3_jax.forward(p2, batch["inputs"], CFG, forced_experts=m["indices"])
    orig, _ = dsv3_jax.forward(params, batch["inputs"], CFG)
    chex.assert_trees_all_equal(replay, orig)
    assert np.abs(np.asarray(free - orig)).max() > 1e-4  # the bias did move choices
    l_replay, _ = jit_loss(p2, batch, CFG, forced_experts=m["indices"])
    chex.assert_trees_all_close(l_replay, m["loss"], rtol=1e-6, atol=0)


def test_shift_left():
    x = jnp.arange(10).reshape(2, 5)
    chex.assert_trees_all_equal(shift_left(x, 2), jnp.array([[2, 3, 4, 0, 0], [7, 8, 9, 0, 0]]))
    chex.assert_trees_all_equal(shift_left(x, 0), x)


def test_bf16_compute_tracks_fp32(params, batch):
    """bf16 compute against fp32 on the same weights. With the fp32 run's experts replayed (a
    near-tie may pick other experts in bf16, a discontinuity that says nothing about rounding):
    norm-wise logit error under 3% (measured 1.7%; all-zero logits give 100%) and each loss part
    within 2e-3 (measured 5e-4; all-zero logits put the main loss 4% off here). Free routing:
    few tokens change experts and the loss stays within 1% (measured 0.4%)."""
    bf16 = Runtime(dtype="bfloat16")
    loss32, m32 = jit_loss(params, batch, CFG)
    l32, _ = dsv3_jax.forward(params, batch["inputs"], CFG)
    l16, _ = dsv3_jax.forward(params, batch["inputs"], CFG, runtime=bf16,
                              forced_experts=m32["indices"])
    assert l16.dtype == jnp.float32
    l32, l16 = np.asarray(l32, np.float64), np.asarray(l16, np.float64)
    logit_err = np.linalg.norm(l16 - l32) / np.linalg.norm(l32)
    assert logit_err < 3e-2, logit_err
    _, m16 = jit_loss(params, batch, CFG, bf16, forced_experts=m32["indices"])
    parts = ("main_loss", "mtp_loss", "balance_loss", "loss")
    chex.assert_trees_all_close({k: m16[k] for k in parts}, {k: m32[k] for k in parts},
                                rtol=2e-3, atol=0)
    zero_gap = abs(np.log(CFG.vocab_size) / float(m32["main_loss"]) - 1)
    assert zero_gap > 10 * 2e-3, zero_gap  # the bound excludes the all-zero model
    loss16, free = jit_loss(params, batch, CFG, bf16)
    moved = (np.sort(np.asarray(free["indices"]["moe_layers"]), -1)
             != np.sort(np.asarray(m32["indices"]["moe_layers"]), -1)).any(-1)
    assert moved.mean() <= 1 / 8, moved.mean()
    chex.assert_trees_all_close(loss16, loss32, rtol=1e-2, atol=0)
