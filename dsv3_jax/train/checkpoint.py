"""Training checkpoints with orbax: async, atomic, keep-last-N, verified on restore.

Each checkpoint holds two items: `state` (params, optimizer state, router state, step, RNG:
`train.abstract_state`) and `meta` (JSON: the data position, the run's config, and a checksum
per state leaf). orbax writes into `<step>.orbax-checkpoint-tmp*` and renames when complete, so
a crash during a save leaves the previous step as the latest finalised one. Restoring targets
the *current* run's shardings, so a checkpoint restores onto a different mesh or process count.

A restore reads a checkpoint's `meta` first and lets the caller compare it with the run (a
different model or data is the user's error, reported by the field that differs, before any
array is read). A checkpoint that orbax cannot read, or whose leaves' checksums do not match
what was saved (bit rot, a truncated or edited file), is reported in one line with its step,
the file and the reason, and the restore falls back to the next older step; the unusable one
is renamed `<step>.unusable-<time>` (kept for inspection, ignored by orbax).

Old checkpoints go when more than `keep` are newer, except the `protected` ones: the training
loop protects the last checkpoint written before a streak of failed steps, so no later save
can push the last good state out.
"""

import dataclasses
import json
import logging
import os
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsv3_jax.train.step import checksums

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


@dataclasses.dataclass
class _LatestAndProtected(ocp.checkpoint_managers.PreservationPolicy):
    """Keep the newest `keep` checkpoints and every step in `protected` (which may grow)."""
    keep: int
    protected: set

    def should_preserve(self, checkpoints, *, context):
        newest = sorted((c.step for c in checkpoints), reverse=True)[:self.keep]
        return [c.step in newest or c.step in self.protected for c in checkpoints]


def _why(e: Exception) -> str:
    """One line: the exception's kind, the file it names (if any) and the start of its message
    (TensorStore errors append whole spec reprs, `[tensorstore_spec='{...}']` or `{...}`: the
    message is cut where the first of those begins)."""
    text = " ".join(str(e).split())
    path = re.search(r'(/[^\s"\']+)', text)
    text = re.split(r"\s\[\w+=|\{", text, maxsplit=1)[0].strip().rstrip(":;,")[:200]
    where = f" (file {path.group(1)})" if path else ""
    return f"{type(e).__name__}: {text or 'no message'}{where}"


@dataclasses.dataclass
class Restored:
    step: int
    state: dict
    meta: dict
    skipped: list[tuple[int, str]]  # newer steps that were unreadable, and why


class Checkpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.policy = _LatestAndProtected(keep, set())
        options = ocp.CheckpointManagerOptions(create=True, preservation_policy=self.policy,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                             options=options)

    def protect(self, step: int) -> None:
        """Never delete checkpoint `step` (recorded in every later checkpoint's meta too)."""
        self.policy.protected.add(int(step))

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices)."""
        sums = np.asarray(jax.device_get(checksums(state))).tolist()
        meta = {**meta, "step": int(step), "checksums": [int(v) for v in sums],
                "protected": sorted(self.policy.protected)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        return dict(self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore_latest(self, target: dict, check=None) -> Restored | None:
        """The newest readable, verified checkpoint restored into `target` (a tree of
        ShapeDtypeStructs with shardings), or None if there is no checkpoint at all.
        `check(meta)` runs on each candidate's meta before its arrays are read; what it
        raises (a run that does not match the checkpoint) propagates."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # reported and skipped, never silently: see the docstring
                skipped.append((step, self._report(step, e)))
                continue
            if check is not None:
                check(meta)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                self._verify(step, out.state, out.meta)
            except Exception as e:  # as above
                skipped.append((step, self._report(step, e)))
                continue
            if skipped:
                self._set_aside([s for s, _ in skipped])
            self.policy.protected.update(int(s) for s in meta.get("protected", ()))
            return Restored(step, out.state, dict(out.meta), skipped)
        if skipped:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: " +
                                  "; ".join(f"step {s}: {r}" for s, r in skipped))
        return None

    def _report(self, step: int, e: Exception) -> str:
        reason = _why(e)
        log.error("checkpoint %s is unreadable: %s; trying an older one",
                  os.path.join(self.directory, str(step)), reason)
        return reason

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unusable newer checkpoints to `<step>.unusable-<time>`: kept for inspection,
        out of orbax's sight, so the resumed run can save those steps again."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if os.path.isdir(src):
                    dst = f"{src}.unusable-{stamp}"
                    os.rename(src, dst)
                    log.warning("moved the unusable checkpoint %s aside to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dsv3_jax checkpoints set aside")
        self.manager.reload()

    @staticmethod
    def _verify(step: int, state: dict, meta: dict) -> None:
        want = meta.get("checksums")
        if want is None:
            raise CheckpointError(f"step {step}: no checksums in its metadata")
        got = [int(v) for v in np.asarray(jax.device_get(checksums(state))).tolist()]
        if len(got) != len(want):
            raise CheckpointError(f"step {step}: {len(got)} leaves restored, {len(want)} saved")
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if bad:
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
            raise CheckpointError(f"step {step}: checksum mismatch in {len(bad)} leaf(s), first "
                                  f"{paths[bad[0]]}")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(directory: str) -> tuple[dict, "Config", int]:
    """(params, config, step) of the newest verified checkpoint of any run of the training loop
    (pretraining, SFT, GRPO): the model is read from the checkpoint's own metadata, so no
    flag has to repeat it. Errors name the folder and what is missing."""
    from dsv3_jax.config import Config
    from dsv3_jax.train import step as train_step

    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    steps = sorted((int(p) for p in os.listdir(path) if p.isdigit()), reverse=True)
    if not steps:
        raise CheckpointError(f"{directory}: no checkpoint steps in it")
    meta = None
    for s in steps:
        f = os.path.join(path, str(s), "meta", "metadata")
        if os.path.exists(f):
            with open(f) as fh:
                meta = json.load(fh)
            break
    if meta is None or "config" not in meta:
        raise CheckpointError(f"{directory}: no readable checkpoint metadata with a model config")
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in meta["config"].items() if k in fields})
    # the optimizer's state has one structure whatever its schedule: any schedule restores it
    optimizer = train_step.make_optimizer(cfg, train_step.v3_schedule(1e-4, 100, 1))
    ckpt = Checkpoints(path, async_save=False)
    try:
        restored = ckpt.restore_latest(train_step.abstract_state(cfg, optimizer))
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{directory}: no checkpoint to restore")
    return restored.state["params"], cfg, restored.step
