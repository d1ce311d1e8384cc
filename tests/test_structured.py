"""Structured channel masks: groups, exact counts under caps, ties, the STE gradient, masked BN outputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import random_network
from vpns_jax.core import structured
from vpns_jax.models import create_model, functional
from vpns_jax.models.channels import ChannelGroup


def _abstract_weights(name: str, width: float = 1.0):
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=10, width=width, rngs=nnx.Rngs(0)))
    return functional.split_model(abstract)[1]


def _groups(spec: list[tuple[str, int, bool]]) -> tuple[ChannelGroup, ...]:
    """Hand-made groups (only name, size and cap matter to the thresholding)."""
    return tuple(ChannelGroup(name, (), (), (), size, capped) for name, size, capped in spec)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _pruned(masks) -> int:
    return sum(int(np.size(m) - np.count_nonzero(np.asarray(m))) for m in masks.values())


def test_resnet18_groups_follow_the_reference():
    groups = structured.channel_groups("resnet18", _abstract_weights("resnet18"))
    by_name = {g.name: g for g in groups}
    assert len(groups) == 17 and sum(g.num_channels for g in groups) == 3904
    assert [g.name for g in groups if g.capped] == [
        "conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    ]  # fmt: skip
    assert not any("downsample" in g.name for g in groups)
    last = by_name["layer2.0.conv2"]
    assert last.convs == (("layer2", 0, "conv2", "kernel"), ("layer2", 0, "downsample", 0, "kernel"))
    assert last.bns == (("layer2", 0, "bn2"), ("layer2", 0, "downsample", 1))
    assert last.consumers == ()
    assert by_name["layer2.0.conv1"].consumers == (("layer2", 0, "conv2", "kernel"),)
    assert by_name["conv1"].consumers == ()  # the stem writes the residual stream


def test_resnet50_and_vgg_groups():
    r50 = structured.channel_groups("resnet50", _abstract_weights("resnet50"))
    assert len(r50) == 1 + 16 * 3 and sum(g.capped for g in r50) == 1 + 3 * 3
    by_name = {g.name: g for g in r50}
    assert by_name["layer1.0.conv2"].consumers == (("layer1", 0, "conv3", "kernel"),)
    assert by_name["layer1.0.conv3"].convs[1] == ("layer1", 0, "downsample", 0, "kernel")

    for name, has_bn in (("vgg16", False), ("vgg16_bn", True)):
        vgg = structured.channel_groups(name, _abstract_weights(name))
        assert len(vgg) == 13 and [g.capped for g in vgg] == [True, True] + [False] * 11
        assert all(bool(g.bns) == has_bn for g in vgg)
        assert vgg[0].consumers == (vgg[1].owner,) and vgg[-1].consumers == ()


def test_exact_pruned_count_with_traced_count():
    groups = structured.channel_groups("resnet18", _abstract_weights("resnet18"))
    scores = structured.init_channel_scores(groups, jax.random.key(0))
    assert all(s.dtype == jnp.float32 and float(jnp.abs(s).max()) <= 1.0 for s in scores.values())
    masks_fn = jax.jit(lambda s, k: structured.channel_masks(s, groups, k))  # one compile for every k
    for density in (0.9, 0.7, 0.5, 0.3):
        k = structured.channel_prune_counts(groups, density)
        assert k == int((1 - density) * 3904)
        masks = masks_fn(scores, k)
        assert _pruned(masks) == k
        # The cap: at most int(0.25 * 64) = 16 channels of each first-stage conv.
        assert all(_pruned({g.name: masks[g.name]}) <= 16 for g in groups if g.capped)
    assert structured.channel_sparsity(masks) == pytest.approx(k / 3904)
    assert "layer4.1.conv2" in structured.channel_report(groups, masks)


def test_cap_moves_budget_to_uncapped_groups():
    groups = _groups([("a", 8, True), ("b", 8, True), ("u", 8, False), ("v", 8, False)])
    scores = {
        "a": jnp.arange(1, 9) * 0.01,  # all below the global threshold: capped at int(0.25 * 8) = 2
        "b": jnp.array([0.25, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]),
        "u": jnp.arange(1, 9) * 0.1,
        "v": jnp.arange(1, 9) * 0.1 + 0.05,
    }
    masks = structured.channel_masks(scores, groups, 6)
    # The global threshold first takes a's six smallest; a keeps only 2 of them, and the
    # other 4 go to the uncapped groups' smallest: u 0.1, 0.2 and v 0.15, 0.25.
    np.testing.assert_array_equal(masks["a"], [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(masks["u"], [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(masks["v"], [0, 0, 1, 1, 1, 1, 1, 1])
    # b was under its cap at the first threshold, so (as set_limited_threshold does) it is not
    # re-thresholded: its 0.25 survives although the uncapped groups prune up to 0.25.
    np.testing.assert_array_equal(masks["b"], np.ones(8))
    assert _pruned(masks) == 6

    # Past what the uncapped groups hold, the rest goes to capped groups up to their caps.
    tight = _groups([("a", 8, True), ("b", 8, True), ("u", 2, False)])
    masks = structured.channel_masks({k: scores[k][: g.num_channels] for k, g in zip("abu", tight)}, tight, 6)
    assert _pruned(masks) == 6 and _pruned({"a": masks["a"]}) == 2 and _pruned({"b": masks["b"]}) == 2
    with pytest.raises(ValueError, match="allow 0 to 6"):
        structured.channel_masks(scores, tight, 7)
    with pytest.raises(ValueError, match="allow"):
        structured.channel_prune_counts(tight, 0.1)


def test_ties_are_pruned_by_position_with_an_exact_count():
    groups = _groups([("x", 5, False), ("y", 5, False)])
    tied = {"x": jnp.full(5, 0.5), "y": -jnp.full(5, 0.5)}
    masks = structured.channel_masks(tied, groups, 7)
    np.testing.assert_array_equal(masks["x"], np.zeros(5))
    np.testing.assert_array_equal(masks["y"], [0, 0, 1, 1, 1])


def test_ste_mask_is_exact_and_its_gradient_is_the_hand_value():
    _, weights, _ = random_network("resnet18")
    groups = structured.channel_groups("resnet18", weights)
    scores = structured.init_channel_scores(groups, jax.random.key(1))
    k = structured.channel_prune_counts(groups, 0.6)
    rng = np.random.default_rng(2)
    residuals = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), weights)

    def loss(s):
        masked = structured.apply_channel_masks(weights, groups, structured.ste_channel_masks(s, groups, k))
        return sum(jnp.sum(w * r) for w, r in zip(jax.tree.leaves(masked), jax.tree.leaves(residuals)))

    grads = jax.jit(jax.grad(loss))(scores)
    ste = structured.ste_channel_masks(scores, groups, k)
    hard = structured.channel_masks(scores, groups, k)
    # A kernel that consumes another group's output has that group's mask on its input axis.
    input_masks = {p: np.asarray(hard[g.name])[:, None] for g in groups for p in g.consumers}
    for g in groups:
        np.testing.assert_array_equal(ste[g.name], hard[g.name])  # exactly 0/1, not 0.99999994
        # Identity w.r.t. |s| through the gated kernels only (BN and consumers take the detached
        # mask): dL/ds = sign(s) * sum over the gated kernels of (W * input mask) * dL/dW_eff.
        expected = sum(
            np.sum(np.asarray(_get(weights, p)) * input_masks.get(p, 1.0) * np.asarray(_get(residuals, p)),
                   axis=(0, 1, 2))
            for p in g.convs
        )
        np.testing.assert_allclose(grads[g.name], np.sign(scores[g.name]) * expected, rtol=1e-5, atol=1e-6)


def test_masks_zero_pruned_channels_in_train_and_eval():
    graphdef, weights, batch_stats = random_network("resnet18")
    groups = structured.channel_groups("resnet18", weights)
    # Every other channel pruned, so each group has pruned and kept channels.
    masks = {g.name: jnp.asarray(np.arange(g.num_channels) % 2, jnp.float32) for g in groups}
    masked = structured.apply_channel_masks(weights, groups, masks)

    # Residual consistency: the downsample's output channels are gated by its block's last-conv mask.
    for stage in ("layer2", "layer3", "layer4"):
        live = np.any(np.asarray(masked[stage][0]["downsample"][0]["kernel"]) != 0, axis=(0, 1, 2))
        np.testing.assert_array_equal(live, np.asarray(masks[f"{stage}.0.conv2"]) > 0)

    model = nnx.merge(graphdef, masked, batch_stats)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 3)), jnp.float32)
    block = model.layer2[0]
    for train in (True, False):
        stem = np.asarray(model.bn1(model.conv1(x), train=train))
        shortcut = np.asarray(block.downsample[1](block.downsample[0](stem), train=train))
        for out, name in ((stem, "conv1"), (shortcut, "layer2.0.conv2")):
            pruned = np.asarray(masks[name]) == 0
            assert pruned.any() and (~pruned).any()
            assert np.all(out[..., pruned] == 0.0)
            assert np.all(np.any(out[..., ~pruned] != 0.0, axis=(0, 1, 2)))


def _vit_like_weights(hidden: int = 4, mlp: int = 3, num_layers: int = 2) -> dict:
    """A ViT encoder's prunable leaves (the layout of vpns_jax.models.vit), entries numbered 1, 2, ..."""
    counter = iter(range(1, 10_000))

    def numbered(*shape):
        return jnp.asarray(np.array([next(counter) for _ in range(math.prod(shape))], np.float32).reshape(shape))

    layers = {}
    for i in range(num_layers):
        layers[f"encoder_layer_{i}"] = {
            "self_attention": {"in_proj": {"kernel": numbered(hidden, 3 * hidden), "bias": numbered(3 * hidden)},
                               "out_proj": {"kernel": numbered(hidden, hidden), "bias": numbered(hidden)}},
            "mlp": {0: {"kernel": numbered(hidden, mlp), "bias": numbered(mlp)},
                    3: {"kernel": numbered(mlp, hidden), "bias": numbered(hidden)}},
        }
    return {"encoder": {"layers": layers}}


