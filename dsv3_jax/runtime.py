"""How to run a model: the compute dtype, rematerialisation, the layer loop and every kernel.

`Config` says what the model *is* (what a checkpoint needs to be read); a `Runtime` says how
this process runs it. A Runtime is resolved once, at the top of a program, from the user's
choices and the devices (`resolve`), and then passed down as a static value: the model reads
its fields and never asks the backend while tracing, so one traced program always means one set
of kernels, and a test can trace the GPU choices on a CPU.

Every choice has a portable value that runs anywhere (XLA einsums, `jax.lax.ragged_dot`), and
`Runtime()` holds exactly those, computing in the model's own dtype (`Config.dtype`). `resolve`
turns "auto" into the fast path of the devices at hand: on a GPU in 16 bits the Pallas grouped
kernel and cuDNN attention (XLA's attention in deterministic mode); on a Hopper GPU our FP8
kernels and the MLA decode kernel. An explicit choice that cannot run here is an error naming
the choice and the reason, never a quiet substitute.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal, NamedTuple

import jax

from dsv3_jax.config import Config
from pallas_kernels.grouped_matmul import unsupported_dims

_log = logging.getLogger(__name__)

Remat = Literal["none", "full", "dots", "dots_no_batch"]
REMATS = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("xla", "cudnn")
GROUPED = ("ragged_dot", "pallas")
FP8_GEMM = ("xla", "pallas")
FP8_QUANT = ("xla", "pallas")
# "pallas_if_fits": the decode kernel where it takes the cache's shapes, XLA's einsums where it
# does not (what "auto" resolves to on a Hopper GPU); "pallas": the kernel or an error.
DECODE = ("xla", "pallas", "pallas_if_fits")


class Fp8(NamedTuple):
    """How the FP8 linear layers run (`dsv3_jax.fp8`). gemm: "xla" (dequantize + float32
    matmul, any backend: FP8 numerics, not FP8 speed) or "pallas" (our Mosaic GPU kernels,
    Hopper); quant: the activation quantizers, "xla" (two XLA passes) or "pallas" (the one-pass
    Mosaic GPU kernels, bf16 activations only)."""
    gemm: str = "xla"
    quant: str = "xla"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """A resolved way to run a model: no "auto" inside (see `resolve`). Hashable: a static jit
    argument, so each Runtime compiles its own program."""
    dtype: str | None = None  # activations and matmul inputs; None = the model's Config.dtype
    remat: Remat = "none"  # jax.checkpoint policy on each layer
    # Layers of a stack as one lax.scan (compile time flat in depth) or unrolled (each layer its
    # own code; faster steps on a GPU, docs/performance.md).
    scan_layers: bool = True
    attention: str = "xla"  # training/prefill attention core: xla | cudnn
    grouped: str = "ragged_dot"  # routed-expert GEMMs: ragged_dot | pallas
    fp8: Fp8 | None = None  # FP8 GEMM inputs in the linear layers ([PAPER] §3.3); None = off
    decode_attention: str = "xla"  # absorbed decode attention core: see DECODE
    interpret: bool = False  # run the Pallas kernels in GPU interpret mode (CPU tests)
    # Compile for bitwise-reproducible results: the same program on the same inputs gives the
    # same bits, run after run (`DETERMINISTIC_OPTIONS`); costs step time on a GPU, where it
    # needs XLA's attention (`resolve`).
    deterministic: bool = False
    # Routed experts of few (token, expert) pairs -- at most half the experts: decoding -- as
    # gathered per-pair weights and batched GEMMs instead of the grouped path
    # (`moe.gathered_experts`; not under FP8).
    gather_experts: bool = True

    def __post_init__(self):
        for field, choices in (("dtype", DTYPES + (None,)), ("remat", REMATS),
                               ("attention", ATTENTION), ("grouped", GROUPED),
                               ("decode_attention", DECODE)):
            if getattr(self, field) not in choices:
                raise ValueError(f"Runtime.{field}={getattr(self, field)!r} is not one of "
                                 f"{choices}")
        for field in ("scan_layers", "interpret", "deterministic", "gather_experts"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"Runtime.{field} must be a bool, got {getattr(self, field)!r}")
        if self.fp8 is not None:
            if not isinstance(self.fp8, Fp8):
                raise ValueError(f"Runtime.fp8 must be an Fp8(gemm, quant) or None, got "
                                 f"{self.fp8!r}")
            if self.fp8.gemm not in FP8_GEMM or self.fp8.quant not in FP8_QUANT:
                raise ValueError(f"Runtime.fp8={self.fp8!r}: gemm must be one of {FP8_GEMM} and "
                                 f"quant one of {FP8_QUANT}")
            if self.fp8.quant == "pallas" and self.dtype not in (None, "bfloat16"):
                raise ValueError(f"Runtime.fp8.quant='pallas' needs bfloat16 activations (the "
                                 f"quantizer kernels take bf16 only), got dtype={self.dtype!r}")

    def compute_dtype(self, cfg: Config) -> str:
        """The activation dtype: this Runtime's, else the model's own."""
        return self.dtype or cfg.dtype

    def for_model(self, cfg: Config) -> "Runtime":
        """This Runtime with its dtype fixed to what it computes `cfg` in (no None)."""
        rt = dataclasses.replace(self, dtype=self.compute_dtype(cfg))
        if rt.fp8 is not None and rt.fp8.quant == "pallas" and rt.dtype != "bfloat16":
            raise ValueError(f"Runtime.fp8.quant='pallas' needs bfloat16 activations, but "
                             f"{cfg.name} computes in {rt.dtype}")
        return rt

    def replace(self, **changes) -> "Runtime":
        return dataclasses.replace(self, **changes)

    def compiler_options(self) -> dict | None:
        """XLA options for every program compiled under this Runtime (`jax.jit`'s
        compiler_options): the deterministic set, or None."""
        return dict(DETERMINISTIC_OPTIONS) if self.deterministic else None

    def describe(self) -> str:
        """One line for logs: dtype and the kernels that differ from the portable defaults."""
        parts = [self.dtype or "model dtype"]
        if self.fp8 is not None:
            parts.append(f"fp8 (GEMMs {self.fp8.gemm}, quantizers {self.fp8.quant})")
        parts.append(f"attention {self.attention}, experts {self.grouped}, decode "
                     f"{self.decode_attention}")
        if self.remat != "none":
            parts.append(f"remat {self.remat}")
        if self.deterministic:
            parts.append("deterministic")
        if not self.gather_experts:
            parts.append("no gathered experts")
        parts.append("scanned layers" if self.scan_layers else "unrolled layers")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Devices:
    """What `resolve` needs to know of the devices: the backend and whether it is a Hopper GPU
    (compute capability 9.x: H100, H200, H800, the chips our wgmma kernels are built for)."""
    backend: str
    hopper: bool

    @classmethod
    def current(cls) -> "Devices":
        dev = jax.devices()[0]
        hopper = (dev.platform == "gpu"
                  and str(getattr(dev, "compute_capability", "")).startswith("9"))
        return cls(jax.default_backend(), hopper)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value != "auto" and value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {('auto',) + choices}")


def resolve(cfg: Config, *, dtype: str | None = None, remat: str = "none",
            scan_layers: bool = True, attention: str = "auto", grouped: str = "auto",
            fp8: bool = False, fp8_gemm: str = "auto", fp8_quant: str = "auto",
            decode_attention: str = "auto", devices: Devices | None = None,
            interpret: bool = False, deterministic: bool = False) -> Runtime:
    """The Runtime for `cfg` on `devices` (default: this process's), "auto" decided:

    - attention: cuDNN's fused attention on a GPU in 16 bits, XLA elsewhere and in
      deterministic mode (cuDNN's attention crashes XLA's deterministic programs; an explicit
      "cudnn" with `deterministic` on a GPU is an error, `_resolve_attention`).
    - grouped: our Pallas grouped kernel on a GPU in 16 bits where the experts' widths fit its
      tiles (`small` and the released models do, `tiny` does not), `ragged_dot` elsewhere.
    - fp8_gemm: our Mosaic GPU FP8 kernels on a Hopper GPU, the XLA reference elsewhere;
      fp8_quant: the one-pass quantizer kernels where the GEMMs are ours and the activations
      bf16, XLA's elsewhere. On a mesh too: each dense FP8 GEMM runs in its own shard_map
      (`fp8.matmul`), the routed experts in the MoE's.
    - decode_attention: the Pallas MLA decode kernel on a Hopper GPU in bf16 (where it takes
      the cache's shapes), XLA elsewhere.
    `interpret`: run the Pallas kernels in GPU interpret mode (CPU tests), which lets "pallas"
    choices run here.
    `deterministic`: compile bitwise-reproducible programs (`Runtime.deterministic`).
    """
    devices = devices or Devices.current()
    dtype = dtype or cfg.dtype
    for name, value, choices in (("attention", attention, ATTENTION),
                                 ("grouped", grouped, GROUPED), ("fp8_gemm", fp8_gemm, FP8_GEMM),
                                 ("fp8_quant", fp8_quant, FP8_QUANT),
                                 ("decode_attention", decode_attention, ("xla", "pallas"))):
        _choice(name, value, choices)
    gpu16 = devices.backend == "gpu" and dtype != "float32"
    kernels_here = devices.hopper or interpret

    attention = _resolve_attention(attention, gpu16, devices.backend == "gpu", deterministic)

    problem = unsupported_dims(cfg.dim, cfg.moe_inter_dim, names=("dim", "moe_inter_dim"))
    if grouped == "auto":
        grouped = "pallas" if gpu16 and problem is None else "ragged_dot"
    elif grouped == "pallas" and problem is not None:
        raise ValueError(f"grouped='pallas': the grouped kernels cannot run {cfg.name}'s "
                         f"experts: {problem}; use 'ragged_dot' or 'auto'")

    if decode_attention == "auto":
        decode_attention = "pallas_if_fits" if devices.hopper and dtype == "bfloat16" else "xla"
    elif decode_attention == "pallas" and not kernels_here:
        raise ValueError("decode_attention='pallas': the Mosaic GPU decode kernel needs a "
                         "Hopper GPU (compute capability 9.x) as the default device; use 'auto' "
                         "or 'xla'")

    if grouped == "ragged_dot" and devices.backend == "gpu":
        _log.warning("the routed experts run on jax.lax.ragged_dot, which XLA lowers on a GPU "
                     "to a dense masked product costing about (experts) x the useful FLOPs; "
                     "the Pallas grouped kernel needs bf16 and widths that fit its tiles")
    fp8_impl = _resolve_fp8(fp8, fp8_gemm, fp8_quant, dtype, devices, interpret)
    return Runtime(dtype=dtype, remat=remat, scan_layers=scan_layers, attention=attention,
                   grouped=grouped, fp8=fp8_impl, decode_attention=decode_attention,
                   interpret=interpret, deterministic=deterministic)


def _resolve_attention(attention: str, gpu16: bool, gpu: bool, deterministic: bool) -> str:
    """The training/prefill attention core. "auto": cuDNN's fused attention on a GPU in 16
    bits, XLA's einsums elsewhere -- and XLA's in deterministic mode on a GPU. With XLA's
    deterministic options (`DETERMINISTIC_OPTIONS`, or only XLA_FLAGS=--xla_gpu_deterministic_ops
    =true) a program with cuDNN's fused attention compiles but crashes when it runs (jax
    0.11.2; it is cuDNN's attention, not our Pallas kernels: docs/performance.md, "Deterministic
    mode"). An explicit "cudnn" with `deterministic` on a GPU is therefore an error, not a
    quiet substitute."""
    if attention == "auto":
        return "cudnn" if gpu16 and not deterministic else "xla"
    if attention == "cudnn" and deterministic and gpu:
        raise ValueError("attention='cudnn' (--attention_impl cudnn) cannot run with "
                         "deterministic=True (--deterministic) on a GPU: cuDNN's fused attention "
                         "crashes XLA's deterministic programs at execution (jax 0.11.2); use "
                         "--attention_impl xla or auto (auto takes XLA's attention in "
                         "deterministic mode), or drop --deterministic")
    return attention


def _resolve_fp8(on: bool, gemm: str, quant: str, dtype: str, devices: Devices,
                 interpret: bool) -> Fp8 | None:
    """The FP8 choice, the same on one device and on a mesh: there each dense FP8 GEMM and its
    quantizers run in a shard_map of their own (`fp8.matmul`), so XLA's partitioner never sees
    the Mosaic GPU custom calls (which carry no sharding rule: left to it, their operands would
    be gathered onto every device); the routed experts run inside the MoE's shard_map. What a
    mesh can still refuse depends on the shapes, and is an error when the program is traced:
    a tensor-parallel split of a projection that leaves a device part of a 128-wide FP8 tile
    (`fp8._check_tiles`, naming the weight and the mesh axis)."""
    if quant == "pallas" and dtype != "bfloat16":  # a choice that cannot run, even unused
        raise ValueError(f"fp8_quant='pallas' needs bfloat16 activations (the quantizer kernels "
                         f"take bf16 only), got dtype={dtype!r}")
    if not on:
        return None
    if gemm == "auto":
        gemm = "pallas" if devices.hopper else "xla"
    if quant == "auto":
        quant = "pallas" if gemm == "pallas" and dtype == "bfloat16" else "xla"
    if quant == "pallas" and dtype != "bfloat16":
        raise ValueError(f"fp8_quant='pallas' needs bfloat16 activations (the quantizer kernels "
                         f"take bf16 only), got dtype={dtype!r}")
    for name, value in (("fp8_gemm", gemm), ("fp8_quant", quant)):
        if value == "pallas" and not (devices.hopper or interpret):
            raise ValueError(f"{name}='pallas': our FP8 Mosaic GPU kernels need a Hopper GPU "
                             "(compute capability 9.x); use 'xla' or 'auto'")
    return Fp8(gemm, quant)


# XLA's GPU programs are not bitwise reproducible by default: scatter-adds (the embedding's
# gradient) and cuDNN's attention backward accumulate with atomics in whatever order threads
# arrive. These options select XLA's deterministic implementations (sorted scatters) and make
# compilation fail on an op that has none (XLA docs/determinism.md). cuDNN's fused attention
# does not survive them (the program crashes when it runs, jax 0.11.2), so a deterministic
# Runtime takes XLA's attention on a GPU (`_resolve_attention`). Our Pallas kernels use no
# atomics: every output tile is written by one program, its K loop in a fixed order; the MoE's
# row permutations are gathers both ways (pallas_kernels/rows.py). The CPU backend is
# deterministic without them.
DETERMINISTIC_OPTIONS = {"xla_gpu_deterministic_ops": True,
                         "xla_gpu_exclude_nondeterministic_ops": True}


def jit_by_runtime(fn=None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` for a function whose static keyword argument `rt` is a
    Runtime: compiled with `rt.compiler_options()` (a deterministic Runtime gets the
    deterministic program). Usable as a decorator: `@functools.partial(jit_by_runtime,
    static_argnames=(..., "rt"))`."""
    if fn is None:
        return functools.partial(jit_by_runtime, **jit_kwargs)
    plain = jax.jit(fn, **jit_kwargs)
    exact = jax.jit(fn, compiler_options=dict(DETERMINISTIC_OPTIONS), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (exact if kwargs["rt"].deterministic else plain)(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=64)
def default(cfg: Config) -> Runtime:
    """`resolve(cfg)` with every choice "auto" on this process's devices, computed once per
    config: what the public API uses when no runtime is given."""
    return resolve(cfg)
