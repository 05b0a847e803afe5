"""The pretraining script's reliability: crash and resume, checkpoints killed mid-save, corrupt
checkpoints, NaN handling, signals, several processes, other meshes, bad flags, plots.

Runs are tiny (the `tiny` preset, 8 x 32 tokens a step, a 200 kB slice of the embedded corpus)
so each costs seconds; the loss sequences are compared bit for bit where the issue asks it.
"""

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dsv3_jax.train import loop, pretrain
from dsv3_jax.train import step as train_step
from dsv3_jax.train.checkpoint import CheckpointError, Checkpoints
from dsv3_jax.train.data import DataError, PackedDataset
from dsv3_jax.config import get_config
from dsv3_jax.train.settings import Settings, parse_settings, settings_parser
from sharding import eplb

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "pretrain.py"
SMALL = ["--seq_len", "32", "--global_batch", "8", "--embedded_bytes", "200000",
         "--sample_tokens", "0", "--log_every", "1000", "--no-progress", "--lr", "3e-3"]


def _settings(tmp: pathlib.Path, *extra: str) -> Settings:
    return parse_settings(SMALL + list(extra))


def _poison(monkeypatch, *steps: int) -> None:
    """Fault injection: the batches of these (1-based) steps carry a token id outside the
    vocabulary, which turns their logits, loss and gradients into NaN inside jit."""
    rows = PackedDataset.rows

    def poisoned(self, step, sl=None):
        out = rows(self, step, sl)
        if step + 1 in steps:
            out = {**out, "inputs": out["inputs"].copy()}
            out["inputs"][:, 0] = 10 ** 6
        return out

    monkeypatch.setattr(PackedDataset, "rows", poisoned)


def _losses(path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs]


