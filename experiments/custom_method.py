"""A pruning method defined outside the package, registered, and run by the unchanged command line.

    python -m vpns_jax.main --config=experiments/custom_method.py --workdir=workdir/custom_method

"source_magnitude": the masks keep the largest |W| of the source (pretrained)
weights, one shot, without the dense finetune OMP runs first; then VPNs' stage
2 trains the weights and a prompt through them on VPNs' two streams. This file
is the whole method: a config section with its defaults and checks, a plan,
where the masks come from, and one ``register`` call. ``get_config`` is the
offline default (configs/default.py) running it, so the file is its own
config; ``--config.source_magnitude.scope=layer`` prunes every layer alike.
docs/methods.md walks through it.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vpns_jax.config import offline
from vpns_jax import methods
from vpns_jax.config_fields import check_choice
from vpns_jax.core import saliency, selection


def _defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "epochs": 3,  # of the finetune (VPNs' stage 2: weights and prompt, two streams)
        "scope": "global",  # 'global': one magnitude threshold over all layers; 'layer': the same density per layer
    })


SECTION = methods.Section(
    "source_magnitude", _defaults, epochs=("epochs",),
    check=lambda config: check_choice(config, "source_magnitude.scope", ("global", "layer")))


class SourceMagnitude(methods.Method):
    name = "source_magnitude"
    summary = "largest |W| of the source weights, then VPNs' stage 2 (weights + prompt)"
    sections = (SECTION, methods.STAGE2)  # STAGE2: the finetune's optimisers (config.stage2)

    def plan(self, config: Any) -> methods.Plan:
        return methods.finetune_plan(self, config, prompt=True, epochs=config.source_magnitude.epochs)

    def unit_masks(self, run: methods.MethodContext, unit: methods.Unit, index: int) -> dict:
        importance = saliency.magnitude_importance(run.source[0], run.kinds)
        scope = run.config.source_magnitude.scope
        keep = selection.keep_counts(importance, unit.density, scope)
        return selection.keep_largest(importance, keep, scope, min_layer_density=run.config.mask.min_layer_density)


METHOD = methods.register(SourceMagnitude())


def get_config() -> ml_collections.ConfigDict:
    """The offline default, running this method."""
    config = offline.resnet()
    methods.add_sections(config, METHOD)
    config.method = METHOD.name
    return config
