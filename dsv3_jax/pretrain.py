"""The pretraining loop: settings, data, the jitted step, orbax checkpoints, metrics, signals.

`experiments/pretrain.py` is its command line: every field of `Settings` is a flag of the same
name with the field's help text. `run(settings)` is the library entry (tests call it in
process). One loop serves one CPU, one GPU, a mesh of devices and several processes:

- State: `train.init_state` (or the newest verified checkpoint, restored straight onto this
  run's mesh, whatever mesh or process count wrote it). The data position is the step number
  (`data.PackedDataset`), recorded with the data's fingerprint in every checkpoint: a resume
  with a different corpus, sequence length, batch or seed is an error naming the flag.
- Step: `train.make_train_step`. Its metrics are read one step late, so the host never stalls
  the device queue waiting for a loss.
- Non-finite loss or gradient: the step itself keeps the old state (a poisoned state never
  exists, so it is never saved); `--nan_policy skip` goes on (and stops after
  `--max_consecutive_skips`), `stop` saves nothing new and exits with a report.
- Checkpoints: every `--checkpoint_every` steps, at the end, and on SIGTERM/SIGINT (then exit
  with 128 + the signal number, as a killed process would, so schedulers requeue).
- Metrics: one JSON record per step (written by process 0, flushed per line; on resume the
  records after the restored step are dropped, so the file always describes one history).
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax import train
from dsv3_jax.config import Config, get_config
from dsv3_jax.data import DataError, build_dataset

log = logging.getLogger("dsv3_jax.pretrain")

# Dense bf16 datasheet peaks (TFLOP/s per chip), the MFU denominator when --peak_tflops is unset.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0,
                    "B200": 2250.0, "GB200": 2500.0}


def _field(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class Settings:
    # --- model ---
    preset: str = _field("tiny", "config preset: tiny, small, v2_lite_16b, v2_236b, v3_671b")
    precision: str = _field("preset", "activation/matmul precision: preset (its own dtype: fp32 "
                            "for tiny, bf16 otherwise), fp32, bf16, or fp8 (= bf16 activations "
                            "+ DeepSeek-V3's FP8 GEMM inputs in the MLA projections, dense FFN "
                            "and experts; they run on the XLA reference path, dequantize + fp32 "
                            "matmul, unless --fp8_impl pallas: FP8 numerics, not FP8 speed; on "
                            "CPU always); master weights stay fp32",
                            choices=("preset", "fp32", "bf16", "fp8"))
    mtp_depth: int | None = _field(None, "MTP modules (default: the preset's; 0 turns MTP off)")
    mtp_weight: float | None = _field(None, "lambda, the MTP loss weight (default: preset's, 0.3)")
    balance_alpha: float | None = _field(None, "alpha of the sequence-wise balance loss "
                                         "(default: the preset's, 1e-4)")
    bias_gamma: float = _field(1e-2, "gamma, the router-bias update speed. V3 used 1e-3 over "
                               "~1M steps; short runs need a faster one to balance the experts")
    remat: str | None = _field(None, "rematerialisation per layer: none, full, dots, "
                               "dots_no_batch (default: the preset's)")
    scan_layers: bool = _field(True, "run each layer stack as one lax.scan (fast compile); "
                               "--no-scan_layers unrolls it: faster steps on a GPU (small on an "
                               "H200: 112 against 147 ms) at a longer compile")
    grouped_impl: str = _field("auto", "routed-expert GEMMs: auto (our Pallas grouped kernel on "
                               "GPU in bf16, ragged_dot otherwise), ragged_dot, pallas",
                               choices=("auto", "ragged_dot", "pallas"))
    attention_impl: str = _field("auto", "attention core: auto (cuDNN fused attention on GPU in "
                                 "bf16, XLA otherwise), xla, cudnn",
                                 choices=("auto", "xla", "cudnn"))
    fp8_impl: str = _field("auto", "FP8 GEMMs under --precision fp8: auto (pallas on a Hopper "
                           "GPU, xla elsewhere), xla (dequantize + fp32 matmul reference), "
                           "pallas (our Mosaic GPU FP8 kernels, Hopper)",
                           choices=("auto", "xla", "pallas"))
    fp8_quant_impl: str = _field("auto", "FP8 activation quantizers under --precision fp8: "
                                 "auto (pallas where the FP8 GEMMs run our kernels, xla "
                                 "elsewhere), xla (pallas_kernels/fp8_quant.py, two passes), "
                                 "pallas (the one-pass Mosaic GPU kernels of "
                                 "fp8_quant_kernel.py for the bf16 activations; Hopper, bf16 "
                                 "only)", choices=("auto", "xla", "pallas"))
    # --- devices ---
    mesh: str = _field("auto", "device mesh, e.g. 'fsdp=4,expert=2'; 'none' = the first device, "
                       "no mesh; 'auto' = 'none' with one device, fsdp over all when several")
    strategy: str = _field("fsdp", "sharding strategy: fsdp, fsdp_ep, fsdp_ep_tp")
    dispatch: str = _field("allgather", "expert-parallel dispatch: allgather, ragged_a2a (GPU), "
                           "ragged_a2a_emulated")
    distributed: str = _field("off", "multi-process: off; auto (jax.distributed.initialize() "
                              "reads SLURM/Open MPI/... from the environment); manual (the three "
                              "flags below)", choices=("off", "auto", "manual"))
    coordinator: str | None = _field(None, "manual: host:port of process 0")
    num_processes: int | None = _field(None, "manual: number of processes")
    process_id: int | None = _field(None, "manual: this process's index")
    # --- optimisation ---
    steps: int = _field(600, "optimizer steps in the whole run (a resume continues to this)")
    global_batch: int = _field(16, "sequences per optimizer step, over all devices")
    seq_len: int = _field(128, "tokens per sequence")
    grad_accum: int = _field(1, "micro-batches per step (splits --global_batch)")
    lr: float = _field(3e-3, "peak learning rate (V3: 2.2e-4 at 671B)")
    warmup_steps: int | None = _field(None, "linear warmup steps (default: 5%% of --steps)")
    weight_decay: float = _field(0.1, "AdamW weight decay on matrices (not on norm gains)")
    clip_norm: float = _field(1.0, "gradient clipping at this global norm")
    nan_policy: str = _field("skip", "on a NaN/Inf loss or gradient: skip the step, or stop with "
                             "a report", choices=("skip", "stop"))
    max_consecutive_skips: int = _field(10, "stop after this many skipped steps in a row")
    inject_nan_step: int | None = _field(None, "fault injection (tests): make this step's loss "
                                         "and gradients NaN")
    seed: int = _field(0, "seed of the initial weights and of the data order")
    # --- data ---
    data: list[str] = _field(None, "text or .jsonl files or folders of them (default: the "
                             "embedded corpus, the Python standard library's sources)",
                             nargs="*")
    text_field: str = _field("text", "the field of each .jsonl record that holds its text")
    embedded_bytes: int = _field(4_000_000, "bytes of the embedded corpus to read")
    # --- checkpoints ---
    checkpoint_dir: str | None = _field(None, "orbax checkpoint folder; a run with the same "
                                        "folder resumes from its latest complete checkpoint")
    checkpoint_every: int = _field(100, "save every N steps (and at the end, and on SIGTERM)")
    keep_checkpoints: int = _field(3, "keep the newest N checkpoints")
    async_checkpoint: bool = _field(True, "write checkpoints in the background")
    # --- output ---
    metrics_file: str | None = _field(None, "JSONL metrics, one record per step")
    log_every: int = _field(25, "print a line (and record per-expert loads) every N steps")
    progress: bool = _field(True, "progress bar on a terminal")
    peak_tflops: float | None = _field(None, "per-device peak for MFU (default: the bf16 "
                                       "datasheet peak of known GPUs; none on CPU)")
    sample_tokens: int = _field(64, "greedy tokens to sample at the end (0: none)")
    sample_prompt: str = _field("def ", "prompt of the final greedy sample")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose: non-finite values under --nan_policy stop, or a signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- set-up


def init_distributed(s: Settings) -> None:
    if s.distributed == "off":
        return
    if s.distributed == "auto":
        jax.distributed.initialize()
    else:
        missing = [f"--{f}" for f in ("coordinator", "num_processes", "process_id")
                   if getattr(s, f) is None]
        if missing:
            raise ValueError(f"--distributed manual needs {', '.join(missing)}")
        jax.distributed.initialize(s.coordinator, num_processes=s.num_processes,
                                   process_id=s.process_id)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def build_config(s: Settings) -> Config:
    over: dict[str, Any] = {"bias_update_speed": s.bias_gamma, "grouped_impl": s.grouped_impl,
                            "attention_impl": s.attention_impl, "scan_layers": s.scan_layers,
                            "fp8": s.precision == "fp8", "fp8_impl": s.fp8_impl,
                            "fp8_quant_impl": s.fp8_quant_impl}
    if s.precision != "preset":
        over["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[s.precision]
    for flag, field in (("mtp_depth", "mtp_depth"), ("mtp_weight", "mtp_loss_weight"),
                        ("balance_alpha", "balance_loss_alpha"), ("remat", "remat")):
        if getattr(s, flag) is not None:
            over[field] = getattr(s, flag)
    return get_config(s.preset, **over)


def build_sharding(s: Settings):
    """None (one device, no mesh) or a ShardingContext."""
    from sharding.context import ShardingContext
    from sharding.mesh import make_mesh

    spec = s.mesh
    if spec == "none":
        return None
    if spec == "auto":
        if jax.device_count() == 1:
            return None
        spec = f"fsdp={jax.device_count()}"
    return ShardingContext(make_mesh(spec), s.strategy, s.dispatch)


def check_settings(s: Settings, shard) -> None:
    for name in ("steps", "global_batch", "seq_len", "grad_accum", "checkpoint_every",
                 "keep_checkpoints", "log_every", "max_consecutive_skips"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(s, name)}")
    if s.global_batch % s.grad_accum:
        raise ValueError(f"--global_batch {s.global_batch} is not a multiple of --grad_accum "
                         f"{s.grad_accum}")
    if shard is not None:
        n = math.prod(shard.sizes[a] for a in shard.batch_axes)
        if (s.global_batch // s.grad_accum) % n:
            raise ValueError(f"each micro-batch ({s.global_batch // s.grad_accum} sequences) must "
                             f"split evenly over the {n} devices of the batch axes "
                             f"{shard.batch_axes}; change --global_batch or --mesh")
    if s.warmup_steps is not None and not 0 <= s.warmup_steps < s.steps:
        raise ValueError(f"--warmup_steps {s.warmup_steps} must be in [0, --steps {s.steps})")


def _data_files(paths: list[str] | None) -> list[str] | None:
    """Files named, and the files inside folders named (sorted, so every host sees one order)."""
    if not paths:
        return None
    out = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"{p}: folder has no files")
            out += [str(f) for f in found]
        else:
            out.append(str(p))
    return out


# ----------------------------------------------------------------------------- host helpers


def host_value(x) -> np.ndarray:
    """A replicated (or single-device) array as numpy, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise ValueError("host_value needs a replicated array")
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def place_batch(rows: dict, shard) -> dict:
    """The step's batch on the devices. With a mesh every device asks the dataset for exactly its
    rows, so each process reads only the rows its devices hold."""
    if shard is None:
        return {k: jnp.asarray(v) for k, v in rows(None).items()}
    from dsv3_jax.placement import batch_sharding

    sharding = batch_sharding(shard, 2)
    shape = rows.shape

    def array(key):
        return jax.make_array_from_callback(shape, sharding, lambda idx: rows(idx[0])[key])

    return {"inputs": array("inputs"), "targets": array("targets")}


