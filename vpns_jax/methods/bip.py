"""BiP: bi-level pruning, a weight step and an implicit-gradient score step in every iteration.

One stage (docs/method.md, section 7.4) of ``Bilevel`` iterations: a weight step on an augmented batch through the
current hard masks, then a score step on a second, independently shuffled augmented batch with the first-order
implicit-gradient correction dL/ds - lr_b * (dL/ds * dL/dtheta), both gradients from that batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from vpns_jax.config_fields import ConfigError, get, group_optimizer, is_real
from vpns_jax.core import steps
from vpns_jax.core.phases import OneStepPerBatch, Phase
from vpns_jax.methods.base import STAGE2, LearnedScores, Plan, Section, Unit, finetune_plan, optimizer, weights_groups
from vpns_jax.methods.finetune import FINETUNE


@dataclasses.dataclass(frozen=True)
class Bilevel(OneStepPerBatch):
    """BiP's iteration (a ``phases.Iteration``): weight batch, then score batch; ``lr`` is the implicit-gradient
    coefficient ('bil_lr')."""

    lr: float = 1e-4
    streams = ("augmented", "second")

    def check(self, phase: Phase) -> None:
        if set(phase.trains) != {"weights", "scores"}:
            raise ValueError("a bilevel phase trains exactly weights and scores")

    def __call__(self, spec, state, batches, *, stage, key):
        key_a, _ = jax.random.split(key)
        key_w, key_s = jax.random.split(key_a)
        phase = spec.phases[stage]
        masks = steps.masks_in_force(spec, state)
        loss_w, acc_w, batch_stats, grads = steps.loss_and_grads(
            spec, state, {"weights": state.weights}, batches[0], phase=phase, prompted=False, masks=masks, key=key_w)
        state = steps.apply_grads(spec, state, stage, grads, batch_stats, untouched=("scores",))
        loss_s, acc_s, batch_stats, grads = steps.loss_and_grads(
            spec, state, {"weights": state.weights, "scores": state.scores}, batches[1], phase=phase,
            prompted=False, masks=None, key=key_s)
        flat_w = traverse_util.flatten_dict(grads["weights"])
        flat_s = traverse_util.flatten_dict(grads["scores"])
        corrected = {path: g - self.lr * g * flat_w[path] for path, g in flat_s.items()}
        state = steps.apply_grads(spec, state, stage, {"scores": traverse_util.unflatten_dict(corrected)},
                                  batch_stats, untouched=("weights", "bn"))
        return state, {"loss_weights": loss_w, "accuracy_weights": acc_w, "loss_scores": loss_s,
                       "accuracy_scores": acc_s}


def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"epochs": 60, "scores": optimizer("adam", 1e-4),
                                      "bilevel_lr": 1e-4})  # the implicit-gradient coefficient ('bil_lr')


def _check(config: Any) -> None:
    value = get(config, "bip.bilevel_lr")
    if not is_real(value) or value < 0:
        raise ConfigError(f"config.bip.bilevel_lr={value!r} must be a number >= 0 (0 drops the correction)")


BIP = Section("bip", _defaults, epochs=("epochs",), optimizers=("scores",), check=_check)


class BiP(LearnedScores):
    name = "bip"
    summary = "bi-level: a weight step and an implicit-gradient score step per iteration"
    sections = (BIP, STAGE2, FINETUNE)

    def plan(self, config: Any) -> Plan:
        phases = {1: Phase(("weights", "scores"), Bilevel(float(config.bip.bilevel_lr)))}
        groups = {1: {**weights_groups(config, False), "scores": group_optimizer(config.bip.scores)}}
        return Plan(self, phases, groups, {1: config.bip.epochs},
                    tuple(Unit(float(d), (1,)) for d in config.densities))

    def transfer_plan(self, config: Any) -> Plan:
        return finetune_plan(self, config, prompt=False, epochs=config.finetune.epochs)
