"""Data pipeline, learning-rate schedule, the train step (accumulation, NaN guard), checksums."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.train import step as train
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
        np.testing.assert_array_equal(ds.rows(s)["inputs"], again.rows(s)["inputs"])
    # a different seed, a different order
    assert not np.array_equal(_dataset(seed=4).sample_ids(0), ds.sample_ids(0))
    # windows: targets are the inputs shifted by one
    r = ds.rows(2)
    np.testing.assert_array_equal(r["inputs"][:, 1:], r["targets"][:, :-1])


def test_rows_split_over_hosts_without_gap_or_duplicate():
    ds = _dataset(batch=8)
    whole = ds.rows(11)["inputs"]
    parts = [ds.rows(11, slice(i, i + 2))["inputs"] for i in range(0, 8, 2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


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


def test_v3_schedule_shape():
    sched = train.v3_schedule(1.0, 1000, 50)
    lr = np.array([float(sched(i)) for i in range(1000)])
    assert lr[0] == 0 and lr[25] == pytest.approx(0.5) and lr[50] == pytest.approx(1.0)
    const_end = round(10 / 14.8 * 1000)
    assert np.all(lr[50:const_end] == 1.0)
    cos = lr[const_end:round(14.3 / 14.8 * 1000)]
    assert np.all(np.diff(cos) <= 1e-7) and cos[-1] == pytest.approx(0.1, abs=2e-3)
    assert lr[round(14.5 / 14.8 * 1000)] == pytest.approx(0.1)
    assert lr[-1] == pytest.approx(7.3e-6 / 2.2e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        train.v3_schedule(1.0, 10, 10)


# ----------------------------------------------------------------------------- the step


NO_GUARD = train.no_guard()


def _setup(accum=1, **over):
    cfg = dsv3_jax.get_config("tiny", init_std=0.05, **over)
    sched = train.v3_schedule(1e-2, 100, 2)
    opt = train.make_optimizer(cfg, sched)
    state = train.init_state(cfg, jax.random.key(0), opt)
    jitted = train.make_train_step(cfg, opt, sched, grad_accum=accum, donate=False)
    toks = np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 17)).astype(np.int32)
    batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
    return cfg, state, lambda st, b, guard=NO_GUARD: jitted(st, b, guard), batch


def test_moments_are_bf16_and_bias_moves():
    cfg, state, step, batch = _setup()
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda s: hasattr(s, "nu"))
            if hasattr(s, "nu")][0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.bfloat16)}
    new, m = step(state, batch)
    assert int(new["step"]) == 1 and bool(m["finite"])
    bias = new["params"]["router_state"]["moe_layers"]["bias"]
    # every expert moved by exactly +/- gamma (or 0 where its load equals the mean)
    moved = np.abs(np.asarray(bias, np.float64))
    assert np.all(np.isclose(moved, 0) | np.isclose(moved, train.V3_BIAS_GAMMA, rtol=1e-6))
    assert float(jnp.abs(bias).max()) > 0


def test_grad_accumulation_equals_one_batch():
    # the MoE routing and the balance loss are per-sequence, so two half batches of sequences
    # average to the same loss and gradient as the whole batch (the load counts add up)
    _, state, step1, batch = _setup(1, dtype="float32")
    _, _, step2, _ = _setup(2, dtype="float32")
    a, ma = step1(state, batch)
    b, mb = step2(state, batch)
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(ma["load"]), np.asarray(mb["load"]))
    assert float(mb["grad_norm"]) == pytest.approx(float(ma["grad_norm"]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(a["params"]["weights"]), jax.tree.leaves(b["params"]["weights"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def _assert_state_unchanged(state, new):
    assert int(new["step"]) == int(state["step"]) + 1
    for key in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(state[key]), jax.tree.leaves(new[key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_guard_keeps_the_state_bitwise():
    cfg, state, step, batch = _setup()
    # an id outside the vocabulary turns its logits into NaN inside jit (layers.embed)
    poisoned = {**batch, "inputs": batch["inputs"].at[1, 3].set(cfg.vocab_size)}
    new, m = step(state, poisoned)
    assert not bool(m["finite"]) and not bool(m["applied"]) and not np.isfinite(float(m["loss"]))
    _assert_state_unchanged(state, new)
    _, mc = step(state, batch)
    assert bool(mc["finite"]) and bool(mc["applied"])


def test_spike_guard_rejects_a_finite_step_above_its_thresholds():
    _, state, step, batch = _setup()
    _, ref = step(state, batch)
    loss, gnorm = float(ref["loss"]), float(ref["grad_norm"])
    for guard in ({**NO_GUARD, "max_loss": np.float32(loss * 0.99)},
                  {**NO_GUARD, "max_grad_norm": np.float32(gnorm * 0.99)}):
        new, m = step(state, batch, guard)
        assert bool(m["finite"]) and not bool(m["applied"])
        assert float(m["loss"]) == loss  # the step was computed, then not applied
        _assert_state_unchanged(state, new)
    _, m = step(state, batch, {"max_loss": np.float32(loss * 1.01),
                               "max_grad_norm": np.float32(gnorm * 1.01)})
    assert bool(m["applied"])


def test_checksums_detect_one_flipped_bit():
    tree = {"a": jnp.arange(10, dtype=jnp.float32), "b": jnp.ones((3,), jnp.bfloat16)}
    base = np.asarray(train.checksums(tree))
    flipped = np.asarray(tree["a"]).copy()
    flipped.view(np.uint32)[4] ^= 1
    other = np.asarray(train.checksums({**tree, "a": jnp.asarray(flipped)}))
    assert base[1] == other[1] and base[0] != other[0]
