"""Vision Transformers (ViT-B/16, ViT-B/32, ViT-L/16) in torchvision's layout.

Names follow torchvision's ``VisionTransformer`` (``encoder.layers.encoder_layer_3.mlp.0.weight`` is the path
``('encoder', 'layers', 'encoder_layer_3', 'mlp', 0, 'kernel')``, transposed), except attention's ``in_proj_weight``
/ ``in_proj_bias``, held by an ``in_proj`` Linear (kernel (D, 3D), columns q | k | v). Images are NHWC at exactly
``image_size`` px; dropout rates are torchvision's (0). Prunable kernels: docs/methods.md, "Vision Transformers".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vpns_jax.models.layers import (
    GELU,
    Conv2d,
    Dropout,
    Embedding,
    LayerNorm,
    compute_input,
    logits_of,
    scale_channels,
    uniform_symmetric,
    xavier_uniform,
)

VIT_NAMES = ("vit_b_16", "vit_b_32", "vit_l_16")
VIT_OPTIONS = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")
DEFAULT_IMAGE_SIZE = 224
LAYER_NORM_EPS = 1e-6  # torchvision's ViT: partial(nn.LayerNorm, eps=1e-6)
CUBIC_A = -0.75  # torch's cubic convolution coefficient (upsample_bicubic2d)


@dataclasses.dataclass(frozen=True)
class ViTShape:
    """The sizes of a Vision Transformer (torchvision's constructor arguments)."""

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int


VIT_SHAPES = {
    "vit_b_16": ViTShape(16, 12, 12, 768, 3072),
    "vit_b_32": ViTShape(32, 12, 12, 768, 3072),
    "vit_l_16": ViTShape(16, 24, 16, 1024, 4096),
}


def _option(name: str, key: str, value: object, default: int) -> int:
    """One ``vit`` option as a positive int; 0 (or None) is the named model's value."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == 0):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"model.vit.{key} must be a positive integer (0: {name}'s {default}), got {value!r}")
    return int(value)


def vit_shape(name: str, vit: Mapping[str, object] | None = None, width: float = 1.0) -> ViTShape:
    """The shape of ViT ``name`` with the ``vit`` overrides (0 or missing: the named value), then ``width``, which
    scales hidden_dim (to a multiple of num_heads, at least num_heads) and mlp_dim; bad options are ValueErrors."""
    if name not in VIT_SHAPES:
        raise ValueError(f"unknown ViT {name!r}; valid: {VIT_NAMES}")
    named = VIT_SHAPES[name]
    vit = dict(vit or {})
    unknown = sorted(set(vit) - set(VIT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model.vit option(s) {unknown} for {name}; valid: {VIT_OPTIONS}")
    shape = ViTShape(**{key: _option(name, key, vit.get(key), getattr(named, key)) for key in VIT_OPTIONS})
    if shape.hidden_dim % shape.num_heads:
        raise ValueError(f"{name}: hidden_dim {shape.hidden_dim} is not divisible by num_heads {shape.num_heads}; "
                         "set model.vit.hidden_dim to a multiple of num_heads")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"{name}: width must be > 0, got {width!r}")
    heads = shape.num_heads
    hidden = max(heads, round(shape.hidden_dim * width / heads) * heads)
    return dataclasses.replace(shape, hidden_dim=hidden, mlp_dim=scale_channels(shape.mlp_dim, width))


def check_image_size(name: str, image_size: int | None, patch_size: int) -> int:
    """``image_size`` (None: ``DEFAULT_IMAGE_SIZE``) if it is a positive multiple of ``patch_size``."""
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"model.image_size must be a positive integer for {name}, got {image_size!r}")
    if size % patch_size:
        raise ValueError(f"model.image_size {size} is not divisible by {name}'s patch size {patch_size}: "
                         f"use a multiple of {patch_size}")
    return int(size)


def _trunc_normal_fan_in(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """torchvision's conv_proj init: trunc_normal_(std=sqrt(1 / fan_in)), cut at +-2 (absolute, as torch)."""
    std = math.sqrt(1.0 / math.prod(shape[:-1]))
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)


def _normal(std: float):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return std * jax.random.normal(key, shape, dtype)

    return init


