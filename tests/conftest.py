"""Shared fixtures: real Fashion-MNIST prepared once per test session from Debian's files."""

import os
import pathlib

import pytest

# Tests run tiny networks a few steps, so compiling dominates: XLA's backend optimisations
# roughly halve the suite's time when off, and change no semantics (only fusion and scheduling).
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding fashion_mnist_local (about 8 s to prepare); skips without the Debian package."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (make data)")
    from vpns_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare("fashion_mnist", data_dir=str(data_dir))
    return str(data_dir)