def test_vit_groups_are_heads_and_mlp_units_per_block():
    layers = _vit_like_weights(hidden=8, mlp=5, num_layers=12)["encoder"]["layers"]
    groups = structured.channel_groups("vit_b_16", {"encoder": {"layers": layers}}, num_heads=2)
    names = [g.name for g in groups]
    # Forward order: encoder_layer_10 comes after encoder_layer_9.
    assert names[18:22] == ["encoder.layers.encoder_layer_9.self_attention", "encoder.layers.encoder_layer_9.mlp.0",
                            "encoder.layers.encoder_layer_10.self_attention", "encoder.layers.encoder_layer_10.mlp.0"]
    heads, units = groups[0], groups[1]
    assert (heads.num_channels, heads.unit_width, heads.blocks, heads.capped) == (2, 4, 3, False)
    assert heads.convs == (("encoder", "layers", "encoder_layer_0", "self_attention", "in_proj", "kernel"),)
    assert heads.consumers == (("encoder", "layers", "encoder_layer_0", "self_attention", "out_proj", "kernel"),)
    assert (units.num_channels, units.unit_width, units.blocks) == (5, 1, 1)
    assert units.consumers == (("encoder", "layers", "encoder_layer_0", "mlp", 3, "kernel"),)
    with pytest.raises(ValueError, match="does not split into 3 heads"):
        structured.channel_groups("vit_b_16", {"encoder": {"layers": layers}}, num_heads=3)
    with pytest.raises(ValueError, match="pass num_heads"):
        structured.channel_groups("vit_b_16", {"encoder": {"layers": layers}})