class _Rows:
    """rows(slice) of one step's global batch (a small cache: inputs and targets share reads)."""

    def __init__(self, dataset, step: int):
        self.dataset, self.step = dataset, step
        self.shape = (dataset.global_batch, dataset.seq_len)
        self._cache = {}

    def __call__(self, rows: slice | None):
        key = None if rows is None else (rows.start, rows.stop, rows.step)
        if key not in self._cache:
            self._cache[key] = self.dataset.rows(self.step, rows)
        return self._cache[key]


class MetricsFile:
    """JSONL, one record per step; written by process 0 only."""

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

    def write(self, record: dict) -> None:
        if self.fh:
            self.fh.write(json.dumps(record) + "\n")

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


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.received = None
        self._old = {}
        self._in_flight = None  # the last poll's cross-process max (several processes)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def poll(self) -> int | None:
        """The signal number to stop for, the same in every process, or None.

        One process: the flag itself. Several: each call dispatches a max of every process's
        flag over all devices and returns the previous call's result, so the host never waits
        on a collective (the earlier version paid a blocking `process_allgather` every step).
        The previous result was computed before the step just dispatched, so reading it costs
        nothing more than reading that step's metrics; a signal stops every process after the
        same step, one step later than in a single-process run."""
        mine = 0 if self.received is None else int(self.received)
        if jax.process_count() == 1:
            return mine or None
        previous, self._in_flight = self._in_flight, _process_max(mine)
        if previous is None:
            return None
        return int(np.asarray(previous.addressable_data(0))) or None