def _script(*args: str, env_extra=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(p: subprocess.Popen, ok=(0,)) -> str:
    out, err = p.communicate(timeout=900)
    assert p.returncode in ok, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return out + err


def _state_leaves(ckpt_dir, step):
    """The saved arrays of one checkpoint, as numpy (via orbax, no target)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=("state", "meta")) as m:
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
    return [np.asarray(x) for x in jax.tree.leaves(out.state)], out.meta


# ----------------------------------------------------------------------------- 1. kill -9


@pytest.mark.slow
def test_kill9_then_resume_gives_the_same_losses_bit_for_bit(tmp_path):
    common = ["--mesh", "none", "--steps", "10", "--checkpoint_every", "3"]
    ref = _script(*common, "--checkpoint_dir", str(tmp_path / "ref"),
                  "--metrics_file", str(tmp_path / "ref.jsonl"))
    _finish(ref)
    kill_after = random.randint(4, 8)  # a random point after the step-3 checkpoint committed
    ck, met = tmp_path / "ck", tmp_path / "m.jsonl"
    p = _script(*common, "--checkpoint_dir", str(ck), "--metrics_file", str(met))
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        lines = met.read_text().count("\n") if met.exists() else 0
        if (ck / "3").is_dir() and lines >= kill_after:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    out = _finish(_script(*common, "--checkpoint_dir", str(ck), "--metrics_file", str(met)))
    assert "resumed from" in out
    got, want = _losses(met), _losses(tmp_path / "ref.jsonl")
    assert [s for s, _ in got] == list(range(1, 11))
    assert got == want, f"killed after {kill_after} records"


# ----------------------------------------------------------------------------- 2. kill mid-save

_SAVE_AND_DIE = """
import os, signal, sys
import numpy as np, jax.numpy as jnp
from dsv3_jax.train.checkpoint import Checkpoints
ck = Checkpoints(sys.argv[1], keep=3, async_save=True)
big = lambda v: {"w": jnp.full((64, 1024, 1024), v, jnp.float32), "step": jnp.int32(v)}
ck.save(1, big(1.0), {"data": {"step": 1}})
ck.wait()
ck.save(2, big(2.0), {"data": {"step": 2}})   # returns once the arrays are off the devices
os.kill(os.getpid(), signal.SIGKILL)          # ... and the process dies while orbax writes
"""


@pytest.mark.slow
def test_kill_during_async_save_restores_the_previous_step(tmp_path):
    ck = tmp_path / "ck"
    p = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(ck)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert not (ck / "2").exists(), "the save finished before the kill: the test needs a bigger state"
    import jax.numpy as jnp

    target = {"w": jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    c = Checkpoints(str(ck), keep=3)
    restored = c.restore_latest(target)
    assert restored.step == 1 and restored.skipped == []
    assert int(restored.state["step"]) == 1 and float(jnp.abs(restored.state["w"] - 1).max()) == 0
    # the same folder takes new saves (orbax removes the unfinished one)
    c.save(2, {"w": jnp.zeros((64, 1024, 1024)), "step": jnp.int32(2)}, {})
    c.close()
    assert Checkpoints(str(ck)).steps() == [1, 2]


# ----------------------------------------------------------------------------- 3. corruption


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_the_previous_good_step(tmp_path, damage):
    ck = tmp_path / "ck"
    base = ["--mesh", "none", "--checkpoint_every", "3", "--checkpoint_dir", str(ck)]
    pretrain.run(_settings(tmp_path, *base, "--steps", "6"))
    assert Checkpoints(str(ck)).steps() == [3, 6]
    victim = _largest_file(ck / "6" / "state")
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x5A
        victim.write_bytes(bytes(data))
    import shutil

    shutil.copytree(ck, tmp_path / "copy")
    c = Checkpoints(str(tmp_path / "copy"))
    cfg = pretrain.build_config(_settings(tmp_path))
    target = train_step.abstract_state(cfg, _optimizer(tmp_path, cfg, 6))
    restored = c.restore_latest(target)
    c.close()
    assert restored.step == 3
    assert [s for s, _ in restored.skipped] == [6] and restored.skipped[0][1]  # with a reason
    assert len(list((tmp_path / "copy").glob("6.unusable-*"))) == 1  # kept, set aside
    # the script says so and resumes from step 3
    out = _finish(_script(*base, "--steps", "7", "--metrics_file", str(tmp_path / "m.jsonl")))
    assert "checkpoint step 6 is unusable" in out and "resumed from" in out
    assert [s for s, _ in _losses(tmp_path / "m.jsonl")] == [4, 5, 6, 7]


def _optimizer(tmp_path, cfg, steps):
    s = _settings(tmp_path, "--steps", str(steps))
    sched = train_step.v3_schedule(s.lr, s.steps, 1)
    return train_step.make_optimizer(cfg, sched)


def test_every_checkpoint_unreadable_is_an_error(tmp_path):
    ck = tmp_path / "ck"
    pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "2", "--checkpoint_every", "2",
                           "--checkpoint_dir", str(ck)))
    (ck / "2" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="no readable checkpoint.*step 2"):
        pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "3",
                               "--checkpoint_dir", str(ck)))
    # the script: one line naming the folder, exit status 2, no traceback
    out = _finish(_script("--mesh", "none", "--steps", "3", "--checkpoint_dir", str(ck)), ok=(2,))
    assert "pretrain: error: no readable checkpoint in" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- 4. NaN / Inf


def test_nan_skip_leaves_the_state_untouched_and_goes_on(tmp_path, monkeypatch):
    _poison(monkeypatch, 3)
    out = pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "5",
                                 "--metrics_file", str(tmp_path / "m.jsonl")))
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, False, True, False, False]
    assert not np.isfinite(recs[2]["loss"]) and np.isfinite(recs[3]["loss"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(out["state"])))


def test_nan_stop_reports_and_never_saves_the_poisoned_step(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    _poison(monkeypatch, 4)
    with pytest.raises(loop.TrainingStopped, match=r"step 4: non-finite loss nan") as e:
        pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "8",
                               "--nan_policy", "stop", "--checkpoint_every", "2",
                               "--checkpoint_dir", str(ck)))
    assert e.value.exit_code == 3
    steps = Checkpoints(str(ck)).steps()
    assert max(steps) <= 4, steps
    for step in steps:
        leaves, _ = _state_leaves(ck, step)
        assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
    # too many skips in a row also stops
    with pytest.raises(loop.TrainingStopped, match="in a row"):
        s = _settings(tmp_path, "--mesh", "none", "--steps", "5", "--max_consecutive_skips", "1")
        pretrain.run(s)


# ----------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_saves_then_exits(tmp_path):
    ck, met = tmp_path / "ck", tmp_path / "m.jsonl"
    p = _script("--mesh", "none", "--steps", "400", "--checkpoint_every", "1000",
                "--checkpoint_dir", str(ck), "--metrics_file", str(met))
    while p.poll() is None and (not met.exists() or met.read_text().count("\n") < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = _finish(p, ok=(128 + signal.SIGTERM,))
    assert "stopped by SIGTERM" in out and "checkpoint saved" in out
    steps = Checkpoints(str(ck)).steps()
    assert len(steps) == 1 and 3 <= steps[0] < 400
    assert _losses(met)[-1][0] == steps[0]


# ----------------------------------------------------------------------------- 5. processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_losses_and_restore_elsewhere(tmp_path):
    """2 processes x 4 CPU devices train like 1 x 8 (losses within 1e-5 relative: the gloo and
    in-process reductions add in different orders); their checkpoint then resumes in one process
    on a different mesh."""
    assert jax.device_count() == 8
    common = ["--mesh", "fsdp=8", "--steps", "4", "--checkpoint_every", "4"]
    port = str(_free_port())
    env = {"JAX_NUM_CPU_DEVICES": "4", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COMPILATION_CACHE_DIR": ""}  # side by side: no shared cache (conftest.py)
    procs = [_script(*common, "--distributed", "manual", "--coordinator", f"localhost:{port}",
                     "--num_processes", "2", "--process_id", str(i),
                     "--checkpoint_dir", str(tmp_path / "ck2"),
                     "--metrics_file", str(tmp_path / "two.jsonl"), env_extra=env)
             for i in range(2)]
    for p in procs:
        _finish(p)
    one = pretrain.run(_settings(tmp_path, *common, "--metrics_file", str(tmp_path / "one.jsonl")))
    two_l, one_l = _losses(tmp_path / "two.jsonl"), _losses(tmp_path / "one.jsonl")
    assert [s for s, _ in two_l] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in two_l], [v for _, v in one_l], rtol=1e-5)
    # restore the 2-process checkpoint on this process's 8 devices as data=2 x fsdp=4, and on a
    # single device: both continue like the uninterrupted 1 x 8 run
    cont = pretrain.run(_settings(tmp_path, "--mesh", "fsdp=8", "--steps", "6",
                                  "--metrics_file", str(tmp_path / "ref.jsonl")))
    ref = dict(_losses(tmp_path / "ref.jsonl"))
    for mesh, strategy in (("data=2,fsdp=4", "fsdp"), ("none", "fsdp")):
        d = tmp_path / f"ck_{mesh.replace(',', '_').replace('=', '')}"
        import shutil

        shutil.copytree(tmp_path / "ck2", d)
        pretrain.run(_settings(tmp_path, "--mesh", mesh, "--strategy", strategy, "--steps", "6",
                               "--checkpoint_dir", str(d), "--metrics_file", str(d) + ".jsonl"))
        got = _losses(str(d) + ".jsonl")
        assert [s for s, _ in got] == [5, 6]
        np.testing.assert_allclose([v for _, v in got], [ref[5], ref[6]], rtol=1e-5)
    del one, cont


# ----------------------------------------------------------------------------- bad input


def test_bad_flags_and_mismatched_resume_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--global_batch 8 is not a multiple of --grad_accum 3"):
        Settings(global_batch=8, grad_accum=3)
    with pytest.raises(ValueError, match="split evenly over the 8 devices"):
        pretrain.run(_settings(tmp_path, "--mesh", "fsdp=8", "--global_batch", "4"))
    with pytest.raises(DataError, match="above the preset's maximum"):
        pretrain.run(_settings(tmp_path, "--mesh", "none", "--seq_len", "100000"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="folder has no files"):
        pretrain.run(_settings(tmp_path, "--mesh", "none", "--data", str(empty)))
    ck = tmp_path / "ck"
    pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "1", "--checkpoint_dir", str(ck)))
    with pytest.raises(ValueError, match="different seq_len.*--seq_len"):
        pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "2", "--seq_len", "16",
                               "--checkpoint_dir", str(ck)))
    # the script turns them into one line and exit status 2
    p = _script("--mesh", "none", "--seq_len", "100000")
    out = _finish(p, ok=(2,))
    assert "pretrain: error: --seq_len 100000 is above the preset's maximum of 256" in out


def test_user_jsonl_data_and_every_flag_has_help(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    out = pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "2", "--data", str(data)))
    assert out["steps_run"] == 2
    parser = settings_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    for name in ("preset", "steps", "checkpoint_dir", "checkpoint_every", "metrics_file", "seed"):
        assert f"--{name}" in parser.format_help()


# ----------------------------------------------------------------------------- plots


def test_plot_script_writes_pngs(tmp_path):
    met = tmp_path / "m.jsonl"
    pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "4", "--log_every", "2",
                           "--metrics_file", str(met)))
    sys.path.insert(0, str(ROOT / "experiments"))
    import plot_metrics

    loss_png, load_png = plot_metrics.main([str(met), "--out", str(tmp_path / "run")])
    for png in (loss_png, load_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ----------------------------------------------------------------------------- the main job


def test_script_learns_and_ends_with_a_greedy_sample(tmp_path):
    """`./dev.sh run` is this script with its defaults; here shorter and smaller."""
    met = tmp_path / "m.jsonl"
    out = _finish(_script("--steps", "40", "--sample_tokens", "8", "--metrics_file", str(met)))
    losses = [loss for _, loss in _losses(met)]
    assert len(losses) == 40 and np.mean(losses[-5:]) < losses[0] - 1.5, losses
    assert "greedy sample: 'def " in out
    assert f"loss {losses[0]:.3f} at step 1 -> {losses[-1]:.3f} at step 40" in out


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_keeps_its_last_good_checkpoint_and_exits_non_zero(tmp_path):
    """The new user's --lr 1e6 (warmup: step 1 runs at lr 0, step 2 at 1e6): the step that
    would replace the weights fails (its update is millions of times their norm), so does
    every later one, nothing is saved during the streak, the run stops with exit 3, and the
    one checkpoint left holds the untouched weights. With the update guard off (the new
    user's experience before it), the same run applies that update and its weights explode."""
    ck, met = tmp_path / "ck", tmp_path / "m.jsonl"
    args = ["--mesh", "none", "--steps", "30", "--lr", "1e6", "--checkpoint_every", "1",
            "--keep_checkpoints", "3", "--checkpoint_dir", str(ck), "--metrics_file", str(met)]
    out = _finish(_script(*args), ok=(3,))
    assert "failed steps in a row" in out and "written before the failed steps" in out
    assert "x the weights' norm (above --max_update_ratio 1)" in out
    recs = [json.loads(line) for line in met.read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False] + [True] * 10
    assert Checkpoints(str(ck)).steps() == [1]
    leaves, _ = _state_leaves(ck, 1)
    assert max(float(np.abs(x).max()) for x in leaves if x.dtype.kind == "f") < 10
    loose = _finish(_script(*args[:-4], "--steps", "3", "--max_update_ratio", "0",
                            "--spike_loss_factor", "0", "--spike_grad_factor", "0",
                            "--checkpoint_dir", str(tmp_path / "loose")), ok=(0, 3))
    leaves, _ = _state_leaves(tmp_path / "loose", 2)
    assert max(float(np.abs(x).max()) for x in leaves if x.dtype.kind == "f") > 1e3, loose


def test_the_checkpoint_before_a_streak_is_never_pushed_out(tmp_path, monkeypatch):
    """Step 5 fails; the checkpoint of step 4 is the last one written before that streak, and
    it survives the three later saves of a run that keeps two."""
    _poison(monkeypatch, 5)
    ck = tmp_path / "ck"
    pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "10", "--checkpoint_every",
                           "2", "--keep_checkpoints", "2", "--checkpoint_dir", str(ck)))
    assert Checkpoints(str(ck)).steps() == [4, 8, 10]


