"""Structured (per-output-channel) masks, as in the authors' structured VPNs.

Each conv that owns a *channel group* (``models.channels.ChannelGroup``; ``channel_groups`` builds each
model's) has one score per output channel; the group's mask gates those output channels (and the output
channels of any follower conv that must agree with it, i.e. a block's downsample conv), the BatchNorm right
after them, and the input channels of the convs that read the output only through this mask (inside a block,
or the next VGG conv).

Density is the channel keep ratio: k = int((1 - d) * C_total) channels are
pruned under one global threshold on |s|, except that *capped* groups (the
early layers) prune at most int(channel_max * C) channels each; what they
cannot take is re-thresholded over the uncapped groups, as the reference's
``set_limited_threshold`` does. Unlike torch's ``kthvalue`` + strict ``>``,
ties are broken by position (group order, then channel index), so exactly k
channels are pruned whenever the caps allow it.

Vision Transformers have two kinds of group per encoder block: its attention
heads (one score per head; the mask gates that head's q, k and v columns of the
fused ``in_proj`` and its rows of ``out_proj``) and its MLP hidden units (one
score per unit; ``mlp.0``'s columns and bias, ``mlp.3``'s rows). No ViT group
is capped; the patch embedding, the residual width and the head stay whole.

A layer floor f = ``min_layer_density`` in (0, 1) (0: none) then gives back,
in every group of C channels that lost more than int((1 - f) * C), its largest
|s| (ties: the later channel, the reverse of the pruning order) until it keeps
C - int((1 - f) * C) = ceil(f * C): the density becomes a lower bound, as for
weight masks (``vpns_jax.core.masking``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax.core import masking
from vpns_jax.models.channels import ChannelGroup, Path, at
from vpns_jax.models.vgg import VGG16_CFG, vgg_conv_indices

Params = dict[Any, Any]

CNN_STRUCTURED_MODELS = ("resnet18", "resnet50", "vgg16", "vgg16_bn")
VIT_STRUCTURED_MODELS = ("vit_b_16", "vit_b_32", "vit_l_16")
STRUCTURED_MODELS = CNN_STRUCTURED_MODELS + VIT_STRUCTURED_MODELS
# VGG's channel_max cap covers its first two convs (the 224 px, 64-channel
# stage): they play the role of ResNet's stem + first stage, the layers whose
# pruning the reference protects; VGG has no reference choice to follow.
VGG_CAPPED_CONVS = 2


def dotted(path: Path) -> str:
    """'layer1.0.conv2' for ('layer1', 0, 'conv2', ...), dropping a trailing 'kernel'."""
    if path and path[-1] == "kernel":
        path = path[:-1]
    return ".".join(str(p) for p in path)


def _resnet_groups(weights: Params) -> list[ChannelGroup]:
    bottleneck = "conv3" in weights["layer1"][0]
    last = "conv3" if bottleneck else "conv2"
    conv_names = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    groups = [
        ChannelGroup("conv1", (("conv1", "kernel"),), (("bn1",),), (), weights["conv1"]["kernel"].shape[-1], True)
    ]
    for stage_index in range(1, 5):
        stage = f"layer{stage_index}"
        # Stage 1 is the first stage: the reference caps conv1 and layer1.*.
        capped = stage_index == 1
        for b in sorted(weights[stage]):
            block = weights[stage][b]
            for i, conv in enumerate(conv_names):
                prefix = (stage, b)
                convs: tuple[Path, ...] = ((*prefix, conv, "kernel"),)
                bns: tuple[Path, ...] = ((*prefix, f"bn{i + 1}"),)
                consumers: tuple[Path, ...] = ()
                if conv == last:
                    if "downsample" in block:
                        # The downsample follows its block's last conv, as in the authors' Calculate_mask.
                        convs += ((*prefix, "downsample", 0, "kernel"),)
                        bns += ((*prefix, "downsample", 1),)
                else:
                    consumers = ((*prefix, conv_names[i + 1], "kernel"),)
                num = block[conv]["kernel"].shape[-1]
                groups.append(ChannelGroup(dotted(convs[0]), convs, bns, consumers, num, capped))
    return groups


def _vgg_groups(weights: Params, batch_norm: bool) -> list[ChannelGroup]:
    indices = vgg_conv_indices(weights)
    num_convs = sum(1 for item in VGG16_CFG if item != "M")
    if len(indices) != num_convs:
        raise ValueError(f"expected {num_convs} VGG-16 convs in weights['features'], found {len(indices)}")
    groups = []
    for n, i in enumerate(indices):
        path = ("features", i, "kernel")
        bns = (("features", i + 1),) if batch_norm else ()
        # The last conv feeds the classifier through the flatten; its rows stay.
        consumers = (("features", indices[n + 1], "kernel"),) if n + 1 < len(indices) else ()
        num = weights["features"][i]["kernel"].shape[-1]
        groups.append(ChannelGroup(dotted(path), (path,), bns, consumers, num, n < VGG_CAPPED_CONVS))
    return groups


def _vit_groups(weights: Params, num_heads: int | None) -> list[ChannelGroup]:
    if not num_heads:
        raise ValueError("a ViT's channel groups need its number of attention heads: pass num_heads")
    layers = weights["encoder"]["layers"]
    groups = []
    # encoder_layer_10 after encoder_layer_9: forward order, not string order.
    for name in sorted(layers, key=lambda n: int(str(n).rsplit("_", 1)[-1])):
        prefix = ("encoder", "layers", name)
        attention = (*prefix, "self_attention")
        hidden = layers[name]["self_attention"]["out_proj"]["kernel"].shape[0]
        if hidden % num_heads:
            raise ValueError(f"{dotted(attention)}: width {hidden} does not split into {num_heads} heads")
        groups.append(ChannelGroup(dotted(attention), ((*attention, "in_proj", "kernel"),), (),
                                   ((*attention, "out_proj", "kernel"),), num_heads, False,
                                   unit_width=hidden // num_heads, blocks=3))
        mlp = (*prefix, "mlp")
        units = layers[name]["mlp"][0]["kernel"].shape[-1]
        groups.append(ChannelGroup(dotted((*mlp, 0)), ((*mlp, 0, "kernel"),), (), ((*mlp, 3, "kernel"),), units,
                                   False))
    return groups


def channel_groups(model_name: str, weights: Params, *, num_heads: int | None = None) -> tuple[ChannelGroup, ...]:
    """The channel groups of ``model_name``, in forward order.

    Every conv owns a group except downsample convs, which follow their
    block's last conv. The classifier is not pruned. Capped groups: the stem
    and first-stage convs for ResNets, the first ``VGG_CAPPED_CONVS`` convs
    for VGG. A ViT (``num_heads`` heads per block) has a head group and an MLP
    group per block, none capped.
    """
    if model_name in ("resnet18", "resnet50"):
        groups = _resnet_groups(weights)
    elif model_name in ("vgg16", "vgg16_bn"):
        groups = _vgg_groups(weights, batch_norm=model_name == "vgg16_bn")
    elif model_name in VIT_STRUCTURED_MODELS:
        groups = _vit_groups(weights, num_heads)
    else:
        raise ValueError(f"structured pruning does not support {model_name!r}; valid models: {STRUCTURED_MODELS}")
    return tuple(groups)


def init_channel_scores(groups: Sequence[ChannelGroup], key: jax.Array) -> dict[str, jax.Array]:
    """One float32 score per channel, U(-1, 1) (torch kaiming_uniform(a=sqrt 5) with fan_in 1)."""
    # One draw split into groups: one compiled sampler instead of one per group size.
    total = sum(g.num_channels for g in groups)
    return _split(jax.random.uniform(key, (total,), jnp.float32, minval=-1.0, maxval=1.0), groups)


def channel_caps(groups: Sequence[ChannelGroup], channel_max: float = 0.25) -> np.ndarray:
    """Most channels each group may prune: int(channel_max * C) if capped, else C."""
    return np.array([int(channel_max * g.num_channels) if g.capped else g.num_channels for g in groups], np.int32)


def channel_prune_counts(groups: Sequence[ChannelGroup], density: float, channel_max: float = 0.25) -> int:
    """Channels to prune at channel keep ratio ``density``: int((1 - d) * C_total), as torch computes it.

    Raises ValueError where the caps leave fewer prunable channels.
    """
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise ValueError(f"density {density!r} is not a channel keep ratio in (0, 1]")
    total = sum(g.num_channels for g in groups)
    k = int((1.0 - float(density)) * total)
    _check_count(groups, k, channel_max)
    return k


def _check_count(groups: Sequence[ChannelGroup], k: int, channel_max: float) -> None:
    allowed = int(channel_caps(groups, channel_max).sum())
    if not 0 <= k <= allowed:
        raise ValueError(
            f"cannot prune {k} channels: the caps (channel_max={channel_max}) allow 0 to {allowed} of "
            f"{sum(g.num_channels for g in groups)}"
        )


def _inverse(perm: jax.Array) -> jax.Array:
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _rank_among(flags: jax.Array, order: jax.Array) -> jax.Array:
    """For each entry, how many flagged entries come before it in ``order`` (meaningful where flagged)."""
    in_order = flags[order].astype(jnp.int32)
    before = jnp.cumsum(in_order) - in_order
    return jnp.zeros_like(before).at[order].set(before)


# Jitted on its own so that eager callers compile one program, not dozens of small ops.
@functools.partial(jax.jit, static_argnames=("groups", "channel_max", "min_layer_density"))
def _pruned_flags(
    magnitudes: jax.Array, k: jax.Array, *, groups: tuple[ChannelGroup, ...], channel_max: float,
    min_layer_density: float = 0.0,
) -> jax.Array:
    """Boolean (N,) over the concatenated channels: which ones to prune (see the module docstring)."""
    sizes = np.array([g.num_channels for g in groups])
    group_capped = np.array([g.capped for g in groups], bool)
    gid = np.repeat(np.arange(len(groups)), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    caps = jnp.asarray(channel_caps(groups, channel_max))
    capped = jnp.asarray(group_capped[gid])
    num_uncapped = int(sizes[~group_capped].sum())

    # A stable sort breaks ties at the threshold by position, so counts are exact.
    order = jnp.argsort(magnitudes, stable=True)
    rank = _inverse(order)
    first_pass = rank < k

    # Rank inside each group in the same global order (groups are contiguous after this sort).
    within = _inverse(jnp.argsort(jnp.asarray(gid, jnp.int32) * int(sizes.sum()) + rank)) - starts[gid]

    # Capped groups keep what the global threshold gives them, up to their cap.
    first_counts = jax.ops.segment_sum(first_pass.astype(jnp.int32), gid, num_segments=len(groups))
    capped_counts = jnp.where(group_capped, jnp.minimum(first_counts, caps), 0)
    capped_pruned = capped & (within < capped_counts[gid])

    # The rest of the budget is re-thresholded over the uncapped groups, smallest |s| first.
    rest = k - jnp.sum(capped_counts)
    uncapped_pruned = ~capped & (_rank_among(~capped, order) < jnp.minimum(rest, num_uncapped))

    # Only if the uncapped groups run out does the remainder go to capped groups below their caps.
    overflow = jnp.maximum(rest - num_uncapped, 0)
    room = capped & (within >= capped_counts[gid]) & (within < caps[gid])
    overflow_pruned = room & (_rank_among(room, order) < overflow)
    pruned = capped_pruned | uncapped_pruned | overflow_pruned
    if not min_layer_density:
        return pruned
    # Each group's pruned channels are the first in its order (``within``), so capping that prefix at the
    # floor's count gives back the group's largest |s|, and no other group changes.
    most = np.array([int((1.0 - min_layer_density) * c) for c in sizes], np.int32)
    return pruned & (within < jnp.asarray(most)[gid])


def _magnitudes(scores: Mapping[str, jax.Array], groups: Sequence[ChannelGroup]) -> jax.Array:
    return jnp.concatenate([_magnitude(scores[g.name]) for g in groups])


def _magnitude(s: jax.Array) -> jax.Array:
    # At least float32 (bfloat16 scores), and float64 where the scores are: a float64 run stays float64.
    return jnp.abs(s).astype(jnp.promote_types(s.dtype, jnp.float32))


def _split(flat: jax.Array, groups: Sequence[ChannelGroup]) -> dict[str, jax.Array]:
    out, start = {}, 0
    for g in groups:
        out[g.name] = flat[start : start + g.num_channels]
        start += g.num_channels
    return out


def channel_masks(
    scores: Mapping[str, jax.Array],
    groups: Sequence[ChannelGroup],
    num_pruned: int | jax.Array,
    channel_max: float = 0.25,
    *,
    min_layer_density: float = 0.0,
) -> dict[str, jax.Array]:
    """Binary float32 (C,) masks pruning ``num_pruned`` channels (from ``channel_prune_counts``), without gradient.

    ``num_pruned`` may be traced; a concrete count is checked against the caps. ``min_layer_density`` (a
    Python float): the layer floor of the module docstring, which gives channels back after the count.
    """
    if isinstance(num_pruned, (int, np.integer)):
        _check_count(groups, int(num_pruned), channel_max)
    floor = masking.validate_min_layer_density(min_layer_density)
    a = jax.lax.stop_gradient(_magnitudes(scores, groups))
    k = jnp.asarray(num_pruned, jnp.int32)
    pruned = _pruned_flags(a, k, groups=tuple(groups), channel_max=float(channel_max), min_layer_density=floor)
    return _split((~pruned).astype(jnp.float32), groups)


def ste_channel_masks(
    scores: Mapping[str, jax.Array],
    groups: Sequence[ChannelGroup],
    num_pruned: int | jax.Array,
    channel_max: float = 0.25,
    *,
    min_layer_density: float = 0.0,
) -> dict[str, jax.Array]:
    """``channel_masks`` whose forward value is exactly 0/1 and whose gradient w.r.t. |s| is the identity.

    Written m + (a - stop_gradient(a)) so that the forward value is exactly m
    (see ``masking.ste_masks``).
    """
    hard = channel_masks(scores, groups, num_pruned, channel_max, min_layer_density=min_layer_density)
    out = {}
    for g in groups:
        a = _magnitude(scores[g.name])
        out[g.name] = hard[g.name] + (a - jax.lax.stop_gradient(a))
    return out


def _set(tree: Params, path: Path, value: Any) -> Params:
    """A copy of ``tree`` (dicts along ``path`` only) with ``value`` at ``path``."""
    head, *rest = path
    new = dict(tree)
    new[head] = _set(tree[head], tuple(rest), value) if rest else value
    return new


def apply_channel_masks(
    weights: Params, groups: Sequence[ChannelGroup], masks: Mapping[str, jax.Array]
) -> Params:
    """``weights`` with each group's channels gated by its mask.

    Owning and follower kernels (output axis) and their conv biases take the
    mask itself, so an STE mask passes gradient to the scores. BatchNorm scale
    and bias take the detached mask, so a pruned channel outputs exactly 0 in
    train and eval mode (the reference's SubnetBatchNorm2d). Consumer kernels'
    input axis takes the detached mask too: it changes nothing in the forward
    pass (the input is already 0) but shows in nnz counts.
    """
    for g in groups:
        m = masks[g.name]
        fixed = jax.lax.stop_gradient(m)
        owned = expand_units(m, g.unit_width, g.blocks)
        for path in g.convs:
            weights = _set(weights, path, at(weights, path) * owned)
            layer = at(weights, path[:-1])
            if "bias" in layer:
                weights = _set(weights, (*path[:-1], "bias"), layer["bias"] * owned)
        for bn in g.bns:
            for leaf in ("scale", "bias"):
                weights = _set(weights, (*bn, leaf), at(weights, (*bn, leaf)) * fixed)
        for path in g.consumers:
            weights = _set(weights, path, at(weights, path) * expand_units(fixed, g.unit_width)[:, None])
    return weights


def expand_units(mask: jax.Array, unit_width: int = 1, blocks: int = 1) -> jax.Array:
    """A per-unit mask as one entry per kernel column: each unit repeated ``unit_width`` times, the whole
    pattern ``blocks`` times (q, k, v of a fused projection). Unit widths of 1 return ``mask`` itself."""
    if unit_width > 1:
        mask = jnp.repeat(mask, unit_width, total_repeat_length=mask.shape[0] * unit_width)
    return jnp.tile(mask, blocks) if blocks > 1 else mask


def channel_sparsity(masks: Mapping[str, jax.Array]) -> float:
    """Fraction of pruned channels over all groups."""
    total = sum(int(np.size(m)) for m in masks.values())
    kept = sum(int(np.count_nonzero(np.asarray(m))) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def channel_report(groups: Sequence[ChannelGroup], masks: Mapping[str, jax.Array]) -> str:
    """A plain-text table of kept channels per group, plus the overall channel sparsity."""
    width = max([len(g.name) for g in groups] + [len("group")])
    rows = [f"{'group':<{width}}  {'channels':>8}  {'kept':>8}  {'sparsity':>8}  capped"]
    for g in groups:
        kept = int(np.count_nonzero(np.asarray(masks[g.name])))
        sparsity = 1.0 - kept / g.num_channels
        capped = "yes" if g.capped else ""
        rows.append(f"{g.name:<{width}}  {g.num_channels:>8}  {kept:>8}  {sparsity:>8.4f}  {capped}")
    total = sum(g.num_channels for g in groups)
    rows.append(f"channel sparsity: {channel_sparsity(masks):.4%} of {total:,} channels")
    return "\n".join(rows)


def max_prunable(groups: Sequence[ChannelGroup], channel_max: float = 0.25) -> int:
    """Largest channel count the caps allow pruning."""
    return int(channel_caps(groups, channel_max).sum())


__all__ = [
    "apply_channel_masks",
    "channel_caps",
    "channel_groups",
    "channel_masks",
    "channel_prune_counts",
    "channel_report",
    "channel_sparsity",
    "expand_units",
    "init_channel_scores",
    "max_prunable",
    "ste_channel_masks",
]


def bn_scale_importance(weights: Params, groups: Sequence[ChannelGroup]) -> dict[str, np.ndarray]:
    """|BatchNorm scale| of each group's own BatchNorm, per channel: Network Slimming's channel importance."""
    missing = [g.name for g in groups if not g.bns]
    if missing:
        raise ValueError(f"Network Slimming prunes by BatchNorm scales, but {missing[0]} has no BatchNorm: "
                         "use a model with BatchNorm (resnet18, resnet50, vgg16_bn)")
    return {g.name: np.abs(np.asarray(at(weights, (*g.bns[0], "scale")))) for g in groups}
