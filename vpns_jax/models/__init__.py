"""Model zoo: ResNet-18/50, VGG-16(-BN) and ViT-B/16, ViT-B/32, ViT-L/16 with torchvision layouts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vpns_jax.models import layers, vit as vit_models
from vpns_jax.models.resnet import STEMS, resnet18, resnet50
from vpns_jax.models.vgg import vgg16, vgg16_bn
from vpns_jax.models.vit import VIT_NAMES

MODEL_NAMES = ("resnet18", "resnet50", "vgg16", "vgg16_bn", *VIT_NAMES)

# Path of the final classification layer in each model's weights dict.
CLASSIFIER_PATHS: dict[str, tuple[Any, ...]] = {
    "resnet18": ("fc",),
    "resnet50": ("fc",),
    "vgg16": ("classifier", 6),
    "vgg16_bn": ("classifier", 6),
    **{name: ("heads", "head") for name in VIT_NAMES},
}


COMPUTE_DTYPES = ("float32", "bfloat16")


def check_dtype_runs(dtype: str) -> None:
    """A one-line ValueError when the default backend cannot run a matmul in ``dtype`` (probed once, tiny)."""
    try:
        jax.block_until_ready(jax.jit(lambda a: a @ a)(jnp.ones((2, 2), dtype)))
    except Exception as error:  # noqa: BLE001 - whatever the backend raises, the user needs one line
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(f"the {jax.default_backend()} backend cannot compute in {dtype} ({first}): "
                         "use model.dtype='float32'") from None


def create_model(
    name: str,
    *,
    num_classes: int,
    width: float = 1.0,
    stem: str = "imagenet",
    rngs: nnx.Rngs,
    dtype: str = "float32",
    conv_impl: str = "auto",
    pool_impl: str = "auto",
    image_size: int | None = None,
    vit: dict | None = None,
) -> nnx.Module:
    """Builds model ``name`` (one of ``MODEL_NAMES``); ``stem`` 'cifar' is for ResNets only.

    ``dtype`` (``COMPUTE_DTYPES``) is the compute dtype of convs, matmuls and activations: parameters stay float32,
    normalisation statistics, softmax and logits at least float32, and 'float32' keeps the input's dtype (float64
    stays float64). ``dtype``, ``conv_impl`` and ``pool_impl`` are static (in the graphdef). ViTs only:
    ``image_size`` (None: 224) and ``vit`` (``vit.vit_shape``'s overrides).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {MODEL_NAMES}")
    if name in VIT_NAMES:
        if stem != "imagenet":
            raise ValueError(f"{name} supports only stem 'imagenet', got {stem!r}; valid stems: ('imagenet',)")
        model = vit_models.vision_transformer(name, num_classes=num_classes, image_size=image_size, vit=vit,
                                              width=width, rngs=rngs)
        return _set_kernels(model, dtype, conv_impl, pool_impl)
    _refuse_vit_options(name, image_size, vit)
    if name in ("resnet18", "resnet50"):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r} for {name}; valid stems: {STEMS}")
        factory = resnet18 if name == "resnet18" else resnet50
        model = factory(num_classes=num_classes, width=width, stem=stem, rngs=rngs)
    elif stem != "imagenet":
        raise ValueError(f"{name} supports only stem 'imagenet', got {stem!r}; valid stems: ('imagenet',)")
    else:
        factory = vgg16 if name == "vgg16" else vgg16_bn
        model = factory(num_classes=num_classes, width=width, rngs=rngs)
    return _set_kernels(model, dtype, conv_impl, pool_impl)


def model_options(name: str, input_size: int, vit: Mapping[str, Any] | None) -> dict[str, Any]:
    """``create_model``'s ViT-only arguments for model ``name`` fed ``input_size`` px images (none for a CNN)."""
    if name not in VIT_NAMES:
        return {}
    return {"image_size": int(input_size), "vit": {key: int(value) for key, value in dict(vit or {}).items()}}


def _refuse_vit_options(name: str, image_size: int | None, vit: dict | None) -> None:
    """A one-line ValueError where a CNN is given ViT-only options (a ``vit`` dict of only zeros is none)."""
    vits = ", ".join(VIT_NAMES)
    if vit and any(value not in (0, None) for value in vit.values()):
        raise ValueError(f"model.vit options apply only to ViT models ({vits}), got {name}")
    if image_size is not None:
        raise ValueError(f"model.image_size applies only to ViT models ({vits}), got {name}: a CNN takes any size")


def _set_kernels(model: nnx.Module, dtype: str, conv_impl: str, pool_impl: str) -> nnx.Module:
    """Sets the compute dtype and kernel choices on every module they concern (checked first)."""
    for value, choices, what in ((dtype, COMPUTE_DTYPES, "dtype"), (conv_impl, layers.CONV_IMPLS, "conv_impl"),
                                 (pool_impl, layers.POOL_IMPLS, "pool_impl")):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; valid: {choices}")
    compute = None if dtype == "float32" else dtype
    model.compute_dtype = compute
    for _, module in nnx.iter_modules(model):
        if isinstance(module, layers.Conv2d):
            module.impl = conv_impl
        elif isinstance(module, layers.MaxPool2d):
            module.impl = pool_impl
        elif isinstance(module, nnx.Linear):
            module.dtype = None if compute is None else jnp.dtype(compute)
    return model


__all__ = ["CLASSIFIER_PATHS", "COMPUTE_DTYPES", "MODEL_NAMES", "VIT_NAMES", "check_dtype_runs", "create_model",
           "model_options"]
