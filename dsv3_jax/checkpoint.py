"""Training checkpoints with orbax: async, atomic, keep-last-N, verified on restore.

Each checkpoint holds two items: `state` (params, optimizer state, router state, step, RNG:
`train.abstract_state`) and `meta` (JSON: the data position, the run's config, and a checksum
per state leaf). orbax writes into `<step>.orbax-checkpoint-tmp*` and renames when complete, so
a crash during a save leaves the previous step as the latest finalised one. Restoring targets
the *current* run's shardings, so a checkpoint restores onto a different mesh or process count.

A checkpoint that orbax cannot read, or whose leaves' checksums do not match what was saved
(bit rot, a truncated or edited file), is reported with its step and the reason, and the
restore falls back to the next older step; the unusable one is renamed
`<step>.unusable-<time>` (kept for inspection, ignored by orbax).
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsv3_jax.train import checksums

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


@dataclasses.dataclass
class Restored:
    step: int
    state: dict
    meta: dict
    skipped: list[tuple[int, str]]  # newer steps that were unreadable, and why


class Checkpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                             options=options)

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices)."""
        sums = np.asarray(jax.device_get(checksums(state))).tolist()
        meta = {**meta, "step": int(step), "checksums": [int(v) for v in sums]}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, target: dict) -> Restored | None:
        """The newest readable, verified checkpoint restored into `target` (a tree of
        ShapeDtypeStructs with shardings), or None if there is no checkpoint at all."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                self._verify(step, out.state, out.meta)
            except Exception as e:  # reported and skipped, never silently: see the docstring
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.error("checkpoint step %d in %s is unreadable (%s); trying an older one",
                          step, self.directory, reason)
                skipped.append((step, reason))
                continue
            if skipped:
                self._set_aside([s for s, _ in skipped])
            return Restored(step, out.state, dict(out.meta), skipped)
        if skipped:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: " +
                                  "; ".join(f"step {s}: {r}" for s, r in skipped))
        return None

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
