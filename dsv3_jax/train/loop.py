"""The one training loop: pretraining, SFT and GRPO each bring a `Job` (a step function, its data
and how to describe and check a checkpoint) and this loop runs it.

What the loop owns, for every kind of training:
- State: the job's fresh state, or the newest verified checkpoint (restored straight onto the
  job's shardings, whatever mesh or process count wrote it). The job's `check_resume` sees a
  checkpoint's meta before its arrays are read, so a run that does not match (another model,
  other data) is an error naming what differs, not an unreadable checkpoint.
- Steps: `job.step(state, batch, guard)`. Its metrics are read one step late, so the host never
  stalls the device queue waiting for a loss.
- Failed steps: the step itself keeps the old state when its loss or gradient norm is not
  finite or spikes above the guard's thresholds (`Guard`: a multiple of the median of recent
  applied steps), so a poisoned or diverged update never exists. `nan_policy` "skip" goes on
  and stops after `max_consecutive_skips` failed steps in a row; "stop" stops at the first.
  Nothing is saved during a streak of failed steps, the last checkpoint written before the
  streak is protected from deletion, and a run that ends in a streak exits non-zero.
- Checkpoints: every `checkpoint_every` steps, at the end, and on SIGTERM/SIGINT (then exit
  with 128 + the signal number, as a killed process would, so schedulers requeue); where each
  one went is printed.
- Metrics: one JSON record per step (`metrics.record`, written by process 0, flushed per
  line; on resume the records after the restored step are dropped), a log line every
  `log_every` steps, a progress bar on a terminal.
- At the end: the job's `sample` (e.g. a greedy continuation), printed.
"""

import collections
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from dsv3_jax.train.checkpoint import Checkpoints
from dsv3_jax.train.metrics import MetricsFile, Progress, log_line, peak_tflops, record
from dsv3_jax.train.signals import Signals

log = logging.getLogger("dsv3_jax.train")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose: failed steps (see the module docstring) or a signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True, kw_only=True)
class Guard:
    """When a finite step still counts as failed: its loss above `loss_factor` x, or its
    gradient norm above `grad_norm_factor` x, the median of the last `window` applied steps,
    once `warmup` steps have been applied; or, from the first step, an update whose global
    norm exceeds `max_update_ratio` x the weights' global norm (a learning rate that would
    replace the weights rather than move them). 0 turns a check off. The defaults sit well
    above what a healthy run shows: the `tiny` main job's largest ratios over its 600 steps
    are 1.4 (loss) and 7.1 (gradient norm), and Adam moves each weight by about the learning
    rate, so the update ratio is about lr / the weights' RMS (0.15 for that job)."""
    loss_factor: float = 2.0
    grad_norm_factor: float = 20.0
    max_update_ratio: float = 1.0
    window: int = 32
    warmup: int = 4

    def __post_init__(self):
        for f in ("loss_factor", "grad_norm_factor"):
            v = getattr(self, f)
            if not (v == 0 or v > 1):
                raise ValueError(f"Guard.{f} must be 0 (off) or > 1, got {v!r}")
        if not self.max_update_ratio >= 0:
            raise ValueError(f"Guard.max_update_ratio must be >= 0 (0: off), got "
                             f"{self.max_update_ratio!r}")
        for f in ("window", "warmup"):
            if getattr(self, f) < 1:
                raise ValueError(f"Guard.{f} must be >= 1, got {getattr(self, f)!r}")

    def thresholds(self, losses, grad_norms) -> dict:
        """The step's `guard` argument (float32 scalars) from the applied steps so far; no
        "max_update_ratio" key when that check is off (the step then skips its pass)."""
        out = {"max_loss": np.float32(np.inf), "max_grad_norm": np.float32(np.inf)}
        if self.max_update_ratio:
            out["max_update_ratio"] = np.float32(self.max_update_ratio)
        if len(losses) >= self.warmup:
            for key, factor, seen in (("max_loss", self.loss_factor, losses),
                                      ("max_grad_norm", self.grad_norm_factor, grad_norms)):
                if factor:
                    out[key] = np.float32(factor * np.median(list(seen)[-self.window:]))
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopOptions:
    steps: int  # optimizer steps in the whole run (a resume continues to this)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    metrics_file: str | None = None
    log_every: int = 25
    progress: bool = True
    nan_policy: str = "skip"  # "skip" | "stop"
    max_consecutive_skips: int = 10
    guard: Guard = Guard()
    peak_tflops: float | None = None

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every",
                     "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.nan_policy not in ("skip", "stop"):
            raise ValueError(f"--nan_policy must be skip or stop, got {self.nan_policy!r}")


