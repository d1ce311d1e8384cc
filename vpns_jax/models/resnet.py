"""ResNet-18 / ResNet-50 in torchvision's layout.

Attribute names follow torchvision: the weights path ``('layer2', 0, 'downsample', 0, 'kernel')`` is the state-dict
key ``layer2.0.downsample.0.weight`` (kernels HWIO, not OIHW; BatchNorm ``scale``/``mean``/``var``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vpns_jax.models.layers import BatchNorm2d, Conv2d, MaxPool2d, compute_input, logits_of, scale_channels, torch_linear

STEMS = ("imagenet", "cifar")
Stem = Literal["imagenet", "cifar"]


def _downsample(in_channels: int, out_channels: int, stride: int, rngs: nnx.Rngs) -> nnx.List | None:
    """torchvision's projection shortcut, or None where the identity fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nnx.List(
        [
            Conv2d(in_channels, out_channels, 1, stride=stride, rngs=rngs),
            BatchNorm2d(out_channels),
        ]
    )


def _shortcut(downsample: nnx.List | None, x: jax.Array, train: bool) -> jax.Array:
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x), train=train)


class BasicBlock(nnx.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, rngs: nnx.Rngs) -> None:
        out_channels = planes * self.expansion
        self.conv1 = Conv2d(in_channels, planes, 3, stride=stride, padding=1, rngs=rngs)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, out_channels, 3, padding=1, rngs=rngs)
        self.bn2 = BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        return jax.nn.relu(out + _shortcut(self.downsample, x, train))


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck, stride on the 3x3 conv (ResNet v1.5)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, rngs: nnx.Rngs) -> None:
        out_channels = planes * self.expansion
        self.conv1 = Conv2d(in_channels, planes, 1, rngs=rngs)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=1, rngs=rngs)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, out_channels, 1, rngs=rngs)
        self.bn3 = BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
        out = self.bn3(self.conv3(out), train=train)
        return jax.nn.relu(out + _shortcut(self.downsample, x, train))


class ResNet(nnx.Module):
    """torchvision-style ResNet with an ImageNet or CIFAR stem; ``width`` scales the base widths 64/128/256/512
    (``scale_channels``), and a Bottleneck's output is the scaled base width times 4."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        num_classes: int,
        width: float = 1.0,
        stem: Stem = "imagenet",
        rngs: nnx.Rngs,
    ) -> None:
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid stems: {STEMS}")
        self.stem = stem
        in_channels = scale_channels(64, width)
        if stem == "imagenet":
            self.conv1 = Conv2d(3, in_channels, 7, stride=2, padding=3, rngs=rngs)
        else:
            self.conv1 = Conv2d(3, in_channels, 3, stride=1, padding=1, rngs=rngs)
        self.bn1 = BatchNorm2d(in_channels)
        self.maxpool = MaxPool2d(3, 2, 1) if stem == "imagenet" else None
        self.compute_dtype = None  # None: the input's dtype; models.create_model sets it

        stages = []
        for i, (base, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            planes = scale_channels(base, width)
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_channels, planes, stride=stride, rngs=rngs))
                in_channels = planes * block.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = torch_linear(in_channels, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for NHWC images ``x``; ``dropout_key`` is unused (no dropout in ResNet)."""
        del dropout_key
        x = jax.nn.relu(self.bn1(self.conv1(compute_input(x, self.compute_dtype)), train=train))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                x = blk(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return logits_of(self.fc(x))


def resnet18(*, num_classes: int, width: float = 1.0, stem: Stem = "imagenet", rngs: nnx.Rngs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, width=width, stem=stem, rngs=rngs)


def resnet50(*, num_classes: int, width: float = 1.0, stem: Stem = "imagenet", rngs: nnx.Rngs) -> ResNet:
    """ResNet-50 (Bottleneck v1.5, [3, 4, 6, 3])."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, width=width, stem=stem, rngs=rngs)
