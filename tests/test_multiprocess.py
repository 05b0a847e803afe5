"""Meshes across processes: 2 processes x 4 CPU devices give the 1 x 8 results."""

import json
import os
import pathlib
import socket
import subprocess
import sys

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
    ("fsdp=8", "fsdp", "allgather"),
])
def test_two_processes_equal_one(mesh_spec, strategy, dispatch):
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", port, mesh_spec,
                               strategy, dispatch], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    # the same computation in this process, on 8 local devices
    cfg = dsv3_jax.get_config("tiny")
    shard = ShardingContext(make_mesh(mesh_spec), strategy, dispatch)
    params = placement.init_params_sharded(cfg.replace(init_std=0.1), jax.random.key(0), shard)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
    batch = placement.shard_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, shard)
    loss, metrics = jax.jit(lambda p, b: loss_fn(p, b, cfg, shard=shard))(params, batch)
    for out in outs:
        assert out["devices"] == 8 and out["local"] == 4
        assert out["signal_polls"] == [None, 15]  # both processes stop for process 1's signal
        assert out["loss"] == pytest.approx(float(loss), rel=1e-6)
        np.testing.assert_array_equal(np.asarray(out["load"]).reshape(metrics["load"].shape),
                                      np.asarray(metrics["load"]))
