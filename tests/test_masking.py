"""Masking: score init, exact thresholds and kept counts, the straight-through gradient, sparsity reports."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vpns_jax.core import masking
from vpns_jax.models import create_model, functional


def _sorted_threshold(scores, density):
    flat = np.sort(np.abs(np.concatenate([np.ravel(s) for s in jax.tree.leaves(scores)])))
    k = int((1 - density) * flat.size)
    return flat[k - 1] if k >= 1 else -1.0, k


def _kept(masks):
    return sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(masks))


@pytest.fixture(scope="module", params=["resnet18", "resnet50", "vgg16", "vgg16_bn"])
def model_scores(request):
    model = create_model(request.param, num_classes=10, width=1 / 16, rngs=nnx.Rngs(0))
    _, weights, _ = functional.split_model(model)
    kinds = functional.leaf_kinds(model)
    return request.param, weights, kinds, masking.init_scores(weights, kinds)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.01])
def test_exact_kept_counts_on_each_architecture(model_scores, density):
    name, weights, kinds, scores = model_scores
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(scores))
    k = int((1 - density) * n)
    masks = masking.masks_from_scores(scores, masking.prune_counts(scores, density))
    # Scaled-init scores of a random network have no ties, so exactly N - k survive.
    assert _kept(masks) == n - k
    tau, _ = _sorted_threshold(scores, density)
    assert _kept(masks) == sum(int((np.abs(np.asarray(s)) > tau).sum()) for s in jax.tree.leaves(scores))


def test_prunable_set_is_every_conv_and_dense_kernel(model_scores):
    name, weights, kinds, scores = model_scores
    paths = set(traverse_util.flatten_dict(scores))
    expected_kernels = {"resnet18": 21, "resnet50": 54, "vgg16": 16, "vgg16_bn": 16}[name]
    assert len(paths) == expected_kernels
    assert all(path[-1] == "kernel" for path in paths)
    flat_kinds = traverse_util.flatten_dict(kinds)
    assert all(flat_kinds[path] in masking.PRUNABLE_KINDS for path in paths)


def test_scaled_score_init_matches_formula():
    w_conv = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 8)), jnp.float32)
    w_fc = jnp.asarray([[0.5, -2.0], [1.0, 0.25]], jnp.float32)
    weights = {"conv": {"kernel": w_conv}, "fc": {"kernel": w_fc, "bias": jnp.zeros(2)}, "bn": {"scale": jnp.ones(8)}}
    kinds = {"conv": {"kernel": "conv_kernel"}, "fc": {"kernel": "dense_kernel", "bias": "bias"}, "bn": {"scale": "bn"}}
    scores = masking.init_scores(weights, kinds)
    assert set(traverse_util.flatten_dict(scores)) == {("conv", "kernel"), ("fc", "kernel")}
    # fan_in of an HWIO conv is 3*3*4 = 36; of an (in, out) dense kernel 2.
    np.testing.assert_allclose(scores["conv"]["kernel"], math.sqrt(6 / 36) * w_conv / np.abs(w_conv).max(), rtol=1e-6)
    np.testing.assert_allclose(scores["fc"]["kernel"], math.sqrt(3.0) * np.array([[0.25, -1.0], [0.5, 0.125]]), rtol=1e-6)


def test_prune_count_uses_float64_truncation_like_torch():
    scores = {"a": jnp.ones((10,))}
    # (1 - 0.9) * 10 = 0.9999999999999998 -> k = 0: nothing pruned, as the reference computes it.
    assert masking.prune_counts(scores, 0.9).tolist() == [0]
    assert masking.prune_counts(scores, 0.7).tolist() == [3]  # 0.30000000000000004 * 10
    assert masking.prune_counts(scores, 1.0).tolist() == [0]
    layer = masking.prune_counts({"a": jnp.ones(10), "b": jnp.ones(30)}, 0.5, "layer")
    assert layer.tolist() == [5, 15]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_density_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="keep ratio"):
        masking.prune_counts({"a": jnp.ones(4)}, bad)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_equals_sorted_kth_value_on_random_and_tied_scores(seed):
    rng = np.random.default_rng(seed)
    scores = {
        "a": jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32),
        # Heavy ties: values rounded to one decimal, plus a block of exact zeros.
        "b": jnp.asarray(np.concatenate([np.round(rng.normal(size=(40, 3)), 1), np.zeros((20, 3))]), jnp.float32),
    }
    for density in [1.0, 0.95, 0.8, 0.5, 0.3, 0.1, 0.02]:
        ks = masking.prune_counts(scores, density)
        tau_ref, k = _sorted_threshold(scores, density)
        assert float(masking.thresholds(scores, ks)[0]) == pytest.approx(tau_ref, abs=0)
        flat = np.abs(np.concatenate([np.ravel(s) for s in jax.tree.leaves(scores)]))
        # Ties at tau are pruned: the kept count is #(|s| > tau), at most N - k.
        kept = _kept(masking.masks_from_scores(scores, ks))
        assert kept == int((flat > tau_ref).sum()) <= flat.size - k


def test_layer_scope_keeps_top_k_in_each_layer():
    rng = np.random.default_rng(1)
    scores = {"a": jnp.asarray(rng.normal(size=(10, 10)), jnp.float32), "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
    ks = masking.prune_counts(scores, 0.3, "layer")
    masks = masking.masks_from_scores(scores, ks, "layer")
    assert int(masks["a"].sum()) == 100 - int(0.7 * 100)
    assert int(masks["b"].sum()) == 7 - int(0.7 * 7)
    for name in ("a", "b"):
        a = np.abs(np.asarray(scores[name])).ravel()
        expected = np.zeros(a.size, bool)
        expected[np.argsort(a)[int(0.7 * a.size):]] = True
        np.testing.assert_array_equal(np.asarray(masks[name]).ravel().astype(bool), expected)


def test_straight_through_gradient_is_sign_times_weight_times_upstream():
    rng = np.random.default_rng(2)
    weights = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
               "fc": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}}
    scores = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
              "fc": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}}
    upstream = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), weights)
    ks = masking.prune_counts(scores, 0.4)

    def loss(s):
        effective = masking.apply_masks(weights, masking.ste_masks(s, ks))
        return sum(jnp.sum(c * w) for c, w in zip(jax.tree.leaves(upstream), jax.tree.leaves(effective)))

    grads = jax.grad(loss)(scores)
    for g, s, w, c in zip(*(jax.tree.leaves(t) for t in (grads, scores, weights, upstream))):
        # dL/dw = c, so dL/ds = sign(s) * W * c, pruned entries included.
        np.testing.assert_allclose(g, np.sign(s) * w * c, rtol=1e-6)
    assert any(float(m.min()) == 0.0 for m in jax.tree.leaves(masking.masks_from_scores(scores, ks)))


def test_straight_through_forward_is_exactly_binary():
    scores = {"a": jnp.asarray(np.random.default_rng(3).uniform(0.1, 3.0, size=(1000,)), jnp.float32)}
    masks = jax.jit(lambda s: masking.ste_masks(s, masking.prune_counts(s, 0.5)))(scores)
    values = np.unique(np.asarray(masks["a"]))
    assert values.tolist() == [0.0, 1.0]


def test_apply_masks_touches_only_masked_kernels():
    weights = {"conv": {"kernel": jnp.full((2, 2), 3.0)}, "bn": {"scale": jnp.full((2,), 5.0)}}
    masked = masking.apply_masks(weights, {"conv": {"kernel": jnp.asarray([[1.0, 0.0], [0.0, 1.0]])}})
    np.testing.assert_array_equal(masked["conv"]["kernel"], [[3.0, 0.0], [0.0, 3.0]])
    assert masked["bn"]["scale"] is weights["bn"]["scale"]


def test_sparsity_report_counts_by_hand():
    weights = {"conv": {"kernel": jnp.ones((2, 5))}, "fc": {"kernel": jnp.ones((4,)), "bias": jnp.ones((6,))}}
    masks = {"conv": {"kernel": jnp.asarray([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)},
             "fc": {"kernel": jnp.asarray([1, 1, 1, 0], jnp.float32)}}
    report = masking.sparsity_report(weights, masks)
    assert [(l.name, l.size, l.kept) for l in report.layers] == [("conv.kernel", 10, 3), ("fc.kernel", 4, 3)]
    # Prunable: 14 entries, 6 kept -> 8/14 pruned. Whole model: 20 entries, 8 pruned.
    assert report.prunable_sparsity == pytest.approx(8 / 14)
    assert report.model_sparsity == pytest.approx(8 / 20)
    text = report.format()
    assert "sparsity over prunable kernels: 57.1429%" in text
    assert "sparsity over all parameters:   40.0000%" in text
