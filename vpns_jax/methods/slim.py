"""Network Slimming: sparsity training with L1 on BatchNorm scales, then channels pruned by |scale| and finetuned.

Channel granularity only (docs/method.md, section 7.7): one dense unit trains with the L1 term, then each density
keeps the channels with the largest BatchNorm scales (under ``structured.channel_max``) and finetunes.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vpns_jax.config_fields import ConfigError, get, is_real
from vpns_jax.core import structured
from vpns_jax.core.phases import Phase
from vpns_jax.methods.base import STAGE2, Method, MethodContext, Params, Plan, Section, Unit, weights_groups
from vpns_jax.methods.iterations import OneStream
from vpns_jax.methods.vpns import STRUCTURED


def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "l1": 1e-4,  # L1 on BatchNorm scales during the sparsity training
        "epochs": 10,  # sparsity training; then each density prunes and finetunes structured.finetune_epochs
    })


def _check(config: Any) -> None:
    value = get(config, "slim.l1")
    if not is_real(value) or value < 0:
        raise ConfigError(f"config.slim.l1={value!r} must be a number >= 0 (0 turns the L1 term off)")


SLIM = Section("slim", _defaults, epochs=("epochs",), check=_check)


class Slim(Method):
    name = "slim"
    summary = "Network Slimming: L1 on BatchNorm scales, prune channels by |scale|, finetune"
    granularities = ("channel",)
    sections = (SLIM, STRUCTURED, STAGE2)

    def plan(self, config: Any) -> Plan:
        phases = {0: Phase(("weights",), OneStream(), bn_l1=float(config.slim.l1)),
                  2: Phase(("weights",), OneStream())}
        groups = {0: weights_groups(config, False), 2: weights_groups(config, False)}
        epochs = {0: config.slim.epochs, 2: config.structured.finetune_epochs}
        units = (Unit(1.0, (0,), dense=True),) + tuple(Unit(float(d), (2,)) for d in config.densities)
        return Plan(self, phases, groups, epochs, units)

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params:
        if unit.dense:
            return run.ones_masks()
        trained, _ = run.finished_unit(0)
        groups, channel_max = run.channel_groups, run.config.structured.channel_max
        importance = structured.bn_scale_importance(trained, groups)
        k = structured.channel_prune_counts(groups, unit.density, channel_max)
        return jax.device_get(structured.channel_masks(importance, groups, k, channel_max))
