"""The pretraining job's settings: one dataclass field per command-line flag, in groups.

`experiments/pretrain.py` is the command line: every field of `Settings` is a flag of the same
name with the field's help text (`--help` prints them by group, with their defaults). Library
callers build `Settings(...)` directly or with `parse_settings(argv)`.
"""

import argparse
import dataclasses
import types
import typing


def _field(default, help: str, group: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **kw})


MODEL, KERNELS, DEVICES, OPTIM, GUARD, DATA, CKPT, OUTPUT = (
    "model and precision", "kernels", "devices and processes", "optimisation",
    "failed steps", "data", "checkpoints", "output")
INIT = "starting point"
GROUP_ORDER = (INIT, MODEL, KERNELS, DEVICES, OPTIM, GUARD, DATA, CKPT, OUTPUT)


@dataclasses.dataclass
class BaseSettings:
    """What every training job shares (model, kernels, devices, optimisation, failed steps,
    checkpoints, output); a job adds its data and its own flags in a subclass."""
    # --- model and precision ---
    preset: str = _field("tiny", "config preset: tiny, small, v3_proxy, v2_lite_16b, v2_236b, "
                         "v3_671b",
                         MODEL)
    precision: str = _field("preset", "activation/matmul precision: preset (its own dtype: fp32 "
                            "for tiny, bf16 otherwise), fp32, bf16, or fp8 (bf16 activations + "
                            "DeepSeek-V3's FP8 GEMM inputs in the MLA projections, dense FFN and "
                            "experts); master weights stay fp32", MODEL,
                            choices=("preset", "fp32", "bf16", "fp8"))
    mtp_depth: int | None = _field(None, "MTP modules (default: the preset's; 0 turns MTP off)",
                                   MODEL)
    mtp_weight: float = _field(0.3, "lambda, the MTP loss weight (V3: 0.3, later 0.1)", MODEL)
    balance_alpha: float = _field(1e-4, "alpha of the sequence-wise balance loss", MODEL)
    bias_gamma: float = _field(1e-2, "gamma, the router-bias update speed. V3 used 1e-3 over "
                               "~1M steps; short runs need a faster one to balance the experts",
                               MODEL)
    remat: str = _field("none", "rematerialisation per layer", MODEL,
                        choices=("none", "full", "dots", "dots_no_batch"))
    scan_layers: bool = _field(True, "run each layer stack as one lax.scan (fast compile); "
                               "--no-scan_layers unrolls it: faster steps on a GPU at a longer "
                               "compile", MODEL)
    # --- kernels ---
    grouped_impl: str = _field("auto", "routed-expert GEMMs: auto (our Pallas grouped kernel on "
                               "a GPU in bf16, ragged_dot otherwise)", KERNELS,
                               choices=("auto", "ragged_dot", "pallas"))
    attention_impl: str = _field("auto", "attention core: auto (cuDNN fused attention on a GPU "
                                 "in bf16, XLA otherwise)", KERNELS,
                                 choices=("auto", "xla", "cudnn"))
    fp8_impl: str = _field("auto", "FP8 GEMMs under --precision fp8: auto (pallas on a Hopper "
                           "GPU, xla elsewhere), xla (dequantize + fp32 matmul: FP8 numerics, "
                           "not FP8 speed), pallas (our Mosaic GPU FP8 kernels, Hopper)",
                           KERNELS, choices=("auto", "xla", "pallas"))
    fp8_quant_impl: str = _field("auto", "FP8 activation quantizers under --precision fp8: auto "
                                 "(pallas where the FP8 GEMMs run our kernels), xla (two XLA "
                                 "passes), pallas (one-pass Mosaic GPU kernels; Hopper, bf16)",
                                 KERNELS, choices=("auto", "xla", "pallas"))
    deterministic: bool = _field(False, "compile bitwise-reproducible programs: the same command "
                                 "twice gives the same per-step losses on a GPU (XLA's "
                                 "deterministic ops; attention auto = XLA's, since cuDNN's "
                                 "crashes that mode; costs step time, docs/performance.md)",
                                 KERNELS)
    # --- devices ---
    mesh: str = _field("auto", "device mesh, e.g. 'fsdp=4,expert=2'; 'none' = the first device, "
                       "no mesh; 'auto' = 'none' with one device, fsdp over all when several",
                       DEVICES)
    pipeline_schedule: str = _field(
        "auto", "pipeline schedule over the mesh's pipeline axis: gpipe, 1f1b, zero_bubble, "
        "dualpipev (README: Scaling); auto = 1f1b when pipeline > 1, none otherwise; a schedule "
        "with pipeline=1 runs the pipelined step on one rank (its overhead)", DEVICES,
        choices=("auto", "none", "gpipe", "1f1b", "zero_bubble", "dualpipev"))
    microbatches: int | None = _field(None, "microbatches per step through the pipeline "
                                      "(default: 2 x pipeline ranks); must divide "
                                      "--global_batch", DEVICES)
    strategy: str = _field("fsdp", "sharding strategy", DEVICES,
                           choices=("fsdp", "fsdp_ep", "fsdp_ep_tp", "zero1_ep"))
    dispatch: str = _field("allgather", "expert-parallel dispatch (sharding/ep.py): a2a (dense "
                           "all-to-all of --ep_capacity-sized buffers, an exact worst-case path "
                           "when they would overflow), allgather, ragged_a2a (GPU only) or "
                           "ragged_a2a_emulated", DEVICES,
                           choices=("a2a", "allgather", "ragged_a2a", "ragged_a2a_emulated"))
    ep_capacity: float = _field(2.0, "--dispatch a2a: pairs each device sends each peer per "
                                "step, as a multiple of the mean (tokens x experts per token / "
                                "expert ranks); more costs bytes, less overflows more often "
                                "(an overflow takes the worst-case exchange, never drops a "
                                "token)", DEVICES)
    distributed: str = _field("off", "multi-process: off; auto (jax.distributed.initialize() "
                              "reads SLURM/Open MPI/... from the environment); manual (the three "
                              "flags below)", DEVICES, choices=("off", "auto", "manual"))
    coordinator: str | None = _field(None, "manual: host:port of process 0", DEVICES)
    num_processes: int | None = _field(None, "manual: number of processes", DEVICES)
    process_id: int | None = _field(None, "manual: this process's index", DEVICES)
    # --- optimisation ---
    steps: int = _field(600, "optimizer steps in the whole run (a resume continues to this)",
                        OPTIM)
    global_batch: int = _field(16, "sequences per optimizer step, over all devices", OPTIM)
    seq_len: int = _field(128, "tokens per sequence", OPTIM)
    grad_accum: int = _field(1, "micro-batches per step (splits --global_batch)", OPTIM)
    lr: float = _field(3e-3, "peak learning rate (V3: 2.2e-4 at 671B)", OPTIM)
    warmup_steps: int | None = _field(None, "linear warmup steps (default: 5%% of --steps)",
                                      OPTIM)
    weight_decay: float = _field(0.1, "AdamW weight decay on matrices (not on norm gains)", OPTIM)
    clip_norm: float = _field(1.0, "gradient clipping at this global norm", OPTIM)
    seed: int = _field(0, "seed of the initial weights and of the data order", OPTIM)
    # --- failed steps ---
    nan_policy: str = _field("skip", "on a failed step (non-finite or spiking loss or gradient "
                             "norm; its update is never applied): skip it, or stop", GUARD,
                             choices=("skip", "stop"))
    max_consecutive_skips: int = _field(10, "stop (exit 3) after this many failed steps in a "
                                        "row", GUARD)
    spike_loss_factor: float = _field(2.0, "a step whose loss exceeds this many times the "
                                      "median of the last 32 applied steps fails (0: off)", GUARD)
    spike_grad_factor: float = _field(20.0, "a step whose gradient norm exceeds this many times "
                                      "the median of the last 32 applied steps fails (0: off)",
                                      GUARD)
    max_update_ratio: float = _field(1.0, "a step whose update's global norm exceeds this many "
                                     "times the weights' global norm fails (0: off, which also "
                                     "saves the check's pass over the optimizer state); "
                                     "Adam's update is about --lr / the weights' RMS", GUARD)
    # --- checkpoints ---
    checkpoint_dir: str | None = _field(None, "orbax checkpoint folder; a run with the same "
                                        "folder resumes from its latest complete checkpoint "
                                        "(default: nothing is saved)", CKPT)
    checkpoint_every: int = _field(100, "save every N steps (and at the end, and on SIGTERM)",
                                   CKPT)
    keep_checkpoints: int = _field(3, "keep the newest N checkpoints", CKPT)
    async_checkpoint: bool = _field(True, "write checkpoints in the background", CKPT)
    # --- output ---
    metrics_file: str | None = _field(None, "JSONL metrics, one record per step (default: none)",
                                      OUTPUT)
    log_every: int = _field(25, "print a line (and record per-expert loads) every N steps",
                            OUTPUT)
    progress: bool = _field(True, "progress bar on a terminal", OUTPUT)
    peak_tflops: float | None = _field(None, "per-device peak for MFU (default: the bf16 "
                                       "datasheet peak of known GPUs; none on CPU)", OUTPUT)
    def __post_init__(self):
        for name in ("steps", "global_batch", "seq_len", "grad_accum", "checkpoint_every",
                     "keep_checkpoints", "log_every", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "mtp_weight", "balance_alpha", "bias_gamma",
                     "max_update_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("spike_loss_factor", "spike_grad_factor"):
            v = getattr(self, name)
            if not (v == 0 or v > 1):
                raise ValueError(f"--{name} must be 0 (off) or > 1, got {v}")
        if not self.ep_capacity > 0:
            raise ValueError(f"--ep_capacity must be > 0, got {self.ep_capacity}")
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"--microbatches must be >= 1, got {self.microbatches}")
        if self.global_batch % self.grad_accum:
            raise ValueError(f"--global_batch {self.global_batch} is not a multiple of "
                             f"--grad_accum {self.grad_accum}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup_steps {self.warmup_steps} must be in [0, --steps "
                             f"{self.steps})")
        if self.mtp_depth is not None and self.mtp_depth < 0:
            raise ValueError(f"--mtp_depth must be >= 0, got {self.mtp_depth}")