def test_a_run_that_ends_in_failed_steps_exits_non_zero(tmp_path, monkeypatch):
    _poison(monkeypatch, 4)
    ck = tmp_path / "ck"
    with pytest.raises(loop.TrainingStopped, match="ended in a streak of 1 failed steps") as e:
        pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "4", "--checkpoint_every",
                               "2", "--checkpoint_dir", str(ck)))
    assert e.value.exit_code == 3
    assert Checkpoints(str(ck)).steps() == [2]  # the final save of step 4 did not happen


def test_guard_thresholds_follow_the_median_of_applied_steps():
    g = loop.Guard(loss_factor=2.0, grad_norm_factor=10.0, window=3, warmup=2)
    off = g.thresholds([5.0], [1.0])
    assert np.isinf(off["max_loss"]) and np.isinf(off["max_grad_norm"])  # still warming up
    on = g.thresholds([9.0, 4.0, 2.0, 3.0], [1.0, 2.0, 4.0, 8.0])  # last 3: median 3 and 4
    assert on["max_loss"] == np.float32(6.0) and on["max_grad_norm"] == np.float32(40.0)
    assert np.isinf(loop.Guard(loss_factor=0).thresholds([1.0] * 9, [1.0] * 9)["max_loss"])
    assert off["max_update_ratio"] == np.float32(1.0)  # judged from the first step on
    assert "max_update_ratio" not in loop.Guard(max_update_ratio=0).thresholds([], [])
    with pytest.raises(ValueError, match="loss_factor"):
        loop.Guard(loss_factor=0.5)


