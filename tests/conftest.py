"""Shared fixtures: real Fashion-MNIST prepared once per test session from Debian's files."""

import pathlib

import pytest

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
