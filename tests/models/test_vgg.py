"""VGG-16(-BN): torchvision parameter counts and indices, forward passes, dropout."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vpns_jax.models import create_model, functional

VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_BN_CONVS = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
CLASSIFIER_LINEARS = (0, 3, 6)


def _rngs(seed: int = 0) -> nnx.Rngs:
    # rbg keys: threefry's per-shape compile costs ~1 s on a small CPU.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def _flat_shapes(model: nnx.Module, kind: type) -> dict[tuple[Any, ...], tuple[int, ...]]:
    state = nnx.to_pure_dict(nnx.state(model, kind))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(state).items()}


def _abstract(name: str, **kwargs: Any) -> nnx.Module:
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


@pytest.fixture(scope="module")
def vgg16_tiny() -> nnx.Module:
    return create_model("vgg16", num_classes=10, width=1 / 16, rngs=_rngs())


@pytest.fixture(scope="module")
def vgg16_bn_tiny() -> nnx.Module:
    return create_model("vgg16_bn", num_classes=10, width=1 / 16, rngs=_rngs(1))


@pytest.mark.parametrize(("name", "expected"), [("vgg16", 138_357_544), ("vgg16_bn", 138_365_992)])
def test_parameter_count_matches_torchvision(name: str, expected: int) -> None:
    shapes = _flat_shapes(_abstract(name, num_classes=1000), nnx.Param)
    assert sum(math.prod(s) for s in shapes.values()) == expected


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_indices_mirror_torchvision(name: str) -> None:
    model = _abstract(name, num_classes=1000)
    params = _flat_shapes(model, nnx.Param)
    convs = VGG16_CONVS if name == "vgg16" else VGG16_BN_CONVS
    expected = {("features", i, leaf) for i in convs for leaf in ("kernel", "bias")}
    expected |= {("classifier", i, leaf) for i in CLASSIFIER_LINEARS for leaf in ("kernel", "bias")}
    if name == "vgg16_bn":
        expected |= {("features", i + 1, leaf) for i in convs for leaf in ("scale", "bias")}
    assert set(params) == expected
    stats = _flat_shapes(model, nnx.BatchStat)
    if name == "vgg16":
        assert stats == {}
    else:
        assert set(stats) == {("features", i + 1, s) for i in convs for s in ("mean", "var")}
    # Convs follow cfg "D"; kernels are torchvision's OIHW transposed to HWIO.
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    in_channels = [3, *widths[:-1]]
    for idx, cin, cout in zip(convs, in_channels, widths):
        assert params[("features", idx, "kernel")] == (3, 3, cin, cout)
    assert params[("classifier", 0, "kernel")] == (512 * 7 * 7, 4096)
    assert params[("classifier", 3, "kernel")] == (4096, 4096)
    assert params[("classifier", 6, "kernel")] == (4096, 1000)


def test_width_scales_channels_and_hidden() -> None:
    params = _flat_shapes(_abstract("vgg16_bn", num_classes=10, width=1 / 16), nnx.Param)
    assert params[("features", 0, "kernel")] == (3, 3, 3, 4)
    assert params[("features", 40, "kernel")] == (3, 3, 32, 32)
    assert params[("classifier", 0, "kernel")] == (32 * 49, 256)
    assert params[("classifier", 6, "kernel")] == (256, 10)


def test_init_follows_torchvision(vgg16_tiny: nnx.Module) -> None:
    _, weights, _ = functional.split_model(vgg16_tiny)
    for i in CLASSIFIER_LINEARS:
        np.testing.assert_array_equal(np.asarray(weights["classifier"][i]["bias"]), 0.0)
    for i in VGG16_CONVS:
        np.testing.assert_array_equal(np.asarray(weights["features"][i]["bias"]), 0.0)
    k = np.asarray(weights["classifier"][0]["kernel"])
    assert abs(k.std() / 0.01 - 1) < 0.02 and abs(k.mean()) < 1e-3


def test_init_bn_follows_torchvision(vgg16_bn_tiny: nnx.Module) -> None:
    _, weights, stats = functional.split_model(vgg16_bn_tiny)
    for i in VGG16_BN_CONVS:
        np.testing.assert_array_equal(np.asarray(weights["features"][i + 1]["scale"]), 1.0)
        np.testing.assert_array_equal(np.asarray(weights["features"][i + 1]["bias"]), 0.0)
        np.testing.assert_array_equal(np.asarray(stats["features"][i + 1]["var"]), 1.0)


@pytest.mark.parametrize("fixture", ["vgg16_tiny", "vgg16_bn_tiny"])
def test_forward_train_and_eval(fixture: str, request: pytest.FixtureRequest) -> None:
    graphdef, weights, stats = functional.split_model(request.getfixturevalue(fixture))
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))

    logits_eval, stats_eval = functional.apply_model(graphdef, weights, stats, x, train=False)
    assert logits_eval.shape == (2, 10) and logits_eval.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits_eval)))
    jax.tree.map(np.testing.assert_array_equal, stats_eval, stats)

    logits_train, stats_train = functional.apply_model(graphdef, weights, stats, x, train=True, dropout_key=_key(0))
    assert logits_train.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(logits_train)))
    assert not np.allclose(np.asarray(logits_train), np.asarray(logits_eval))
    assert jax.tree.structure(stats_train) == jax.tree.structure(stats)
    changed = jax.tree.map(lambda a, b: bool(jnp.all(a != b)), stats_train, stats)
    assert all(jax.tree.leaves(changed))
    if fixture == "vgg16_bn_tiny":
        assert len(jax.tree.leaves(stats)) == 26


def test_dropout_uses_key_functionally(vgg16_tiny: nnx.Module) -> None:
    graphdef, weights, stats = functional.split_model(vgg16_tiny)
    # Scale the last layer up so that dropout noise is far above float noise.
    weights["classifier"][6]["kernel"] = weights["classifier"][6]["kernel"] * 100.0
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))

    def run(train: bool, key: jax.Array | None) -> np.ndarray:
        return np.asarray(functional.apply_model(graphdef, weights, stats, x, train=train, dropout_key=key)[0])

    np.testing.assert_array_equal(run(True, _key(1)), run(True, _key(1)))
    assert not np.allclose(run(True, _key(1)), run(True, _key(2)))
    np.testing.assert_array_equal(run(False, None), run(False, None))
    # Eval ignores the key: dropout is off.
    np.testing.assert_array_equal(run(False, _key(1)), run(False, None))
    with pytest.raises(ValueError, match="dropout_key"):
        run(True, None)


def test_head_is_pool_then_torch_order_flatten(vgg16_tiny: nnx.Module) -> None:
    """Eval logits equal a numpy head on the features: 7x7 pool, (C, H, W) flatten, 3 Linears."""
    graphdef, weights, stats = functional.split_model(vgg16_tiny)
    x = jax.random.normal(jax.random.key(5), (2, 64, 64, 3))
    logits, _ = functional.apply_model(graphdef, weights, stats, x, train=False)

    feats = x
    for layer in vgg16_tiny.features:
        feats = layer(feats)
    feats = np.asarray(feats, np.float64)
    assert feats.shape == (2, 2, 2, 32)
    # 2x2 -> 7x7 with torch's bins; the middle bin (3) averages both rows/cols.
    idx = [(math.floor(i * 2 / 7), math.ceil((i + 1) * 2 / 7)) for i in range(7)]
    pooled = np.stack(
        [np.stack([feats[:, h0:h1, w0:w1, :].mean(axis=(1, 2)) for (w0, w1) in idx], axis=1) for (h0, h1) in idx],
        axis=1,
    )
    h = pooled.transpose(0, 3, 1, 2).reshape(2, -1)
    cls = weights["classifier"]
    for i in CLASSIFIER_LINEARS:
        h = h @ np.asarray(cls[i]["kernel"], np.float64) + np.asarray(cls[i]["bias"], np.float64)
        if i != 6:
            h = np.maximum(h, 0.0)
    np.testing.assert_allclose(np.asarray(logits), h, rtol=1e-4, atol=1e-6)
    # The (H, W, C) order would give different logits.
    h_wrong = pooled.reshape(2, -1) @ np.asarray(cls[0]["kernel"], np.float64)
    h_right = pooled.transpose(0, 3, 1, 2).reshape(2, -1) @ np.asarray(cls[0]["kernel"], np.float64)
    assert not np.allclose(h_wrong, h_right)


def test_vgg_rejects_cifar_stem() -> None:
    with pytest.raises(ValueError, match="imagenet"):
        create_model("vgg16", num_classes=10, stem="cifar", rngs=nnx.Rngs(0))
