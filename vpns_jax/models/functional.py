"""Use an NNX model as pure functions of pytrees.

A model is split once into a static ``graphdef`` and two plain nested dicts, ``weights`` (every ``nnx.Param``) and
``batch_stats`` (every ``nnx.BatchStat``); ``apply_model`` rebuilds the module inside the traced function, so nothing
stateful leaks out of ``jit``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax import traverse_util

from vpns_jax.models import layers

Params = dict[Any, Any]

# Leaf kinds, as named by `leaf_kinds`.
CONV_KERNEL = "conv_kernel"
DENSE_KERNEL = "dense_kernel"
BIAS = "bias"
BN = "bn"  # a normalisation layer's affine (BatchNorm2d or LayerNorm scale/bias): optimiser label 'bn', never pruned
EMBEDDING = "embedding"  # a learned embedding (layers.Embedding: ViT class token, position embedding): never pruned


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params, Params]:
    """Splits ``model`` into (graphdef, weights, batch_stats) with plain-dict states."""
    graphdef, weights, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(weights), nnx.to_pure_dict(batch_stats)


def apply_model(
    graphdef: nnx.GraphDef,
    weights: Params,
    batch_stats: Params,
    x: jax.Array,
    *,
    train: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, Params]:
    """Runs the model on ``x``; returns (logits, batch_stats after the pass): updated running statistics in
    training mode, ``batch_stats`` as given in eval mode."""
    model = nnx.merge(graphdef, weights, batch_stats)
    logits = model(x, train=train, dropout_key=dropout_key)
    if not train:
        return logits, batch_stats
    return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def leaf_kinds(model: nnx.Module) -> Params:
    """A dict shaped like ``weights`` whose leaves name each parameter's kind (``CONV_KERNEL`` ... ``EMBEDDING``).

    Any other parameter is an error, so a new layer type cannot slip past masking or the optimiser labels.
    """
    kinds: dict[tuple[Any, ...], str] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, layers.Conv2d):
            kinds[(*path, "kernel")] = CONV_KERNEL
        elif isinstance(module, nnx.Linear):
            kinds[(*path, "kernel")] = DENSE_KERNEL
        elif isinstance(module, (layers.BatchNorm2d, layers.LayerNorm)):
            kinds[(*path, "scale")] = BN
            kinds[(*path, "bias")] = BN
            continue
        else:
            continue
        if getattr(module, "bias", None) is not None:
            kinds[(*path, "bias")] = BIAS
    embeddings = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, layers.Embedding)))
    kinds.update({path: EMBEDDING for path in embeddings})
    weights = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    unknown = sorted(set(weights) - set(kinds), key=str)
    if unknown:
        raise ValueError(f"parameters of unknown kind (not Conv2d/Linear/BatchNorm2d/LayerNorm/Embedding): {unknown}")
    return traverse_util.unflatten_dict({path: kinds[path] for path in weights})
