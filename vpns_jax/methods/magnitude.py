"""Magnitude pruning of finetuned weights: OMP (one shot) and LTH / IMP (iterative, rewinding), with "+ VP" variants.

Both first finetune the dense network (a dense unit); OMP then keeps the largest
|W| at each density (with ``mask.granularity`` N:M, the N largest of every group of
M: docs/method.md, section 4.6), LTH prunes ``finetune.lth_fraction`` of what the previous
round kept, down past the smallest density (docs/method.md, section 7.2). Every
masked unit rewinds to the source weights and finetunes.
"""

from __future__ import annotations

from typing import Any

from vpns_jax.core import saliency, selection
from vpns_jax.methods.base import MethodContext, Params, Plan, Unit, finetune_plan
from vpns_jax.methods.finetune import MaskThenFinetune


def lth_densities(smallest: float, fraction: float) -> list[float]:
    """Nominal round densities (1 - fraction)^r, r = 1.., down to the first at or below ``smallest``."""
    rounds = max(1, selection.lth_rounds_for(smallest, fraction))
    return [(1.0 - fraction) ** r for r in range(1, rounds + 1)]


class OMP(MaskThenFinetune):
    dense_unit = True
    supports_nm = True

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params:
        if unit.dense:
            return run.ones_masks()
        trained, _ = run.finished_unit(0)
        importance = saliency.magnitude_importance(trained, run.kinds)
        if run.spec.nm is not None:  # N:M: the N largest |W| of every group, not a global count
            return selection.keep_nm(importance, *run.spec.nm)
        return selection.keep_largest(importance, selection.keep_counts(importance, unit.density),
                                      min_layer_density=run.config.mask.min_layer_density)

    def transfer_plan(self, config: Any) -> Plan:
        return finetune_plan(self, config, prompt=self.finetune_prompt, epochs=config.finetune.epochs)


class LTH(MaskThenFinetune):
    dense_unit = True

    def units(self, config: Any) -> tuple[Unit, ...]:
        rounds = lth_densities(min(float(d) for d in config.densities), config.finetune.lth_fraction)
        return tuple(Unit(d, (2,), round=r) for r, d in enumerate(rounds, start=1))

    def dense(self) -> Unit:
        return Unit(1.0, (0,), round=0, dense=True)

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params:
        if unit.dense:
            return run.ones_masks()
        trained, masks = run.finished_unit(index - 1)
        return saliency.lth_round(trained, None if index == 1 else masks, run.kinds, run.config.finetune.lth_fraction,
                                  min_layer_density=run.config.mask.min_layer_density)
