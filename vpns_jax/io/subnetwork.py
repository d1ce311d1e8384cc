"""A loaded subnetwork export: the masked weights, statistics, prompt and label map with the rebuilt model.

:func:`load_subnetwork` checks a file of ``io.export.export_subnetwork`` against the model its metadata names
(``io.subnetwork_format``) and returns a :class:`Subnetwork` that predicts target classes as the run evaluated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from vpns_jax.core import label_mapping, nm, prompts, steps
from vpns_jax.io import keys
from vpns_jax.io import subnetwork_format as fmt
from vpns_jax.models import functional

Params = dict[Any, Any]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _target_logits(graphdef: nnx.GraphDef, spec: prompts.PromptSpec, with_prompt: bool, weights: Params,
                   batch_stats: Params, prompt: Params, label_map: jax.Array, key: jax.Array,
                   images: jax.Array) -> jax.Array:
    """Target logits as ``steps.eval_logits`` + ``label_mapping.map_logits`` compute them (weights already masked).

    GraphDefs hash and compare by structure, so loads of the same model share one compilation.
    """
    x = prompts.model_inputs(spec, prompt, images, prompted=with_prompt, key=key)
    logits, _ = functional.apply_model(graphdef, weights, batch_stats, x, train=False)
    return label_mapping.map_logits(logits, label_map)


@dataclasses.dataclass(eq=False)
class Subnetwork:
    """A loaded export: masked weights ``W * m``, statistics, prompt, label map and the model's graphdef."""

    model_name: str
    num_classes: int
    width: float
    stem: str
    prompt_spec: prompts.PromptSpec
    eval_with_prompt: bool
    label_map: np.ndarray  # (num_target,) int32
    class_names: tuple[str, ...] | None
    graphdef: nnx.GraphDef
    weights: Params  # W * m for the prunable kernels, as stored for the rest
    masks: Params  # float32 0/1, one per prunable kernel
    batch_stats: Params
    prompt: Params
    rng: np.ndarray
    meta: dict[str, Any]
    size: fmt.ExportSize
    nm_pattern: tuple[int, int] | None = None  # (N, M) of N:M masks; None: per-weight masks
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # a ViT's input side and shape

    def __post_init__(self) -> None:
        # The key evaluation folds for the 'random' prompt kind (the other kinds ignore it).
        self._key = steps.eval_prompt_key(jnp.asarray(self.rng))

    @property
    def num_target(self) -> int:
        return len(self.label_map)

    def logits(self, images: Any) -> jax.Array:
        """Target logits (B, num_target) of NHWC float images in [0, 1] (resized to the input size if needed).

        Prompted when ``eval_with_prompt``, else only normalised, as the run evaluated.
        """
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        return _target_logits(self.graphdef, self.prompt_spec, self.eval_with_prompt, self.weights, self.batch_stats,
                              self.prompt, jnp.asarray(self.label_map), self._key, images)

    def probabilities(self, images: Any) -> np.ndarray:
        """Softmax over the target classes."""
        return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))

    def predict(self, images: Any) -> np.ndarray:
        """Target class index of each image (the first maximum of the logits)."""
        return np.asarray(jnp.argmax(self.logits(images), axis=-1))


