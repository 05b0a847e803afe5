"""The deterministic mode (`--deterministic`, `Runtime.deterministic`): its XLA options reach
every program a training or generation job compiles. Whether they make a GPU bitwise
reproducible is measured on the GPU (experiments/determinism.py); here, on the CPU, we check
the plumbing, by swapping the options for one XLA rejects: a program that does not carry them
would compile without error; and the rule that the mode takes XLA's attention on a GPU (cuDNN's
fused attention crashes XLA's deterministic programs), checked on pretended GPU devices.
"""

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.config import get_config
from dsv3_jax.train import pretrain
from dsv3_jax.train import step as train_step
from dsv3_jax.train.settings import parse_settings

BOGUS = {"xla_no_such_option_dsv3": True}
CFG = get_config("tiny")


def test_deterministic_runtime_names_xla_deterministic_ops():
    rt = runtime_lib.Runtime(deterministic=True)
    assert rt.compiler_options() == {"xla_gpu_deterministic_ops": True,
                                     "xla_gpu_exclude_nondeterministic_ops": True}
    assert runtime_lib.Runtime().compiler_options() is None
    assert "deterministic" in rt.describe()
    with pytest.raises(ValueError, match="Runtime.deterministic must be a bool"):
        runtime_lib.Runtime(deterministic="yes")


def test_the_flag_reaches_the_runtime_of_every_job():
    s = parse_settings(["--deterministic", "--mesh", "none"])
    assert pretrain.build_runtime(s, CFG).deterministic
    assert not pretrain.build_runtime(parse_settings(["--mesh", "none"]), CFG).deterministic


GPU = runtime_lib.Devices("gpu", hopper=True)
CPU = runtime_lib.Devices("cpu", hopper=False)
SMALL = get_config("small")


def test_deterministic_mode_takes_xla_attention_on_a_gpu():
    """cuDNN's fused attention crashes XLA's deterministic programs when they run (jax 0.11.2,
    H100): "auto" resolves to XLA's attention under --deterministic on a GPU, and cuDNN's
    otherwise; off the GPU nothing changes."""
    resolve = runtime_lib.resolve
    assert resolve(SMALL, dtype="bfloat16", devices=GPU).attention == "cudnn"
    rt = resolve(SMALL, dtype="bfloat16", devices=GPU, deterministic=True)
    assert (rt.attention, rt.deterministic) == ("xla", True)
    assert rt.grouped == "pallas"  # only the attention changes: our kernels use no atomics
    assert resolve(SMALL, dtype="bfloat16", fp8=True, devices=GPU,
                   deterministic=True).attention == "xla"
    assert resolve(SMALL, dtype="float32", devices=GPU, deterministic=True).attention == "xla"
    for deterministic in (False, True):
        assert resolve(SMALL, dtype="bfloat16", devices=CPU,
                       deterministic=deterministic).attention == "xla"
        assert resolve(SMALL, dtype="bfloat16", attention="xla", devices=GPU,
                       deterministic=deterministic).attention == "xla"


def test_explicit_cudnn_attention_with_deterministic_on_a_gpu_is_an_error():
    with pytest.raises(ValueError, match=r"--attention_impl cudnn.*--deterministic"):
        runtime_lib.resolve(SMALL, dtype="bfloat16", attention="cudnn", devices=GPU,
                            deterministic=True)
    # either one alone is allowed
    assert runtime_lib.resolve(SMALL, dtype="bfloat16", attention="cudnn",
                               devices=GPU).attention == "cudnn"
    assert runtime_lib.resolve(SMALL, dtype="bfloat16", attention="xla", devices=GPU,
                               deterministic=True).attention == "xla"


def test_the_pretrain_flags_follow_the_rule(monkeypatch):
    """`--deterministic` through the training scripts' settings, on a (pretended) GPU."""
    monkeypatch.setattr(runtime_lib.Devices, "current", classmethod(lambda cls: GPU))
    flags = ["--mesh", "none", "--precision", "bf16"]
    assert pretrain.build_runtime(parse_settings(flags), SMALL).attention == "cudnn"
    rt = pretrain.build_runtime(parse_settings(flags + ["--deterministic"]), SMALL)
    assert (rt.attention, rt.deterministic) == ("xla", True)
    with pytest.raises(ValueError, match="--deterministic"):
        pretrain.build_runtime(parse_settings(flags + ["--deterministic", "--attention_impl",
                                                       "cudnn"]), SMALL)


def test_train_step_compiles_with_the_runtimes_options(monkeypatch):
    monkeypatch.setattr(runtime_lib, "DETERMINISTIC_OPTIONS", BOGUS)
    schedule = train_step.v3_schedule(1e-3, 10, 1)
    optimizer = train_step.make_optimizer(CFG, schedule)
    state = train_step.init_state(CFG, jax.random.key(0), optimizer)
    batch = {"inputs": jnp.zeros((1, 8), jnp.int32), "targets": jnp.zeros((1, 8), jnp.int32)}
    plain = train_step.make_train_step(CFG, optimizer, schedule, rt=runtime_lib.Runtime(),
                                       donate=False)
    plain.lower(state, batch, train_step.no_guard()).compile()  # no options: compiles
    exact = train_step.make_train_step(CFG, optimizer, schedule,
                                       rt=runtime_lib.Runtime(deterministic=True), donate=False)
    with pytest.raises(Exception, match="xla_no_such_option_dsv3"):
        exact.lower(state, batch, train_step.no_guard()).compile()


def test_jit_by_runtime_picks_the_program_by_the_runtime(monkeypatch):
    monkeypatch.setattr(runtime_lib, "DETERMINISTIC_OPTIONS", BOGUS)

    @runtime_lib.jit_by_runtime(static_argnames=("rt",))
    def double(x, *, rt):
        return 2 * x

    assert float(double(jnp.float32(2), rt=runtime_lib.Runtime())) == 4.0
    with pytest.raises(Exception, match="xla_no_such_option_dsv3"):
        double(jnp.float32(2), rt=runtime_lib.Runtime(deterministic=True))