def _process_max(value: int) -> jax.Array:
    """max over processes of `value`, as a replicated device scalar (dispatched, not waited for):
    one int32 per device in a global array, reduced by one jitted max."""
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("p",))
    local = np.full((jax.local_device_count(),), value, np.int32)
    flags = jax.make_array_from_process_local_data(NamedSharding(mesh, P("p")), local)
    return _max_fn(mesh)(flags)


_MAX_FNS: dict = {}


def _max_fn(mesh):
    """One jitted max per mesh (one compile for the run)."""
    if mesh not in _MAX_FNS:
        _MAX_FNS[mesh] = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    return _MAX_FNS[mesh]


# ----------------------------------------------------------------------------- the loop


def _record(step: int, m: dict, seconds: float, tokens: int, flops_per_token: float,
            peak: float | None, n_devices: int, with_loads: bool) -> dict:
    """One step's JSON record from its host-side metrics."""
    load = m["load"]
    balance = (load.max(-1) / np.maximum(load.mean(-1), 1e-9)) if load.size else load
    rec = {"step": step, "loss": float(m["loss"]), "main_loss": float(m["main_loss"]),
           "mtp_loss": float(m["mtp_loss"]) if "mtp_loss" in m else None,
           "balance_loss": float(m["balance_loss"]), "grad_norm": float(m["grad_norm"]),
           "lr": float(m["lr"]), "skipped": not bool(m["finite"]),
           "tokens_per_s": tokens / seconds if seconds > 0 else None,
           "step_seconds": seconds,
           "load_max_over_mean": [round(float(v), 4) for v in balance],
           "bias_drift": [float(v) for v in m.get("bias_abs_max", [])]}
    rec["mfu"] = (rec["tokens_per_s"] * flops_per_token / (peak * 1e12 * n_devices)
                  if peak and rec["tokens_per_s"] else None)
    if with_loads and load.size:
        rec["expert_load"] = np.round(load / np.maximum(load.mean(-1, keepdims=True), 1e-9),
                                      3).tolist()
    return rec


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