def test_vit_head_mask_gates_its_q_k_v_columns_and_out_rows():
    weights = _vit_like_weights(hidden=4, mlp=3, num_layers=1)
    groups = structured.channel_groups("vit_b_16", weights, num_heads=2)
    masks = {groups[0].name: jnp.array([0.0, 1.0]), groups[1].name: jnp.array([1.0, 0.0, 1.0])}
    out = structured.apply_channel_masks(weights, groups, masks)["encoder"]["layers"]["encoder_layer_0"]
    before = weights["encoder"]["layers"]["encoder_layer_0"]
    # Head 0 owns columns 0-1 of q (0-3), k (4-7) and v (8-11), and rows 0-1 of out_proj.
    kept_columns = np.array([0, 0, 1, 1] * 3, np.float32)
    attention = out["self_attention"]
    np.testing.assert_array_equal(attention["in_proj"]["kernel"],
                                  before["self_attention"]["in_proj"]["kernel"] * kept_columns)
    np.testing.assert_array_equal(attention["in_proj"]["bias"],
                                  before["self_attention"]["in_proj"]["bias"] * kept_columns)
    np.testing.assert_array_equal(attention["out_proj"]["kernel"][:2], 0.0)
    np.testing.assert_array_equal(attention["out_proj"]["kernel"][2:], before["self_attention"]["out_proj"]["kernel"][2:])
    # The output projection's bias feeds the residual stream, not a head: it stays.
    np.testing.assert_array_equal(attention["out_proj"]["bias"], before["self_attention"]["out_proj"]["bias"])
    np.testing.assert_array_equal(out["mlp"][0]["kernel"][:, 1], 0.0)
    np.testing.assert_array_equal(out["mlp"][0]["bias"], before["mlp"][0]["bias"] * np.array([1, 0, 1]))
    np.testing.assert_array_equal(out["mlp"][3]["kernel"][1], 0.0)
    assert np.count_nonzero(out["mlp"][3]["kernel"]) == 2 * 4
    np.testing.assert_array_equal(out["mlp"][3]["bias"], before["mlp"][3]["bias"])


