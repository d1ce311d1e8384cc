"""One-shot importance (``core.saliency``): magnitude, random, LTH rounds against torch, SNIP/GraSP/SynFlow against
closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from vpns_jax.core import label_mapping, masking, saliency, selection
from vpns_jax.models import create_model, functional

DENSE = functional.DENSE_KERNEL


def _kept(masks) -> int:
    return int(sum(np.asarray(m).sum() for m in jax.tree.leaves(masks)))


def _np(tree):
    return jax.tree.map(np.asarray, tree)


# --- OMP and Random ------------------------------------------------------------------------

KINDS = {
    "conv": {"kernel": functional.CONV_KERNEL},
    "fc": {"kernel": functional.DENSE_KERNEL, "bias": functional.BIAS},
    "bn": {"scale": functional.BN, "bias": functional.BN},
}


def _hand_weights():
    return {
        "conv": {"kernel": jnp.array([[-4.0, 0.5], [0.6, -0.1]]).reshape(1, 1, 2, 2)},
        "fc": {"kernel": jnp.array([[1.0, -3.0], [0.2, 2.5]]), "bias": jnp.array([100.0, -100.0])},
        "bn": {"scale": jnp.array([50.0, 50.0]), "bias": jnp.array([-50.0, 50.0])},
    }


def test_magnitude_keeps_the_largest_abs_weights():
    importance = saliency.magnitude_importance(_hand_weights(), KINDS)
    assert set(traverse_util.flatten_dict(importance)) == {("conv", "kernel"), ("fc", "kernel")}
    # |W| = conv 4, .5, .6, .1 and fc 1, 3, .2, 2.5: the top 4 of 8 are 4, 3, 2.5, 1.
    masks = selection.keep_largest(importance, selection.keep_counts(importance, 0.5))
    np.testing.assert_array_equal(masks["conv"]["kernel"].reshape(2, 2), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(masks["fc"]["kernel"], [[1, 1], [0, 1]])
    # Per layer the conv keeps 4 and .6 instead.
    layer = selection.keep_largest(importance, selection.keep_counts(importance, 0.5, "layer"), "layer")
    np.testing.assert_array_equal(layer["conv"]["kernel"].reshape(2, 2), [[1, 0], [1, 0]])
    np.testing.assert_array_equal(layer["fc"]["kernel"], [[0, 1], [0, 1]])


def test_random_keeps_exactly_the_density_in_every_layer():
    weights = {"a": {"kernel": jnp.zeros((10, 10))}, "b": {"kernel": jnp.zeros((37,)), "bias": jnp.zeros(3)}}
    kinds = {"a": {"kernel": DENSE}, "b": {"kernel": DENSE, "bias": functional.BIAS}}
    importance = saliency.random_importance(weights, jax.random.key(0), kinds=kinds)
    assert set(traverse_util.flatten_dict(importance)) == {("a", "kernel"), ("b", "kernel")}
    values = np.concatenate([np.ravel(v) for v in jax.tree.leaves(importance)])
    assert values.min() >= 0.0 and values.max() < 1.0
    keep = selection.keep_counts(importance, 0.3, "layer")
    np.testing.assert_array_equal(keep, [30, 12])  # 100 - int(0.7 * 100), 37 - int(0.7 * 37)
    masks = selection.keep_largest(importance, keep, "layer")
    assert int(masks["a"]["kernel"].sum()) == 30 and int(masks["b"]["kernel"].sum()) == 12
    # Same key, same draw, also from an importance-shaped tree; another key, another mask.
    again = saliency.random_importance(importance, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, _np(again), _np(importance))
    other = saliency.random_importance(importance, jax.random.key(1))
    assert not np.array_equal(np.asarray(other["a"]["kernel"]), np.asarray(importance["a"]["kernel"]))
    with pytest.raises(ValueError, match="shapes"):
        saliency.random_importance(kinds, jax.random.key(0))


# --- LTH -----------------------------------------------------------------------------------


def test_lth_rounds_count_and_never_revive():
    rng = np.random.default_rng(0)
    weights = {"a": {"kernel": rng.normal(size=(20, 30))}, "b": {"kernel": rng.normal(size=(400,)), "bias": np.ones(3)}}
    kinds = {"a": {"kernel": DENSE}, "b": {"kernel": DENSE, "bias": functional.BIAS}}
    masks, expected = None, selection.lth_schedule(1000, 5)
    for kept in expected:
        new = saliency.lth_round(weights, masks, kinds)
        assert _kept(new) == kept
        if masks is not None:
            for old, cur in zip(jax.tree.leaves(masks), jax.tree.leaves(new)):
                assert np.all(cur <= old)
        # Training moves the pruned weights' values (here: makes them huge); they must stay pruned.
        weights = {
            "a": {"kernel": np.where(new["a"]["kernel"] > 0, weights["a"]["kernel"], 1e3)},
            "b": {"kernel": np.where(new["b"]["kernel"] > 0, weights["b"]["kernel"], 1e3), "bias": np.ones(3)},
        }
        masks = new


def test_lth_round_matches_torch_global_unstructured():
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layers = [torch.nn.Linear(7, 13), torch.nn.Linear(13, 5)]
    params = [(layer, "weight") for layer in layers]
    weights = {str(i): {"kernel": layer.weight.detach().numpy().T.copy()} for i, layer in enumerate(layers)}
    kinds = {str(i): {"kernel": functional.DENSE_KERNEL} for i in range(2)}
    masks = None
    for _ in range(4):
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.2)
        masks = saliency.lth_round(weights, masks, kinds)
        for i, layer in enumerate(layers):
            np.testing.assert_array_equal(masks[str(i)]["kernel"], layer.weight_mask.numpy().T)


# --- SNIP and GraSP on hand-derivable models -----------------------------------------------

LINEAR_KINDS = {"fc": {"kernel": functional.DENSE_KERNEL, "bias": functional.BIAS}}


def _linear_loss(temperatures):
    def loss_fn(weights, batch, temperature):
        temperatures.append(temperature)
        x, y = batch
        logits = (x @ weights["fc"]["kernel"] + weights["fc"]["bias"]) / temperature
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def _batches(rng, n, size, features, classes):
    return [
        (jnp.asarray(rng.normal(size=(size, features)), jnp.float32), jnp.asarray(rng.integers(0, classes, size)))
        for _ in range(n)
    ]


def test_snip_is_abs_grad_times_weight_of_a_linear_model():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    weights = {"fc": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    batches = _batches(rng, 2, 5, 3, 4)
    temperatures = []
    importance = saliency.snip_importance(_linear_loss(temperatures), weights, LINEAR_KINDS, iter(batches))
    assert set(temperatures) == {1.0}
    # Mean cross-entropy of x W + b: dL/dW = x^T (softmax - onehot) / B, summed over the batches.
    g = np.zeros_like(w)
    for x, y in batches:
        x = np.asarray(x, np.float64)
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g += x.T @ (p - np.eye(4)[np.asarray(y)]) / len(x)
    assert list(traverse_util.flatten_dict(importance)) == [("fc", "kernel")]
    np.testing.assert_allclose(importance["fc"]["kernel"], np.abs(g * w), rtol=1e-5, atol=1e-7)


def test_grasp_matches_an_explicit_hessian():
    rng = np.random.default_rng(2)
    weights = {
        "l1": {
            "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
        },
        "l2": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
    }
    kinds = {"l1": {"kernel": DENSE, "bias": functional.BIAS}, "l2": {"kernel": DENSE}}
    temperatures = []

    def loss_fn(w, batch, temperature):
        temperatures.append(temperature)
        x, y = batch
        logits = jnp.tanh(x @ w["l1"]["kernel"] + w["l1"]["bias"]) @ w["l2"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits / temperature, y).mean()

    batches = _batches(rng, 2, 6, 3, 3)
    importance = saliency.grasp_importance(loss_fn, weights, kinds, batches, temperature=3.0)
    assert set(temperatures) == {3.0}

    # The same summed loss as a function of the flat kernel vector, bias fixed.
    def total(theta):
        w = {
            "l1": {"kernel": theta[:12].reshape(3, 4), "bias": weights["l1"]["bias"]},
            "l2": {"kernel": theta[12:].reshape(4, 3)},
        }
        return sum(loss_fn(w, batch, 3.0) for batch in batches)

    theta = jnp.concatenate([weights["l1"]["kernel"].ravel(), weights["l2"]["kernel"].ravel()])
    hg = jax.jit(jax.hessian(total))(theta) @ jax.grad(total)(theta)  # jit: op by op takes seconds
    expected = np.asarray(theta * hg)
    got = np.concatenate([np.ravel(importance["l1"]["kernel"]), np.ravel(importance["l2"]["kernel"])])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert got.min() < 0 < got.max()  # signed, so keep_largest sees negative values too
    masks = selection.keep_largest(importance, selection.keep_counts(importance, 0.25))
    assert _kept(masks) == 24 - int(0.75 * 24)

    temperatures.clear()
    saliency.grasp_importance(loss_fn, weights, kinds, batches[:1])
    assert set(temperatures) == {200.0}


# --- SynFlow -------------------------------------------------------------------------------

W1 = np.array([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]], np.float32)
W2 = np.array([[2.0], [-1.0], [0.5]], np.float32)
CHAIN_KINDS = {"l1": {"kernel": DENSE}, "l2": {"kernel": DENSE, "bias": functional.BIAS}}


def _chain_weights():
    return {"l1": {"kernel": jnp.asarray(W1)}, "l2": {"kernel": jnp.asarray(W2), "bias": jnp.asarray([-10.0])}}


def _chain(weights, stats, x):
    h = x @ weights["l1"]["kernel"] - stats["mean"]
    return h @ weights["l2"]["kernel"] + weights["l2"]["bias"]


def test_synflow_path_sums_of_a_two_layer_linear_net():
    stats = {"mean": jnp.zeros(3)}
    scores = saliency.synflow_importance(_chain, _chain_weights(), stats, CHAIN_KINDS, (2,))
    # Column sums of |W1| are (1.5, 3, 4): score W1_ij = |W1_ij| |W2_j|, score W2_j = |W2_j| * colsum_j.
    np.testing.assert_allclose(scores["l1"]["kernel"], [[2.0, 2.0, 1.5], [1.0, 1.0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(scores["l2"]["kernel"], [[3.0], [3.0], [2.0]], rtol=1e-6)
    # A pruned W1[0, 2] scores 0 and no longer feeds W2[2]'s paths.
    masks = {"l1": {"kernel": np.array([[1, 1, 0], [1, 1, 1]])}, "l2": {"kernel": np.ones((3, 1))}}
    masked = saliency.synflow_importance(_chain, _chain_weights(), stats, CHAIN_KINDS, (2,), masks=masks)
    np.testing.assert_allclose(masked["l1"]["kernel"], [[2.0, 2.0, 0.0], [1.0, 1.0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(masked["l2"]["kernel"], [[3.0], [3.0], [0.5]], rtol=1e-6)
    # Statistics are linearised too: |mean| = (1, 0, 0) lowers the first path sum to 0.5.
    shifted = saliency.synflow_importance(_chain, _chain_weights(), {"mean": jnp.array([-1.0, 0, 0])}, CHAIN_KINDS,
                                          (2,))
    np.testing.assert_allclose(shifted["l2"]["kernel"], [[1.0], [3.0], [2.0]], rtol=1e-6)
    # Without BatchNorm shifts, rescaling multiplies every score by one constant: c1 = 8.5 / 3, c2 = 3.5.
    rescaled = saliency.synflow_importance(_chain, _chain_weights(), stats, CHAIN_KINDS, (2,), rescale=True)
    for got, want in zip(jax.tree.leaves(rescaled), jax.tree.leaves(scores)):
        np.testing.assert_allclose(np.asarray(got) * (8.5 / 3) * 3.5, want, rtol=1e-5)


def _deep_chain(depth, rng, scale):
    weights = {f"l{i}": {"kernel": jnp.asarray(scale * rng.normal(size=(16, 16)), jnp.float32)} for i in range(depth)}
    kinds = {f"l{i}": {"kernel": functional.DENSE_KERNEL} for i in range(depth)}

    def apply_fn(w, stats, x):
        for i in range(depth):
            x = jax.nn.relu(x @ w[f"l{i}"]["kernel"])
        return x

    return weights, kinds, apply_fn


def test_synflow_overflow_is_an_error_and_rescale_keeps_the_exact_ranking():
    depth = 14
    weights, kinds, apply_fn = _deep_chain(depth, np.random.default_rng(3), 100.0)
    with pytest.raises(ValueError, match="rescale=True"):
        saliency.synflow_importance(apply_fn, weights, {}, kinds, (16,))
    scores = saliency.synflow_importance(apply_fn, weights, {}, kinds, (16,), rescale=True)
    # Exact scores in float64 with numpy: |W_l| weighted by the path sums into its rows and out of its columns.
    a = [np.abs(np.asarray(weights[f"l{i}"]["kernel"], np.float64)) for i in range(depth)]
    left, lefts = np.ones(16), []
    for m in a:
        lefts.append(left)
        left = left @ m
    right, rights = np.ones(16), []
    for m in reversed(a):
        rights.append(right)
        right = m @ right
    rights.reverse()
    exact = np.concatenate([(lefts[i][:, None] * a[i] * rights[i][None, :]).ravel() for i in range(depth)])
    got = np.concatenate([np.ravel(scores[f"l{i}"]["kernel"]) for i in range(depth)]).astype(np.float64)
    np.testing.assert_allclose(got / got.sum(), exact / exact.sum(), rtol=1e-4)


def test_synflow_masks_end_at_the_exact_target_and_keep_pruned_entries_pruned():
    weights, kinds, apply_fn = _deep_chain(3, np.random.default_rng(4), 1.0)
    n = 3 * 256
    for density, iterations in [(0.05, 10), (0.4, 1), (0.123, 7)]:
        masks = saliency.synflow_masks(apply_fn, weights, {}, kinds, (16,), density, iterations=iterations)
        assert _kept(masks) == n - int((1 - density) * n)
    start = selection.keep_largest(saliency.random_importance(weights, jax.random.key(0), kinds=kinds), [500])
    masks = saliency.synflow_masks(apply_fn, weights, {}, kinds, (16,), 0.3, iterations=4, masks=start)
    assert _kept(masks) == n - int(0.7 * n)
    for old, new in zip(jax.tree.leaves(start), jax.tree.leaves(masks)):
        assert np.all(new <= old)
    with pytest.raises(ValueError, match="fewer than the target"):
        saliency.synflow_masks(apply_fn, weights, {}, kinds, (16,), 0.9, iterations=2, masks=start)


# --- a tiny real ResNet-18 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_resnet():
    """The real ResNet-18 graph with numpy-drawn values: eager init compiles every initialiser (~8 s on 2 cores)."""
    abstract = nnx.eval_shape(
        lambda: create_model("resnet18", num_classes=5, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0))
    )
    graphdef, shapes, stat_shapes = functional.split_model(abstract)
    kinds = functional.leaf_kinds(abstract)
    rng = np.random.default_rng(0)
    flat_kinds = traverse_util.flatten_dict(kinds)
    weights = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if flat_kinds[path] in masking.PRUNABLE_KINDS:
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-2] + leaf.shape[-1:]))
        elif path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        weights[path] = jnp.asarray(value, jnp.float32)
    stats = {}
    for path, leaf in traverse_util.flatten_dict(stat_shapes).items():
        value = 0.1 * rng.normal(size=leaf.shape) if path[-1] == "mean" else rng.uniform(0.5, 1.5, leaf.shape)
        stats[path] = jnp.asarray(value, jnp.float32)
    return graphdef, traverse_util.unflatten_dict(weights), traverse_util.unflatten_dict(stats), kinds


def _check_importance(importance, weights, kinds):
    flat_w = traverse_util.flatten_dict(weights)
    flat = traverse_util.flatten_dict(importance)
    assert sorted(flat, key=str) == sorted(masking.prunable_paths(kinds), key=str)
    for path, value in flat.items():
        assert value.shape == flat_w[path].shape and np.all(np.isfinite(np.asarray(value)))


def test_snip_and_grasp_on_a_tiny_resnet(tiny_resnet):
    graphdef, weights, batch_stats, kinds = tiny_resnet
    label_map = jnp.array([4, 0, 2])

    def loss_fn(w, batch, temperature):
        x, y = batch
        logits, _ = functional.apply_model(graphdef, w, batch_stats, x, train=True)
        return label_mapping.mapped_loss(logits / temperature, y, label_map)[0]

    rng = np.random.default_rng(5)
    batches = [
        (jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32), jnp.asarray(rng.integers(0, 3, 4)))
        for _ in range(2)
    ]
    snip = saliency.snip_importance(loss_fn, weights, kinds, batches)
    _check_importance(snip, weights, kinds)
    masks = selection.keep_largest(snip, selection.keep_counts(snip, 0.2))
    assert _kept(masks) == int(selection.keep_counts(snip, 0.2)[0])
    grasp = saliency.grasp_importance(loss_fn, weights, kinds, batches)
    _check_importance(grasp, weights, kinds)
    keep = selection.keep_counts(grasp, 0.3, "layer")
    layer_masks = selection.keep_largest(grasp, keep, "layer")
    np.testing.assert_array_equal([int(m.sum()) for m in jax.tree.leaves(layer_masks)], keep)


def test_synflow_on_a_tiny_resnet(tiny_resnet):
    graphdef, weights, batch_stats, kinds = tiny_resnet

    def apply_fn(w, stats, x):
        return functional.apply_model(graphdef, w, stats, x, train=False)[0]

    scores = saliency.synflow_importance(apply_fn, weights, batch_stats, kinds, (16, 16, 3))
    _check_importance(scores, weights, kinds)
    masks = saliency.synflow_masks(apply_fn, weights, batch_stats, kinds, (16, 16, 3), 0.1, iterations=4)
    assert _kept(masks) == int(selection.keep_counts(scores, 0.1)[0])