def _check_resume(meta: dict, dataset, cfg: Config) -> None:
    saved = meta.get("data", {})
    now = dataset.state(0)
    flags = {"fingerprint": "--data/--embedded_bytes", "seq_len": "--seq_len",
             "global_batch": "--global_batch", "seed": "--seed"}
    for key, flag in flags.items():
        if key in saved and saved[key] != now[key]:
            raise ValueError(f"the checkpoint was written with a different {key} ({saved[key]!r}, "
                             f"now {now[key]!r}): resume with the same {flag}, or use a new "
                             "--checkpoint_dir")
    saved_cfg = meta.get("config", {})
    for key, value in dataclasses.asdict(cfg).items():
        if key in ("bias_update_speed", "mtp_loss_weight", "balance_loss_alpha", "remat",
                   "grouped_impl", "attention_impl", "scan_layers", "fp8", "fp8_impl",
                   "fp8_quant_impl"):
            # may change between stages of a run (kernels: between machines; FP8 GEMMs are a
            # compute choice over the same fp32 master weights, so bf16 <-> fp8 may switch)
            continue
        if key in saved_cfg and saved_cfg[key] != (list(value) if isinstance(value, tuple) else value):
            raise ValueError(f"the checkpoint's model differs in {key} ({saved_cfg[key]!r}, now "
                             f"{value!r}): resume with the same --preset and model flags")