@dataclasses.dataclass
class Settings(BaseSettings):
    """Pretraining: the shared flags, its corpus and the end-of-run sample."""
    # --- data ---
    data: list[str] | None = _field(None, "text or .jsonl files or folders of them (default: "
                                    "the embedded corpus, the Python standard library's "
                                    "sources)", DATA, nargs="*")
    text_field: str = _field("text", "the field of each .jsonl record that holds its text", DATA)
    embedded_bytes: int = _field(4_000_000, "bytes of the embedded corpus to read", DATA)
    # --- redundant experts ---
    redundant_experts: int = _field(0, "EPLB: run the routed experts as E + this many slots, "
                                    "the hottest experts copied (sharding/eplb.py); the model's "
                                    "outputs are unchanged (0: none)", DEVICES)
    rebalance_every: int = _field(50, "with --redundant_experts: re-place the copies every N "
                                  "steps from the expert loads seen since the last placement",
                                  DEVICES)
    # --- output ---
    sample_tokens: int = _field(64, "greedy tokens to sample at the end (0: none)", OUTPUT)
    sample_prompt: str = _field("def ", "prompt of the final greedy sample", OUTPUT)

    def __post_init__(self):
        super().__post_init__()
        if self.redundant_experts < 0:
            raise ValueError(f"--redundant_experts must be >= 0, got {self.redundant_experts}")
        if self.rebalance_every < 1:
            raise ValueError(f"--rebalance_every must be >= 1, got {self.rebalance_every}")
        if self.embedded_bytes < 1:
            raise ValueError(f"--embedded_bytes must be >= 1, got {self.embedded_bytes}")
        if self.sample_tokens < 0:
            raise ValueError(f"--sample_tokens must be >= 0, got {self.sample_tokens}")


