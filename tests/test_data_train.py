"""Data pipeline, learning-rate schedule, the train step (accumulation, NaN guard), checksums."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsv3_jax
from dsv3_jax import placement
from dsv3_jax.train import step as train
from dsv3_jax.train.optim import adamw_v3, decay_mask
from sharding.context import ShardingContext
from sharding.mesh import make_mesh
from dsv3_jax.train.data import (BOS_ID, EOS_ID, ByteTokenizer, DataError, PackedDataset, build_dataset,
                           pack, read_documents)


# ----------------------------------------------------------------------------- data


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok.encode(text)
    assert ids.min() >= 3 and ids.max() < tok.vocab_size == 259
    assert tok.decode(ids) == text
    stream = pack(["ab", "c"], tok)
    assert stream.tolist() == [BOS_ID, 100, 101, EOS_ID, BOS_ID, 102, EOS_ID]


def _dataset(n_tokens=1000, seq_len=7, batch=4, seed=3):
    return PackedDataset(np.arange(n_tokens, dtype=np.int32), seq_len, batch, seed)


def test_batches_are_deterministic_and_cover_each_epoch_once():
    ds = _dataset()
    per_epoch = ds.n_windows // ds.global_batch
    ids = np.concatenate([ds.sample_ids(s) for s in range(per_epoch)])
    assert len(set(ids.tolist())) == len(ids)  # no window twice within the epoch
    again = _dataset()
    for s in (0, 5, per_epoch + 2):
        chex.assert_trees_all_equal(ds.rows(s), again.rows(s))
    # a different seed, a different order
    assert not np.array_equal(_dataset(seed=4).sample_ids(0), ds.sample_ids(0))
    # windows: targets are the inputs shifted by one
    r = ds.rows(2)
    chex.assert_trees_all_equal(r["inputs"][:, 1:], r["targets"][:, :-1])


def test_rows_split_over_hosts_without_gap_or_duplicate():
    ds = _dataset(batch=8)
    whole = ds.rows(11)["inputs"]
    parts = [ds.rows(11, slice(i, i + 2))["inputs"] for i in range(0, 8, 2)]
    chex.assert_trees_all_equal(np.concatenate(parts), whole)


def test_bad_data_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        build_dataset([str(empty)], seq_len=8, global_batch=2, seed=0, vocab_size=259,
                      max_seq_len=64)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        read_documents([bad])
    good = tmp_path / "ok.txt"
    good.write_text("x" * 100)
    with pytest.raises(DataError, match=r"--seq_len 65 is above the preset's maximum of 64"):
        build_dataset([str(good)], seq_len=65, global_batch=2, seed=0, vocab_size=259,
                      max_seq_len=64)
    with pytest.raises(DataError, match="not enough for one sequence"):
        build_dataset([str(good)], seq_len=200, global_batch=2, seed=0, vocab_size=259,
                      max_seq_len=256)
    with pytest.raises(DataError, match="vocab_size >= 259"):
        build_dataset([str(good)], seq_len=8, global_batch=2, seed=0, vocab_size=200,
                      max_seq_len=64)
    with pytest.raises(DataError, match="no such data file"):
        read_documents([tmp_path / "missing.txt"])
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_documents([jl])
    jl.write_text(json.dumps({"body": "ok"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: no string field 'text'"):
        read_documents([jl])
    assert read_documents([jl], text_field="body") == ["ok"]


def test_embedded_corpus_is_stable():
    a, _ = build_dataset(None, seq_len=32, global_batch=2, seed=0, vocab_size=259,
                         max_seq_len=64, embedded_bytes=100_000)
    b, _ = build_dataset(None, seq_len=32, global_batch=2, seed=0, vocab_size=259,
                         max_seq_len=64, embedded_bytes=100_000)
    assert a.fingerprint == b.fingerprint and len(a.stream) > 100_000


# ----------------------------------------------------------------------------- schedule


def _v3_shape(step: np.ndarray, total: int, warmup: int) -> np.ndarray:
    """V3's learning-rate shape as a fraction of the peak ([PAPER] §4.2, 14.8T tokens scaled to
    `total` steps): linear warmup from 0; constant to 10T; cosine decay to 10% by 14.3T; 10% for
    the next 333B; 7.3e-6 / 2.2e-4 for the last 167B (float64)."""
    const_end, cos_end = round(10 / 14.8 * total), round(14.3 / 14.8 * total)
    tail_end = round((14.3 + 0.333) / 14.8 * total)
    t = np.clip((step - const_end) / (cos_end - const_end), 0, 1)
    return np.select(
        [step < warmup, step < const_end, step < cos_end, step < tail_end],
        [step / warmup, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)), 0.1],
        7.3e-6 / 2.2e-4)


def test_v3_schedule_shape():
    sched = train.v3_schedule(2.0, 1000, 50)
    steps = np.arange(1000)
    lr = np.array([float(sched(i)) for i in steps])
    chex.assert_trees_all_close(lr, 2.0 * _v3_shape(steps, 1000, 50), rtol=1e-5, atol=1e-7)
    # the landmarks, by hand: warmup midpoint, peak, the end of the cosine, the two tails
    assert lr[0] == 0 and lr[25] == 1.0 and lr[50] == 2.0 and np.all(lr[50:676] == 2.0)
    assert np.all(np.diff(lr[676:966]) < 0) and abs(lr[965] - 0.2) < 1e-4
    assert np.all(lr[966:989] == np.float32(0.2)) and lr[-1] == np.float32(2.0 * 7.3e-6 / 2.2e-4)
    with pytest.raises(ValueError, match=r"need 0 <= warmup_steps \(10\) < steps \(10\)"):
        train.v3_schedule(1.0, 10, 10)


# ----------------------------------------------------------------------------- the step


NO_GUARD = train.no_guard()
TOKENS = np.random.default_rng(0).integers(3, 512, (4, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def bf16():
    """tiny in bf16 with the V3 optimizer: (cfg, state, step(state, batch, guard=NO_GUARD),
    batch); one compiled step shared by the tests that use it."""
    cfg = dsv3_jax.get_config("tiny", init_std=0.05)
    sched = train.v3_schedule(1e-2, 100, 2)
    opt = train.make_optimizer(cfg, sched)
    state = train.init_state(cfg, jax.random.key(0), opt)
    jitted = train.make_train_step(cfg, opt, sched, donate=False)
    batch = {"inputs": jnp.asarray(TOKENS[:, :-1]), "targets": jnp.asarray(TOKENS[:, 1:])}
    return cfg, state, lambda st, b, guard=NO_GUARD: jitted(st, b, guard), batch


def _adam_states(opt_state):
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1
    return found[0]


def test_moments_stay_bf16_and_bias_moves_against_the_load(bf16):
    cfg, state, step, batch = bf16
    new = state
    for i in range(2):  # warmup: the first step has lr 0, the second applies an update
        new, m = step(new, batch)
        assert int(new["step"]) == i + 1 and bool(m["finite"]) and bool(m["applied"])
    # after updates (optax promotes a moment it computes in float32 unless cast back)
    adam = _adam_states(new["opt_state"])
    assert int(adam.count) == 2
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.bfloat16)}
    assert float(jnp.abs(adam.nu["embed"]).max()) > 0  # really updated
    # one step from the fresh state: every expert's bias moves by gamma against its load
    # ([PAPER] §2.1.2: b_i += gamma * sign(mean load - load_i)), per layer
    bias0 = state["params"]["router_state"]["moe_layers"]["bias"]
    chex.assert_trees_all_equal(bias0, jnp.zeros_like(bias0))
    new, m = step(state, batch)
    load = np.asarray(m["load"], np.float64)  # [L, E] token counts of the step
    want = train.V3_BIAS_GAMMA * np.sign(load.mean(-1, keepdims=True) - load)
    assert np.abs(want).max() > 0  # the load is uneven: some bias must move
    chex.assert_trees_all_close(new["params"]["router_state"]["moe_layers"]["bias"],
                                want.astype(np.float32), atol=1e-9, rtol=1e-6)


# ----------------------------------------------------------------------------- the optimizer

LR, WD, B1, B2, EPS = 1e-2, 0.1, 0.9, 0.95, 1e-8
TINY = dsv3_jax.get_config("tiny")


@jax.jit
def _adamw_update(grads, state, weights, lr, eps, wd):
    """`optim.adamw_v3` over tiny's weights (V3's betas and clipping at global norm 1), its
    learning rate, eps and weight decay traced: one compiled update for every test below."""
    return adamw_v3(lr, TINY, eps=eps, weight_decay=wd).update(grads, state, weights)


@pytest.fixture(scope="module")
def weights():
    w = dsv3_jax.init_params(TINY, jax.random.key(0))["weights"]
    return w, adamw_v3(LR, TINY).init(w)


def _named(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_norm_gain(name: str) -> bool:
    return name.endswith("norm']")  # every RMSNorm gain is a "*norm" leaf (params.py)


def _random_grads(weights, seed, norm):
    """Gaussian float32 gradients of global norm `norm` (numpy: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    g = jax.tree.map(lambda x: rng.standard_normal(x.shape), weights)
    total = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(g)))
    return jax.tree.map(lambda x: (x * (norm / total)).astype(np.float32), g)


