"""The mask-then-finetune family: a mask from a one-shot rule, then the weights (and "+ VP": a prompt) finetuned.

``MaskThenFinetune`` is the shared plan of OMP, LTH, Random, SNIP, GraSP,
SynFlow, their "+ VP" variants and the dense finetune (docs/method.md, section
7): one finetune stage per unit, after a dense finetune unit for the methods
whose masks read trained weights. Subclasses say where a unit's masks come
from (``unit_masks``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vpns_jax.config_fields import check_fraction
from vpns_jax.core.phases import Phase
from vpns_jax.methods.base import STAGE2, Method, Plan, Section, Unit, finetune_phase, weights_groups
from vpns_jax.methods.iterations import OneStream


def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "epochs": 120,
        "dense_epochs": 120,  # OMP's and LTH's dense finetune before the first mask
        "lth_fraction": 0.2,  # of the remaining weights, pruned per LTH round
    })


FINETUNE = Section("finetune", _defaults, epochs=("epochs", "dense_epochs"),
                   check=lambda config: check_fraction(config, "finetune.lth_fraction",
                                                       "pruned per LTH round, e.g. 0.2"))


class MaskThenFinetune(Method):
    """One finetune per density; with ``dense_unit``, a dense finetune unit first (its weights decide the masks)."""

    sections = (FINETUNE, STAGE2)
    dense_unit = False

    def __init__(self, name: str, summary: str, *, finetune_prompt: bool = False):
        self.name, self.summary, self.finetune_prompt = name, summary, finetune_prompt

    def units(self, config: Any) -> tuple[Unit, ...]:
        """The units after the dense one: one finetune per density."""
        return tuple(Unit(float(d), (2,)) for d in config.densities)

    def plan(self, config: Any) -> Plan:
        prompt = self.finetune_prompt
        phases = {2: finetune_phase(prompt)}
        groups = {2: weights_groups(config, prompt)}
        epochs = {2: config.finetune.epochs}
        units = self.units(config)
        if self.dense_unit:
            phases[0] = Phase(("weights",), OneStream())
            groups[0] = weights_groups(config, False)
            epochs[0] = config.finetune.dense_epochs
            units = (self.dense(),) + units
        return Plan(self, phases, groups, epochs, units)

    def dense(self) -> Unit:
        """The dense finetune unit that comes first (``dense_unit``)."""
        return Unit(1.0, (0,), dense=True)


class Dense(MaskThenFinetune):
    """The full finetune: one dense unit, no mask."""

    def units(self, config: Any) -> tuple[Unit, ...]:
        return (Unit(1.0, (2,), dense=True),)
