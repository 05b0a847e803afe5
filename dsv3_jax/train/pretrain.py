"""Pretraining: the V3 objective on packed text, as a `loop.Job` for the one training loop.

`experiments/pretrain.py` is its command line (`settings.Settings`: every field a flag);
`run(settings)` is the library entry (tests call it in process). It builds, once and in this
order: the processes (`jax.distributed`), the model config, the mesh, the runtime (kernels,
dtype), the data, the optimizer and the jitted step; then hands them to `loop.run`. The data
position is the step number (`data.PackedDataset`), recorded with the data's fingerprint and
the model config in every checkpoint: a resume with another model, corpus, sequence length,
batch or seed is an error naming the flag.
"""

import dataclasses
import json
import logging
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import Config, get_config
from dsv3_jax.infer.generate import generate
from dsv3_jax.placement import batch_sharding
from dsv3_jax.runtime import Runtime
from dsv3_jax.train import loop, pipeline as pipeline_lib, step as train_step
from dsv3_jax.train.checkpoint import CheckpointError
from dsv3_jax.train.data import DataError, PackedDataset, build_dataset
from dsv3_jax.train.loss import LossWeights
from dsv3_jax.train.settings import Settings, parse_settings
from sharding import eplb
from sharding.context import ShardingContext
from sharding.mesh import make_mesh

log = logging.getLogger("dsv3_jax.train")


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
    """The model: the preset, with --mtp_depth if given."""
    return get_config(s.preset, **({} if s.mtp_depth is None else {"mtp_depth": s.mtp_depth}))


def build_sharding(s: Settings):
    """None (one device, no mesh) or a ShardingContext."""
    spec = s.mesh
    if spec == "none":
        return None
    if spec == "auto":
        if jax.device_count() == 1:
            return None
        spec = f"fsdp={jax.device_count()}"
    return ShardingContext(make_mesh(spec), s.strategy, s.dispatch, s.ep_capacity)


