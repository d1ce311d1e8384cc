"""Shared fixtures: real Fashion-MNIST prepared once per test session from Debian's files."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# Tests run tiny networks a few steps, so compiling dominates: XLA's backend optimisations
# roughly halve the suite's time when off, and change no semantics (only fusion and scheduling).
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# One persistent compilation cache for the session and the subprocesses it starts, read before jax is imported:
# many tests build a new StepSpec (hashed by identity) for a program that is already compiled, e.g. every
# baseline's finetune stage; the cache finds it by its HLO (test_baselines: 235 s against 299 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="vpns_jax_tests_xla_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

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
