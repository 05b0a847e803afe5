"""Test setup: 8 fake CPU devices for sharding tests, fixtures paths, the `gpu` marker."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("DSV3_TEST_GPU") != "1":  # CPU unless the GPU machine asks for its GPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

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
