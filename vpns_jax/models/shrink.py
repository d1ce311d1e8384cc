"""Physically remove pruned channels from a channel-masked network, for eval-mode inference.

Eval BatchNorm is folded into the conv before it (kernel * g, bias - mean * g
with g = scale / sqrt(var + eps)), so a shrunk conv is one conv plus a bias.

Residual streams. A ResNet stage carries a stream that several convs write
into: the stem (or the downsample conv that starts a stream) and the last conv
of every block in it. A channel that every writer prunes is exactly 0 in the
masked network all along the stream (relu(0 + 0) = 0), so the shrunk stream
holds only the union of the writers' kept channels. A writer that keeps fewer
channels than the union is embedded into the union's positions (a gather from
its output padded with one zero channel), and every reader of the stream
(block first convs, the next downsample, the fc after pooling) reads the union
channels only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax.models import layers
from vpns_jax.models.channels import ChannelGroup, at
from vpns_jax.models.vgg import VGG16_CFG, vgg_conv_indices

Params = dict[Any, Any]

# The models build every BatchNorm2d with its default eps.
BN_EPS = inspect.signature(layers.BatchNorm2d.__init__).parameters["eps"].default
# VGG's classifier reads a 7x7 adaptive pool, flattened in torch's (C, H, W) order.
_VGG_POOL = 7


class ConvSpec(NamedTuple):
    """Static geometry of one shrunk conv."""

    stride: int
    padding: int


class BlockSpec(NamedTuple):
    """Static structure of one shrunk residual block."""

    convs: tuple[ConvSpec, ...]
    downsample: ConvSpec | None
    # Gather indices into the block's output padded with one zero channel, or None where
    # the block writes every channel of its output stream.
    embed: tuple[int, ...] | None


class ResNetLayout(NamedTuple):
    """Static structure of a shrunk ResNet."""

    stem: ConvSpec
    stem_pool: bool
    stem_embed: tuple[int, ...] | None
    blocks: tuple[BlockSpec, ...]


class VGGLayout(NamedTuple):
    """Static structure of a shrunk VGG."""

    convs: tuple[ConvSpec, ...]
    pool_after: tuple[bool, ...]  # a 2x2/2 max-pool follows conv i


@dataclasses.dataclass(frozen=True)
class ShrunkNetwork:
    """A network with its pruned channels removed: static ``arch``/``layout``, array ``params``."""

    arch: str
    layout: ResNetLayout | VGGLayout
    params: Params


jax.tree_util.register_dataclass(ShrunkNetwork, data_fields=["params"], meta_fields=["arch", "layout"])


def _kept(masks: Mapping[str, jax.Array], name: str) -> np.ndarray:
    return np.asarray(masks[name]) > 0.5


def _channels(keep: np.ndarray, align: int) -> np.ndarray:
    """Indices of the kept channels, padded with -1 (an all-zero channel) to a multiple of ``align``."""
    idx = np.flatnonzero(keep)
    return np.concatenate([idx, np.full(-len(idx) % align, -1)]).astype(np.int64)


def _select(array: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """``array`` at positions ``idx`` along ``axis``; index -1 gives zeros."""
    array = np.asarray(array)
    zero = np.zeros_like(np.take(array, [0], axis=axis))
    return np.take(np.concatenate([array, zero], axis=axis), np.where(idx < 0, array.shape[axis], idx), axis=axis)


def _fold(
    weights: Params,
    batch_stats: Params,
    conv: tuple[Any, ...],
    bn: tuple[Any, ...] | None,
    in_idx: np.ndarray,
    out_idx: np.ndarray,
) -> Params:
    """The conv at ``conv`` (module path) restricted to (in_idx, out_idx), with eval BN ``bn`` folded in."""
    layer = at(weights, conv)
    kernel = _select(_select(np.asarray(layer["kernel"], np.float64), in_idx, 2), out_idx, 3)
    bias = _select(np.asarray(layer["bias"], np.float64), out_idx, 0) if "bias" in layer else np.zeros(len(out_idx))
    if bn is not None:
        # Padding channels select zeros everywhere, so they fold to a zero kernel and a zero bias.
        affine, stats = at(weights, bn), at(batch_stats, bn)
        g = np.asarray(affine["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + BN_EPS)
        g = _select(g, out_idx, 0)
        kernel = kernel * g
        mean = _select(np.asarray(stats["mean"], np.float64), out_idx, 0)
        bias = (bias - mean) * g + _select(np.asarray(affine["bias"], np.float64), out_idx, 0)
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _to_device(params: Params) -> Params:
    # Built in NumPy (no per-shape dispatch), moved to the default device once.
    return jax.tree.map(jnp.asarray, params)


def _embedding(kept: np.ndarray, stream: np.ndarray) -> tuple[int, ...] | None:
    """Gather indices placing channels ``kept`` into ``stream`` positions (len(kept) picks the zero pad).

    None where they coincide. Static, so XLA sees a constant gather.
    """
    if np.array_equal(kept, stream):
        return None
    where = {int(c): i for i, c in enumerate(kept) if c >= 0}
    return tuple(where.get(int(c), len(kept)) if c >= 0 else len(kept) for c in stream)


def _resnet_shrink(
    weights: Params, batch_stats: Params, groups: Sequence[ChannelGroup], masks, align: int
) -> ShrunkNetwork:
    by_owner = {g.owner[:-1]: g for g in groups}
    bottleneck = "conv3" in weights["layer1"][0]
    conv_names = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")

    blocks = [(s, b) for s in ("layer1", "layer2", "layer3", "layer4") for b in sorted(weights[s])]
    # Streams: writer masks per stream, and each block's (input, output) stream.
    writers = [[_kept(masks, by_owner[("conv1",)].name)]]
    streams = []
    for s, b in blocks:
        last = _kept(masks, by_owner[(s, b, conv_names[-1])].name)
        # A downsample starts a new stream; without one the block adds into its input's.
        starts_stream = "downsample" in weights[s][b]
        if starts_stream:
            writers.append([last])
        else:
            writers[-1].append(last)
        streams.append((len(writers) - 1 - int(starts_stream), len(writers) - 1))
    unions = [_channels(np.logical_or.reduce(w), align) for w in writers]

    imagenet_stem = weights["conv1"]["kernel"].shape[0] == 7
    stem_kept = _channels(_kept(masks, "conv1"), align)
    image_channels = np.arange(weights["conv1"]["kernel"].shape[2])
    params: Params = {"stem": _fold(weights, batch_stats, ("conv1",), ("bn1",), image_channels, stem_kept), "blocks": []}
    stem_embed = _embedding(stem_kept, unions[0])

    specs = []
    for (s, b), (stream_in, stream_out) in zip(blocks, streams):
        first_block_of_later_stage = s != "layer1" and b == 0
        stride = 2 if first_block_of_later_stage else 1
        in_idx = unions[stream_in]
        block_params: Params = {"convs": []}
        conv_specs = []
        for i, conv in enumerate(conv_names):
            out_idx = _channels(_kept(masks, by_owner[(s, b, conv)].name), align)
            folded = _fold(weights, batch_stats, (s, b, conv), (s, b, f"bn{i + 1}"), in_idx, out_idx)
            block_params["convs"].append(folded)
            size = weights[s][b][conv]["kernel"].shape[0]
            # torchvision v1.5: BasicBlock strides its conv1, Bottleneck its 3x3 conv2.
            strided = stride if (i == 1 if bottleneck else i == 0) else 1
            conv_specs.append(ConvSpec(strided, size // 2))
            in_idx = out_idx
        ds_spec = None
        if "downsample" in weights[s][b]:
            block_params["downsample"] = _fold(
                weights, batch_stats, (s, b, "downsample", 0), (s, b, "downsample", 1), unions[stream_in], in_idx
            )
            ds_spec = ConvSpec(stride, 0)
        params["blocks"].append(block_params)
        specs.append(BlockSpec(tuple(conv_specs), ds_spec, _embedding(in_idx, unions[stream_out])))

    fc = weights["fc"]
    params["fc"] = {"kernel": _select(fc["kernel"], unions[-1], 0), "bias": np.asarray(fc["bias"])}
    stem_spec = ConvSpec(2, 3) if imagenet_stem else ConvSpec(1, 1)
    layout = ResNetLayout(stem_spec, imagenet_stem, stem_embed, tuple(specs))
    return ShrunkNetwork("resnet", layout, _to_device(params))


def _vgg_shrink(
    weights: Params, batch_stats: Params, groups: Sequence[ChannelGroup], masks, batch_norm: bool, align: int
) -> ShrunkNetwork:
    indices = vgg_conv_indices(weights)
    by_owner = {g.owner[:-1]: g for g in groups}
    # "M" in the config is a max-pool after the conv before it.
    pool_after, n = [False] * len(indices), -1
    for item in VGG16_CFG:
        if item == "M":
            pool_after[n] = True
        else:
            n += 1
    in_idx = np.arange(weights["features"][indices[0]]["kernel"].shape[2])
    convs = []
    for i in indices:
        out_idx = _channels(_kept(masks, by_owner[("features", i)].name), align)
        bn = ("features", i + 1) if batch_norm else None
        convs.append(_fold(weights, batch_stats, ("features", i), bn, in_idx, out_idx))
        in_idx = out_idx
    # Rows of classifier.0 are (c, h, w) with c major: keep every position of each kept channel.
    area = _VGG_POOL * _VGG_POOL
    rows = np.where(in_idx[:, None] < 0, -1, in_idx[:, None] * area + np.arange(area)[None, :]).ravel()
    classifier = []
    for j, layer in enumerate(sorted(weights["classifier"])):
        dense = weights["classifier"][layer]
        kernel = _select(dense["kernel"], rows, 0) if j == 0 else np.asarray(dense["kernel"])
        classifier.append({"kernel": kernel, "bias": np.asarray(dense["bias"])})
    layout = VGGLayout(tuple(ConvSpec(1, 1) for _ in indices), tuple(pool_after))
    return ShrunkNetwork("vgg", layout, _to_device({"convs": convs, "classifier": classifier}))


def shrink(
    model_name: str,
    weights: Params,
    batch_stats: Params,
    groups: Sequence[ChannelGroup],
    masks: Mapping[str, jax.Array],
    *,
    align: int = 1,
) -> ShrunkNetwork:
    """The eval-mode network with every pruned channel (mask 0) removed and BN folded.

    ``weights`` may be raw or already masked: only kept channels are read.
    ``align`` > 1 pads every kept channel count (and each residual stream) with
    all-zero channels up to a multiple of ``align``: the logits do not change,
    and CPU convolutions tend to run faster on channel counts that are
    multiples of 8 than on the odd counts an exact shrink leaves.
    ``apply_shrunk`` on the result matches ``apply_model(graphdef,
    apply_channel_masks(weights, groups, masks), batch_stats, x, train=False)``.
    """
    if model_name in ("resnet18", "resnet50"):
        return _resnet_shrink(weights, batch_stats, groups, masks, align)
    if model_name in ("vgg16", "vgg16_bn"):
        return _vgg_shrink(weights, batch_stats, groups, masks, batch_norm=model_name == "vgg16_bn", align=align)
    raise ValueError(f"shrink does not support {model_name!r}; valid models: resnet18, resnet50, vgg16, vgg16_bn")


def _conv(x: jax.Array, p: Params, spec: ConvSpec) -> jax.Array:
    kernel = p["kernel"]
    kh, kw, cin, cout = kernel.shape
    if cin == 0 or cout == 0:
        # A fully pruned input or output: the conv sums nothing, only the (folded) bias remains.
        h = (x.shape[1] + 2 * spec.padding - kh) // spec.stride + 1
        w = (x.shape[2] + 2 * spec.padding - kw) // spec.stride + 1
        return jnp.broadcast_to(p["bias"], (x.shape[0], h, w, cout)).astype(x.dtype)
    return layers.conv2d(x, kernel, spec.stride, spec.padding) + p["bias"]


def _embed(y: jax.Array, index: tuple[int, ...]) -> jax.Array:
    padded = jnp.concatenate([y, jnp.zeros((*y.shape[:-1], 1), y.dtype)], axis=-1)
    return jnp.take(padded, np.asarray(index, np.int32), axis=-1)


def _apply_resnet(layout: ResNetLayout, params: Params, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(_conv(x, params["stem"], layout.stem))
    if layout.stem_pool:
        x = layers.max_pool2d(x, 3, 2, 1)
    if layout.stem_embed is not None:
        # Pooling and relu are per channel, so embedding after them is the same and cheaper.
        x = _embed(x, layout.stem_embed)
    for spec, p in zip(layout.blocks, params["blocks"]):
        h = x
        for i, (conv_spec, conv_p) in enumerate(zip(spec.convs, p["convs"])):
            h = _conv(h, conv_p, conv_spec)
            if i + 1 < len(spec.convs):
                h = jax.nn.relu(h)
        if spec.downsample is not None:
            h = h + _conv(x, p["downsample"], spec.downsample)
            x = h if spec.embed is None else _embed(h, spec.embed)
        else:
            x = x + (h if spec.embed is None else _embed(h, spec.embed))
        x = jax.nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["fc"]["kernel"] + params["fc"]["bias"]


def _apply_vgg(layout: VGGLayout, params: Params, x: jax.Array) -> jax.Array:
    for spec, pool, p in zip(layout.convs, layout.pool_after, params["convs"]):
        x = jax.nn.relu(_conv(x, p, spec))
        if pool:
            x = layers.max_pool2d(x, 2, 2, 0)
    x = layers.adaptive_avg_pool2d(x, _VGG_POOL)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for j, p in enumerate(params["classifier"]):
        x = x @ p["kernel"] + p["bias"]
        if j + 1 < len(params["classifier"]):
            x = jax.nn.relu(x)  # dropout is the identity in eval mode
    return x


def apply_shrunk(net: ShrunkNetwork, x: jax.Array) -> jax.Array:
    """Eval-mode logits of the shrunk network for NHWC images ``x``; pure and jittable."""
    if net.arch == "resnet":
        return _apply_resnet(net.layout, net.params, x)
    return _apply_vgg(net.layout, net.params, x)


def parameter_count(net: ShrunkNetwork) -> int:
    """Stored parameters of the shrunk network: kernels and folded biases (``align`` padding included)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(net.params))


__all__ = ["BN_EPS", "ShrunkNetwork", "apply_shrunk", "parameter_count", "shrink"]
