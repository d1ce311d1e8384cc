"""ResNet-18/50: torchvision parameter counts and names, forward passes."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vpns_jax.models import create_model, functional, layers
from vpns_jax.models.resnet import ResNet


def _rngs(seed: int = 0) -> nnx.Rngs:
    # rbg keys: threefry's per-shape compile costs ~1 s on a small CPU, which
    # would dominate the test time for concrete models.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _abstract(name: str, **kwargs: Any) -> nnx.Module:
    """The model with ShapeDtypeStructs instead of arrays (nothing allocated)."""
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


def _flat_shapes(model: nnx.Module, kind: type) -> dict[tuple[Any, ...], tuple[int, ...]]:
    state = nnx.to_pure_dict(nnx.state(model, kind))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(state).items()}


def _torch_name(path: tuple[Any, ...]) -> str:
    """Our weights path as a torchvision state-dict key."""
    rename = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    return ".".join(str(p) for p in path[:-1]) + "." + rename.get(path[-1], path[-1])


def _torchvision_resnet_params(convs_per_block: int, stages: tuple[int, ...]) -> set[str]:
    """Trainable state-dict keys of torchvision's resnet18/resnet50."""
    names = {"conv1.weight", "bn1.weight", "bn1.bias", "fc.weight", "fc.bias"}
    for i, num_blocks in enumerate(stages, start=1):
        for j in range(num_blocks):
            prefix = f"layer{i}.{j}"
            for k in range(1, convs_per_block + 1):
                names |= {f"{prefix}.conv{k}.weight", f"{prefix}.bn{k}.weight", f"{prefix}.bn{k}.bias"}
            # Bottleneck's layer1.0 widens 64 -> 256, so it projects too.
            if j == 0 and (i > 1 or convs_per_block == 3):
                names |= {f"{prefix}.downsample.0.weight"}
                names |= {f"{prefix}.downsample.1.weight", f"{prefix}.downsample.1.bias"}
    return names


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_matches_torchvision(name: str, expected: int) -> None:
    shapes = _flat_shapes(_abstract(name, num_classes=1000), nnx.Param)
    assert sum(math.prod(s) for s in shapes.values()) == expected


@pytest.mark.parametrize(("name", "convs", "stages"), [("resnet18", 2, (2, 2, 2, 2)), ("resnet50", 3, (3, 4, 6, 3))])
def test_weight_names_mirror_torchvision(name: str, convs: int, stages: tuple[int, ...]) -> None:
    model = _abstract(name, num_classes=1000)
    params = _flat_shapes(model, nnx.Param)
    assert {_torch_name(p) for p in params} == _torchvision_resnet_params(convs, stages)
    stats = _flat_shapes(model, nnx.BatchStat)
    bn_prefixes = {p[:-1] for p in params if p[-1] == "scale"}
    assert set(stats) == {(*p, s) for p in bn_prefixes for s in ("mean", "var")}


def test_resnet_shapes_are_torchvision_transposed() -> None:
    r18 = _flat_shapes(_abstract("resnet18", num_classes=1000), nnx.Param)
    assert r18[("conv1", "kernel")] == (7, 7, 3, 64)
    assert r18[("layer2", 0, "downsample", 0, "kernel")] == (1, 1, 64, 128)
    assert r18[("layer4", 1, "conv2", "kernel")] == (3, 3, 512, 512)
    assert r18[("fc", "kernel")] == (512, 1000)
    r50 = _flat_shapes(_abstract("resnet50", num_classes=1000), nnx.Param)
    assert r50[("layer1", 0, "downsample", 0, "kernel")] == (1, 1, 64, 256)
    assert r50[("layer3", 0, "conv1", "kernel")] == (1, 1, 512, 256)
    assert r50[("layer3", 0, "conv3", "kernel")] == (1, 1, 256, 1024)
    assert r50[("layer4", 2, "bn3", "scale")] == (2048,)
    assert r50[("fc", "kernel")] == (2048, 1000)


def test_bottleneck_strides_on_3x3_conv() -> None:
    model = _abstract("resnet50", num_classes=10)
    block = model.layer2[0]
    assert (block.conv1.stride, block.conv2.stride, block.conv3.stride) == (1, 2, 1)
    assert block.downsample[0].stride == 2
    assert model.layer2[1].downsample is None
    assert model.layer1[0].downsample[0].stride == 1


