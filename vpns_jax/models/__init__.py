"""Model zoo: ResNet-18/50 and VGG-16(-BN) with torchvision layouts."""

from __future__ import annotations

from typing import Any

from flax import nnx

from vpns_jax.models.resnet import STEMS, resnet18, resnet50
from vpns_jax.models.vgg import vgg16, vgg16_bn

MODEL_NAMES = ("resnet18", "resnet50", "vgg16", "vgg16_bn")

# Path of the final classification layer in each model's weights dict.
CLASSIFIER_PATHS: dict[str, tuple[Any, ...]] = {
    "resnet18": ("fc",),
    "resnet50": ("fc",),
    "vgg16": ("classifier", 6),
    "vgg16_bn": ("classifier", 6),
}


def create_model(
    name: str,
    *,
    num_classes: int,
    width: float = 1.0,
    stem: str = "imagenet",
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Builds model ``name`` (one of ``MODEL_NAMES``).

    ``stem`` is 'imagenet' or 'cifar' for ResNets; VGGs only have the
    'imagenet' layout.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {MODEL_NAMES}")
    if name in ("resnet18", "resnet50"):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r} for {name}; valid stems: {STEMS}")
        factory = resnet18 if name == "resnet18" else resnet50
        return factory(num_classes=num_classes, width=width, stem=stem, rngs=rngs)
    if stem != "imagenet":
        raise ValueError(f"{name} supports only stem 'imagenet', got {stem!r}; valid stems: ('imagenet',)")
    factory = vgg16 if name == "vgg16" else vgg16_bn
    return factory(num_classes=num_classes, width=width, rngs=rngs)


__all__ = ["CLASSIFIER_PATHS", "MODEL_NAMES", "create_model"]
