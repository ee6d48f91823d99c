"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs and traces after each test module. One process runs the
    whole suite; without this it keeps every executable of ~250 tests (and the torch models that
    built them) alive, and XLA:CPU has crashed compiling late in the run (in a test that passes
    on its own)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
