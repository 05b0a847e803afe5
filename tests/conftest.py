"""Test setup: 8 fake CPU devices for sharding tests, a compilation cache per process, fixtures
paths, the `gpu` marker, and compiled programs released before the process runs out of memory
maps."""

import atexit
import gc
import os
import pathlib
import shutil
import tempfile

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("DSV3_TEST_GPU") != "1":  # CPU unless the GPU machine asks for its GPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent compilation cache for this pytest process and the scripts its tests start one
# after another: tests rebuild the same programs in new closures and the pretraining script
# compiles the same step in every run (14 s of a 31 s run), and jax keys the cache by the
# program, so each is compiled once. A fresh folder for every pytest process (xdist workers
# inherit their controller's environment, so each replaces it), removed at exit: jax writes
# an entry without a lock unless the cache has a size limit, so two processes must never
# share one. Tests that start processes side by side turn it off for them
# (JAX_COMPILATION_CACHE_DIR="").
_CACHE = tempfile.mkdtemp(prefix="dsv3-jax-compile-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# Every program XLA's CPU backend loads maps its code into this process, and jax keeps compiled
# programs as long as their functions live: one pytest process of the whole suite passes
# Linux's default limit of 65530 memory maps (vm.max_map_count; 11,860 after test_model.py
# alone), and then the next compile dies with a segmentation fault. Compiled programs are
# dropped whenever the count passes this share of the limit.
_MAPS = pathlib.Path("/proc/self/maps")
_MAX_MAPS = 20_000


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


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if _MAPS.exists() and sum(1 for _ in _MAPS.open()) > _MAX_MAPS:
        jax.clear_caches()
        gc.collect()
