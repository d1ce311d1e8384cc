"""VGG-16 and VGG-16-BN in torchvision's layout.

``features`` and ``classifier`` are ``nnx.List``s indexed exactly like
torchvision's ``nn.Sequential``s: parameter-free ReLU / MaxPool2d / Dropout
modules fill the indices torchvision gives them, so they leave no entry in the
weights dict and ``('features', 3, 'kernel')`` in vgg16_bn is torchvision's
``features.3.weight``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vpns_jax.models.layers import (
    BatchNorm2d,
    Conv2d,
    Dropout,
    MaxPool2d,
    ReLU,
    adaptive_avg_pool2d,
    compute_input,
    logits_of,
    scale_channels,
)

# torchvision's configuration "D"; "M" is a 2x2/2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

_DROPOUT_RATE = 0.5


def vgg_conv_indices(weights: dict) -> list[int]:
    """Indices in ``weights['features']`` of VGG's convs, in forward order."""
    return sorted(i for i, layer in weights["features"].items() if "kernel" in layer)


def _normal_001(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """torchvision VGG's Linear init: N(0, 0.01)."""
    return 0.01 * jax.random.normal(key, shape, dtype)


def _vgg_linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, kernel_init=_normal_001, bias_init=nnx.initializers.zeros, rngs=rngs
    )


class VGG(nnx.Module):
    """torchvision-style VGG with a width multiplier on every channel count and the 4096 hidden width."""

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        *,
        batch_norm: bool,
        num_classes: int,
        width: float = 1.0,
        rngs: nnx.Rngs,
    ) -> None:
        features: list[nnx.Module] = []
        in_channels = 3
        for item in cfg:
            if item == "M":
                features.append(MaxPool2d(2, 2, 0))
                continue
            out_channels = scale_channels(int(item), width)
            features.append(Conv2d(in_channels, out_channels, 3, padding=1, use_bias=True, rngs=rngs))
            if batch_norm:
                features.append(BatchNorm2d(out_channels))
            features.append(ReLU())
            in_channels = out_channels
        self.features = nnx.List(features)
        self.compute_dtype = None  # None: the input's dtype; models.create_model sets it

        hidden = scale_channels(4096, width)
        self.classifier = nnx.List(
            [
                _vgg_linear(in_channels * 7 * 7, hidden, rngs),
                ReLU(),
                Dropout(_DROPOUT_RATE),
                _vgg_linear(hidden, hidden, rngs),
                ReLU(),
                Dropout(_DROPOUT_RATE),
                _vgg_linear(hidden, num_classes, rngs),
            ]
        )

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for NHWC images ``x``; training mode needs ``dropout_key``."""
        if train and dropout_key is None:
            raise ValueError("VGG in training mode needs a dropout_key (dropout is active when train=True)")
        x = compute_input(x, self.compute_dtype)
        for layer in self.features:
            x = layer(x, train=train) if isinstance(layer, BatchNorm2d) else layer(x)
        x = adaptive_avg_pool2d(x, 7)
        # Flatten in torch's (C, H, W) order so that torchvision's classifier.0
        # weight ports with a plain transpose.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)

        num_dropouts = sum(isinstance(layer, Dropout) for layer in self.classifier)
        keys = list(jax.random.split(dropout_key, num_dropouts)) if train else [None] * num_dropouts
        for layer in self.classifier:
            x = layer(x, key=keys.pop(0)) if isinstance(layer, Dropout) else layer(x)
        return logits_of(x)


def vgg16(*, num_classes: int, width: float = 1.0, rngs: nnx.Rngs) -> VGG:
    """VGG-16 without BatchNorm (torchvision ``vgg16``)."""
    return VGG(VGG16_CFG, batch_norm=False, num_classes=num_classes, width=width, rngs=rngs)


def vgg16_bn(*, num_classes: int, width: float = 1.0, rngs: nnx.Rngs) -> VGG:
    """VGG-16 with BatchNorm after every conv (torchvision ``vgg16_bn``)."""
    return VGG(VGG16_CFG, batch_norm=True, num_classes=num_classes, width=width, rngs=rngs)
