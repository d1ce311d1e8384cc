"""Stage-partitioned optimisers with the reference's torch semantics.

Each stage trains some top-level state subtrees (``phases.Phase``); every trainable leaf is labelled weights, bn,
scores or prompt, and one ``optax.partition`` per stage gives each label a torch-style optimiser: coupled weight
decay before SGD/Adam (not AdamW) and a cosine schedule constant within an epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import traverse_util

from vpns_jax.models import functional

Params = dict[Any, Any]
LABELS = ("weights", "bn", "scores", "prompt")
# Optimiser steps per iteration of the two-stream protocol: the model-side group
# steps on both sub-steps, the prompt only on the prompted one.
TWO_STREAM_UPDATES = {"weights": 2, "bn": 2, "scores": 2, "prompt": 1}


@dataclasses.dataclass(frozen=True)
class GroupOptimizer:
    """A torch-style optimiser for one parameter group."""

    name: str  # 'sgd' or 'adam'
    learning_rate: float
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only; torch's dampening 0, no Nesterov
    clip_value: float = 0.0  # > 0: torch's clip_grad_value_ on this group's gradients (structured VPNs' scores)

    def __post_init__(self):
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"optimiser {self.name!r} is unknown: use 'sgd' or 'adam'")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate {self.learning_rate!r} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay {self.weight_decay!r} must be >= 0")
        if self.clip_value < 0:
            raise ValueError(f"gradient clip value {self.clip_value!r} must be >= 0 (0 = no clipping)")


def reference_groups(stage: int) -> dict[str, GroupOptimizer]:
    """The authors' defaults (docs/method.md, section 6.2) for ``stage``."""
    if stage == 1:
        return {"scores": GroupOptimizer("adam", 1e-4), "prompt": GroupOptimizer("adam", 1e-4)}
    if stage == 2:
        sgd = GroupOptimizer("sgd", 0.01)
        return {"weights": sgd, "bn": sgd, "prompt": sgd}
    raise ValueError(f"stage {stage!r} is unknown: use 1 or 2")


def param_labels(trainable: Params, kinds: Params) -> Params:
    """A label for every leaf of ``trainable`` (a dict of top-level state subtrees); ``kinds``
    (``functional.leaf_kinds``) tells normalisation affines ('bn') from the other weights."""
    labels = {}
    for subtree, params in trainable.items():
        if subtree == "weights":
            flat_kinds = traverse_util.flatten_dict(kinds)
            flat = traverse_util.flatten_dict(params)
            labels[subtree] = traverse_util.unflatten_dict(
                {path: "bn" if flat_kinds[path] == functional.BN else "weights" for path in flat}
            )
        elif subtree in ("scores", "prompt"):
            labels[subtree] = jax.tree.map(lambda _, name=subtree: name, params)
        else:
            raise ValueError(f"state subtree {subtree!r} has no optimiser label; expected one of {LABELS}")
    unlabelled = set(jax.tree.leaves(labels)) - set(LABELS)
    assert not unlabelled, f"leaves without a known label: {unlabelled}"
    assert jax.tree.structure(labels) == jax.tree.structure(trainable), "every trainable leaf needs a label"
    return labels


def epoch_cosine_schedule(learning_rate: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """lr0 * (1 + cos(pi * e / E)) / 2 for epoch e = floor(step / steps_per_epoch): torch's
    CosineAnnealingLR(T_max=E) stepped once per epoch."""
    cosine = optax.cosine_decay_schedule(learning_rate, decay_steps=max(epochs, 1))
    return lambda step: cosine(step // steps_per_epoch)


def group_transform(group: GroupOptimizer, schedule: optax.Schedule) -> optax.GradientTransformation:
    """torch.optim.SGD / Adam with coupled weight decay, as an optax chain."""
    if group.name == "sgd":
        inner = optax.sgd(schedule, momentum=group.momentum or None)
    else:
        inner = optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
    decayed = optax.chain(optax.add_decayed_weights(group.weight_decay), inner)
    # torch clips the raw gradients before the optimiser adds its weight decay.
    return optax.chain(optax.clip(group.clip_value), decayed) if group.clip_value else decayed


def stage_optimizer(
    groups: Mapping[str, GroupOptimizer],
    labels: Params,
    *,
    epochs: int,
    iterations_per_epoch: int,
    updates_per_iteration: Mapping[str, int] = TWO_STREAM_UPDATES,
) -> optax.GradientTransformation:
    """One ``optax.partition`` over the labels present in ``labels``; each group's schedule counts its own updates,
    so the prompt (one per iteration) and the scores or weights (two) both decay once per epoch."""
    present = set(jax.tree.leaves(labels))
    missing = present - set(groups)
    if missing:
        raise ValueError(f"no optimiser configured for parameter groups {sorted(missing)}")
    transforms = {
        label: group_transform(
            groups[label],
            epoch_cosine_schedule(groups[label].learning_rate, epochs, iterations_per_epoch * updates_per_iteration[label]),
        )
        for label in sorted(present)
    }
    return optax.partition(transforms, labels)


def apply_gradients(
    tx: optax.GradientTransformation,
    labels: Params,
    params: Params,
    grads: Params,
    opt_state: optax.transforms.PartitionState,
    *,
    untouched: tuple[str, ...] = (),
) -> tuple[Params, optax.transforms.PartitionState]:
    """One optimiser step; groups named in ``untouched`` keep their parameters and state, as torch skips a group
    that got no gradient after ``zero_grad(set_to_none=True)`` (no Adam count, weight decay or momentum drift)."""
    updates, new_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if untouched:
        new_params = jax.tree.map(
            lambda label, new, old: old if label in untouched else new, labels, new_params, params
        )
        inner = dict(new_state.inner_states)
        inner.update({label: opt_state.inner_states[label] for label in untouched})
        new_state = optax.transforms.PartitionState(inner)
    return new_params, new_state
