"""Writes a pruned subnetwork as one self-contained file (``io.subnetwork_format``) after checking its trees.

:func:`export_subnetwork` stores ``weights * masks``, the statistics, the prompt and the label map; the model is
rebuilt from its settings by ``io.subnetwork.load_subnetwork``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vpns_jax.core import nm, prompts
from vpns_jax.io import disk
from vpns_jax.io import subnetwork_format as fmt

Params = dict[Any, Any]


def export_subnetwork(
    path: str | os.PathLike,
    *,
    model_name: str,
    num_classes: int,
    width: float,
    stem: str,
    weights: Params,
    batch_stats: Params,
    masks: Params,
    prompt_spec: prompts.PromptSpec,
    prompt: Params,
    label_map: Any,
    eval_with_prompt: bool = False,
    class_names: Sequence[str] | None = None,
    rng: Any = None,
    overwrite: bool = False,
    nm_pattern: tuple[int, int] | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> fmt.ExportSize:
    """Writes the subnetwork (``weights * masks``, statistics, prompt, label map) to the one ``.npz`` at ``path``.

    ``nm_pattern`` (N, M): the masks are N:M (``vpns_jax.core.nm``), stored as per-group indices.
    ``model_options``: a ViT's input side and shape (``models.model_options``), stored to rebuild it.
    Written atomically (``disk.write_atomically``): a refused write is a one-line ``disk.DiskError`` and leaves
    an existing ``path`` as it was. An existing ``path`` is a FileExistsError unless ``overwrite``. ``rng`` is
    the run's raw PRNG key (default ``PRNGKey(0)``), which evaluation folds for the ``random`` prompt kind.
    Returns the sizes, with the file's size on disk.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    options = dict(model_options or {})
    host = jax.device_get({"weights": weights, "batch_stats": batch_stats, "masks": masks, "prompt": prompt})
    prunable = _checked_trees(host, fmt.model_template(model_name, num_classes, width, stem, options))
    nm_pattern = None if nm_pattern is None else nm.check_nm(*nm_pattern)
    _check_masks_and_prompt(host, prunable, prompt_spec, nm_pattern)
    label_map, class_names, rng = _checked_labels_and_key(label_map, class_names, rng, num_classes)
    encoded, paths = fmt.encode_arrays(host, prunable, nm_pattern)
    arrays = {fmt.RNG_KEY: rng, **encoded}
    size = fmt.compute_size(host["weights"], host["batch_stats"], host["masks"], host["prompt"],
                            nm_pattern=nm_pattern)
    meta = {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "model": {"name": model_name, "num_classes": int(num_classes), "width": float(width), "stem": stem,
                  **({"options": options} if options else {})},
        "prompt": {name: getattr(prompt_spec, name) for name in fmt.PROMPT_FIELDS},
        "eval_with_prompt": bool(eval_with_prompt),
        "label_map": [int(v) for v in label_map],
        "class_names": class_names,
        "kept_fraction": size.kept_entries / size.prunable_entries,
        "prunable_paths": [fmt.json_path(p) for p in prunable],
        "dense_paths": paths,
    }
    if nm_pattern is not None:
        meta[fmt.NM_KEY] = f"{nm_pattern[0]}:{nm_pattern[1]}"
    arrays[fmt.META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    disk.write_atomically(path, lambda file: np.savez(file, **arrays))
    return dataclasses.replace(size, file_bytes=path.stat().st_size)


def _checked_trees(host: dict[str, Params], template: tuple) -> list:
    """The prunable paths of the model ``template`` (``subnetwork_format.model_template``), once the host trees
    fit it."""
    _, template_weights, template_stats, prunable = template
    fmt.check_tree("weights", host["weights"], template_weights)
    fmt.check_tree("batch_stats", host["batch_stats"], template_stats)
    return prunable


def _check_masks_and_prompt(host: dict[str, Params], prunable: list, prompt_spec: prompts.PromptSpec,
                            nm_pattern: tuple[int, int] | None) -> None:
    flat_masks = traverse_util.flatten_dict(host["masks"])
    if set(flat_masks) != set(prunable):
        raise ValueError(
            f"masks must cover exactly the model's {len(prunable)} conv and dense kernels, got {len(flat_masks)} "
            f"leaves (e.g. missing {[p for p in prunable if p not in flat_masks][:3]})"
        )
    for kernel_path, mask in flat_masks.items():
        if not np.all((np.asarray(mask) == 0) | (np.asarray(mask) == 1)):
            raise ValueError(f"mask of {kernel_path} is not binary (values other than 0 and 1)")
        if nm_pattern is not None and not nm.is_nm(mask, *nm_pattern):
            n, m = nm_pattern
            raise ValueError(f"mask of {kernel_path} is not {n}:{m}: some group of {m} along its input dimension "
                             f"keeps other than min({n}, its size)")
    program_shape = (prompt_spec.output_size, prompt_spec.output_size, 3)
    if set(host["prompt"]) != {"program"} or np.shape(host["prompt"]["program"]) != program_shape:
        raise ValueError(f"prompt must be {{'program': array of shape {program_shape}}} for {prompt_spec}")


def _checked_labels_and_key(label_map: Any, class_names: Sequence[str] | None, rng: Any,
                            num_classes: int) -> tuple[np.ndarray, list[str] | None, np.ndarray]:
    label_map = np.asarray(jax.device_get(label_map))
    if label_map.ndim != 1 or not label_map.size or label_map.dtype.kind not in "iu":
        raise ValueError(f"label_map must be a non-empty 1-D integer array, got {label_map.dtype} {label_map.shape}")
    if label_map.min() < 0 or label_map.max() >= num_classes:
        raise ValueError(f"label_map holds source classes outside [0, {num_classes}): {label_map.tolist()}")
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) != len(label_map):
            raise ValueError(f"{len(class_names)} class names for {len(label_map)} target classes")
    rng = np.asarray(jax.device_get(jax.random.PRNGKey(0) if rng is None else rng))
    if rng.shape != (2,) or rng.dtype != np.uint32:
        raise ValueError(f"rng must be a raw uint32 PRNG key of shape (2,), got {rng.dtype} {rng.shape}")
    return label_map, class_names, rng