def test_adamw_update_is_the_formula_with_bf16_moments(weights):
    """Three AdamW steps of `optim.adamw_v3` (V3: beta1 0.9, beta2 0.95, eps 1e-8, weight decay
    0.1 on matrices; gradients below the clipping norm) against the formula in float64:
    m_t = b1 m_{t-1} + (1 - b1) g_t, v_t = b2 v_{t-1} + (1 - b2) g_t^2,
    update = -lr (m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps) + wd p),
    where m_{t-1} and v_{t-1} are the moments as stored (bf16) and the stored m_t, v_t are
    m_t, v_t rounded to bf16. The betas multiply the history at full precision: optax's own
    Adam, which the optimizer used before, multiplied the bf16 history by bf16(0.9) =
    0.8984375 and bf16(0.95) = 0.94921875 (this test failed on it)."""
    w, state = weights
    b1h, b2h = B1, B2
    mu, nu = _named(_adam_states(state).mu), _named(_adam_states(state).nu)
    params = _named(w)
    for t in (1, 2, 3):
        g = _random_grads(w, t, 0.8)
        updates, state = _adamw_update(g, state, w, LR, EPS, WD)
        adam = _adam_states(state)
        assert int(adam.count) == t
        assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
        want_update, want_mu, want_nu = {}, {}, {}
        for name, gi in _named(g).items():
            m = b1h * mu[name] + (1 - B1) * gi
            v = b2h * nu[name] + (1 - B2) * gi ** 2
            adam_dir = m / (1 - B1 ** t) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
            decay = 0.0 if _is_norm_gain(name) else WD * params[name]
            want_update[name] = -LR * (adam_dir + decay)
            want_mu[name], want_nu[name] = m, v
        # float32 arithmetic: relative 1e-5, and 1e-5 of lr where m_t cancels to ~0
        chex.assert_trees_all_close(_named(updates), want_update, rtol=1e-5, atol=1e-5 * LR)
        # stored moments: the float64 moments rounded to bf16 (8 significant bits: half an ulp
        # is at most 2^-8 of the value), plus float32 rounding where m_t cancels to ~0
        got_mu, got_nu = _named(adam.mu), _named(adam.nu)
        for got, want in ((got_mu, want_mu), (got_nu, want_nu)):
            top = max(np.abs(x).max() for x in want.values())
            chex.assert_trees_all_close(got, want, rtol=2 ** -8 * 1.001, atol=2 ** -20 * top)
        mu, nu = got_mu, got_nu  # the next step starts from the stored (rounded) moments


