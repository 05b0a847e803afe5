"""One process of a multi-process run (started by tests/test_multiprocess.py): joins the JAX
cluster, builds a mesh over every process's CPU devices and prints the sharded loss and the
global expert load as JSON."""

import json
import os
import sys

import jax

pid, nproc, port, mesh_spec, strategy, dispatch = (
    int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np  # noqa: E402

import dsv3_jax  # noqa: E402
from dsv3_jax import placement  # noqa: E402
from dsv3_jax.train.loss import loss_fn  # noqa: E402
from sharding.context import ShardingContext  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402

cfg = dsv3_jax.get_config("tiny")
shard = ShardingContext(make_mesh(mesh_spec), strategy, dispatch)
params = placement.init_params_sharded(cfg.replace(init_std=0.1), jax.random.key(0), shard)
toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
batch = placement.shard_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, shard)
loss, metrics = jax.jit(lambda p, b: loss_fn(p, b, cfg, shard=shard))(params, batch)
# both are replicated over the mesh: this process's copy is the global value
load = np.asarray(metrics["load"].addressable_data(0))
# pretrain's stop agreement: only process 1 got SIGTERM (15); every process must read it, one
# poll late (each poll returns the previous poll's cross-process max)
from dsv3_jax.train.signals import Signals  # noqa: E402

from jax.experimental import multihost_utils  # noqa: E402


def _host_sync(*_a, **_k):
    raise AssertionError("a host-side collective in the step's signal poll")


# the poll runs every step: no host collective may sit in it (the first poll returning None
# while process 1 holds a signal shows it read nothing it had to wait for)
for name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all"):
    setattr(multihost_utils, name, _host_sync)
signals = Signals()
signals.received = 15 if pid == 1 else None
polls = [signals.poll(), signals.poll()]
print(json.dumps({"pid": pid, "devices": jax.device_count(), "local": jax.local_device_count(),
                  "loss": float(loss.addressable_data(0)), "load": load.tolist(),
                  "signal_polls": polls}), flush=True)
jax.distributed.shutdown()
