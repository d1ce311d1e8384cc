"""Building blocks with PyTorch semantics, in NHWC / float32.

They mirror ``torch.nn`` (initialisation, BatchNorm momentum and unbiased running variance, pooling bins) so the
models match torchvision numerically and its weights port by renaming and transposing only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def scale_channels(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by the width multiplier (at least 1): one rule for every model, so a
    layer's width matches what its consumers expect."""
    return max(1, round(channels * width))


def kaiming_normal_fan_out() -> Initializer:
    """torch ``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` for HWIO kernels: untruncated normal with std
    ``sqrt(2 / (kh * kw * out))``."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        *receptive, _, out_channels = shape
        fan_out = out_channels * math.prod(receptive)
        return math.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, dtype)

    return init


def uniform_symmetric(bound: float) -> Initializer:
    """Uniform initialiser on ``[-bound, bound)``."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def xavier_uniform() -> Initializer:
    """torch ``xavier_uniform_`` for (in, out) dense kernels: U(-b, b) with b = sqrt(6 / (in + out))."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        fan_in, fan_out = shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` initialised like torch's ``nn.Linear``: its ``kaiming_uniform_(a=sqrt(5))`` weight init is
    U(-1/sqrt(in), 1/sqrt(in)), the bias's bound."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=uniform_symmetric(bound),
        bias_init=uniform_symmetric(bound),
        rngs=rngs,
    )


# Largest input map (px) on which a conv with a window larger than 1x1 runs as im2col + matmul.
IM2COL_MAX_MAP = 4
# How convs and max-pools are computed (config.model.conv_impl, pool_impl). 'auto' takes the CPU kernels on the
# CPU backend only: they work around XLA:CPU (docs/performance.md); GPU and TPU get plain lax ops.
CONV_IMPLS = ("auto", "lax", "im2col")  # im2col: im2col + matmul on maps of at most IM2COL_MAX_MAP px
POOL_IMPLS = ("auto", "lax", "argmax")  # argmax: the custom VJP routing by the saved argmax; lax: JAX's own


def _cpu_kernels(impl: str, choices: tuple[str, ...], cpu_kernel: str) -> bool:
    """Whether ``impl`` selects the CPU kernel: named, or 'auto' on the CPU backend (read at trace time)."""
    if impl not in choices:
        raise ValueError(f"implementation {impl!r} is unknown: use one of {choices}")
    return impl == cpu_kernel or (impl == "auto" and backend() == "cpu")


def backend() -> str:
    """The backend programs are traced for ('cpu', 'gpu', 'tpu'): what 'auto' decides on."""
    return jax.default_backend()


def runs_as_im2col(map_size: tuple[int, int], kernel_size: tuple[int, int]) -> bool:
    """Whether :func:`conv2d` computes a conv as im2col + matmul: a window larger than 1x1 on a map of at most
    ``IM2COL_MAX_MAP`` px, where XLA swaps a conv's operands and XLA:CPU runs the swapped conv as a naive loop
    (docs/performance.md, "What was learnt about XLA:CPU")."""
    return kernel_size[0] * kernel_size[1] > 1 and min(map_size) <= IM2COL_MAX_MAP


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, impl: str = "auto") -> jax.Array:
    """2-D cross-correlation, NHWC input, HWIO kernel, symmetric zero padding: every conv of the package.

    ``impl`` (``CONV_IMPLS``): 'im2col' computes small maps as im2col + matmul (:func:`runs_as_im2col`), 'lax'
    always uses XLA's conv, 'auto' the first on CPU and the second elsewhere.
    """
    if _cpu_kernels(impl, CONV_IMPLS, "im2col") and runs_as_im2col(x.shape[1:3], kernel.shape[:2]):
        return conv2d_im2col(x, kernel, stride, padding)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv2d_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """:func:`conv2d` as patches times a matrix: the kh*kw strided slices of the padded input, concatenated on
    the channel axis in (i, j, c) order, contracted with the HWIO kernel reshaped to (kh*kw*in, out)."""
    kh, kw, in_channels, out_channels = kernel.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (padded.shape[1] - kh) // stride + 1
    out_w = (padded.shape[2] - kw) // stride + 1
    patches = jnp.concatenate(
        [
            padded[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    matrix = kernel.reshape(kh * kw * in_channels, out_channels)
    return jnp.einsum("nhwk,ko->nhwo", patches, matrix)


class Conv2d(nnx.Module):
    """Square 2-D convolution with a ``kernel`` of shape (kh, kw, in, out)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = False,
        rngs: nnx.Rngs,
        kernel_init: Initializer | None = None,
    ) -> None:
        init = kaiming_normal_fan_out() if kernel_init is None else kernel_init
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if use_bias else None
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.impl = "auto"  # CONV_IMPLS; models.create_model sets it

    def __call__(self, x: jax.Array) -> jax.Array:
        # In the activations' dtype: bfloat16 compute keeps float32 parameters (the cast's gradient is float32).
        y = conv2d(x, self.kernel[...].astype(x.dtype), self.stride, self.padding, self.impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class BatchNorm2d(nnx.Module):
    """BatchNorm over (N, H, W) with torch semantics: training normalises with the biased batch variance and
    updates the running variance with the unbiased one; ``momentum`` is torch's (the new batch's weight)."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5) -> None:
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # At least float32 (statistics of bfloat16 activations), and float64 where the input is.
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if train:
            n = x.shape[0] * x.shape[1] * x.shape[2]
            if n < 2:
                # torch refuses too; the unbiased variance would divide by zero.
                raise ValueError(
                    f"BatchNorm2d needs more than 1 value per channel when training, got input shape {x.shape}"
                )
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            m = self.momentum
            # Running statistics are bookkeeping, not part of the loss.
            batch_mean = jax.lax.stop_gradient(mean)
            batch_var = jax.lax.stop_gradient(var) * (n / (n - 1))
            # set_value is what the (deprecated in flax 0.12) `.value` setter calls.
            # Stored in the statistics' own dtype, so the state keeps its dtypes whatever the input's.
            self.mean.set_value(((1.0 - m) * self.mean[...] + m * batch_mean).astype(self.mean[...].dtype))
            self.var.set_value(((1.0 - m) * self.var[...] + m * batch_var).astype(self.var[...].dtype))
        else:
            mean = self.mean[...]
            var = self.var[...]
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        y = (xf - mean) * inv + self.bias[...]
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with torch semantics (biased variance, ``eps`` inside the root); parameters are
    named like BatchNorm2d's (``scale``, ``bias``), so torch's ``weight`` maps to ``scale`` by the same rule."""

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.num_features = num_features
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in at least float32 (bfloat16 activations), float64 where the input is; output in x's dtype.
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Embedding(nnx.Param):
    """A learned tensor added to (or joined with) the activations, such as a ViT's class token or position
    embedding: trained with the weights, never pruned (``functional.leaf_kinds`` calls it ``embedding``)."""


def _pool_padding(padding: int) -> tuple[tuple[int, int], ...]:
    return ((0, 0), (padding, padding), (padding, padding), (0, 0))


def max_pool2d_reference(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """:func:`max_pool2d` as XLA's ``reduce_window``, differentiated by JAX itself (select-and-scatter): the
    reference the custom gradient is tested against."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), _pool_padding(padding)
    )


def _window_views(x: jax.Array, window: int, stride: int, padding: int):
    """The ``window**2`` strided views of the -inf-padded ``x``, one per window position in row-major order;
    each has the pool output's shape (floor mode)."""
    padded = jnp.pad(x, _pool_padding(padding), constant_values=-jnp.inf)
    out_h, out_w = ((padded.shape[a] - window) // stride + 1 for a in (1, 2))
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    for i in range(window):
        for j in range(window):
            yield padded[:, i : i + span_h : stride, j : j + span_w : stride, :]


def max_pool2d(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1, impl: str = "auto") -> jax.Array:
    """torch ``max_pool2d`` (floor mode) on NHWC; padding counts as -inf.

    ``impl`` (``POOL_IMPLS``) picks the gradient: 'lax' is JAX's own (:func:`max_pool2d_reference`), 'argmax' the
    custom VJP below, 'auto' the custom VJP on CPU and JAX's own elsewhere. The custom VJP sends each window's
    gradient to its first maximum in row-major order, as torch, by the argmax the forward saved: the backward
    compares no value, since XLA may recompute the input there with another fusion, differing in the last bit.
    It also avoids select-and-scatter, costly on XLA:CPU (docs/performance.md, docs/gradients.md).
    """
    if not _cpu_kernels(impl, POOL_IMPLS, "argmax"):
        return max_pool2d_reference(x, window, stride, padding)
    return _max_pool(x, window, stride, padding, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x: jax.Array, window: int, stride: int, padding: int, x_shape: tuple[int, ...]) -> jax.Array:
    del x_shape  # static, for the backward
    return max_pool2d_reference(x, window, stride, padding)


def _max_pool_fwd(x: jax.Array, window: int, stride: int, padding: int, x_shape: tuple[int, ...]):
    del x_shape
    views = _window_views(x, window, stride, padding)
    # Maximum and argmax from the same values in one pass, so they always agree; strict > keeps the first.
    y = next(views)
    index_dtype = jnp.int8 if window * window <= jnp.iinfo(jnp.int8).max else jnp.int32
    argmax = jnp.zeros(y.shape, index_dtype)
    for position, view in enumerate(views, start=1):
        # Not `view > y`: the first NaN of a window wins and stays, so the output is NaN as reduce_window's.
        better = ~(view <= y) & ~jnp.isnan(y)
        y = jnp.where(better, view, y)
        argmax = jnp.where(better, jnp.asarray(position, index_dtype), argmax)
    return y, argmax


def _max_pool_bwd(
    window: int, stride: int, padding: int, x_shape: tuple[int, ...], argmax: jax.Array, g: jax.Array
) -> tuple[jax.Array]:
    padded_h, padded_w = x_shape[1] + 2 * padding, x_shape[2] + 2 * padding
    span_h, span_w = stride * (g.shape[1] - 1) + 1, stride * (g.shape[2] - 1) + 1
    grad = jnp.zeros((x_shape[0], padded_h, padded_w, x_shape[3]), g.dtype)
    for i in range(window):
        for j in range(window):
            share = jnp.where(argmax == i * window + j, g, jnp.zeros((), g.dtype))
            # Each window position's share, spread back onto the padded grid with stride - 1 zeros between.
            grad = grad + jax.lax.pad(
                share,
                jnp.zeros((), g.dtype),
                ((0, 0, 0), (i, padded_h - i - span_h, stride - 1), (j, padded_w - j - span_w, stride - 1), (0, 0, 0)),
            )
    return (grad[:, padding : padding + x_shape[1], padding : padding + x_shape[2], :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _adaptive_avg_pool_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """Adaptive average pooling along one axis with torch's bins, [floor(i*In/Out), ceil((i+1)*In/Out)); the bins
    are rectangles, so pooling H then W equals torch's 2-D average."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    if in_size % out_size == 0:
        k = in_size // out_size
        shape = x.shape[:axis] + (out_size, k) + x.shape[axis + 1 :]
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    if out_size % in_size == 0:
        # Every bin is a single input element: plain replication.
        return jnp.repeat(x, out_size // in_size, axis=axis)
    bins = []
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        bins.append(jnp.mean(jax.lax.slice_in_dim(x, start, end, axis=axis), axis=axis))
    return jnp.stack(bins, axis=axis)


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """torch ``adaptive_avg_pool2d`` on NHWC input."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = _adaptive_avg_pool_axis(x, 1, out_h)
    return _adaptive_avg_pool_axis(x, 2, out_w)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: zero with probability ``rate``, scale survivors by 1/(1-rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def compute_input(x: jax.Array, compute_dtype: str | None) -> jax.Array:
    """The network's input in the compute dtype (None: as given, so float64 inputs stay float64)."""
    return x if compute_dtype is None else x.astype(compute_dtype)


def logits_of(y: jax.Array) -> jax.Array:
    """Logits in at least float32: the loss and softmax never run in bfloat16."""
    return y.astype(jnp.promote_types(y.dtype, jnp.float32))


# Parameter-free modules. They exist so that containers can keep torchvision's
# indices (e.g. VGG's ``features.3``) while leaving no entry in the weights.


class ReLU(nnx.Module):
    """ReLU as a parameter-free module."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class GELU(nnx.Module):
    """torch ``nn.GELU()``: the exact (erf) form, not the tanh approximation."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)


class MaxPool2d(nnx.Module):
    """``max_pool2d`` as a parameter-free module."""

    def __init__(self, window: int, stride: int, padding: int = 0) -> None:
        self.window = window
        self.stride = stride
        self.padding = padding
        self.impl = "auto"  # POOL_IMPLS; models.create_model sets it

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool2d(x, self.window, self.stride, self.padding, self.impl)


class Dropout(nnx.Module):
    """Dropout placeholder; the caller passes the key, so no RNG state lives here."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, x: jax.Array, *, key: jax.Array | None) -> jax.Array:
        """Applies dropout with ``key``; ``key=None`` means eval mode (identity)."""
        if key is None:
            return x
        return dropout(x, self.rate, key)