def test_stems_and_width() -> None:
    imagenet = _abstract("resnet18", num_classes=10, width=1 / 8)
    assert imagenet.conv1.kernel.shape == (7, 7, 3, 8)
    assert (imagenet.conv1.stride, imagenet.conv1.padding) == (2, 3)
    cifar = _abstract("resnet18", num_classes=10, width=1 / 8, stem="cifar")
    assert cifar.conv1.kernel.shape == (3, 3, 3, 8)
    assert (cifar.conv1.stride, cifar.conv1.padding) == (1, 1)
    assert cifar.layer4[1].conv2.kernel.shape == (3, 3, 64, 64)
    assert cifar.fc.kernel.shape == (64, 10)
    r50 = _abstract("resnet50", num_classes=7, width=1 / 16)
    assert r50.layer1[0].conv3.kernel.shape == (1, 1, 4, 16)
    assert r50.fc.kernel.shape == (128, 7)
    with pytest.raises(ValueError, match="cifar"):
        ResNet(None, (2, 2, 2, 2), num_classes=10, stem="tiny", rngs=nnx.Rngs(0))  # type: ignore[arg-type]


def test_fc_init_is_torch_linear_default() -> None:
    model = create_model("resnet18", num_classes=10, width=1 / 8, rngs=_rngs())
    bound = 1 / math.sqrt(64)
    for leaf in (model.fc.kernel[...], model.fc.bias[...]):
        assert float(jnp.abs(leaf).max()) <= bound
        assert float(jnp.abs(leaf).max()) > 0.5 * bound
    # No zero-init of the last BN in each block (torchvision's default).
    np.testing.assert_array_equal(np.asarray(model.layer1[0].bn2.scale[...]), np.ones(8))


@pytest.mark.parametrize(
    ("name", "width", "stem"),
    [
        ("resnet18", 1 / 8, "imagenet"),
        ("resnet18", 1 / 8, "cifar"),
        ("resnet50", 1 / 16, "imagenet"),
        ("resnet50", 1 / 16, "cifar"),
    ],
)
def test_forward_train_and_eval(name: str, width: float, stem: str) -> None:
    model = create_model(name, num_classes=10, width=width, stem=stem, rngs=_rngs())
    graphdef, weights, stats = functional.split_model(model)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    logits_eval, stats_eval = functional.apply_model(graphdef, weights, stats, x, train=False)
    assert logits_eval.shape == (2, 10) and logits_eval.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits_eval)))
    jax.tree.map(np.testing.assert_array_equal, stats_eval, stats)

    logits_train, stats_train = functional.apply_model(graphdef, weights, stats, x, train=True)
    assert logits_train.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(logits_train)))
    assert jax.tree.structure(stats_train) == jax.tree.structure(stats)
    # Every running statistic moves away from its (0, 1) initial value.
    changed = jax.tree.map(lambda a, b: bool(jnp.all(a != b)), stats_train, stats)
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(np.asarray(logits_train), np.asarray(logits_eval))

    # The stem BN's new running mean is 0.1 * the batch mean of conv1's output.
    stride, pad = (2, 3) if stem == "imagenet" else (1, 1)
    conv1_out = layers.conv2d(x, weights["conv1"]["kernel"], stride, pad)
    np.testing.assert_allclose(
        np.asarray(stats_train["bn1"]["mean"]), 0.1 * np.asarray(conv1_out.mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-6
    )


def test_jit_matches_eager() -> None:
    model = create_model("resnet18", num_classes=10, width=1 / 8, stem="cifar", rngs=_rngs())
    graphdef, weights, stats = functional.split_model(model)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    apply = jax.jit(functional.apply_model, static_argnums=0, static_argnames="train")
    eager_logits, eager_stats = functional.apply_model(graphdef, weights, stats, x, train=True)
    jit_logits, jit_stats = apply(graphdef, weights, stats, x, train=True)
    np.testing.assert_allclose(np.asarray(jit_logits), np.asarray(eager_logits), rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jit_stats, eager_stats)