def test_weight_decay_shrinks_matrices_and_never_norm_gains(weights):
    """With zero gradients the Adam term is 0, so one step moves only decayed leaves, each by
    -lr * wd * p: matrices (embedding, head, projections, experts, router) shrink by the factor
    1 - lr * wd; RMSNorm gains (Decl.decay=False) stay bitwise."""
    w, state = weights
    lr, wd = 0.1, 0.5
    zeros = jax.tree.map(np.zeros_like, w)
    updates, _ = _adamw_update(zeros, state, w, lr, EPS, wd)
    new = _named(optax.apply_updates(w, updates))
    old = _named(w)
    decayed = {n for n in old if not _is_norm_gain(n)}
    excluded = set(old) - decayed
    # tiny's gains: 4 per layer stack (q, kv, attention, FFN), the final norm, and the MTP
    # block's 4 + its e/h/final norms
    assert len(excluded) == 16 and all(np.all(old[n] == 1.0) for n in excluded)
    # the declarations agree: decay exactly where the leaf is not a norm gain
    assert {n for n, d in _named(decay_mask(TINY)).items() if not d} == excluded
    chex.assert_trees_all_equal({n: new[n] for n in excluded}, {n: old[n] for n in excluded})
    chex.assert_trees_all_close({n: new[n] for n in decayed},
                                {n: old[n] * (1 - lr * wd) for n in decayed}, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("norm, scaled_to", [(10.0, 1.0), (0.5, 0.5)])
def test_gradients_are_clipped_to_global_norm_one(weights, norm, scaled_to):
    """adamw_v3 clips at global norm 1 before Adam: a gradient of norm 10 is applied as if it
    had norm 1, one of norm 0.5 as it is. Adam's first step is g / (|g| + eps), blind to the
    gradient's scale at eps 1e-8, so this optimizer takes eps = 1: the update -lr * g_c /
    (|g_c| + 1) shows the clipped gradient g_c's size."""
    w, state = weights
    g = _random_grads(w, 7, norm)
    updates, _ = _adamw_update(g, state, w, LR, 1.0, 0.0)
    g_c = {n: x * (scaled_to / norm) for n, x in _named(g).items()}
    want = {n: -LR * x / (np.abs(x) + 1.0) for n, x in g_c.items()}
    chex.assert_trees_all_close(_named(updates), want, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- accumulation

SGD_LR = 0.5  # plain SGD: a step's weight change is -lr times the (accumulated) gradient


@pytest.fixture(scope="module")
def fp32():
    """tiny in float32 trained by plain SGD on 16 sequences of 8 tokens, and the reference:
    the unaccumulated step on one device (new state, metrics)."""
    cfg = dsv3_jax.get_config("tiny", init_std=0.05, dtype="float32")
    sched = optax.constant_schedule(SGD_LR)
    opt = optax.sgd(sched)
    state = train.init_state(cfg, jax.random.key(0), opt)
    toks = np.random.default_rng(1).integers(3, cfg.vocab_size, (16, 9)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    ref = train.make_train_step(cfg, opt, sched, donate=False)(state, batch, NO_GUARD)
    return cfg, opt, sched, state, batch, ref


def _assert_step_equal(state, got, ref):
    """The same loss, load, gradient norm, weight change (= -lr * gradient) and router bias, in
    float32 tolerance (the gradients differ only in summation order)."""
    (new, m), (ref_new, ref_m) = got, ref
    assert bool(m["applied"])
    chex.assert_trees_all_close(m["loss"], ref_m["loss"], rtol=1e-6, atol=0)
    chex.assert_trees_all_close(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5, atol=0)
    chex.assert_trees_all_equal(np.asarray(m["load"]), np.asarray(ref_m["load"]))  # counts
    def delta(s):
        return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                            s["params"]["weights"], state["params"]["weights"])

    got_d, ref_d = delta(new), delta(ref_new)
    scale = max(np.abs(x).max() for x in jax.tree.leaves(ref_d))
    assert scale > 1e-4  # the step really moved the weights
    chex.assert_trees_all_close(got_d, ref_d, rtol=1e-4, atol=1e-6 * scale)
    chex.assert_trees_all_equal(np.asarray(new["params"]["router_state"]["moe_layers"]["bias"]),
                                np.asarray(ref_new["params"]["router_state"]["moe_layers"]["bias"]))


def test_grad_accumulation_equals_one_batch(fp32):
    # the MoE routing and the balance loss are per-sequence, so two half batches of sequences
    # average to the same loss and gradient as the whole batch (the load counts add up)
    cfg, opt, sched, state, batch, ref = fp32
    got = train.make_train_step(cfg, opt, sched, grad_accum=2, donate=False)(state, batch, NO_GUARD)
    _assert_step_equal(state, got, ref)


@pytest.mark.slow
def test_grad_accumulation_on_a_mesh_equals_one_device(fp32):
    """make_train_step on a 2 x 2 x 2 (data, fsdp, expert) mesh with the ragged EP exchange and
    two micro-batches of 8 sequences (one per device) = the whole batch on one device."""
    cfg, opt, sched, state, batch, ref = fp32
    shard = ShardingContext(make_mesh("data=2,fsdp=2,expert=2"), "fsdp_ep", "ragged_a2a_emulated")
    sharded = jax.device_put(state, train.state_shardings(cfg, opt, shard))
    step = train.make_train_step(cfg, opt, sched, shard, grad_accum=2, donate=False)
    got = step(sharded, placement.shard_batch(batch, shard), NO_GUARD)
    assert got[0]["params"]["weights"]["embed"].sharding.spec == \
        placement.param_specs(cfg, shard)["weights"]["embed"]
    _assert_step_equal(state, jax.device_get(got), ref)


def test_zero1_splits_the_moments_finer_than_the_weights_and_equals_one_device(fp32):
    """zero1_ep (V3's layout) on data=2,expert=4: dense weights whole on every device, their
    optimizer state (SGD momentum, linear in the gradient) split 8 ways; the step equals the
    one-device step and leaves the weights in their own layout."""
    cfg, _, sched, state, batch, _ = fp32
    opt = optax.sgd(sched, momentum=0.9)
    state = train.init_state(cfg, jax.random.key(0), opt)
    ref = train.make_train_step(cfg, opt, sched, donate=False)(state, batch, NO_GUARD)
    shard = ShardingContext(make_mesh("data=2,expert=4"), "zero1_ep", "ragged_a2a_emulated")
    sharded = jax.device_put(state, train.state_shardings(cfg, opt, shard))
    step = train.make_train_step(cfg, opt, sched, shard, donate=False)
    new, m = step(sharded, placement.shard_batch(batch, shard), NO_GUARD)
    w = new["params"]["weights"]["dense_layers"]["attn"]["w_dq"]
    trace = new["opt_state"][0].trace["dense_layers"]["attn"]["w_dq"]
    assert w.addressable_shards[0].data.size == w.size  # whole: no per-layer gather
    assert trace.sharding.spec == placement.optimizer_specs(cfg, shard)["dense_layers"]["attn"]["w_dq"]
    assert trace.addressable_shards[0].data.size * 8 == trace.size
    experts = new["params"]["weights"]["moe_layers"]["moe"]["experts"]["w_gate"]
    assert experts.addressable_shards[0].data.size * 4 == experts.size  # expert-parallel
    _assert_step_equal(state, jax.device_get((new, m)), ref)
    chex.assert_trees_all_close(jax.device_get(new["opt_state"]), ref[0]["opt_state"],
                                rtol=1e-4, atol=1e-7)


def _assert_state_unchanged(state, new):
    assert int(new["step"]) == int(state["step"]) + 1
    chex.assert_trees_all_equal(new["params"], state["params"])
    chex.assert_trees_all_equal(new["opt_state"], state["opt_state"])


def test_nan_guard_keeps_the_state_bitwise(bf16):
    cfg, state, step, batch = bf16
    # an id outside the vocabulary turns its logits into NaN inside jit (layers.embed)
    poisoned = {**batch, "inputs": batch["inputs"].at[1, 3].set(cfg.vocab_size)}
    new, m = step(state, poisoned)
    assert not bool(m["finite"]) and not bool(m["applied"]) and not np.isfinite(float(m["loss"]))
    _assert_state_unchanged(state, new)
    _, mc = step(state, batch)
    assert bool(mc["finite"]) and bool(mc["applied"])


def test_spike_guard_rejects_a_finite_step_above_its_thresholds(bf16):
    _, state, step, batch = bf16
    _, ref = step(state, batch)
    loss, gnorm = float(ref["loss"]), float(ref["grad_norm"])
    for guard in ({**NO_GUARD, "max_loss": np.float32(loss * 0.99)},
                  {**NO_GUARD, "max_grad_norm": np.float32(gnorm * 0.99)}):
        new, m = step(state, batch, guard)
        assert bool(m["finite"]) and not bool(m["applied"])
        assert float(m["loss"]) == loss  # the step was computed, then not applied
        _assert_state_unchanged(state, new)
    _, m = step(state, batch, {**NO_GUARD, "max_loss": np.float32(loss * 1.01),
                               "max_grad_norm": np.float32(gnorm * 1.01)})
    assert bool(m["applied"])


def test_update_ratio_guard_is_compiled_only_when_asked_and_rejects_above_it(bf16):
    _, state, step, batch = bf16
    state, m = step(state, batch)  # the first step has lr 0: from the second on, updates move
    assert "update_ratio" not in m  # no_guard(): the check and its pass are left out
    _, m = step(state, batch, {**NO_GUARD, "max_update_ratio": np.float32(np.inf)})
    ratio = float(m["update_ratio"])
    assert bool(m["applied"]) and 0 < ratio < 1
    new, m = step(state, batch, {**NO_GUARD, "max_update_ratio": np.float32(ratio * 0.99)})
    assert bool(m["finite"]) and not bool(m["applied"])
    _assert_state_unchanged(state, new)


def test_checksums_detect_one_flipped_bit():
    tree = {"a": jnp.arange(10, dtype=jnp.float32), "b": jnp.ones((3,), jnp.bfloat16)}
    base = np.asarray(train.checksums(tree))
    flipped = np.asarray(tree["a"]).copy()
    flipped.view(np.uint32)[4] ^= 1
    other = np.asarray(train.checksums({**tree, "a": jnp.asarray(flipped)}))
    assert base[1] == other[1] and base[0] != other[0]
