"""What a unit is measured by: label mapping through its masks, test accuracy and loss, sparsity, MACs.

Host-side loops over a stream of the run's data, calling the jitted steps of
``vpns_jax.core.steps`` on batches placed on the device mesh. A unit whose
masks empty a whole layer (channel group) is reported: a warning naming the
layers, and ``COLLAPSE_FIELDS`` in its measurements.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh

from vpns_jax import cli
from vpns_jax.core import label_mapping, masking, parallel, steps, structured
from vpns_jax.data import pipeline
from vpns_jax.models import macs

Params = dict[Any, Any]
# A unit's collapsed layers: their count and their names joined by ';' ('' for none). The names are text:
# keep them out of scalar metric writers.
COLLAPSE_FIELDS = ("collapsed_layers", "collapsed_layer_names")


def _stoppable(batches):
    """``batches``, with a requested stop (SIGINT, SIGTERM) raised between them."""
    for batch in batches:
        cli.raise_if_stopped()
        yield batch


def label_mapped(spec: steps.StepSpec, state: steps.TrainState, stream, mesh: Mesh, *, num_target: int,
                 with_prompt: bool) -> steps.TrainState:
    """``state`` with the frequency label mapping of ``stream``'s batches through its masks (and prompt)."""
    counts = sum(
        np.asarray(steps.source_prediction_counts(state, batch, spec=spec, num_target=num_target,
                                                  with_prompt=with_prompt))
        for batch in parallel.prefetch_to_device(_stoppable(stream.epoch_batches()), mesh,
                                                scale_pixels=pipeline.unit_pixels)
    )
    mapping = label_mapping.frequency_label_mapping(counts)
    return state.replace(label_map=parallel.replicate(jnp.asarray(mapping), mesh))


def test_metrics(spec: steps.StepSpec, state: steps.TrainState, stream, mesh: Mesh, *,
                 with_prompt: bool) -> dict[str, float]:
    """Test accuracy and mean loss of ``state`` over ``stream`` (through the masks in force)."""
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    for batch in parallel.prefetch_to_device(_stoppable(stream.epoch_batches()), mesh,
                                            scale_pixels=pipeline.unit_pixels):
        out = jax.device_get(steps.eval_step(state, batch, spec=spec, with_prompt=with_prompt))
        for key in totals:
            totals[key] += out[key].item()
    return {"test_accuracy": round(totals["correct"] / totals["count"], 6),
            "test_loss": round(totals["loss_sum"] / totals["count"], 6)}


def found_subnetwork(spec: steps.StepSpec, state: steps.TrainState) -> dict[str, Any]:
    """The trained subnetwork on the host: its masks, effective (masked) weights and 0/1 masks of every
    prunable kernel (channel masks spread over the kernels they gate)."""
    masks = jax.device_get(steps.current_masks(spec, state))
    effective, pattern = jax.device_get(steps.effective_weights(spec, state))
    flat = traverse_util.flatten_dict(pattern)
    kernel_masks = traverse_util.unflatten_dict({path: flat[path] for path in masking.prunable_paths(spec.kinds)})
    return {"masks": masks, "effective": effective, "kernel_masks": kernel_masks}


def sparsity_and_cost(spec: steps.StepSpec, state: steps.TrainState, found: dict[str, Any], *,
                      input_size: int) -> dict[str, Any]:
    """Measured sparsity (prunable and whole model, per channel for channel masks), MACs and MAC speedup."""
    report = masking.sparsity_report(found["effective"], found["kernel_masks"])
    counted = macs.count_macs(spec.graphdef, found["effective"], jax.device_get(state.batch_stats), input_size)
    result = {"sparsity": round(report.prunable_sparsity, 6), "model_sparsity": round(report.model_sparsity, 6),
              "macs": counted.total, "speedup": round(counted.speedup, 4)}
    if spec.granularity == "channel":
        result["channel_sparsity"] = round(structured.channel_sparsity(found["masks"]), 6)
    result.update(collapse_fields(found["masks"], sparsity=report.prunable_sparsity))
    return result


def collapse_fields(masks: Params, *, sparsity: float | None = None) -> dict[str, Any]:
    """``COLLAPSE_FIELDS`` of a unit's masks (weight or channel), with a warning naming the layers they empty."""
    names = masking.collapsed_layers(masks)
    if names:
        at = "" if sparsity is None else f" at sparsity {sparsity:.4%}"
        # Nothing else would say it: accuracy alone does not show that the output ignores the input.
        logging.warning("the masks%s keep nothing of %d layer(s): %s; no signal passes them (on the "
                        "network's only path the output no longer depends on the input): raise the density or "
                        "set config.mask.min_layer_density", at, len(names), ", ".join(names))
    return dict(zip(COLLAPSE_FIELDS, (len(names), ";".join(names))))
