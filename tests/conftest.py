"""Test setup: 8 fake CPU devices for sharding tests, a persistent compilation cache, fixtures
paths, the `gpu` marker."""

import os
import pathlib

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("DSV3_TEST_GPU") != "1":  # CPU unless the GPU machine asks for its GPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are kept on disk and shared by every test and every subprocess a test
# starts (the pretraining script is run many times with the same step): a compile-bound suite
# pays for each program once. Read by jax at import; the environment reaches subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a GPU (run on the GPU machine with DSV3_TEST_GPU=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