def test_vit_channel_ste_gradient_sums_each_heads_entries():
    """d/ds_h of sum(W * expanded mask) is sign(s_h) times the sum of head h's gated entries (q, k, v columns)."""
    weights = _vit_like_weights(hidden=4, mlp=3, num_layers=1)
    groups = structured.channel_groups("vit_b_16", weights, num_heads=2)
    scores = {groups[0].name: jnp.array([0.5, -2.0]), groups[1].name: jnp.array([1.0, 0.1, -3.0])}

    def total(s):
        masks = structured.ste_channel_masks(s, groups, 1, 1.0)
        gated = structured.apply_channel_masks(weights, groups, masks)["encoder"]["layers"]["encoder_layer_0"]
        return jnp.sum(gated["self_attention"]["in_proj"]["kernel"]) + jnp.sum(gated["mlp"][0]["kernel"])

    grads = jax.jit(jax.grad(total))(scores)
    kernel = np.asarray(weights["encoder"]["layers"]["encoder_layer_0"]["self_attention"]["in_proj"]["kernel"])
    head_sums = [kernel[:, [c + 4 * b for b in range(3) for c in (2 * h, 2 * h + 1)]].sum() for h in range(2)]
    np.testing.assert_allclose(grads[groups[0].name], [head_sums[0], -head_sums[1]], rtol=1e-6)
    mlp = np.asarray(weights["encoder"]["layers"]["encoder_layer_0"]["mlp"][0]["kernel"])
    np.testing.assert_allclose(grads[groups[1].name], mlp.sum(axis=0) * np.array([1, 1, -1]), rtol=1e-6)
    # One of 5 units pruned, the smallest |s|: MLP unit 1 (0.1).
    hard = structured.channel_masks(scores, groups, 1, 1.0)
    np.testing.assert_array_equal(hard[groups[1].name], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(hard[groups[0].name], [1.0, 1.0])
