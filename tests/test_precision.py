"""Precision policy and kernel choices, as traced: bfloat16 convs, the choice 'auto' makes per backend, bad values.

What compiles (bfloat16 iterations next to float32, every kernel choice's gradients, float64 end to end) runs in
a process of its own: tests/isolated/check_precision.py.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vpns_jax.models import create_model, layers

SIZE = 16


@pytest.mark.parametrize("backend, cpu_kernels", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_auto_takes_the_cpu_kernels_on_cpu_only(monkeypatch, backend, cpu_kernels):
    monkeypatch.setattr(layers, "backend", lambda: backend)
    x = jnp.ones((2, 4, 4, 8), jnp.float32)  # a 4 px map: im2col territory on CPU
    kernel = jnp.ones((3, 3, 8, 8), jnp.float32)
    conv = str(jax.make_jaxpr(lambda a: layers.conv2d(a, kernel, 1, 1))(x))
    assert ("conv_general_dilated" not in conv) == cpu_kernels
    pool = str(jax.make_jaxpr(lambda a: layers.max_pool2d(a, 3, 2, 1))(x))
    pool_grad = str(jax.make_jaxpr(jax.grad(lambda a: layers.max_pool2d(a, 3, 2, 1).sum()))(x))
    assert ("custom_vjp_call" in pool) == cpu_kernels and ("select_and_scatter" in pool_grad) == (not cpu_kernels)
    # Named choices ignore the backend.
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda a: layers.conv2d(a, kernel, 1, 1, "lax"))(x))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda a: layers.conv2d(a, kernel, 1, 1, "im2col"))(x))


def test_unknown_kernel_or_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown conv_impl 'winograd'"):
        create_model("resnet18", num_classes=5, rngs=nnx.Rngs(0), conv_impl="winograd")
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        create_model("resnet18", num_classes=5, rngs=nnx.Rngs(0), dtype="float16")
    with pytest.raises(ValueError, match="implementation 'fast' is unknown"):
        layers.max_pool2d(jnp.ones((1, 4, 4, 1)), impl="fast")
