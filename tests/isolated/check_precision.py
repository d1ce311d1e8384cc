"""float64 end to end under ``jax.enable_x64``: the threshold search and BatchNorm honour float64 inputs.

Run in a process of their own with the gradient checks (tests/test_isolated_gradient_checks.py), since they
switch x64 on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vpns_jax.core import masking
from vpns_jax.models import create_model, functional, layers


@pytest.mark.parametrize("kind", ["random", "ties", "beyond_float32"])
def test_float64_threshold_is_the_kth_value_of_a_float64_sort(kind) -> None:
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        if kind == "random":
            leaves = [rng.standard_normal((40, 30)), rng.standard_normal((7,)), rng.standard_normal((300_000,))]
        elif kind == "ties":
            leaves = [np.round(rng.standard_normal((50, 20)), 1), np.zeros((64,)), np.round(rng.standard_normal(999), 1)]
        else:  # values that float32 would merge: they differ below float32's resolution
            leaves = [1.0 + np.arange(2000) * 1e-12, 1.0 + np.arange(500)[::-1] * 3e-13]
        scores = {f"leaf{i}": {"kernel": jnp.asarray(leaf, jnp.float64)} for i, leaf in enumerate(leaves)}
        flat = np.sort(np.abs(np.concatenate([leaf.reshape(-1) for leaf in leaves])))
        for density in (0.9, 0.5, 0.1, 0.003):
            ks = masking.prune_counts(scores, density)
            tau = masking.thresholds(scores, ks)
            assert tau.dtype == jnp.float64 and float(tau[0]) == flat[ks[0] - 1]
            masks = masking.masks_from_scores(scores, ks)
            kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
            # Kept: |s| > tau, so entries tied at tau are pruned with it.
            assert kept == int(np.sum(flat > flat[ks[0] - 1]))
        per_layer = masking.thresholds(scores, masking.prune_counts(scores, 0.5, "layer"), "layer")
        for i, leaf in enumerate(leaves):
            k = int(0.5 * leaf.size)
            assert float(per_layer[i]) == np.sort(np.abs(leaf.reshape(-1)))[k - 1]


def test_float64_batchnorm_and_its_running_statistics_match_numpy() -> None:
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        bn = layers.BatchNorm2d(5, momentum=0.1, eps=1e-5)
        graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
        params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        stats = jax.tree.map(lambda s: jnp.asarray(s, jnp.float64), stats)
        bn = nnx.merge(graphdef, params, stats)
        x = rng.standard_normal((4, 3, 3, 5)) * 3.0 + 1.0
        y = bn(jnp.asarray(x), train=True)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
        expected = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        assert bn.mean[...].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * var * n / (n - 1), rtol=0, atol=1e-12)


def test_a_float64_model_computes_in_float64_and_float32_statistics_keep_their_dtype() -> None:
    with jax.enable_x64(True):
        model = create_model("resnet18", num_classes=4, width=1 / 16, stem="imagenet", rngs=nnx.Rngs(0))
        graphdef, weights, batch_stats = functional.split_model(model)
        x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 32, 32, 3)))
        weights64 = jax.tree.map(lambda w: w.astype(jnp.float64), weights)
        stats64 = jax.tree.map(lambda s: s.astype(jnp.float64), batch_stats)
        logits, new_stats = functional.apply_model(graphdef, weights64, stats64, x, train=True)
        assert logits.dtype == jnp.float64
        assert all(s.dtype == jnp.float64 for s in jax.tree.leaves(new_stats))
        # float32 parameters under float64 inputs: the statistics stay float32, so a state keeps its dtypes.
        _, kept = functional.apply_model(graphdef, weights, batch_stats, x, train=True)
        assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(kept))
        logits32, _ = functional.apply_model(graphdef, weights, batch_stats, x.astype(jnp.float32), train=True)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(logits32), rtol=1e-3, atol=1e-4)