# ----------------------------------------------------------------------------- what a user sees


def test_resume_with_another_preset_names_the_field_before_reading_arrays(tmp_path):
    ck = tmp_path / "ck"
    pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "1", "--checkpoint_dir", str(ck)))
    out = _finish(_script("--mesh", "none", "--steps", "2", "--preset", "small",
                          "--checkpoint_dir", str(ck)), ok=(2,))
    assert "the checkpoint's model differs in name ('tiny', now 'small')" in out
    assert "Traceback" not in out and "strict" not in out


def test_the_run_says_where_checkpoints_go_and_when_it_compiles(tmp_path):
    ck = tmp_path / "ck"
    out = _finish(_script("--mesh", "none", "--steps", "2", "--checkpoint_every", "1",
                          "--checkpoint_dir", str(ck)))
    assert f"checkpoint step 1 -> {ck / '1'}" in out and f"checkpoint step 2 -> {ck / '2'}" in out
    assert out.index("compiling the pretraining step") < out.index("compiled in")
    out = _finish(_script("--mesh", "none", "--steps", "1"))
    assert "no --checkpoint_dir: nothing will be saved" in out


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "--lr must be > 0"), ("--clip_norm", "0", "--clip_norm must be > 0"),
    ("--spike_loss_factor", "0.5", "--spike_loss_factor must be 0"),
    ("--steps", "0", "--steps must be >= 1"),
])
def test_bad_flag_values_are_usage_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_settings([flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_is_grouped_and_says_no_default_none():
    text = settings_parser().format_help()
    assert "(default: None)" not in text and "inject_nan" not in text
    for group in ("model and precision:", "kernels:", "checkpoints:", "failed steps:"):
        assert group in text


def test_redundant_experts_train_as_the_plain_model_and_are_replaced_from_loads(tmp_path):
    """--redundant_experts: the copies change nothing the model computes (the losses equal the
    run without them), are re-placed from the loads every --rebalance_every steps, and are in
    the checkpoint (a resume continues with them)."""
    base = ["--mesh", "none", "--steps", "4", "--metrics_file"]
    plain = pretrain.run(_settings(tmp_path, *base, str(tmp_path / "a.jsonl")))
    out = pretrain.run(_settings(tmp_path, *base, str(tmp_path / "b.jsonl"),
                                 "--redundant_experts", "4", "--rebalance_every", "2",
                                 "--checkpoint_dir", str(tmp_path / "ck")))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / f).read_text().splitlines()]
              for f in ("a.jsonl", "b.jsonl")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    reps = jax.device_get(out["state"]["params"]["router_state"]["moe_layers"]["replicas"])
    cfg = get_config("tiny")
    assert reps["slots"].shape[-1] == cfg.n_routed_experts + 4
    uniform = eplb.plan(np.ones(reps["copies"].shape), cfg.n_routed_experts + 4, 1, 1, 1)
    assert not np.array_equal(reps["copies"], uniform.copies)  # re-placed from measured loads
    resumed = pretrain.run(_settings(tmp_path, "--mesh", "none", "--steps", "5",
                                     "--redundant_experts", "4", "--rebalance_every", "2",
                                     "--checkpoint_dir", str(tmp_path / "ck")))
    assert resumed["start_step"] == 4
    with pytest.raises(SystemExit):  # a usage error naming the flag
        _settings(tmp_path, "--redundant_experts", "-1")
