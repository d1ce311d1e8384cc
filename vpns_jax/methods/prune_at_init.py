"""Masks chosen at the source weights, then finetuned: Random (and "+ VP"), SNIP, GraSP and SynFlow.

docs/method.md, section 7.2. Random keeps a uniform random share of every layer;
SNIP and GraSP score the loss on ``oneshot.batches`` training batches through
the dense network's label mapping; SynFlow iterates its data-free score.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vpns_jax.config_fields import ConfigError, check_int_at_least, get, is_real
from vpns_jax.core import label_mapping, prompts, saliency, selection
from vpns_jax.methods.base import STAGE2, MethodContext, Params, Section, Unit
from vpns_jax.methods.finetune import FINETUNE, MaskThenFinetune
from vpns_jax.models import functional


def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "batches": 10,  # training batches (eval_batch_size each) SNIP and GraSP score on
        "grasp_temperature": 200.0,
        "synflow_iterations": 100,
    })


def _check(config: Any) -> None:
    check_int_at_least(config, "oneshot.batches", 1, "training batches the saliency is summed over")
    check_int_at_least(config, "oneshot.synflow_iterations", 1)
    value = get(config, "oneshot.grasp_temperature")
    if not is_real(value) or not value > 0:
        raise ConfigError(f"config.oneshot.grasp_temperature={value!r} must be a number > 0, e.g. 200")


ONESHOT = Section("oneshot", _defaults, check=_check)


class Random(MaskThenFinetune):
    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params:
        key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), index)
        importance = saliency.random_importance(run.source[0], key, kinds=run.kinds)
        return selection.keep_largest(importance, selection.keep_counts(importance, unit.density, "layer"), "layer",
                                      min_layer_density=run.config.mask.min_layer_density)


class SynFlow(MaskThenFinetune):
    sections = (FINETUNE, STAGE2, ONESHOT)

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params:
        graphdef = run.spec.graphdef
        apply_fn = lambda w, stats, x: functional.apply_model(graphdef, w, stats, x, train=False)[0]  # noqa: E731
        size = run.config.prompt.input_size
        weights, batch_stats = run.source
        return saliency.synflow_masks(apply_fn, weights, batch_stats, run.kinds, (size, size, 3), unit.density,
                                      iterations=run.config.oneshot.synflow_iterations,
                                      min_layer_density=run.config.mask.min_layer_density)


class _LossSaliency(MaskThenFinetune):
    """SNIP and GraSP: a saliency of the loss through the dense network's label mapping."""

    sections = (FINETUNE, STAGE2, ONESHOT)

    def importance(self, run: MethodContext, loss_fn, weights: Params, batches: list) -> Params:
        raise NotImplementedError

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params:
        weights, batch_stats = run.source
        label_map = run.mapped_state(unit, masks=run.ones_masks()).label_map
        graphdef = run.spec.graphdef

        def loss_fn(w, batch, temperature):
            logits, _ = functional.apply_model(graphdef, w, batch_stats, prompts.normalize(batch["image"]), train=True)
            return label_mapping.mapped_loss(logits / temperature, batch["label"], label_map)[0]

        batches = run.training_batches(run.config.oneshot.batches)
        importance = jax.device_get(self.importance(run, loss_fn, weights, batches))
        return selection.keep_largest(importance, selection.keep_counts(importance, unit.density),
                                      min_layer_density=run.config.mask.min_layer_density)


class SNIP(_LossSaliency):
    def importance(self, run: MethodContext, loss_fn, weights: Params, batches: list) -> Params:
        return saliency.snip_importance(loss_fn, weights, run.kinds, batches)


class GraSP(_LossSaliency):
    def importance(self, run: MethodContext, loss_fn, weights: Params, batches: list) -> Params:
        return saliency.grasp_importance(loss_fn, weights, run.kinds, batches,
                                         temperature=run.config.oneshot.grasp_temperature)