PRECISION_DTYPES = {"preset": None, "fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}


def build_runtime(s: Settings, cfg: Config) -> Runtime:
    """How this process runs the model, resolved once from the flags and the devices."""
    return runtime_lib.resolve(
        cfg, dtype=PRECISION_DTYPES[s.precision], remat=s.remat, scan_layers=s.scan_layers,
        attention=s.attention_impl, grouped=s.grouped_impl, fp8=s.precision == "fp8",
        fp8_gemm=s.fp8_impl, fp8_quant=s.fp8_quant_impl, deterministic=s.deterministic)


def pipeline_schedule(s, shard) -> str:
    """The schedule the flags ask for: 'none' or one of `sharding.schedules.SCHEDULES`."""
    ranks = 1 if shard is None else shard.pipeline
    name = s.pipeline_schedule
    if name == "auto":
        name = "1f1b" if ranks > 1 else "none"
    if name == "none" and ranks > 1:
        raise ValueError(f"--mesh has pipeline={ranks}: choose a --pipeline_schedule (gpipe, "
                         "1f1b, zero_bubble, dualpipev), not none")
    return name


def refuse_pipeline(s, shard, job: str) -> None:
    """Jobs whose objectives do not run through a pipeline schedule yet refuse its flags."""
    asked = s.pipeline_schedule not in ("auto", "none") or s.microbatches is not None
    if asked or (shard is not None and shard.pipeline > 1):
        raise ValueError(f"{job} does not run on a pipeline yet: drop --pipeline_schedule / "
                         "--microbatches and the mesh's pipeline axis (pipelining runs "
                         "experiments/pretrain.py's objective)")


def build_pipeline(s, cfg: Config, shard):
    """The stage plan of `--pipeline_schedule` / `--microbatches`, or None without pipelining."""
    name = pipeline_schedule(s, shard)
    if name == "none":
        if s.microbatches is not None:
            raise ValueError("--microbatches needs a --pipeline_schedule (or a mesh with "
                             "pipeline > 1); --grad_accum splits a step without a pipeline")
        return None
    ranks = 1 if shard is None else shard.pipeline
    micro = s.microbatches or 2 * ranks
    if s.grad_accum != 1:
        raise ValueError("--grad_accum with a pipeline schedule: use --microbatches instead")
    pipeline_lib.check(cfg, name, ranks, micro, s.global_batch)
    if shard is not None:
        n = math.prod(shard.sizes[a] for a in shard.batch_axes)
        if (s.global_batch // micro) % n:
            raise ValueError(f"each microbatch ({s.global_batch // micro} sequences) must split "
                             f"evenly over the {n} devices of the batch axes "
                             f"{shard.batch_axes}; change --global_batch, --microbatches or "
                             "--mesh")
    mtp = bool(cfg.mtp_depth) and s.mtp_weight > 0
    return pipeline_lib.stage_plan(cfg, name, ranks, micro, s.seq_len, mtp)


def check_batch_split(s: Settings, shard) -> None:
    if shard is not None:
        n = math.prod(shard.sizes[a] for a in shard.batch_axes)
        if (s.global_batch // s.grad_accum) % n:
            raise ValueError(f"each micro-batch ({s.global_batch // s.grad_accum} sequences) must "
                             f"split evenly over the {n} devices of the batch axes "
                             f"{shard.batch_axes}; change --global_batch or --mesh")


def data_files(paths: list[str] | None) -> list[str] | None:
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


# ----------------------------------------------------------------------------- batches


def place_batch(rows, shard) -> dict:
    """The step's batch on the devices. With a mesh every device asks the dataset for exactly its
    rows, so each process reads only the rows its devices hold."""
    if shard is None:
        return {k: jnp.asarray(v) for k, v in rows(None).items()}
    sharding = batch_sharding(shard, 2)
    shape = rows.shape

    def array(key):
        return jax.make_array_from_callback(shape, sharding, lambda idx: rows(idx[0])[key])

    return {key: array(key) for key in rows.keys}


class Rows:
    """rows(slice) of one step's global batch (a small cache: the arrays of one row range share
    reads). `dataset` has `rows(step, slice) -> {key: [rows, seq_len]}`, `global_batch` and
    `seq_len` (`PackedDataset`, `sft_data.SFTDataset`); `keys` are the arrays it returns."""

    def __init__(self, dataset, step: int, keys: tuple[str, ...] = ("inputs", "targets")):
        self.dataset, self.step, self.keys = dataset, step, keys
        self.shape = (dataset.global_batch, dataset.seq_len)
        self._cache = {}

    def __call__(self, rows: slice | None):
        key = None if rows is None else (rows.start, rows.stop, rows.step)
        if key not in self._cache:
            self._cache[key] = self.dataset.rows(self.step, rows)
        return self._cache[key]


# ----------------------------------------------------------------------------- resume check


def _plain(x):
    return json.loads(json.dumps(x))


def check_resume(meta: dict, dataset: PackedDataset, cfg: Config) -> None:
    """A checkpoint written for another model or other data is an error naming the field (the
    model first: it decides whether the arrays can be read at all)."""
    check_model(meta, cfg)
    check_data(meta, dataset.state(0), {"fingerprint": "--data/--embedded_bytes",
                                        "seq_len": "--seq_len", "global_batch": "--global_batch",
                                        "seed": "--seed"})


def check_data(meta: dict, now: dict, flags: dict[str, str]) -> None:
    """A checkpoint written with other data is an error naming the field and its flag."""
    saved = meta.get("data", {})
    for key, flag in flags.items():
        if key in saved and saved[key] != now[key]:
            raise ValueError(f"the checkpoint was written with a different {key} ({saved[key]!r}, "
                             f"now {now[key]!r}): resume with the same {flag}, or use a new "
                             "--checkpoint_dir")


def check_model(meta: dict, cfg: Config) -> None:
    """A checkpoint of another model is an error naming the config field that differs."""
    saved_cfg = meta.get("config", {})
    for key, value in dataclasses.asdict(cfg).items():
        if key in saved_cfg and saved_cfg[key] != _plain(value):
            raise ValueError(f"the checkpoint's model differs in {key} ({saved_cfg[key]!r}, now "
                             f"{value!r}): resume with the same --preset and model flags, or use "
                             "a new --checkpoint_dir")


# ----------------------------------------------------------------------------- the job


def greedy_sample(params: dict, cfg: Config, rt: Runtime, prompt: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens after `prompt` (`infer.generate`: one jitted prefill + decode loop over
    the latent cache in the runtime's compute dtype)."""
    if len(prompt) + n > cfg.max_seq_len:
        raise ValueError(f"--sample_prompt ({len(prompt)} tokens) + --sample_tokens {n} exceed "
                         f"the preset's max_seq_len {cfg.max_seq_len}")
    params = jax.tree.map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, params)
    out = generate(params, cfg, [np.asarray(prompt).tolist()], n, runtime=rt)
    return np.array(out[0], np.int32)


def gather_params(params: dict) -> dict:
    """The whole parameter tree on this host (from a mesh of one or several processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    return jax.device_get(params)


def _sampler(s: Settings, cfg: Config, rt: Runtime, tokenizer):
    if not s.sample_tokens:
        return None

    def sample(state) -> str:
        # one process: the trained weights where they are; several: gathered to every host
        params = state["params"]
        params = params if jax.process_count() == 1 else gather_params(params)
        if jax.process_index() != 0:
            return ""
        prompt = tokenizer.encode(s.sample_prompt)
        out = greedy_sample(params, cfg, rt, prompt, s.sample_tokens)
        return f"greedy sample: {tokenizer.decode(np.concatenate([prompt, out]))!r}"

    return sample


def build_optimizer(s, cfg: Config, default_warmup: int | None = None):
    """(schedule, optimizer): the V3 AdamW and learning-rate shape from a job's settings; the
    warmup is --warmup_steps, else `default_warmup`, else 5% of the steps."""
    warmup = s.warmup_steps if s.warmup_steps is not None else (
        default_warmup if default_warmup is not None else max(1, round(0.05 * s.steps)))
    schedule = train_step.v3_schedule(s.lr, s.steps, min(warmup, s.steps - 1))
    optimizer = train_step.make_optimizer(cfg, schedule, weight_decay=s.weight_decay,
                                          clip_norm=s.clip_norm)
    return schedule, optimizer


def run_meta(cfg: Config, rt: Runtime, s, **more) -> dict:
    """What every checkpoint of a run records besides its data position."""
    return {"config": _plain(dataclasses.asdict(cfg)), "runtime": _plain(dataclasses.asdict(rt)),
            "settings": _plain(dataclasses.asdict(s)), **more}


def pretraining_job(s: Settings, cfg: Config, rt: Runtime, shard, dataset: PackedDataset,
                    tokenizer) -> loop.Job:
    """Pretraining as a loop job: the V3 objective over `dataset`'s packed batches."""
    schedule, optimizer = build_optimizer(s, cfg)
    weights = LossWeights(mtp=s.mtp_weight, balance=s.balance_alpha)
    step_fn = train_step.make_train_step(
        cfg, optimizer, schedule, shard, rt=rt, pipeline=build_pipeline(s, cfg, shard),
        bias_gamma=s.bias_gamma, grad_accum=s.grad_accum, loss_weights=weights)
    about = run_meta(cfg, rt, s)
    copies = Redundancy(cfg, shard, s.redundant_experts) if s.redundant_experts else None
    init = lambda: train_step.init_state(cfg, jax.random.key(s.seed), optimizer, shard)
    abstract = lambda: train_step.abstract_state(cfg, optimizer, shard)
    return loop.Job(
        name="pretraining",
        init_state=init if copies is None else lambda: copies.with_placement(init(), None),
        abstract_state=abstract if copies is None else lambda: copies.abstract(abstract()),
        step=step_fn,
        batch=lambda i: place_batch(Rows(dataset, i), shard),
        meta=lambda i: {"data": dataset.state(i), **about},
        check_resume=lambda meta: check_resume(meta, dataset, cfg),
        tokens_per_step=s.global_batch * s.seq_len,
        flops_per_token=cfg.flops_per_token(s.seq_len),
        log_fields=(("main_loss", "main"),),
        sample=_sampler(s, cfg, rt, tokenizer),
        rebalance=None if copies is None else copies.with_placement,
        rebalance_every=s.rebalance_every)


class Redundancy:
    """--redundant_experts: the routed experts' copies in the state's router state
    (router_state["moe_layers"]["replicas"], `sharding.eplb.replica_state`), placed over the
    expert axis from measured loads (uniform at the start) and saved with every checkpoint."""

    def __init__(self, cfg: Config, shard, redundant: int):
        self.cfg, self.shard = cfg, shard
        self.ranks = shard.sizes.get(shard.expert_axis, 1) if shard and shard.expert_axis else 1
        self.slots = cfg.n_routed_experts + redundant
        if self.slots % self.ranks:
            raise ValueError(f"--redundant_experts {redundant}: {self.slots} expert slots do not "
                             f"split over the {self.ranks} expert ranks of the mesh")
        self.layers = cfg.n_layers - cfg.n_dense_layers

    def with_placement(self, state, load):
        """state with its copies placed for `load` [L, E] (None: uniform)."""
        if load is None:
            load = np.ones((self.layers, self.cfg.n_routed_experts))
        placed = eplb.plan(load, self.slots, 1, 1, self.ranks)
        # committed where the step expects them: the compiled step takes no other placement
        where = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if self.shard is None else
                 jax.sharding.NamedSharding(self.shard.mesh, jax.sharding.PartitionSpec()))
        arrays = jax.tree.map(lambda a: jax.device_put(a, where), eplb.replica_state(placed))
        router = dict(state["params"]["router_state"])
        router["moe_layers"] = {**router["moe_layers"], "replicas": arrays}
        return {**state, "params": {**state["params"], "router_state": router}}

    def abstract(self, tree):
        """The restore target with the copies' arrays in it."""
        placed = eplb.replica_state(eplb.plan(
            np.ones((self.layers, self.cfg.n_routed_experts)), self.slots, 1, 1, self.ranks))
        one = tree["step"].sharding
        arrays = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                              placed)
        router = dict(tree["params"]["router_state"])
        router["moe_layers"] = {**router["moe_layers"], "replicas": arrays}
        return {**tree, "params": {**tree["params"], "router_state": router}}


def loop_options(s: Settings) -> loop.LoopOptions:
    return loop.LoopOptions(
        steps=s.steps, checkpoint_dir=s.checkpoint_dir, checkpoint_every=s.checkpoint_every,
        keep_checkpoints=s.keep_checkpoints, async_checkpoint=s.async_checkpoint,
        metrics_file=s.metrics_file, log_every=s.log_every, progress=s.progress,
        nan_policy=s.nan_policy, max_consecutive_skips=s.max_consecutive_skips,
        guard=loop.Guard(loss_factor=s.spike_loss_factor, grad_norm_factor=s.spike_grad_factor,
                         max_update_ratio=s.max_update_ratio),
        peak_tflops=s.peak_tflops)


def describe(cfg: Config, rt: Runtime, shard, dataset: PackedDataset, s: Settings) -> str:
    counts = cfg.param_count()
    return (f"preset {cfg.name} ({rt.describe()}): {counts['main']:,} parameters, "
            f"{counts['activated']:,} activated per token, {counts['mtp']:,} MTP; "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
            f"{'' if shard is None else ', mesh ' + str(dict(shard.mesh.shape))}; corpus "
            f"{len(dataset.stream):,} tokens = {dataset.n_windows:,} sequences of {s.seq_len}")


def run(s: Settings) -> dict:
    """Pretrain; returns a summary (steps run, start step, per-step losses, final state)."""
    init_distributed(s)
    cfg = build_config(s)
    shard = build_sharding(s)
    check_batch_split(s, shard)
    rt = build_runtime(s, cfg)
    dataset, tokenizer = build_dataset(
        data_files(s.data), seq_len=s.seq_len, global_batch=s.global_batch, seed=s.seed,
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, text_field=s.text_field,
        embedded_bytes=s.embedded_bytes)
    if jax.process_index() == 0:
        print(describe(cfg, rt, shard, dataset, s), flush=True)
    job = pretraining_job(s, cfg, rt, shard, dataset, tokenizer)
    out = loop.run(job, loop_options(s))
    return {"steps_run": out.steps_run, "start_step": out.start_step, "history": out.history,
            "state": out.state, "config": cfg, "runtime": rt, "tokenizer": tokenizer,
            "shard": shard}


def cli(run_fn, s, name: str) -> int:
    """Run a training job from its command line: logging set up, errors as one line (exit 2),
    a stopped run's exit code, and a summary of the losses."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        out = run_fn(s)
    except loop.TrainingStopped as e:
        print(f"{name}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (DataError, ValueError, CheckpointError) as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return 2
    hist = out["history"]
    if hist and jax.process_index() == 0:
        first, last = hist[0], hist[-1]
        tail = [h["loss"] for h in hist[-max(1, len(hist) // 10):]]
        print(f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
              f"{last['step']} (mean of the last {len(tail)} steps {np.mean(tail):.3f})")
    return 0


def main(argv=None, description: str = "") -> int:
    return cli(run, parse_settings(argv, description), "pretrain")