class MultiheadSelfAttention(nnx.Module):
    """torch ``nn.MultiheadAttention(D, heads, batch_first=True)`` on (x, x, x), no mask, no dropout; ``in_proj``
    holds ``in_proj_weight`` transposed (columns q | k | v) and head h reads dims ``h*dh:(h+1)*dh`` of each."""

    def __init__(self, hidden_dim: int, num_heads: int, *, rngs: nnx.Rngs) -> None:
        self.in_proj = nnx.Linear(hidden_dim, 3 * hidden_dim, kernel_init=xavier_uniform(),
                                  bias_init=nnx.initializers.zeros, rngs=rngs)
        # torch's out_proj keeps nn.Linear's weight init; MultiheadAttention zeroes its bias.
        self.out_proj = nnx.Linear(hidden_dim, hidden_dim, kernel_init=uniform_symmetric(1 / math.sqrt(hidden_dim)),
                                   bias_init=nnx.initializers.zeros, rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        n, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q, k, v = (a.reshape(n, tokens, self.num_heads, head_dim) for a in jnp.split(self.in_proj(x), 3, axis=-1))
        # Scores and softmax in at least float32 whatever the compute dtype; the weighted sum in x's dtype.
        wide = jnp.promote_types(x.dtype, jnp.float32)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=wide) / math.sqrt(head_dim)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, tokens, dim)
        return self.out_proj(out)


def _mlp_linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    """torchvision MLPBlock's Linear init: xavier_uniform_ weight, normal(std=1e-6) bias."""
    return nnx.Linear(in_features, out_features, kernel_init=xavier_uniform(), bias_init=_normal(1e-6), rngs=rngs)


class EncoderBlock(nnx.Module):
    """Pre-norm block: x + attention(ln_1(x)), then + mlp(ln_2(.)); ``mlp`` keeps torchvision's indices."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs) -> None:
        self.ln_1 = LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.self_attention = MultiheadSelfAttention(hidden_dim, num_heads, rngs=rngs)
        self.ln_2 = LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        # Linear, GELU, Dropout, Linear, Dropout: the dropouts (rate 0) hold indices 2 and 4 and no weights.
        self.mlp = nnx.List([_mlp_linear(hidden_dim, mlp_dim, rngs), GELU(), Dropout(0.0),
                             _mlp_linear(mlp_dim, hidden_dim, rngs), Dropout(0.0)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attention(self.ln_1(x))
        y = self.ln_2(x)
        for layer in self.mlp:
            y = layer(y, key=None) if isinstance(layer, Dropout) else layer(y)
        return x + y


class Encoder(nnx.Module):
    """Position embedding, ``layers.encoder_layer_{i}`` blocks, final LayerNorm ``ln``."""

    def __init__(self, seq_length: int, shape: ViTShape, *, rngs: nnx.Rngs) -> None:
        dim = shape.hidden_dim
        self.pos_embedding = Embedding(_normal(0.02)(rngs.params(), (1, seq_length, dim), jnp.float32))
        self.layers = nnx.Dict({f"encoder_layer_{i}": EncoderBlock(dim, shape.num_heads, shape.mlp_dim, rngs=rngs)
                                for i in range(shape.num_layers)})
        self.num_layers = shape.num_layers
        self.ln = LayerNorm(dim, eps=LAYER_NORM_EPS)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.pos_embedding[...].astype(x.dtype)
        for i in range(self.num_layers):  # forward order (encoder_layer_10 after encoder_layer_9)
            x = self.layers[f"encoder_layer_{i}"](x)
        return self.ln(x)


class VisionTransformer(nnx.Module):
    """torchvision's ``VisionTransformer`` (no representation layer, dropout rates 0) on NHWC images."""

    def __init__(self, *, image_size: int, shape: ViTShape, num_classes: int, rngs: nnx.Rngs) -> None:
        dim, patch = shape.hidden_dim, shape.patch_size
        self.conv_proj = Conv2d(3, dim, patch, stride=patch, use_bias=True, kernel_init=_trunc_normal_fan_in,
                                rngs=rngs)
        self.class_token = Embedding(jnp.zeros((1, 1, dim), jnp.float32))
        self.encoder = Encoder((image_size // patch) ** 2 + 1, shape, rngs=rngs)
        zeros = nnx.initializers.zeros  # torchvision zeroes the head
        self.heads = nnx.Dict({"head": nnx.Linear(dim, num_classes, kernel_init=zeros, bias_init=zeros, rngs=rngs)})
        self.image_size = image_size
        self.patch_size = patch
        self.num_heads = shape.num_heads
        self.compute_dtype = None  # None: the input's dtype; models.create_model sets it

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for NHWC images ``x`` of ``image_size`` px; ``train`` and ``dropout_key`` change nothing
        (no dropout, no BatchNorm) and exist for the CNNs' signature."""
        del train, dropout_key
        if x.ndim != 4 or x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"the ViT takes NHWC images of {self.image_size}x{self.image_size} px (its position "
                             f"embedding's grid), got input shape {x.shape}")
        x = compute_input(x, self.compute_dtype)
        x = self.conv_proj(x)
        # Patches in torchvision's order, row-major over the (h, w) grid: its (n, D, h*w) permuted to (n, h*w, D).
        n, dim = x.shape[0], x.shape[-1]
        x = x.reshape(n, -1, dim)
        token = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (n, 1, dim))
        x = self.encoder(jnp.concatenate([token, x], axis=1))
        return logits_of(self.heads["head"](x[:, 0]))


