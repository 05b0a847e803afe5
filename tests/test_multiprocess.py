"""Meshes across processes: 2 processes x 4 CPU devices give the 1 x 8 results."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax import placement
from dsv3_jax.train.loss import loss_fn
from sharding.context import ShardingContext
from sharding.mesh import make_mesh

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mesh_spec, strategy, dispatch", [
    ("fsdp=2,expert=4", "fsdp_ep", "ragged_a2a_emulated"),
    pytest.param("fsdp=8", "fsdp", "allgather", marks=pytest.mark.slow),
])
def test_two_processes_equal_one(mesh_spec, strategy, dispatch):
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COMPILATION_CACHE_DIR": ""}  # side by side: no shared cache (conftest.py)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", port, mesh_spec,
                               strategy, dispatch], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    try:
        # the same computation in this process, on 8 local devices (while the workers run)
        cfg = dsv3_jax.get_config("tiny")
        shard = ShardingContext(make_mesh(mesh_spec), strategy, dispatch)
        params = placement.init_params_sharded(cfg.replace(init_std=0.1), jax.random.key(0), shard)
        toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
        batch = placement.shard_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, shard)
        loss, metrics = jax.jit(lambda p, b: loss_fn(p, b, cfg, shard=shard))(params, batch)
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:  # none left behind when this process fails first
            if p.poll() is None:
                p.kill()
                p.wait()
    for out in outs:
        assert out["devices"] == 8 and out["local"] == 4
        assert out["signal_polls"] == [None, 15]  # both processes stop for process 1's signal
        # the loss to float32 rounding (the workers print it as a Python float)
        chex.assert_trees_all_close(np.float32(out["loss"]), np.asarray(loss), rtol=1e-6, atol=0)
        chex.assert_trees_all_equal(np.asarray(out["load"], np.asarray(metrics["load"]).dtype)
                                    .reshape(metrics["load"].shape), np.asarray(metrics["load"]))
