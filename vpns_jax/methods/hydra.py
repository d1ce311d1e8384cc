"""HYDRA: scores trained with the weights frozen on one plain stream, no prompt, then the weights finetuned.

The authors' HYDRA baseline (docs/method.md, section 7.3): VPNs' global threshold and straight-through masks without
the prompt and its clean stream.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vpns_jax.config_fields import group_optimizer
from vpns_jax.core.phases import Phase
from vpns_jax.methods.base import STAGE2, LearnedScores, Plan, Section, Unit, finetune_plan, optimizer, weights_groups
from vpns_jax.methods.finetune import FINETUNE
from vpns_jax.methods.iterations import OneStream


def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"prune_epochs": 60, "finetune_epochs": 60, "scores": optimizer("sgd", 0.01)})


HYDRA = Section("hydra", _defaults, epochs=("prune_epochs", "finetune_epochs"), optimizers=("scores",))


class Hydra(LearnedScores):
    name = "hydra"
    summary = "scores (weights frozen), then weights; no prompt, one stream"
    supports_nm = True
    sections = (HYDRA, STAGE2, FINETUNE)

    def plan(self, config: Any) -> Plan:
        phases = {1: Phase(("scores",), OneStream()), 2: Phase(("weights",), OneStream())}
        groups = {1: {"scores": group_optimizer(config.hydra.scores)}, 2: weights_groups(config, False)}
        epochs = {1: config.hydra.prune_epochs, 2: config.hydra.finetune_epochs}
        return Plan(self, phases, groups, epochs, tuple(Unit(float(d), (1, 2)) for d in config.densities))

    def transfer_plan(self, config: Any) -> Plan:
        return finetune_plan(self, config, prompt=False, epochs=config.finetune.epochs)