def run(s: Settings) -> dict:
    """Train; returns a summary (steps run, first/last losses, where things were written)."""
    init_distributed(s)
    cfg = build_config(s)
    shard = build_sharding(s)
    check_settings(s, shard)
    dataset, tokenizer = build_dataset(
        _data_files(s.data), seq_len=s.seq_len, global_batch=s.global_batch, seed=s.seed,
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, text_field=s.text_field,
        embedded_bytes=s.embedded_bytes)
    warmup = s.warmup_steps if s.warmup_steps is not None else max(1, round(0.05 * s.steps))
    schedule = train.v3_schedule(s.lr, s.steps, min(warmup, s.steps - 1))
    optimizer = train.make_optimizer(schedule, weight_decay=s.weight_decay, clip_norm=s.clip_norm)
    counts = cfg.param_count()
    main = jax.process_index() == 0
    if main:
        fp8 = (f" + fp8 GEMMs ({cfg.resolved_fp8_impl()}, quantizers {cfg.resolved_fp8_quant_impl()})"
               if cfg.fp8 else "")
        print(f"preset {cfg.name} ({cfg.dtype}{fp8}): {counts['main']:,} parameters, "
              f"{counts['activated']:,} activated per token, {counts['mtp']:,} MTP; "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
              f"{'' if shard is None else ', mesh ' + str(dict(shard.mesh.shape))}; corpus "
              f"{len(dataset.stream):,} tokens = {dataset.n_windows:,} sequences of {s.seq_len}",
              flush=True)

    ckpt = None
    state, start = None, 0
    if s.checkpoint_dir:
        from dsv3_jax.checkpoint import Checkpoints

        ckpt = Checkpoints(s.checkpoint_dir, keep=s.keep_checkpoints,
                           async_save=s.async_checkpoint)
        restored = ckpt.restore_latest(train.abstract_state(cfg, optimizer, shard))
        if restored is not None:
            _check_resume(restored.meta, dataset, cfg)
            state, start = restored.state, restored.step
            for step, why in restored.skipped:
                print(f"checkpoint step {step} is unusable ({why}); resumed from step {start}",
                      flush=True)
            if main:
                print(f"resumed from {ckpt.directory} at step {start}", flush=True)
    if state is None:
        state = train.init_state(cfg, jax.random.key(s.seed), optimizer, shard)
    if start >= s.steps:
        if main:
            print(f"nothing to do: the checkpoint is at step {start} and --steps is {s.steps}")
        summary = {"steps_run": 0, "start_step": start, "history": []}
        if ckpt:
            ckpt.close()
        return summary

    step_fn = train.make_train_step(cfg, optimizer, schedule, shard, grad_accum=s.grad_accum)
    metrics = MetricsFile(s.metrics_file, start)
    progress = Progress(s.steps, start, s.progress)
    fpt = cfg.flops_per_token(s.seq_len)
    peak = peak_tflops(s.peak_tflops)
    tokens_per_step = s.global_batch * s.seq_len
    n_dev = jax.device_count()
    history, skips_in_row = [], 0

    def meta(step):
        return {"data": dataset.state(step), "config": json.loads(json.dumps(
            dataclasses.asdict(cfg))), "settings": json.loads(json.dumps(dataclasses.asdict(s)))}

    def save(step, wait=False):
        if ckpt is None:
            return
        ckpt.save(step, state, meta(step))
        if wait:
            ckpt.wait()

    def batch_for(step):
        batch = place_batch(_Rows(dataset, step), shard)
        if s.inject_nan_step is not None:
            poison = np.float32(np.nan if step + 1 == s.inject_nan_step else 0.0)
            batch["poison"] = (jnp.asarray(poison) if shard is None else jax.device_put(
                poison, NamedSharding(shard.mesh, P())))
        return batch

    def finish(step: int, m_dev, t_dispatch: float, t_prev: float) -> float:
        """Read step `step`'s metrics (blocks until they exist), log and record them."""
        nonlocal skips_in_row
        m = {k: host_value(v) for k, v in m_dev.items()}
        now = time.perf_counter()
        rec = _record(step, m, now - t_prev, tokens_per_step, fpt, peak, n_dev,
                      with_loads=(step % s.log_every == 0 or step == s.steps or step == start + 1))
        metrics.write(rec)
        history.append({"step": step, "loss": rec["loss"]})
        progress.update(step, rec["loss"])
        if rec["skipped"]:
            skips_in_row += 1
            report = (f"step {step}: non-finite loss {rec['loss']} or gradient norm "
                      f"{rec['grad_norm']}; the update was not applied")
            if s.nan_policy == "stop" or skips_in_row >= s.max_consecutive_skips:
                why = ("--nan_policy stop" if s.nan_policy == "stop" else
                       f"{skips_in_row} skipped steps in a row (--max_consecutive_skips)")
                raise TrainingStopped(f"{report}. Stopping ({why}); the newest checkpoint holds "
                                      "the last good state.", exit_code=3)
            progress.clear()
            log.warning("%s (skipped, --nan_policy skip)", report)
        else:
            skips_in_row = 0
        if main and (step % s.log_every == 0 or step == s.steps or step == start + 1):
            progress.clear()
            mfu = f" mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
            print(f"step {step:5d}  loss {rec['loss']:.4f}  main {rec['main_loss']:.4f}  "
                  f"lr {rec['lr']:.2e}  |g| {rec['grad_norm']:.3f}  load max/mean "
                  f"{max(rec['load_max_over_mean'], default=0):.2f}  "
                  f"{rec['tokens_per_s']:,.0f} tok/s{mfu}", flush=True)
        return now

    t_prev = time.perf_counter()
    pending = None  # (step, metrics on device) of the step in flight
    try:
        with _Signals() as signals:
            for i in range(start, s.steps):
                batch = batch_for(i)
                state, m_dev = step_fn(state, batch)
                if pending is not None:
                    t_prev = finish(*pending, t_prev)
                pending = (i + 1, m_dev, 0.0)
                stop_sig = signals.poll()
                if stop_sig is not None:
                    t_prev = finish(*pending, t_prev)
                    pending = None
                    save(i + 1, wait=True)
                    raise TrainingStopped(f"stopped by {signal.Signals(stop_sig).name} after step "
                                          f"{i + 1}; checkpoint saved" if ckpt else
                                          f"stopped by {signal.Signals(stop_sig).name} after "
                                          f"step {i + 1} (no --checkpoint_dir: nothing saved)",
                                          exit_code=128 + stop_sig)
                if ckpt and ((i + 1) % s.checkpoint_every == 0 or i + 1 == s.steps):
                    # the metrics are read first: a non-finite step stops here, unsaved
                    t_prev = finish(*pending, t_prev)
                    pending = None
                    save(i + 1)
            if pending is not None:
                finish(*pending, t_prev)
    finally:
        progress.clear()
        metrics.close()
        if ckpt:
            ckpt.close()  # waits for the last save to be committed
    summary = {"steps_run": s.steps - start, "start_step": start, "history": history,
               "state": state, "config": cfg, "tokenizer": tokenizer, "shard": shard}
    return summary


