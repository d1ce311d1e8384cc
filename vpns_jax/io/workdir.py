"""A run's workdir: where each unit's subnetwork goes, the results files, and reading a finished unit back.

    workdir/
      config.json, checkpoints/, metrics.jsonl     (io.workdir_guard, io.checkpoint, io.metrics)
      results.json, results.csv                    (write_results)
      subnetworks/density_<d>/                     (save_unit: masks, weights, batch_stats, prompt, label_map
                                                    .npz and the exported subnetwork.npz)
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Any

import jax

from vpns_jax import models
from vpns_jax.core import prompts, steps
from vpns_jax.io import array_files, disk, export

Params = dict[Any, Any]
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
# collapsed_layers: how many layers (channel groups) the unit's masks empty; collapsed_layer_names: their
# names joined by ';' ('' for none), a plain string so that the CSV cell needs no quoting rules of its own.
RESULT_FIELDS = ("method", "density", "round", "sparsity", "channel_sparsity", "model_sparsity", "test_accuracy",
                 "test_loss", "macs", "speedup", "collapsed_layers", "collapsed_layer_names", "wall_time_s")


def unit_folder(workdir: pathlib.Path, density: float) -> pathlib.Path:
    """Where a unit's subnetwork files go: ``subnetworks/density_<d>`` (6 significant digits)."""
    return workdir / "subnetworks" / f"density_{density:.6g}"


def finished_unit(workdir: pathlib.Path, density: float) -> tuple[Params, Params]:
    """(final weights, masks) of the unit of ``density``, as ``save_unit`` wrote them."""
    folder = unit_folder(workdir, density)
    return array_files.load_arrays(folder / "weights.npz"), array_files.load_arrays(folder / "masks.npz")


def save_unit(folder: pathlib.Path, state: steps.TrainState, found: dict[str, Any], *, model: Any,
              prompt_spec: prompts.PromptSpec, eval_with_prompt: bool, class_names: list[str] | None,
              nm_pattern: tuple[int, int] | None = None) -> None:
    """A finished unit's arrays (masks, weights, batch stats, prompt, label map) and its exported subnetwork.

    ``found``: ``evaluation.found_subnetwork``'s masks, effective weights and kernel masks; ``model``: the
    config's model section; ``nm_pattern`` (N, M): the masks are N:M and exported as such. Overwrites: a run
    killed after this save but before its checkpoint redoes it.
    Each file is written whole and then renamed into place (``disk.write_atomically``, which also makes
    the folder): a write the disk refuses is a one-line ``disk.DiskError`` naming the file, and leaves the
    file it would have replaced as it was.
    """
    host = {"masks": found["masks"], **jax.device_get({
        "weights": state.weights, "batch_stats": state.batch_stats, "prompt": state.prompt,
        "label_map": {"label_map": state.label_map}})}
    for name, tree in host.items():
        array_files.save_arrays(folder / f"{name}.npz", tree)
    # Channel masks also zero BatchNorm outputs: the export holds the gated weights, so it needs no channel logic.
    export.export_subnetwork(
        folder / "subnetwork.npz", model_name=model.name, num_classes=model.num_classes, width=model.width,
        stem=model.stem, model_options=models.model_options(model.name, prompt_spec.output_size, model.vit),
        weights=found["effective"], batch_stats=host["batch_stats"], masks=found["kernel_masks"],
        prompt_spec=prompt_spec, prompt=host["prompt"], label_map=host["label_map"]["label_map"],
        eval_with_prompt=eval_with_prompt, class_names=class_names, rng=jax.device_get(state.rng), overwrite=True,
        nm_pattern=nm_pattern,
    )


def format_results(results: list[dict[str, Any]]) -> str:
    """The results table as aligned plain text."""
    header = f"{'method':>9} {'density':>8} {'sparsity':>9} {'test acc':>9} {'test loss':>10} {'speedup':>8} {'wall s':>8}"
    rows = [header] + [
        f"{r.get('method', ''):>9} {r['density']:>8.4g} {r['sparsity']:>9.4f} {r['test_accuracy']:>9.4f} "
        f"{r['test_loss']:>10.4f} {r.get('speedup', 1.0):>8.3f} {r['wall_time_s']:>8.1f}"
        for r in results
    ]
    return "\n".join(rows)


def write_results(workdir: pathlib.Path, results: list[dict[str, Any]]) -> None:
    """results.json and results.csv in the workdir (each written whole, then renamed into place: a write the disk
    refuses is a one-line ``disk.DiskError`` naming the file, and leaves the previous file as it was)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(results)
    for name, content in ((RESULTS_JSON, json.dumps(results, indent=2)), (RESULTS_CSV, text.getvalue())):
        disk.write_atomically(workdir / name, lambda file, content=content: file.write(content.encode()))
