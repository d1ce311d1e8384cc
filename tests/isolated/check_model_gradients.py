"""Whole models' training gradients under ``jax.jit`` (as production compiles) against eager and JAX's own autodiff.

Each case computes the cross-entropy gradient of every weight in training mode three ways: eagerly with the
package's max-pool (``pool_impl='argmax'``), under production jit with it, and under production jit with
``pool_impl='lax'`` (XLA's ``reduce_window``, differentiated by JAX). Both jitted gradients are held to the eager one. A passing
shape proves nothing about another (the max-pool bug hit 28 and 224 px but not 32 or 64), so the cases span both
stems, ResNet-18/50 and VGG, 28 to 224 px, float32 and float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.gradcheck import eager, mnist_like, production_jit, relative_errors, worst
from vpns_jax.models import create_model, functional

# float64: the eager and jitted programs agree to rounding. float32: a tiny-width network in training mode is
# ill-conditioned (a BatchNorm bias's gradient can cancel to 1e-3 of its terms), so a different summation order
# alone moves some leaves by up to 1e-1; each leaf is then held to what JAX's own max-pool gradient shows under the
# same compilation, where a window that loses its gradient moves the stem's leaves far beyond it.
FLOAT64_TOLERANCE = 1e-10
FLOAT32_FLOOR, FLOAT32_FACTOR = 1e-4, 4.0
CASES = [
    ("resnet18", "imagenet", 28, "float64"),
    ("resnet18", "imagenet", 224, "float64"),
    ("resnet18", "cifar", 32, "float32"),
    ("resnet50", "imagenet", 32, "float64"),
    ("vgg16_bn", "imagenet", 32, "float64"),
]


@pytest.mark.parametrize(("name", "stem", "size", "dtype"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_training_gradient_under_jit_equals_eager_and_jax_autodiff(name, stem, size, dtype) -> None:
    rng = np.random.default_rng(size)
    with jax.enable_x64(dtype == "float64"):
        graphdefs = {}
        for pool_impl in ("argmax", "lax"):
            model = create_model(name, num_classes=5, width=1 / 16, stem=stem, rngs=nnx.Rngs(0), pool_impl=pool_impl)
            graphdefs[pool_impl], weights, batch_stats = functional.split_model(model)
        weights, batch_stats = jax.tree.map(lambda w: jnp.asarray(w, dtype), (weights, batch_stats))
        images = jnp.asarray(mnist_like(rng, (4, size, size, 3)), dtype)
        labels = jnp.asarray(rng.integers(0, 5, 4))
        key = jax.random.key(0)  # VGG's dropout: the same mask in every mode

        def loss(graphdef):
            def of(weights, images, labels):
                logits, _ = functional.apply_model(graphdef, weights, batch_stats, images, train=True,
                                                   dropout_key=key)
                assert logits.dtype == jnp.dtype(dtype)
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
            return of

        grad, reference_grad = jax.grad(loss(graphdefs["argmax"])), jax.grad(loss(graphdefs["lax"]))
        want = eager(grad)(weights, images, labels)
        got = relative_errors(production_jit(grad)(weights, images, labels), want)
        reference = relative_errors(production_jit(reference_grad)(weights, images, labels), want)
        if dtype == "float64":
            for errors, what in ((got, "jit"), (reference, "JAX's own max-pool gradient under jit")):
                leaf, error = worst(errors)
                assert error <= FLOAT64_TOLERANCE, f"{what}: gradient of {leaf} off by {error:.2e}"
        else:
            bound = {leaf: max(FLOAT32_FLOOR, FLOAT32_FACTOR * e) for leaf, e in reference.items()}
            over = {leaf: f"{got[leaf]:.2e} > {bound[leaf]:.2e}" for leaf in got if got[leaf] > bound[leaf]}
            assert not over, f"jit gradients off by more than JAX's own under the same compilation: {over}"


def test_the_two_pool_implementations_reach_every_model() -> None:
    """The reference really pools with JAX's own gradient (else it would be the package's): one custom VJP per
    max-pool with 'argmax', none with 'lax'."""
    for name, pools in (("resnet18", 1), ("vgg16", 5)):
        for pool_impl, expected in (("argmax", pools), ("lax", 0)):
            model = create_model(name, num_classes=5, width=1 / 16, rngs=nnx.Rngs(0), pool_impl=pool_impl)
            graphdef, weights, batch_stats = functional.split_model(model)
            jaxpr = str(jax.make_jaxpr(lambda w: functional.apply_model(
                graphdef, w, batch_stats, jnp.zeros((2, 32, 32, 3)), train=False)[0])(weights))
            assert jaxpr.count("custom_vjp_call") == expected, (name, pool_impl)