def vision_transformer(name: str, *, num_classes: int, image_size: int | None = None,
                       vit: Mapping[str, object] | None = None, width: float = 1.0,
                       rngs: nnx.Rngs) -> VisionTransformer:
    """ViT ``name`` (``VIT_NAMES``) with the ``vit`` overrides and ``width`` (:func:`vit_shape`) at ``image_size``."""
    shape = vit_shape(name, vit, width)
    size = check_image_size(name, image_size, shape.patch_size)
    return VisionTransformer(image_size=size, shape=shape, num_classes=num_classes, rngs=rngs)


def vit_b_16(*, num_classes: int, image_size: int = DEFAULT_IMAGE_SIZE, rngs: nnx.Rngs) -> VisionTransformer:
    """torchvision ``vit_b_16``: patch 16, 12 layers, 12 heads, hidden 768, MLP 3072."""
    return vision_transformer("vit_b_16", num_classes=num_classes, image_size=image_size, rngs=rngs)


def vit_b_32(*, num_classes: int, image_size: int = DEFAULT_IMAGE_SIZE, rngs: nnx.Rngs) -> VisionTransformer:
    """torchvision ``vit_b_32``: patch 32, 12 layers, 12 heads, hidden 768, MLP 3072."""
    return vision_transformer("vit_b_32", num_classes=num_classes, image_size=image_size, rngs=rngs)


def vit_l_16(*, num_classes: int, image_size: int = DEFAULT_IMAGE_SIZE, rngs: nnx.Rngs) -> VisionTransformer:
    """torchvision ``vit_l_16``: patch 16, 24 layers, 16 heads, hidden 1024, MLP 4096."""
    return vision_transformer("vit_l_16", num_classes=num_classes, image_size=image_size, rngs=rngs)


def _cubic_taps(t: float) -> tuple[float, float, float, float]:
    """torch's cubic convolution weights of the samples at offsets -1, 0, 1, 2 from floor(src), t = src - floor."""
    a = CUBIC_A
    near = lambda s: ((a + 2) * s - (a + 3)) * s * s + 1  # noqa: E731 - |s| <= 1
    far = lambda s: ((a * s - 5 * a) * s + 8 * a) * s - 4 * a  # noqa: E731 - 1 < |s| < 2
    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of torch's 1-D bicubic resize with ``align_corners=True``: output i samples
    src = i * (in - 1) / (out - 1) (0 when out is 1), its four taps clamped to the border as upsample_bicubic2d's."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = scale * i
        base = math.floor(src)
        for offset, weight in zip((-1, 0, 1, 2), _cubic_taps(src - base)):
            matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
    return matrix


def interpolate_pos_embedding(pos_embedding: np.ndarray | jax.Array, grid: int) -> np.ndarray | jax.Array:
    """(1, 1 + g0*g0, D) -> (1, 1 + grid*grid, D) as torchvision's ``interpolate_embeddings``: the class token's row
    kept, the row-major g0 x g0 grid resized by separable bicubic (:func:`bicubic_matrix`). numpy in, numpy out
    (computed in float64, returned in the input's dtype); jax in, jax out."""
    xp = jnp if isinstance(pos_embedding, jax.Array) else np
    n, length, dim = pos_embedding.shape
    old = math.isqrt(length - 1)
    if n != 1 or old * old != length - 1 or grid < 1:
        raise ValueError(f"a position embedding of shape {tuple(pos_embedding.shape)} is not (1, 1 + g*g, D), "
                         f"or grid {grid} < 1: cannot interpolate")
    if grid == old:
        return pos_embedding
    wide = np.float64 if xp is np else jnp.promote_types(pos_embedding.dtype, jnp.float32)
    matrix = xp.asarray(bicubic_matrix(old, grid), wide)
    cells = pos_embedding[0, 1:].astype(wide).reshape(old, old, dim)
    resized = xp.einsum("ih,hwd,jw->ijd", matrix, cells, matrix).reshape(1, grid * grid, dim)
    return xp.concatenate([pos_embedding[:, :1], resized.astype(pos_embedding.dtype)], axis=1)


__all__ = ["DEFAULT_IMAGE_SIZE", "VIT_NAMES", "VIT_OPTIONS", "VIT_SHAPES", "MultiheadSelfAttention", "ViTShape",
           "VisionTransformer", "bicubic_matrix", "check_image_size", "interpolate_pos_embedding",
           "vision_transformer", "vit_b_16", "vit_b_32", "vit_l_16", "vit_shape"]