def settings_parser(description: str = "", cls: type = Settings) -> argparse.ArgumentParser:
    """argparse flags from a settings dataclass (`Settings` or a job's subclass of it): one flag
    per field, same name, its help and default, in the fields' groups."""
    ap = argparse.ArgumentParser(description=description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(cls)
    present = {f.metadata["group"] for f in dataclasses.fields(cls)}
    for name in GROUP_ORDER:  # --help lists the groups in this order, the job's own last
        if name in present:
            groups[name] = ap.add_argument_group(name)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], ap.add_argument_group(meta["group"]))
        help_text = meta["help"]
        if f.default is not None and "default" not in help_text:
            help_text += f" (default: {f.default})"
        kw = {"default": f.default, "help": help_text}
        base = hints[f.name]
        if isinstance(base, types.UnionType):  # `int | None`: the flag takes an int
            base = next(t for t in typing.get_args(base) if t is not type(None))
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = meta["help"] + f" (default: {'on' if f.default else 'off'})"
        elif typing.get_origin(base) is list:
            kw["type"] = typing.get_args(base)[0]
            if meta.get("action") == "append":  # repeat the flag: --reward a --reward b
                kw["action"] = "append"
            else:
                kw["nargs"] = meta.get("nargs", "*")
        else:
            kw["type"] = base
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        group.add_argument(f"--{f.name}", **kw)
    return ap


def parse_settings(argv=None, description: str = "", cls: type = Settings):
    """`cls` settings from command-line arguments; a bad value exits with a one-line usage
    error."""
    ap = settings_parser(description, cls)
    args = ap.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:
        ap.error(str(e))


@dataclasses.dataclass
class FinetuneSettings(BaseSettings):
    """SFT and GRPO: the shared flags, where the model comes from, and its export. Defaults
    differ from pretraining where fine-tuning differs: no MTP loss, a slow router-bias update
    (V3's 1e-3)."""
    # --- starting point ---
    init_checkpoint: str | None = _field(None, "start from the newest checkpoint of one of our "
                                         "runs (pretraining, SFT or GRPO; its model config "
                                         "comes with it)", INIT)
    hf: str | None = _field(None, "start from a Hugging Face DeepSeek-V3-architecture folder "
                            "(config.json, safetensors, and tokenizer.json when it has one)",
                            INIT)
    export_hf: str | None = _field(None, "at the end, write the trained model to this folder "
                                   "as a Hugging Face checkpoint (bf16 safetensors, "
                                   "config.json, the source's tokenizer files)", OUTPUT)
    preset: str = _field("tiny", "config preset of a random start (with neither "
                         "--init_checkpoint nor --hf): tiny, small, v2_lite_16b, v2_236b, "
                         "v3_671b", MODEL)
    mtp_weight: float = _field(0.0, "lambda, the MTP loss weight; 0 leaves the MTP modules "
                               "out of the step (they are kept, untrained)", MODEL)
    bias_gamma: float = _field(1e-3, "gamma, the router-bias update speed (V3: 1e-3)", MODEL)

    def __post_init__(self):
        super().__post_init__()
        if self.init_checkpoint and self.hf:
            raise ValueError("--init_checkpoint and --hf: give one starting point, not both")
