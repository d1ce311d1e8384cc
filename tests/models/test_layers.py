"""Layers against direct numpy implementations of torch's definitions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vpns_jax.models import layers


def _np_conv2d(x: np.ndarray, k: np.ndarray, stride: int, padding: int) -> np.ndarray:
    n, h, w, _ = x.shape
    kh, kw, _, o = k.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, o), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, k)
    return out


def _np_max_pool(x: np.ndarray, window: int, stride: int, padding: int) -> np.ndarray:
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
    oh = (h + 2 * padding - window) // stride + 1
    ow = (w + 2 * padding - window) // stride + 1
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            rows = slice(i * stride, i * stride + window)
            cols = slice(j * stride, j * stride + window)
            out[:, i, j, :] = xp[:, rows, cols, :].max(axis=(1, 2))
    return out


def _np_adaptive_avg_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    n, h, w, c = x.shape
    out = np.empty((n, out_h, out_w, c), np.float64)
    for i in range(out_h):
        h0, h1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
        for j in range(out_w):
            w0, w1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
            out[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize(
    ("channels", "width", "expected"),
    [(64, 1.0, 64), (64, 1 / 8, 8), (64, 1 / 16, 4), (4096, 1 / 16, 256), (3, 0.1, 1), (100, 0.333, 33)],
)
def test_scale_channels(channels: int, width: float, expected: int) -> None:
    assert layers.scale_channels(channels, width) == expected


def test_conv2d_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    for stride, padding in [(1, 0), (1, 1), (2, 1), (2, 3)]:
        got = np.asarray(layers.conv2d(jnp.asarray(x), jnp.asarray(k), stride, padding))
        want = _np_conv2d(x.astype(np.float64), k.astype(np.float64), stride, padding)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("size", "stride", "padding"), [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2), (2, 1, 2)])
def test_im2col_conv_matches_lax_conv_values_and_gradients(size, stride, padding) -> None:
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.standard_normal((2, size, size, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((padding, padding), (padding, padding)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # A 3x3 window on a map of at most 4 px takes the im2col path inside conv2d; a 1x1 one never does.
    assert layers.runs_as_im2col((size, size), (3, 3)) and not layers.runs_as_im2col((size, size), (1, 1))
    assert not layers.runs_as_im2col((layers.IM2COL_MAX_MAP + 1, 8), (3, 3))
    want = _np_conv2d(np.asarray(x, np.float64), np.asarray(k, np.float64), stride, padding)
    np.testing.assert_allclose(layers.conv2d(x, k, stride, padding), want, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    got = jax.vjp(lambda x, k: layers.conv2d(x, k, stride, padding), x, k)[1](cotangent)
    ref = jax.vjp(lax_conv, x, k)[1](cotangent)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # The compiled forward and backward hold no convolution at all.
    hlo = jax.jit(jax.grad(lambda x, k: layers.conv2d(x, k, stride, padding).sum(), (0, 1))).lower(x, k)
    assert "convolution" not in hlo.compile().as_text()


def test_conv2d_module_bias_and_shapes() -> None:
    conv = layers.Conv2d(3, 5, 3, stride=2, padding=1, use_bias=True, rngs=nnx.Rngs(0))
    assert conv.kernel[...].shape == (3, 3, 3, 5)
    np.testing.assert_array_equal(np.asarray(conv.bias[...]), np.zeros(5))
    conv.bias.set_value(jnp.arange(5, dtype=jnp.float32))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    got = np.asarray(conv(x))
    want = _np_conv2d(np.asarray(x, np.float64), np.asarray(conv.kernel[...], np.float64), 2, 1) + np.arange(5)
    assert got.shape == (2, 4, 4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert layers.Conv2d(3, 5, 1, rngs=nnx.Rngs(0)).bias is None


def test_conv2d_default_init_is_kaiming_normal_fan_out() -> None:
    conv = layers.Conv2d(64, 256, 3, rngs=nnx.Rngs(0))
    k = np.asarray(conv.kernel[...])
    assert k.shape == (3, 3, 64, 256) and k.dtype == np.float32
    std = math.sqrt(2.0 / (3 * 3 * 256))
    assert abs(k.std() / std - 1.0) < 0.02
    assert abs(k.mean()) < 0.02 * std
    # Untruncated: ~0.27% of 147k samples lie beyond 3 std.
    assert np.abs(k).max() > 3.5 * std


def test_torch_linear_init_bounds() -> None:
    lin = layers.torch_linear(400, 300, rngs=nnx.Rngs(0))
    bound = 1 / math.sqrt(400)
    k, b = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    assert k.shape == (400, 300) and b.shape == (300,)
    for v in (k, b):
        assert np.abs(v).max() <= bound
        assert np.abs(v).max() > 0.95 * bound
        assert v.min() < 0 < v.max()
    # Uniform on [-b, b] has std b/sqrt(3).
    assert abs(k.std() / (bound / math.sqrt(3)) - 1) < 0.02


def test_batchnorm_train_matches_torch_semantics() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 5)) * 3 + 1).astype(np.float32)
    bn = layers.BatchNorm2d(5)
    scale = np.linspace(0.5, 2.0, 5).astype(np.float32)
    bias = np.linspace(-1.0, 1.0, 5).astype(np.float32)
    bn.scale.set_value(jnp.asarray(scale))
    bn.bias.set_value(jnp.asarray(bias))
    old_mean = np.full(5, 0.3, np.float32)
    old_var = np.full(5, 2.0, np.float32)
    bn.mean.set_value(jnp.asarray(old_mean))
    bn.var.set_value(jnp.asarray(old_var))

    y = np.asarray(bn(jnp.asarray(x), train=True))

    x64 = x.astype(np.float64)
    n = 2 * 3 * 4
    mu = x64.mean(axis=(0, 1, 2))
    var_biased = ((x64 - mu) ** 2).mean(axis=(0, 1, 2))
    var_unbiased = ((x64 - mu) ** 2).sum(axis=(0, 1, 2)) / (n - 1)
    np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(var_biased + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)
    new_mean = 0.9 * old_mean + 0.1 * mu
    new_var = 0.9 * old_var + 0.1 * var_unbiased
    np.testing.assert_allclose(np.asarray(bn.mean[...]), new_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), new_var, rtol=1e-6, atol=1e-6)
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32

    # Eval normalises with the running statistics and leaves them alone.
    y_eval = np.asarray(bn(jnp.asarray(x), train=False))
    np.testing.assert_allclose(
        y_eval, (x64 - new_mean) / np.sqrt(new_var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(bn.mean[...]), new_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), new_var, rtol=1e-6, atol=1e-6)


def test_batchnorm_init_and_single_value_error() -> None:
    bn = layers.BatchNorm2d(3)
    np.testing.assert_array_equal(np.asarray(bn.scale[...]), np.ones(3))
    np.testing.assert_array_equal(np.asarray(bn.bias[...]), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.var[...]), np.ones(3))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(jnp.ones((1, 1, 1, 3)), train=True)


@pytest.mark.parametrize(
    ("size", "window", "stride", "padding"),
    [(7, 3, 2, 1), (8, 3, 2, 1), (5, 2, 2, 0), (4, 2, 2, 0), (2, 3, 2, 1), (1, 3, 2, 1)],
)
def test_max_pool2d_matches_torch_definition(size: int, window: int, stride: int, padding: int) -> None:
    # All-negative inputs: zero padding instead of -inf would show up.
    x = -np.abs(np.random.default_rng(size).standard_normal((2, size, size + 1, 3))).astype(np.float32) - 1
    got = np.asarray(layers.max_pool2d(jnp.asarray(x), window, stride, padding))
    want = _np_max_pool(x, window, stride, padding)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _np_max_pool_grad(x: np.ndarray, g: np.ndarray, window: int, stride: int, padding: int) -> np.ndarray:
    """torch's rule: each window's upstream gradient goes to its first maximum in row-major order."""
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
    grad = np.zeros_like(xp, dtype=np.float64)
    for n in range(x.shape[0]):
        for c in range(x.shape[3]):
            for i in range(g.shape[1]):
                for j in range(g.shape[2]):
                    patch = xp[n, i * stride : i * stride + window, j * stride : j * stride + window, c]
                    a, b = np.unravel_index(np.argmax(patch), patch.shape)
                    grad[n, i * stride + a, j * stride + b, c] += g[n, i, j, c]
    return grad[:, padding : padding + x.shape[1], padding : padding + x.shape[2], :]


@pytest.mark.parametrize(("size", "window", "stride", "padding"), [(7, 3, 2, 1), (8, 3, 2, 1), (5, 2, 2, 0), (3, 3, 1, 1)])
def test_max_pool2d_gradient_goes_to_the_first_maximum_of_each_window(size, window, stride, padding) -> None:
    rng = np.random.default_rng(size)
    # Values on a coarse grid: many windows hold tied maxima.
    x = (np.round(rng.standard_normal((2, size, size + 1, 3)) * 2) / 2).astype(np.float32)
    y, vjp = jax.vjp(lambda x: layers.max_pool2d(x, window, stride, padding), jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    want = _np_max_pool_grad(x, g.astype(np.float64), window, stride, padding)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want, rtol=1e-6, atol=1e-6)
    # The backward pass holds no scatter (XLA:CPU's select-and-scatter lowering).
    hlo = jax.jit(jax.grad(lambda x: layers.max_pool2d(x, window, stride, padding).sum())).lower(jnp.asarray(x))
    assert "scatter" not in hlo.compile().as_text()


def test_max_pool2d_defaults_are_resnet_stem() -> None:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 2)), jnp.float32)
    got = layers.max_pool2d(x)
    assert got.shape == (1, 8, 8, 2)
    np.testing.assert_array_equal(np.asarray(got), _np_max_pool(np.asarray(x), 3, 2, 1))


@pytest.mark.parametrize(
    ("in_hw", "out_hw"),
    [((5, 5), (3, 3)), ((1, 1), (7, 7)), ((7, 7), (7, 7)), ((14, 14), (7, 7)), ((4, 4), (7, 7)),
     ((2, 2), (7, 7)), ((6, 10), (4, 3)), ((3, 9), (7, 7)), ((13, 8), (7, 7))],
)  # fmt: skip
def test_adaptive_avg_pool2d_matches_torch_bins(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    x = np.random.default_rng(sum(in_hw)).standard_normal((2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(layers.adaptive_avg_pool2d(jnp.asarray(x), out_hw))
    want = _np_adaptive_avg_pool(x.astype(np.float64), *out_hw)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_adaptive_avg_pool2d_int_size_replicates_1x1() -> None:
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 1, 1, 3)
    got = np.asarray(layers.adaptive_avg_pool2d(x, 7))
    assert got.shape == (2, 7, 7, 3)
    np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(x), (2, 7, 7, 3)))


def test_dropout_statistics_and_scaling() -> None:
    x = jnp.ones((100, 100))
    y = np.asarray(layers.dropout(x, 0.5, jax.random.key(0)))
    assert set(np.unique(y)) == {0.0, 2.0}
    assert abs((y == 0).mean() - 0.5) < 0.02
    drop = layers.Dropout(0.5)
    np.testing.assert_array_equal(np.asarray(drop(x, key=None)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(drop(x, key=jax.random.key(0))), y)