# ----------------------------------------------------------------------------- command line


def settings_parser(description: str = "") -> "argparse.ArgumentParser":
    """argparse flags from `Settings`: one flag per field, same name, its help and default."""
    import argparse
    import types
    import typing

    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        kw = {"default": f.default, "help": f.metadata["help"]}
        base = hints[f.name]
        if isinstance(base, types.UnionType):  # `int | None`: the flag takes an int
            base = next(t for t in typing.get_args(base) if t is not type(None))
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw["nargs"] = f.metadata.get("nargs", "*")
        else:
            kw["type"] = base
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        ap.add_argument(f"--{f.name}", **kw)
    return ap


def parse_settings(argv=None, description: str = "") -> Settings:
    return Settings(**vars(settings_parser(description).parse_args(argv)))


def greedy_sample(params: dict, cfg: Config, prompt: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens after `prompt` with `dsv3_jax.generate`: one jitted prefill + decode loop
    over the latent cache (in the model's dtype), the weights sent to the device once. (The
    former loop of forward_cached calls took the fp32 weights from the host on every call,
    5 GB a token for `small`, and compiled two programs: on an H200 a run's 250 s limit caught
    it still sampling.)"""
    from dsv3_jax import generate

    if len(prompt) + n > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + {n} tokens exceed max_seq_len {cfg.max_seq_len}")
    params = jax.tree.map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, params)
    out = generate(params, cfg, [np.asarray(prompt).tolist()], n,
                   cache_dtype=jnp.dtype(cfg.dtype))
    return np.array(out[0], np.int32)


def gather_params(params: dict) -> dict:
    """The whole parameter tree on this host (from a mesh of one or several processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    return jax.device_get(params)


def main(argv=None, description: str = "") -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = parse_settings(argv, description)
    try:
        out = run(s)
    except TrainingStopped as e:
        print(f"pretrain: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (DataError, ValueError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    hist = out["history"]
    if hist and jax.process_index() == 0:
        first, last = hist[0], hist[-1]
        tail = [h["loss"] for h in hist[-max(1, len(hist) // 10):]]
        print(f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
              f"{last['step']} (mean of the last {len(tail)} steps {np.mean(tail):.3f})")
    if s.sample_tokens and "state" in out:
        # one process: the trained weights where they are; several: gathered to every host
        params = out["state"]["params"]
        params = params if jax.process_count() == 1 else gather_params(params)
        if jax.process_index() == 0:
            tok, cfg = out["tokenizer"], out["config"]
            prompt = tok.encode(s.sample_prompt)
            sample = greedy_sample(params, cfg, prompt, s.sample_tokens)
            print(f"greedy sample: {tok.decode(np.concatenate([prompt, sample]))!r}")
    return 0