@dataclasses.dataclass(kw_only=True)
class Job:
    """What the loop needs from one kind of training."""
    name: str  # for messages: "pretrain", "sft", "grpo"
    init_state: Callable[[], Any]  # a fresh state
    abstract_state: Callable[[], Any]  # the restore target: ShapeDtypeStructs with shardings
    step: Callable  # (state, batch, guard) -> (state, metrics with loss, grad_norm, lr, applied)
    batch: Callable[[int], dict]  # the batch of step i, a pure function of i (exact resume)
    meta: Callable[[int], dict]  # JSON kept with checkpoint i (data position, config, ...)
    check_resume: Callable[[dict], None] = lambda meta: None  # raise ValueError naming a mismatch
    tokens_per_step: int = 0
    flops_per_token: float | None = None
    log_fields: tuple[tuple[str, str], ...] = ()  # extra (metric, label) pairs for log lines
    sample: Callable[[Any], str] | None = None  # a line printed at the end, from the final state
    # (state, loads [L, E] summed since the last call) -> state, every `rebalance_every` steps:
    # redundant experts re-placed from measured loads (pretrain --redundant_experts)
    rebalance: Callable[[Any, np.ndarray], Any] | None = None
    rebalance_every: int = 0


@dataclasses.dataclass
class Result:
    steps_run: int
    start_step: int
    history: list  # [{"step", "loss", "applied"}]
    state: Any = None


def host_value(x) -> np.ndarray:
    """A replicated (or single-device) array as numpy, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise ValueError("host_value needs a replicated array")
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


class _Run:
    """The state of one `run`: the loop's bookkeeping, split out so each part stays small."""

    def __init__(self, job: Job, opts: LoopOptions, ckpt, start: int):
        self.job, self.opts, self.ckpt, self.start = job, opts, ckpt, start
        self.metrics = MetricsFile(opts.metrics_file, start)
        self.progress = Progress(opts.steps, start, opts.progress)
        self.peak = peak_tflops(opts.peak_tflops)
        self.history: list = []
        self.streak = 0  # failed steps in a row
        # the recent applied steps the guard's medians read (bounded: a run may be long)
        self.applied_losses = collections.deque(maxlen=opts.guard.window)
        self.applied_grad_norms = collections.deque(maxlen=opts.guard.window)
        self.t_prev = time.perf_counter()
        self.load_sum = None  # [L, E] tokens per expert since the last rebalance

    def guard(self) -> dict:
        return self.opts.guard.thresholds(self.applied_losses, self.applied_grad_norms)

    def finish(self, step: int, m_dev: dict) -> None:
        """Read step `step`'s metrics (blocks until they exist), record and judge them."""
        m = {k: host_value(v) for k, v in m_dev.items()}
        now = time.perf_counter()
        if "load" in m and bool(m["applied"]):
            load = np.asarray(m["load"], np.float64)
            self.load_sum = load if self.load_sum is None else self.load_sum + load
        opts = self.opts
        logged = step % opts.log_every == 0 or step == opts.steps or step == self.start + 1
        rec = record(step, m, now - self.t_prev, self.job.tokens_per_step,
                     self.job.flops_per_token, self.peak, jax.device_count(), with_loads=logged)
        self.t_prev = now
        self.metrics.write(rec)
        self.history.append({"step": step, "loss": rec["loss"], "applied": not rec["skipped"]})
        self.progress.update(step, rec["loss"])
        if rec["skipped"]:
            self._failed(step, rec)
        else:
            self.streak = 0
            self.applied_losses.append(rec["loss"])
            self.applied_grad_norms.append(rec["grad_norm"])
        if logged:
            self.progress.clear()
            _say(log_line(rec, self.job.log_fields))

    def _failed(self, step: int, rec: dict) -> None:
        if self.streak == 0 and self.ckpt is not None and self.ckpt.latest_step() is not None:
            # the last state saved before the streak must survive whatever is saved later
            self.ckpt.protect(self.ckpt.latest_step())
        self.streak += 1
        if not (np.isfinite(rec["loss"]) and np.isfinite(rec["grad_norm"])):
            what = f"non-finite loss {rec['loss']:.4g} or gradient norm {rec['grad_norm']:.4g}"
        elif rec.get("update_ratio", 0) > self.opts.guard.max_update_ratio > 0:
            what = (f"an update {rec['update_ratio']:.3g} x the weights' norm (above "
                    f"--max_update_ratio {self.opts.guard.max_update_ratio:g})")
        else:
            what = (f"spiking loss {rec['loss']:.4g} or gradient norm {rec['grad_norm']:.4g} "
                    "(above --spike_loss_factor / --spike_grad_factor x the recent median)")
        report = f"step {step}: {what}; the update was not applied"
        if self.opts.nan_policy == "stop" or self.streak >= self.opts.max_consecutive_skips:
            why = ("--nan_policy stop" if self.opts.nan_policy == "stop" else
                   f"{self.streak} failed steps in a row (--max_consecutive_skips)")
            raise TrainingStopped(f"{report}. Stopping ({why}); {self._last_good()}",
                                  exit_code=3)
        self.progress.clear()
        log.warning("%s (skipped, --nan_policy skip)", report)

    def _last_good(self) -> str:
        if self.ckpt is None or self.ckpt.latest_step() is None:
            return "no checkpoint was written"
        return (f"the newest checkpoint, step {self.ckpt.latest_step()} in "
                f"{self.ckpt.directory}, was written before the failed steps")

    def save(self, step: int, state, wait: bool = False) -> None:
        if self.ckpt is None:
            return
        if self.streak:  # never save a state that failed steps may have reached
            log.warning("step %d: not saving a checkpoint during a streak of %d failed steps",
                        step, self.streak)
            return
        self.ckpt.save(step, state, self.job.meta(step))
        _say(f"checkpoint step {step} -> {os.path.join(self.ckpt.directory, str(step))}"
             f"{' (written in the background)' if not wait and self.opts.async_checkpoint else ''}")
        if wait:
            self.ckpt.wait()

    def close(self) -> None:
        self.progress.clear()
        self.metrics.close()
        if self.ckpt:
            self.ckpt.close()  # waits for the last save to be committed


