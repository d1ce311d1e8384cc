"""The model zoo through vpns_jax.models.functional: leaf kinds, classifier paths, factory."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vpns_jax.models import CLASSIFIER_PATHS, MODEL_NAMES, create_model, functional


def _abstract(name: str, **kwargs: Any) -> nnx.Module:
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


def _kind_counts(model: nnx.Module) -> tuple[dict[tuple[Any, ...], str], collections.Counter[str]]:
    flat = traverse_util.flatten_dict(functional.leaf_kinds(model))
    return flat, collections.Counter(flat.values())


def test_leaf_kinds_resnet18() -> None:
    flat, counts = _kind_counts(_abstract("resnet18", num_classes=10, width=1 / 8))
    # 20 convs (stem + 16 in blocks + 3 downsample) + fc; 20 BNs; only fc has a bias.
    assert counts == {
        functional.CONV_KERNEL: 20,
        functional.DENSE_KERNEL: 1,
        functional.BN: 40,
        functional.BIAS: 1,
    }
    assert flat[("layer2", 0, "downsample", 0, "kernel")] == functional.CONV_KERNEL
    assert flat[("layer2", 0, "downsample", 1, "scale")] == functional.BN
    assert flat[("fc", "kernel")] == functional.DENSE_KERNEL
    assert flat[("fc", "bias")] == functional.BIAS
    assert flat[("bn1", "bias")] == functional.BN
    assert ("layer1", 0, "downsample", 0, "kernel") not in flat


def test_leaf_kinds_resnet50() -> None:
    flat, counts = _kind_counts(_abstract("resnet50", num_classes=10, width=1 / 16))
    # 1 + 16 blocks * 3 + 4 downsample convs, each followed by a BN.
    assert counts == {functional.CONV_KERNEL: 53, functional.DENSE_KERNEL: 1, functional.BN: 106, functional.BIAS: 1}
    assert flat[("layer1", 0, "downsample", 0, "kernel")] == functional.CONV_KERNEL
    assert flat[("layer4", 2, "conv3", "kernel")] == functional.CONV_KERNEL


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_leaf_kinds_vgg(name: str) -> None:
    flat, counts = _kind_counts(_abstract(name, num_classes=10, width=1 / 16))
    expected = {functional.CONV_KERNEL: 13, functional.DENSE_KERNEL: 3, functional.BIAS: 16}
    if name == "vgg16_bn":
        expected[functional.BN] = 26
    assert counts == expected
    assert flat[("features", 0, "kernel")] == functional.CONV_KERNEL
    assert flat[("features", 0, "bias")] == functional.BIAS
    assert flat[("classifier", 6, "kernel")] == functional.DENSE_KERNEL
    if name == "vgg16_bn":
        assert flat[("features", 1, "scale")] == functional.BN
        assert flat[("features", 40, "kernel")] == functional.CONV_KERNEL
    else:
        assert flat[("features", 28, "kernel")] == functional.CONV_KERNEL


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_leaf_kinds_tree_matches_weights(name: str) -> None:
    model = _abstract(name, num_classes=10, width=1 / 16)
    kinds = functional.leaf_kinds(model)
    weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.structure(kinds) == jax.tree.structure(weights)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_classifier_paths(name: str) -> None:
    model = _abstract(name, num_classes=13, width=1 / 16)
    weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layer = weights
    for key in CLASSIFIER_PATHS[name]:
        layer = layer[key]
    assert set(layer) == {"kernel", "bias"}
    assert layer["kernel"].shape[-1] == 13 and layer["bias"].shape == (13,)
    # It is the only layer with num_classes outputs.
    flat = traverse_util.flatten_dict(weights)
    outs = [path for path, leaf in flat.items() if path[-1] == "kernel" and leaf.shape[-1] == 13]
    assert outs == [(*CLASSIFIER_PATHS[name], "kernel")]


def test_apply_model_uses_the_weights_dict() -> None:
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    model = create_model("resnet18", num_classes=5, width=1 / 16, stem="cifar", rngs=rngs)
    graphdef, weights, stats = functional.split_model(model)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    logits, _ = functional.apply_model(graphdef, weights, stats, x, train=False)
    assert float(jnp.abs(logits).max()) > 0
    weights["fc"]["kernel"] = jnp.zeros_like(weights["fc"]["kernel"])
    weights["fc"]["bias"] = jnp.arange(5, dtype=jnp.float32)
    logits, _ = functional.apply_model(graphdef, weights, stats, x, train=False)
    np.testing.assert_array_equal(np.asarray(logits), np.tile(np.arange(5, dtype=np.float32), (2, 1)))


def test_create_model_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError) as err:
        create_model("resnet34", num_classes=10, rngs=nnx.Rngs(0))
    assert all(name in str(err.value) for name in MODEL_NAMES)
    with pytest.raises(ValueError, match="cifar"):
        create_model("resnet18", num_classes=10, stem="tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="imagenet"):
        create_model("vgg16_bn", num_classes=10, stem="cifar", rngs=nnx.Rngs(0))
    assert MODEL_NAMES == ("resnet18", "resnet50", "vgg16", "vgg16_bn", "vit_b_16", "vit_b_32", "vit_l_16")
    assert set(CLASSIFIER_PATHS) == set(MODEL_NAMES)
