"""Label mapping from a source classifier head onto the target classes.

VPNs keeps the pretrained 1000-way head and reads target logits through ILM-VP's frequency label mapping (FLM): count
how often each source class is the argmax for each target class, then greedily give every target class a distinct
source class, so the head needs at least as many classes as the target (docs/method.md, section 5).
``identity_mapping`` is for a head that already has the target's classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def prediction_counts(source_logits: jax.Array, labels: jax.Array, num_target: int) -> jax.Array:
    """Count matrix D[src, tgt], int32 [num_source, num_target]: samples of target class tgt whose source argmax is
    src; sum it over batches. Jittable (``num_target`` static); labels outside [0, num_target) are not counted.
    """
    num_source = source_logits.shape[-1]
    src = jnp.argmax(source_logits, axis=-1)  # first maximum, as torch.argmax
    labels = jnp.asarray(labels)
    valid = (labels >= 0) & (labels < num_target)
    # A masked scatter-add rather than .at[src, labels]: negative indices would wrap.
    counts = jnp.zeros((num_source, num_target), jnp.int32)
    return counts.at[src, jnp.where(valid, labels, 0)].add(valid.astype(jnp.int32))


def frequency_label_mapping(counts: Any) -> np.ndarray:
    """Greedy one-to-one int32 mapping [num_target] (``mapping[t]``: the source class of t) from a count matrix.

    As the authors' code, num_target times: take the row-major first maximum, assign that source to that target,
    then set the source's row and the target's column to -1.
    """
    dist = np.array(counts, dtype=np.int64)  # a copy: it is overwritten below
    if dist.ndim != 2:
        raise ValueError(f"counts must be a [num_source, num_target] matrix, got shape {dist.shape}.")
    num_source, num_target = dist.shape
    if num_target > num_source:
        raise ValueError(
            f"source head has fewer classes than the target ({num_source} < {num_target}); "
            "a one-to-one label mapping is impossible: use a source head with at least as many classes."
        )
    mapping = np.full(num_target, -1, np.int32)
    for _ in range(num_target):
        src, tgt = divmod(int(np.argmax(dist)), num_target)
        mapping[tgt] = src
        # Counts are >= 0, so -1 keeps used rows and columns below every free entry.
        dist[src, :] = -1
        dist[:, tgt] = -1
    return mapping


def map_logits(logits: jax.Array, mapping: Any) -> jax.Array:
    """Target logits ``logits[:, mapping]``."""
    return jnp.take(logits, jnp.asarray(mapping), axis=1)


def mapped_loss(logits: jax.Array, labels: jax.Array, label_map: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of the label-mapped logits."""
    mapped = map_logits(logits, label_map)
    loss = optax.softmax_cross_entropy_with_integer_labels(mapped, labels).mean()
    accuracy = jnp.mean(jnp.argmax(mapped, axis=-1) == labels)
    return loss, accuracy


def identity_mapping(num_classes: int) -> np.ndarray:
    """The mapping for a head that already has the target's classes."""
    return np.arange(num_classes, dtype=np.int32)

