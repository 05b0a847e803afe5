"""What a training run shows and keeps of each step: the JSONL record, the log line, the
progress bar and the MFU denominator."""

import json
import math
import os
import pathlib
import re
import sys
import time

import jax
import numpy as np

# Dense bf16 datasheet peaks (TFLOP/s per chip), the MFU denominator when --peak_tflops is unset.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0,
                    "B200": 2250.0, "GB200": 2500.0}

# metrics that are not a number per step, or that the record spells differently
_NOT_SCALARS = ("load", "mtp_load", "bias_abs_max", "finite", "applied")


def peak_tflops(override: float | None = None, device=None) -> float | None:
    """The MFU denominator: `override`, else the dense bf16 datasheet peak of `device` (default
    the first device) when its kind names a known GPU as a whole word, else None (CPUs)."""
    if override is not None:
        return override
    kind = (device or jax.devices()[0]).device_kind
    words = set(re.split(r"[^A-Za-z0-9]+", kind))  # "NVIDIA A100-SXM4-80GB" -> ..., "A100", ...
    for name, value in PEAK_BF16_TFLOPS.items():
        if name in words:
            return value
    return None


def record(step: int, m: dict, seconds: float, tokens: int, flops_per_token: float | None,
           peak: float | None, n_devices: int, with_loads: bool) -> dict:
    """One step's JSON record from its host-side metrics: every scalar metric as a float,
    `skipped` (the update was not applied), throughput and MFU, and from a per-layer expert
    `load` [L, E] its max/mean per layer (and, `with_loads`, the whole normalised matrix)."""
    rec = {"step": step}
    for key, value in m.items():
        if key not in _NOT_SCALARS and np.ndim(value) == 0:
            rec[key] = float(value)
    if "main_loss" in rec:
        rec.setdefault("mtp_loss", None)
    rec["skipped"] = not bool(m["applied"])
    rec["tokens_per_s"] = tokens / seconds if seconds > 0 and tokens else None
    rec["step_seconds"] = seconds
    rec["mfu"] = (rec["tokens_per_s"] * flops_per_token / (peak * 1e12 * n_devices)
                  if peak and flops_per_token and rec["tokens_per_s"] else None)
    load = np.asarray(m.get("load", np.zeros((0, 0))))
    if load.ndim == 2:
        balance = (load.max(-1) / np.maximum(load.mean(-1), 1e-9)) if load.size else load[:, 0]
        rec["load_max_over_mean"] = [round(float(v), 4) for v in balance]
        if with_loads and load.size:
            rec["expert_load"] = np.round(load / np.maximum(load.mean(-1, keepdims=True), 1e-9),
                                          3).tolist()
    if "bias_abs_max" in m:
        rec["bias_drift"] = [float(v) for v in np.asarray(m["bias_abs_max"])]
    return rec


def log_line(rec: dict, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """The periodic log line of a record: loss, the `extra` (metric, label) pairs, lr, |g|,
    expert load and throughput."""
    parts = [f"step {rec['step']:5d}", f"loss {rec['loss']:.4f}"]
    parts += [f"{label} {rec[key]:.4g}" for key, label in extra if rec.get(key) is not None]
    parts += [f"lr {rec['lr']:.2e}", f"|g| {rec['grad_norm']:.3f}"]
    if "load_max_over_mean" in rec:
        parts.append(f"load max/mean {max(rec['load_max_over_mean'], default=0):.2f}")
    if rec["tokens_per_s"] is not None:
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s"
                     + (f" mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""))
    if rec["skipped"]:
        parts.append("(not applied)")
    return "  ".join(parts)


class MetricsFile:
    """JSONL, one record per step; written by process 0 only. On resume the records after the
    restored step are dropped, so the file always describes one history."""

    def __init__(self, path: str | None, resume_step: int):
        self.path = pathlib.Path(path) if path and jax.process_index() == 0 else None
        self.fh = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and rec.get("step", math.inf) <= resume_step:
                    kept.append(line)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a", buffering=1)

    def write(self, rec: dict) -> None:
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.fh:
            self.fh.close()


class Progress:
    """A one-line progress bar on stderr when it is a terminal; nothing otherwise (the periodic
    log lines then show progress)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty() and jax.process_index() == 0
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        done = (step - self.start) / max(self.total - self.start, 1)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (1 - done) if done > 0 else 0.0
        bar = "#" * int(30 * step / self.total)
        sys.stderr.write(f"\r[{bar:<30}] {step}/{self.total} loss {loss:.3f} "
                         f"eta {eta:5.0f}s\033[K")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