def load_subnetwork(path: str | os.PathLike) -> Subnetwork:
    """Reads and checks an export of ``io.export.export_subnetwork``.

    A missing file is FileNotFoundError; a file that is not a complete export of
    this format version is a one-line ValueError naming the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subnetwork file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
        raise ValueError(f"{path} is not a readable vpns_jax subnetwork export ({fmt.one_line(error)})") from None
    try:
        subnetwork = _build(arrays)
    except fmt.Corrupt as error:
        raise ValueError(f"{path} is not a valid vpns_jax subnetwork export: {error}") from None
    subnetwork.size = dataclasses.replace(subnetwork.size, file_bytes=path.stat().st_size)
    return subnetwork


def _build(arrays: dict[str, np.ndarray]) -> Subnetwork:
    meta, (graphdef, template_weights, template_stats, prunable) = _read_meta(arrays)
    model, prompt_spec = meta["model"], prompts.PromptSpec(**meta["prompt"])
    flat_template = traverse_util.flatten_dict(template_weights)
    nm_pattern = _nm_pattern(meta)
    flat_weights, flat_masks = fmt.decode_kernels(arrays, prunable, flat_template, nm_pattern)
    for kernel_path, leaf in flat_template.items():
        if kernel_path not in flat_masks:
            flat_weights[kernel_path] = fmt.read_array(arrays, f"weights/{keys.encode_path(kernel_path)}", leaf.shape)
    flat_stats = {p: fmt.read_array(arrays, f"batch_stats/{keys.encode_path(p)}", leaf.shape)
                  for p, leaf in traverse_util.flatten_dict(template_stats).items()}
    program = fmt.read_array(arrays, "prompt/program", (prompt_spec.output_size, prompt_spec.output_size, 3))
    rng = fmt.read_array(arrays, fmt.RNG_KEY, (2,), np.uint32)
    to_tree = lambda flat: jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))  # noqa: E731
    weights, masks, batch_stats = to_tree(flat_weights), to_tree(flat_masks), to_tree(flat_stats)
    prompt = {"program": jnp.asarray(program)}
    class_names = None if meta["class_names"] is None else tuple(meta["class_names"])
    return Subnetwork(
        model_name=model["name"], num_classes=int(model["num_classes"]), width=float(model["width"]),
        stem=model["stem"], prompt_spec=prompt_spec, eval_with_prompt=meta["eval_with_prompt"],
        label_map=np.asarray(meta["label_map"], np.int32), class_names=class_names, graphdef=graphdef,
        weights=weights, masks=masks, batch_stats=batch_stats, prompt=prompt, rng=rng, meta=meta,
        size=fmt.compute_size(weights, batch_stats, masks, prompt, nm_pattern=nm_pattern), nm_pattern=nm_pattern,
        model_options=dict(model.get("options") or {}),
    )


def _nm_pattern(meta: dict[str, Any]) -> tuple[int, int] | None:
    """(N, M) of the file's N:M masks; None for a file without the field (per-weight bits)."""
    if fmt.NM_KEY not in meta:
        return None
    try:
        return nm.parse_nm(meta[fmt.NM_KEY])
    except ValueError as error:
        raise fmt.Corrupt(f"bad metadata ({fmt.one_line(error)})") from None


def _read_meta(arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], tuple]:
    """The file's metadata, checked (format and version, the model it names, label map and class names), and
    ``subnetwork_format.model_template`` of that model."""
    fmt.require(fmt.META_KEY in arrays, f"no '{fmt.META_KEY}' entry")
    raw = arrays[fmt.META_KEY]
    fmt.require(raw.dtype == np.uint8 and raw.ndim == 1, "the metadata entry is not a uint8 byte string")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise fmt.Corrupt("the metadata is not JSON") from None
    fmt.require(isinstance(meta, dict) and meta.get("format") == fmt.FORMAT,
                f"the metadata does not say format {fmt.FORMAT!r}")
    version = meta.get("format_version")
    fmt.require(version == fmt.FORMAT_VERSION,
                f"format version {version!r}, this code reads version {fmt.FORMAT_VERSION}")
    try:
        model = meta["model"]
        prompts.PromptSpec(**meta["prompt"])
        template = fmt.model_template(model["name"], model["num_classes"], model["width"], model["stem"],
                                      model.get("options"))
        prunable = template[-1]
        label_map = np.asarray(meta["label_map"], np.int32)
        class_names = meta["class_names"]
        eval_with_prompt = meta["eval_with_prompt"]
        stored_prunable = [tuple(p) for p in meta["prunable_paths"]]
    except (KeyError, TypeError, ValueError) as error:
        raise fmt.Corrupt(f"bad metadata ({fmt.one_line(error)})") from None
    fmt.require(isinstance(eval_with_prompt, bool), "eval_with_prompt is not a bool")
    fmt.require(stored_prunable == prunable, "its prunable kernels are not those of the model it names")
    fits = label_map.ndim == 1 and label_map.size > 0 and np.all((label_map >= 0) & (label_map < model["num_classes"]))
    fmt.require(bool(fits), f"label map {meta['label_map']} does not fit a {model['num_classes']}-class head")
    if class_names is not None:
        fmt.require(isinstance(class_names, list) and len(class_names) == len(label_map)
                    and all(isinstance(n, str) for n in class_names), "class names do not match the label map")
    return meta, template