def _restore(job: Job, opts: LoopOptions):
    """(checkpoints or None, state, start step)."""
    if not opts.checkpoint_dir:
        _say(f"no --checkpoint_dir: nothing will be saved (add --checkpoint_dir DIR to keep "
             "checkpoints and resume)")
        return None, job.init_state(), 0
    ckpt = Checkpoints(opts.checkpoint_dir, keep=opts.keep_checkpoints,
                       async_save=opts.async_checkpoint)
    restored = ckpt.restore_latest(job.abstract_state(), check=job.check_resume)
    if restored is None:
        _say(f"checkpoints go to {ckpt.directory} (every {opts.checkpoint_every} steps and at "
             "the end)")
        return ckpt, job.init_state(), 0
    for step, why in restored.skipped:
        _say(f"checkpoint step {step} is unusable ({why}); resumed from step {restored.step}")
    _say(f"resumed from {ckpt.directory} at step {restored.step}")
    return ckpt, restored.state, restored.step


def run(job: Job, opts: LoopOptions) -> Result:
    """Train `job` to `opts.steps`; returns what ran (raises TrainingStopped, see above)."""
    ckpt, state, start = _restore(job, opts)
    if start >= opts.steps:
        _say(f"nothing to do: the checkpoint is at step {start} and --steps is {opts.steps}")
        if ckpt:
            ckpt.close()
        return Result(0, start, [], state)
    step_fn = _compiled(job, state, start, opts.guard)
    r = _Run(job, opts, ckpt, start)
    pending = None  # (step, metrics on device) of the step in flight
    try:
        with Signals() as signals:
            for i in range(start, opts.steps):
                state, m_dev = step_fn(state, job.batch(i), r.guard())
                if pending is not None:
                    r.finish(*pending)
                pending = (i + 1, m_dev)
                stop_sig = signals.poll()
                if stop_sig is not None:
                    r.finish(*pending)
                    pending = None
                    r.save(i + 1, state, wait=True)
                    name = signal.Signals(stop_sig).name
                    saved = ("checkpoint saved" if ckpt and not r.streak else
                             "nothing saved (no --checkpoint_dir)" if not ckpt else
                             "nothing saved (a streak of failed steps)")
                    raise TrainingStopped(f"stopped by {name} after step {i + 1}; {saved}",
                                          exit_code=128 + stop_sig)
                every = job.rebalance_every if job.rebalance is not None else 0
                if every and (i + 1) % every == 0 and i + 1 < opts.steps:
                    if pending is not None:  # its loads count
                        r.finish(*pending)
                        pending = None
                    if r.load_sum is not None:
                        state = job.rebalance(state, r.load_sum)
                        r.load_sum = None
                if ckpt and ((i + 1) % opts.checkpoint_every == 0 or i + 1 == opts.steps):
                    # the metrics are read first: a failed step is not saved
                    r.finish(*pending)
                    pending = None
                    r.save(i + 1, state)
            if pending is not None:
                r.finish(*pending)
        if r.streak:
            raise TrainingStopped(f"the run ended in a streak of {r.streak} failed steps; "
                                  f"{r._last_good()}", exit_code=3)
    finally:
        r.close()
    if job.sample is not None:
        _say(job.sample(state))
    return Result(opts.steps - start, start, r.history, state)


def _compiled(job: Job, state, start: int, guard: Guard):
    """The job's step compiled ahead of the first step, so that the wait is announced and the
    first step's throughput does not include it (a step that is not a jitted function runs
    as it is). `guard` sets which checks the step holds (its thresholds' keys)."""
    if not hasattr(job.step, "lower"):
        return job.step
    _say(f"compiling the {job.name} step...")
    t0 = time.perf_counter()
    guard = guard.thresholds([], [])
    compiled = job.step.lower(state, job.batch(start), guard).compile()
    _say(f"compiled in {time.perf_counter() - t0:.1f} s")
    return compiled
