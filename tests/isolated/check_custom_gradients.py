"""Every custom gradient of the package, under ``jax.jit`` as production compiles it, against eager and JAX's own.

The custom gradients: ``layers.max_pool2d`` (custom VJP), ``prompts.clamp_unit`` (custom JVP) and the
straight-through masks ``masking.ste_masks`` / ``structured.ste_channel_masks`` / ``nm.ste_nm_masks`` (gradient
routed around a comparison with a threshold, or within an N:M group). ``layers.conv2d_im2col`` has no custom
rule, but replaces the conv on small maps and is checked alongside. Inputs have ties and exact zeros
(MNIST-like) as well as random values; float64 cases run under ``jax.enable_x64``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.gradcheck import eager, mnist_like, production_jit, relative_errors, worst
from vpns_jax.core import masking, nm, prompts, structured
from vpns_jax.models import channels, layers

DTYPES = ("float32", "float64")
# A whole computation in float32 against another order of the same float operations; float64 likewise.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1)]
INPUTS = ("ties", "mnist_like", "random")


def _input(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "ties":
        return rng.integers(0, 3, shape).astype(np.float64)  # three values: most windows tie
    if kind == "mnist_like":
        return mnist_like(rng, shape)
    return rng.standard_normal(shape)


def _x64(dtype: str):
    return jax.enable_x64(dtype == "float64")


def _pool_loss(pool, window, stride, padding):
    def loss(x, upstream):
        return jnp.sum(pool(x, window, stride, padding) * upstream)

    return loss


@pytest.mark.parametrize(("window", "stride", "padding"), POOLS)
@pytest.mark.parametrize(("shape", "dtype"), [((2, 9, 9, 3), "float32"), ((3, 8, 7, 2), "float32"),
                                              ((3, 8, 7, 2), "float64")])
def test_max_pool2d_gradient_is_the_reference_exactly(shape, window, stride, padding, dtype) -> None:
    """Pooled directly: every window's gradient goes to its first maximum, bit for bit, in every mode.

    The upstream gradient holds small integers, so every sum of shares is exact in any order.
    """
    rng = np.random.default_rng(sum(shape) + window)
    with _x64(dtype):
        grads = {
            (mode.__name__, pool.__name__): mode(jax.grad(_pool_loss(pool, window, stride, padding)))
            for mode in (eager, production_jit)
            for pool in (layers.max_pool2d, layers.max_pool2d_reference)
        }
        for kind in INPUTS:
            x = jnp.asarray(_input(kind, shape, rng), dtype)
            y = layers.max_pool2d_reference(x, window, stride, padding)
            np.testing.assert_array_equal(layers.max_pool2d(x, window, stride, padding), y)
            upstream = jnp.asarray(rng.integers(-3, 4, y.shape), dtype)
            want = np.asarray(grads["eager", "max_pool2d_reference"](x, upstream))
            assert np.count_nonzero(want) > 0
            for name, grad in grads.items():
                got = grad(x, upstream)
                assert got.dtype == x.dtype
                np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{kind} input, {name}")


def _stem_loss(pool, conv_stride, padding, pool_args):
    def loss(w, scale, bias, x, upstream):
        y = layers.conv2d(x, w, conv_stride, padding)
        mean = jnp.mean(y, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
        y = jax.nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)
        return jnp.sum(pool(y, *pool_args) * upstream)

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize(
    ("size", "kernel", "conv_stride", "pool", "dtype"),
    [(28, 7, 2, (3, 2, 1), "float32"), (28, 7, 2, (3, 2, 1), "float64"), (32, 7, 2, (3, 2, 1), "float32"),
     (64, 7, 2, (3, 2, 1), "float64"), (32, 3, 1, (2, 2, 0), "float64"), (4, 3, 1, (2, 2, 0), "float32")],
)
def test_conv_batchnorm_relu_pool_gradient_under_jit(size, kernel, conv_stride, pool, dtype) -> None:
    """The ImageNet stem (and VGG's conv-pool) with its pool input made inside the jitted program.

    This is where XLA may recompute the pool's input in the backward with another fusion: the old max-pool VJP,
    which found each window's maximum again by comparing values, lost the gradient of hundreds of the 3,136
    windows here at 28 px (relative error 0.44 in float32, 0.51 in float64). ``conv2d`` picks im2col on the
    4 px map.
    """
    rng = np.random.default_rng(size + kernel)
    with _x64(dtype):
        reference = eager(_stem_loss(layers.max_pool2d_reference, conv_stride, kernel // 2, pool))
        modes = {
            "eager": eager(_stem_loss(layers.max_pool2d, conv_stride, kernel // 2, pool)),
            "jit": production_jit(_stem_loss(layers.max_pool2d, conv_stride, kernel // 2, pool)),
            "reference under jit": production_jit(_stem_loss(layers.max_pool2d_reference, conv_stride, kernel // 2,
                                                             pool)),
        }
        for kind in ("mnist_like", "random"):
            x = jnp.asarray(_input(kind, (16, size, size, 3), rng), dtype)
            w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4)) * 0.1, dtype)
            scale, bias = jnp.ones(4, dtype), jnp.asarray(rng.standard_normal(4) * 0.1, dtype)
            out = jax.eval_shape(lambda: layers.max_pool2d_reference(layers.conv2d(x, w, conv_stride, kernel // 2),
                                                                     *pool))
            upstream = jnp.asarray(rng.standard_normal(out.shape), dtype)
            args = (w, scale, bias, x, upstream)
            want = reference(*args)
            for name, grad in modes.items():
                leaf, error = worst(relative_errors(grad(*args), want))
                assert error <= TOLERANCE[dtype], f"{kind} input, {name}: gradient {leaf} off by {error:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [8, 32])
def test_clamp_unit_gradient_under_jit(size, dtype) -> None:
    """The pad prompt over MNIST-like images: exact 0s (black pixels, zero prompt), 1s and values outside [0, 1].

    The reference is JAX's autodiff of the same rule written without a custom JVP: identity on the closed
    interval [0, 1], zero outside.
    """
    rng = np.random.default_rng(size)
    with _x64(dtype):
        images = mnist_like(rng, (4, size, size, 3))
        images[:, 0, 0] = 1.0  # exact ones too
        images = jnp.asarray(images, dtype)
        frame = np.ones((size, size, 1))
        frame[size // 4 : -(size // 4), size // 4 : -(size // 4)] = 0
        frame = jnp.asarray(frame, dtype)
        prompt = np.round(rng.standard_normal((size, size, 3)), 1) * (rng.random((size, size, 3)) < 0.5)
        prompt = jnp.asarray(prompt, dtype)  # half exact zeros; others push some pixels outside [0, 1]
        upstream = jnp.asarray(rng.standard_normal(images.shape), dtype)

        def reference_clamp(x):
            inside = (x >= 0) & (x <= 1)
            return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, 0.0, 1.0)))

        def loss(clamp, prompt):
            return jnp.sum(prompts.normalize(clamp(images + prompt * frame)) * upstream)

        want = eager(jax.grad(functools.partial(loss, reference_clamp)))(prompt)
        assert np.count_nonzero(want) > 0
        for mode in (eager, production_jit):
            got = mode(jax.grad(functools.partial(loss, prompts.clamp_unit)))(prompt)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOLERANCE[dtype], atol=0)
        # A zero prompt over black pixels (exactly 0) still passes the gradient, as torch.clamp's backward does:
        # every frame entry gets one.
        on_black = production_jit(jax.grad(functools.partial(loss, prompts.clamp_unit)))(jnp.zeros_like(prompt))
        assert np.all(np.asarray(on_black)[np.asarray(frame)[..., 0] > 0] != 0)
        assert np.all(np.asarray(on_black)[np.asarray(frame)[..., 0] == 0] == 0)


def _scores_with_ties(rng: np.random.Generator, shapes, dtype) -> dict:
    """Scores on a coarse grid (many ties, also at the threshold) with exact zeros."""
    return {f"layer{i}": jnp.asarray(np.round(rng.standard_normal(s) * 2) / 4, dtype) for i, s in enumerate(shapes)}


@pytest.mark.parametrize(("density", "scope", "dtype"), [(0.5, "global", "float32"), (0.1, "layer", "float64")])
def test_ste_masks_under_jit_keep_exact_counts_and_pass_the_gradient_straight_through(density, scope, dtype) -> None:
    shapes = [(3, 3, 2, 4), (3, 3, 4, 4), (8, 5)]
    rng = np.random.default_rng(3)
    with _x64(dtype):
        scores = _scores_with_ties(rng, shapes, dtype)
        weights = {name: jnp.asarray(rng.standard_normal(s.shape), dtype) for name, s in scores.items()}
        upstream = {name: jnp.asarray(rng.standard_normal(s.shape), dtype) for name, s in scores.items()}
        ks = jnp.asarray(masking.prune_counts(scores, density, scope))

        def loss(scores):
            masked = masking.apply_masks(weights, masking.ste_masks(scores, ks, scope))
            return sum(jnp.sum(masked[n] * upstream[n]) for n in masked)

        # The straight-through rule by hand: dL/ds = d|s|/ds * W * dL/dw_masked, where JAX's d|s|/ds is +1 at an
        # exact zero (torch's abs backward gives 0 there).
        want = {n: jnp.where(scores[n] >= 0, 1, -1) * weights[n] * upstream[n] for n in scores}
        for mode in (eager, production_jit):
            got = mode(jax.grad(loss))(scores)
            errors = relative_errors(got, want)
            assert max(errors.values()) <= TOLERANCE[dtype], errors
            masks = mode(lambda s: masking.masks_from_scores(s, ks, scope))(scores)
            # The ties rule: tau is the k-th smallest |s| of its group and an entry is kept iff |s| > tau.
            groups = [list(scores)] if scope == "global" else [[n] for n in scores]
            for group, k in zip(groups, np.asarray(ks)):
                magnitudes = np.sort(np.concatenate([np.abs(np.asarray(scores[n])).ravel() for n in group]))
                tau = magnitudes[k - 1]
                assert sum(int(np.sum(np.asarray(masks[n]))) for n in group) == int(np.sum(magnitudes > tau))
                assert np.sum(magnitudes == tau) > 1  # the grid puts ties at the threshold
        # The straight-through masks' forward values are the binary masks exactly.
        ste_values = production_jit(lambda s: masking.ste_masks(s, ks, scope))(scores)
        for n in masks:
            np.testing.assert_array_equal(np.asarray(ste_values[n]), np.asarray(masks[n]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_channel_masks_under_jit_prune_exact_counts_and_pass_the_gradient_straight_through(dtype) -> None:
    rng = np.random.default_rng(5)
    groups = (channels.ChannelGroup("a", convs=(), bns=(), consumers=(), num_channels=8, capped=False),
              channels.ChannelGroup("b", convs=(), bns=(), consumers=(), num_channels=12, capped=False))
    with _x64(dtype):
        # Ties and exact zeros on a coarse grid.
        scores = {g.name: jnp.asarray(np.round(rng.standard_normal(g.num_channels) * 2) / 4, dtype) for g in groups}
        upstream = {g.name: jnp.asarray(rng.standard_normal(g.num_channels), dtype) for g in groups}
        num_pruned = structured.channel_prune_counts(groups, 0.5, channel_max=1.0)

        def loss(scores, upstream):
            masks = structured.ste_channel_masks(scores, groups, num_pruned, channel_max=1.0)
            return sum(jnp.sum(masks[n] * upstream[n]) for n in masks)

        want = {n: jnp.where(scores[n] >= 0, 1, -1) * upstream[n] for n in scores}
        for mode in (eager, production_jit):
            errors = relative_errors(mode(jax.grad(loss))(scores, upstream), want)
            assert max(errors.values()) <= TOLERANCE[dtype], errors
            masks = mode(lambda s: structured.channel_masks(s, groups, num_pruned, channel_max=1.0))(scores)
            assert sum(int(np.sum(np.asarray(m) == 0)) for m in masks.values()) == num_pruned == 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_ste_nm_masks_under_jit_keep_n_per_group_and_pass_the_gradient_straight_through(n, m, dtype) -> None:
    """Conv kernels with a cut group (3 input channels), a dense head; ties and exact zeros on a coarse grid."""
    shapes = [(3, 3, 3, 4), (3, 3, 8, 4), (10, 5)]
    rng = np.random.default_rng(7 + n + m)
    with _x64(dtype):
        scores = _scores_with_ties(rng, shapes, dtype)
        weights = {name: jnp.asarray(rng.standard_normal(s.shape), dtype) for name, s in scores.items()}
        upstream = {name: jnp.asarray(rng.standard_normal(s.shape), dtype) for name, s in scores.items()}

        def loss(scores):
            masked = masking.apply_masks(weights, nm.ste_nm_masks(scores, n, m))
            return sum(jnp.sum(masked[k] * upstream[k]) for k in masked)

        want = {k: jnp.where(scores[k] >= 0, 1, -1) * weights[k] * upstream[k] for k in scores}
        hard = {k: np.asarray(v) for k, v in eager(lambda s: nm.nm_masks(s, n, m))(scores).items()}
        for mode in (eager, production_jit):
            errors = relative_errors(mode(jax.grad(loss))(scores), want)
            assert max(errors.values()) <= TOLERANCE[dtype], errors
            for k, mask in mode(lambda s: nm.ste_nm_masks(s, n, m))(scores).items():
                assert mask.dtype == jnp.dtype(dtype)
                np.testing.assert_array_equal(np.asarray(mask), hard[k])  # forward: exactly the hard mask
                assert int(hard[k].sum()) == nm.kept_count(mask.shape, n, m) and nm.is_nm(hard[k], n, m)


def test_nm_masks_select_in_float64_what_float32_cannot_tell_apart() -> None:
    """1 + 2^-40 and 1 + 2^-41 round to 1 in float32 (a four-way tie: the first two kept); float64 keeps them."""
    column = np.array([1.0, 1.0 + 2.0**-41, 1.0 + 2.0**-40, 1.0])
    with _x64("float64"):
        scores = {"k": jnp.asarray(column.reshape(4, 1), jnp.float64)}
        for mode in (eager, production_jit):
            mask = mode(lambda s: nm.nm_masks(s, 2, 4))(scores)["k"]
            assert mask.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(mask)[:, 0], [0, 1, 1, 0])
    scores32 = {"k": jnp.asarray(column.reshape(4, 1), jnp.float32)}
    np.testing.assert_array_equal(np.asarray(nm.nm_masks(scores32, 2, 4)["k"])[:, 0], [1, 1, 0, 0])
