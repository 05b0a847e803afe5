"""Checkpoint verification on restore (dsv3_jax/train/checkpoint.py) with small states, no model:
a checkpoint whose metadata carries no checksums, or a different number of checksums than the
state has leaves, is reported with its step and reason, set aside, and the restore falls back to
the next older step; when no step is usable the restore is an error naming every one."""

import json
import logging

import chex
import jax
import jax.numpy as jnp
import pytest

from dsv3_jax.train.checkpoint import CheckpointError, Checkpoints


def _state(v: float) -> dict:
    return {"w": jnp.full((3, 4), v, jnp.float32), "b": jnp.arange(5, dtype=jnp.bfloat16) * v,
            "step": jnp.int32(v)}


TARGET = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                   sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
    _state(0.0))


def _edit_meta(folder, step: int, edit) -> None:
    """Rewrite checkpoint `step`'s JSON metadata (orbax's `<step>/meta/metadata`) with
    edit(meta)."""
    path = folder / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.fixture
def two_steps(tmp_path):
    """A folder with good checkpoints at steps 1 and 2 (states _state(1.0), _state(2.0))."""
    folder = tmp_path / "ck"
    ck = Checkpoints(str(folder), keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, _state(float(step)), {"data": {"step": step}})
    ck.close()
    return folder


def test_good_checkpoints_restore_the_newest_bitwise(two_steps):
    ck = Checkpoints(str(two_steps), async_save=False)
    restored = ck.restore_latest(TARGET)
    ck.close()
    assert restored.step == 2 and restored.skipped == []
    chex.assert_trees_all_equal(restored.state, _state(2.0))
    assert restored.meta["data"] == {"step": 2} and len(restored.meta["checksums"]) == 3


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.pop("checksums"), "CheckpointError: step 2: no checksums in its metadata"),
    (lambda m: m["checksums"].pop(), "CheckpointError: step 2: 3 leaves restored, 2 saved"),
    (lambda m: m["checksums"].append(7), "CheckpointError: step 2: 3 leaves restored, 4 saved"),
], ids=["no_checksums", "one_checksum_missing", "one_checksum_extra"])
def test_unverifiable_checkpoint_is_reported_skipped_and_set_aside(two_steps, caplog, edit,
                                                                   reason):
    _edit_meta(two_steps, 2, edit)
    ck = Checkpoints(str(two_steps), async_save=False)
    with caplog.at_level(logging.ERROR, logger="dsv3_jax.train.checkpoint"):
        restored = ck.restore_latest(TARGET)
    # the older step, bitwise, with the newer one reported (step and reason)
    assert restored.step == 1
    assert restored.skipped == [(2, reason)]
    chex.assert_trees_all_equal(restored.state, _state(1.0))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(two_steps / "2") in errors[0] and reason in errors[0]
    # set aside for inspection, out of orbax's sight: the resumed run can save step 2 again
    assert len(list(two_steps.glob("2.unusable-*"))) == 1 and not (two_steps / "2").exists()
    assert ck.steps() == [1]
    ck.save(2, _state(5.0), {})
    ck.wait()
    assert ck.steps() == [1, 2]
    ck.close()


def test_no_usable_step_is_an_error_naming_each(two_steps):
    _edit_meta(two_steps, 2, lambda m: m.pop("checksums"))
    _edit_meta(two_steps, 1, lambda m: m["checksums"].pop())
    ck = Checkpoints(str(two_steps), async_save=False)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*ck: "
                                              r"step 2: CheckpointError: step 2: no checksums.*; "
                                              r"step 1: CheckpointError: step 1: 3 leaves "
                                              r"restored, 2 saved"):
        ck.restore_latest(TARGET)
    ck.close()


def _mismatch_restore(folder):
    # leaves in key order: b, step, w; flip one bit of the saved checksum of "step", as a
    # flipped bit in its data would
    _edit_meta(folder, 2, lambda m: m["checksums"].__setitem__(1, m["checksums"][1] ^ 1))
    ck = Checkpoints(str(folder), async_save=False)
    restored = ck.restore_latest(TARGET)
    ck.close()
    return restored


def test_a_checksum_mismatch_falls_back_to_the_older_step(two_steps):
    """The third verification branch, through the same metadata."""
    restored = _mismatch_restore(two_steps)
    assert restored.step == 1 and [s for s, _ in restored.skipped] == [2]
    assert restored.skipped[0][1].startswith(
        "CheckpointError: step 2: checksum mismatch in 1 leaf(s), first")
    chex.assert_trees_all_equal(restored.state, _state(1.0))


def test_a_checksum_mismatch_report_names_the_leaf(two_steps):
    restored = _mismatch_restore(two_steps)
    assert restored.skipped == [(2, "CheckpointError: step 2: checksum mismatch in 1 leaf(s), "
                                    "first ['step']")]
