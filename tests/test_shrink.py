"""Shrunk networks: same eval logits as the channel-masked network, fewer parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_network
from vpns_jax.core import structured
from vpns_jax.models import shrink
from vpns_jax.models import functional


def _random_masks(groups, seed: int):
    """Masks that prune at least one and keep at least one channel of every group."""
    rng = np.random.default_rng(seed)
    masks = {}
    for g in groups:
        keep = rng.uniform(size=g.num_channels) < 0.6
        on, off = rng.choice(g.num_channels, size=2, replace=False)
        keep[on], keep[off] = True, False
        masks[g.name] = jnp.asarray(keep, jnp.float32)
    return masks


def _masked_logits(graphdef, weights, batch_stats, groups, masks, x):
    fn = jax.jit(lambda w, m, x: functional.apply_model(
        graphdef, structured.apply_channel_masks(w, groups, m), batch_stats, x, train=False)[0])
    return fn(weights, masks, x)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "vgg16_bn"])
def test_shrunk_logits_match_the_masked_network(name):
    graphdef, weights, batch_stats = random_network(name)
    groups = structured.channel_groups(name, weights)
    masks = _random_masks(groups, seed=1)
    if name == "resnet18":
        # Fully pruned groups: a block's conv1 (its conv2 then sees no input), and a block's last
        # conv (it writes nothing into its stream).
        masks["layer3.1.conv1"] = jnp.zeros_like(masks["layer3.1.conv1"])
        masks["layer4.1.conv2"] = jnp.zeros_like(masks["layer4.1.conv2"])
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)

    net = shrink.shrink(name, weights, batch_stats, groups, masks)
    got = jax.jit(shrink.apply_shrunk)(net, x)
    want = _masked_logits(graphdef, weights, batch_stats, groups, masks, x)
    assert float(jnp.abs(want).max()) > 0.1  # the random BN terms keep a live signal
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))

    if name.startswith("resnet"):
        # Writers that keep fewer channels than their stream's union take the embedding path.
        # (ResNet-50's stem alone writes its stream: layer1.0 starts a new one with its downsample.)
        assert (net.layout.stem_embed is not None) == (name == "resnet18")
        assert sum(block.embed is not None for block in net.layout.blocks) >= 2
    if name == "resnet18":
        # Zero channels padded up to multiples of 8 change nothing.
        aligned = shrink.shrink(name, weights, batch_stats, groups, masks, align=8)
        assert all(p["kernel"].shape[-1] % 8 == 0 for p in aligned.params["blocks"][3]["convs"])
        np.testing.assert_allclose(jax.jit(shrink.apply_shrunk)(aligned, x), want, rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(want).max()))
    dense = shrink.shrink(name, weights, batch_stats, groups, {g.name: jnp.ones(g.num_channels) for g in groups})
    assert shrink.parameter_count(net) < shrink.parameter_count(dense)


def test_parameter_count_by_hand_on_vgg16():
    _, weights, batch_stats = random_network("vgg16")
    groups = structured.channel_groups("vgg16", weights)
    # Drop the last channel of every conv. Widths at 1/16: 4,4,8,8,16,16,16,32 x 6; hidden 256.
    masks = {g.name: jnp.asarray(np.arange(g.num_channels) < g.num_channels - 1, jnp.float32) for g in groups}
    net = shrink.shrink("vgg16", weights, batch_stats, groups, masks)
    kept = [3, 3, 7, 7, 15, 15, 15, 31, 31, 31, 31, 31, 31]
    inputs = [3] + kept[:-1]
    convs = sum(9 * i * o + o for i, o in zip(inputs, kept))
    # = 84 + 84 + 196 + 448 + 960 + 2040 + 2040 + 4216 + 5 * 8680
    assert convs == 53_468
    classifier = (31 * 7 * 7 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert shrink.parameter_count(net) == convs + classifier == 510_950
    # Against the unshrunk network, which also has the dropped channels' weights.
    assert shrink.parameter_count(net) < sum(np.size(w) for w in jax.tree.leaves(weights))
