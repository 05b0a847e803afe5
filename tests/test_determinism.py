"""The deterministic mode (`--deterministic`, `Runtime.deterministic`): its XLA options reach
every program a training or generation job compiles. Whether they make a GPU bitwise
reproducible is measured on the GPU (experiments/determinism.py); here, on the CPU, we check
the plumbing, by swapping the options for one XLA rejects: a program that does not carry them
would compile without error.
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
    assert pretrain.build_runtime(s, CFG, None).deterministic
    assert not pretrain.build_runtime(parse_settings(["--mesh", "none"]), CFG, None).deterministic


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
