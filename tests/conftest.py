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

# Debian's dataset-fashion-mnist files (VPNS_JAX_FASHION_MNIST_DIR: a copy elsewhere).
FASHION_MNIST = pathlib.Path(os.environ.get("VPNS_JAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Under CI (CI=true) a skip is a failure, except these: optional dependencies the pinned install leaves out.
OPTIONAL_SKIPS = ("could not import 'torch'", "tensorflow is installed")


def under_ci() -> bool:
    """True in CI (``CI=true``), where the suite must not pass with a layer of it skipped."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def pytest_sessionstart(session) -> None:
    if under_ci() and not FASHION_MNIST.is_dir():
        raise pytest.UsageError(f"CI=true but Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST}): "
                                "the end-to-end tests need it; run make data (apt-get install dataset-fashion-mnist)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if under_ci() and report.skipped and not any(reason in str(report.longrepr) for reason in OPTIONAL_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where only optional-dependency skips are allowed: {report.longrepr}"


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding fashion_mnist_local (about 8 s to prepare); skips without the Debian package."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (make data)")
    from vpns_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare("fashion_mnist", data_dir=str(data_dir), manual_dir=str(FASHION_MNIST))
    return str(data_dir)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, dict]:
    """(path, weights) of a random-init width-1/16 ResNet-18 source model file (sparsity checks need no pretraining)."""
    from flax import nnx

    from tests.helpers import write_source
    from vpns_jax.models import create_model

    return write_source(tmp_path_factory,
                        create_model("resnet18", num_classes=10, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0)))


# The slowest modules first, each with all its tests: `make test` runs the suite on 2 workers (pytest-xdist,
# --dist loadfile --no-loadscope-reorder: modules in this order, not by test count), and a long module that
# started last would run alone at the end. Measured on the shared 2-core CPU: the isolated gradient checks take
# about 5 minutes in one test, test_main about 4.
SLOW_FIRST = ("test_isolated_gradient_checks.py", "test_main.py", "test_baselines.py", "test_learning.py",
              "test_device_check.py", "test_examples.py", "test_phases.py", "test_steps.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order
