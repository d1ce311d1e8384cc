"""A pruned subnetwork as one self-contained file, and the model it rebuilds.

:func:`export_subnetwork` writes one ``.npz`` (read back without pickle) holding:

* ``meta``: UTF-8 JSON as a uint8 array: format name and version, the model
  settings (name, num_classes, width, stem), the prompt spec fields,
  ``eval_with_prompt``, the label map, the target class names (or null), the
  kept fraction, and the path of every stored leaf (prunable kernels, the other
  weights, BatchNorm statistics, prompt);
* every prunable (conv and dense) kernel compressed, under ``kernels/<path>/``:
  ``bits`` = ``np.packbits`` of the flattened C-order 0/1 mask, ``shape`` (int64)
  and ``values`` = float32 ``W[mask]`` in C order, i.e. the entries of ``W * m``
  at the kept positions (a kept weight that is exactly 0 is stored as 0);
* N:M masks (``mask_pattern`` 'N:M' in the metadata; absent = per-weight bits
  as above) store ``nm_indices`` instead of ``bits``: per group of M along the
  kernel's input dimension (groups in C order of (..., I / M, O),
  ``vpns_jax.core.nm.group_indices``), the positions 0..M-1 of its kept entries
  in ascending order, N slots of log2(M) bits each, packed MSB first with
  ``np.packbits``; a cut group of r < N entries leaves its last N - r slots 0.
  That is N * log2(M) bits per group (2:4: 4 bits, as the 2-bit indices of
  sparse tensor cores; 1:4: 2 bits), against M bits of a bitmask;
* dense float32 under ``weights/<path>`` (biases, BatchNorm affine),
  ``batch_stats/<path>`` and ``prompt/<path>``, plus ``rng`` (the run's raw PRNG
  key, used only by the ``random`` prompt kind, as in evaluation).

Paths join dict keys with '/'; an integer key (a ResNet block index) is written
'#<int>'. :func:`load_subnetwork` checks all of it and rebuilds ``W * m``
exactly (zeros at pruned entries) and the model, ready for :meth:`Subnetwork.logits`.

Size of a full-width ResNet-18 (1000 classes, 224 px pad prompt) at some
densities, from random weights and masks of its init scores (no training)::

    python -m vpns_jax.io.export --size_report --model=resnet18 --densities 0.5 0.1 0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from vpns_jax.core import label_mapping, masking, nm, prompts, steps
from vpns_jax.io import checkpoint
from vpns_jax.models import create_model, functional

Params = dict[Any, Any]

FORMAT = "vpns_jax.subnetwork"
FORMAT_VERSION = 1
META_KEY = "meta"
RNG_KEY = "rng"
KERNEL_PREFIX = "kernels"
NM_KEY = "mask_pattern"  # metadata: 'N:M' when the kernels store N:M indices
DENSE_GROUPS = ("weights", "batch_stats", "prompt")
_INT_PREFIX = "#"
_PROMPT_FIELDS = tuple(field.name for field in dataclasses.fields(prompts.PromptSpec))


# ---------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class ExportSize:
    """Bytes of a subnetwork: all parameters dense in float32 vs the export's compressed arrays.

    Both totals are in-memory array bytes: ``dense_bytes`` = 4 bytes per
    prunable kernel entry + ``rest_bytes``; ``compressed_bytes`` =
    ``bitmask_bytes`` (one bit per prunable entry, padded to whole bytes per
    kernel) + ``index_bytes`` (N:M masks instead: N indices of log2(M) bits per
    group, whole bytes per kernel) + ``values_bytes`` (4 per kept entry) +
    ``rest_bytes`` (every other weight, the BatchNorm statistics and the prompt
    program, float32).
    ``file_bytes`` is the written file's size on disk (metadata, shapes and zip
    headers included), or None when nothing was written.
    """

    prunable_entries: int
    kept_entries: int
    bitmask_bytes: int
    values_bytes: int
    rest_bytes: int
    file_bytes: int | None = None
    index_bytes: int = 0

    @property
    def dense_bytes(self) -> int:
        return 4 * self.prunable_entries + self.rest_bytes

    @property
    def compressed_bytes(self) -> int:
        return self.bitmask_bytes + self.index_bytes + self.values_bytes + self.rest_bytes

    @property
    def ratio(self) -> float:
        """dense / compressed."""
        return self.dense_bytes / self.compressed_bytes

    def format(self) -> str:
        kept = self.kept_entries / self.prunable_entries if self.prunable_entries else 1.0
        text = (
            f"dense {_mib(self.dense_bytes)} -> compressed {_mib(self.compressed_bytes)} "
            f"({self.ratio:.2f}x smaller; kept {self.kept_entries:,} of {self.prunable_entries:,} kernel entries "
            f"= {kept:.4f}; {self._mask_part()}, kept values {_mib(self.values_bytes)}, "
            f"dense rest {_mib(self.rest_bytes)})"
        )
        if self.file_bytes is not None:
            text += f"; file {_mib(self.file_bytes)}"
        return text


    def _mask_part(self) -> str:
        if self.index_bytes and not self.bitmask_bytes:
            return f"N:M indices {_mib(self.index_bytes)}"
        return f"bitmask {_mib(self.bitmask_bytes)}" + (f", N:M indices {_mib(self.index_bytes)}"
                                                        if self.index_bytes else "")


def _mib(size: int) -> str:
    return f"{size / 2**20:.3f} MiB ({size:,} B)"


def _index_bytes(shape: tuple[int, ...], pattern: tuple[int, int]) -> int:
    """Bytes of one kernel's packed N:M indices: N slots of log2(M) bits per group."""
    n, m = pattern
    groups = math.prod(shape) // shape[nm.GROUP_AXIS] * math.ceil(shape[nm.GROUP_AXIS] / m)
    return (groups * n * (m.bit_length() - 1) + 7) // 8


def compute_size(weights: Params, batch_stats: Params, masks: Params, prompt: Params,
                 file_bytes: int | None = None, nm_pattern: tuple[int, int] | None = None) -> ExportSize:
    """The :class:`ExportSize` of the export of these trees (``masks`` names the prunable kernels; with
    ``nm_pattern`` (N, M) they are stored as N:M indices)."""
    flat_masks = traverse_util.flatten_dict(masks)
    flat_weights = traverse_util.flatten_dict(weights)
    prunable = kept = bitmask = indices = 0
    for mask in flat_masks.values():
        size = int(np.prod(np.shape(mask)))
        prunable += size
        kept += int(np.count_nonzero(np.asarray(mask)))
        if nm_pattern is None:
            bitmask += (size + 7) // 8
        else:
            indices += _index_bytes(np.shape(mask), nm_pattern)
    rest = [leaf for path, leaf in flat_weights.items() if path not in flat_masks]
    rest += jax.tree.leaves(batch_stats) + jax.tree.leaves(prompt)
    rest_bytes = 4 * sum(int(np.prod(np.shape(leaf))) for leaf in rest)
    return ExportSize(prunable, kept, bitmask, 4 * kept, rest_bytes, file_bytes, indices)


# ---------------------------------------------------------------- names and templates


def _encode_path(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            parts.append(f"{_INT_PREFIX}{int(key)}")
        elif isinstance(key, str) and key and "/" not in key and not key.startswith(_INT_PREFIX):
            parts.append(key)
        else:
            raise ValueError(f"parameter path key {key!r} cannot be stored (not an int or a plain str)")
    return "/".join(parts)


def _json_path(path: Sequence[Any]) -> list[Any]:
    return [int(key) if isinstance(key, (int, np.integer)) else key for key in path]


def _model_template(model_name: str, num_classes: int, width: float, stem: str,
                    options: Mapping[str, Any] | None = None):
    """(graphdef, abstract weights, abstract batch_stats, prunable paths) of the model, without initialising it.

    ``options``: ``create_model``'s ViT-only arguments (``models.model_options``)."""
    model = nnx.eval_shape(lambda: create_model(model_name, num_classes=num_classes, width=width, stem=stem,
                                                rngs=nnx.Rngs(0), **dict(options or {})))
    graphdef, weights, batch_stats = functional.split_model(model)
    return graphdef, weights, batch_stats, masking.prunable_paths(functional.leaf_kinds(model))


def _check_tree(name: str, got: Params, expected: Params) -> None:
    """Same paths and shapes as the model's tree; a one-line ValueError otherwise."""
    flat_got, flat_expected = traverse_util.flatten_dict(got), traverse_util.flatten_dict(expected)
    missing = [p for p in flat_expected if p not in flat_got]
    extra = [p for p in flat_got if p not in flat_expected]
    misshapen = [f"{p}: {np.shape(flat_got[p])} vs {flat_expected[p].shape}"
                 for p in flat_expected if p in flat_got and tuple(np.shape(flat_got[p])) != flat_expected[p].shape]
    found = (("missing", missing), ("unexpected", extra), ("shapes differ (got vs model)", misshapen))
    problems = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}" for label, items in found if items]
    if problems:
        raise ValueError(f"{name} do not fit the model: " + "; ".join(problems))


# ---------------------------------------------------------------- export


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
) -> ExportSize:
    """Writes the subnetwork (``weights * masks``, statistics, prompt, label map) to the one ``.npz`` at ``path``.

    ``nm_pattern`` (N, M): the masks are N:M (``vpns_jax.core.nm``), stored as per-group indices.
    ``model_options``: a ViT's input side and shape (``models.model_options``), stored to rebuild it.
    The file is written beside ``path``, synced and renamed onto it (``checkpoint.write_atomically``): a write
    the disk refuses is a one-line ``checkpoint.DiskError`` naming ``path`` and leaves an existing ``path`` as
    it was, with no temporary file. An existing ``path`` is a FileExistsError unless ``overwrite``. ``rng`` is the
    run's raw PRNG key (default ``PRNGKey(0)``); evaluation folds it for the
    ``random`` prompt kind. Returns the sizes, with the file's size on disk.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    options = dict(model_options or {})
    host = jax.device_get({"weights": weights, "batch_stats": batch_stats, "masks": masks, "prompt": prompt})
    prunable = _checked_trees(host, _model_template(model_name, num_classes, width, stem, options))
    nm_pattern = None if nm_pattern is None else nm.check_nm(*nm_pattern)
    _check_masks_and_prompt(host, prunable, prompt_spec, nm_pattern)
    label_map, class_names, rng = _checked_labels_and_key(label_map, class_names, rng, num_classes)
    encoded, paths = _encode(host, prunable, nm_pattern)
    arrays = {RNG_KEY: rng, **encoded}
    size = compute_size(host["weights"], host["batch_stats"], host["masks"], host["prompt"], nm_pattern=nm_pattern)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": model_name, "num_classes": int(num_classes), "width": float(width), "stem": stem,
                  **({"options": options} if options else {})},
        "prompt": {name: getattr(prompt_spec, name) for name in _PROMPT_FIELDS},
        "eval_with_prompt": bool(eval_with_prompt),
        "label_map": [int(v) for v in label_map],
        "class_names": class_names,
        "kept_fraction": size.kept_entries / size.prunable_entries,
        "prunable_paths": [_json_path(p) for p in prunable],
        "dense_paths": paths,
    }
    if nm_pattern is not None:
        meta[NM_KEY] = f"{nm_pattern[0]}:{nm_pattern[1]}"
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    checkpoint.write_atomically(path, lambda file: np.savez(file, **arrays))
    return dataclasses.replace(size, file_bytes=path.stat().st_size)


def _checked_trees(host: dict[str, Params], template: tuple) -> list:
    """The prunable paths of the model ``template`` (``_model_template``), once the host trees fit it."""
    _, template_weights, template_stats, prunable = template
    _check_tree("weights", host["weights"], template_weights)
    _check_tree("batch_stats", host["batch_stats"], template_stats)
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


def _pack_indices(indices: np.ndarray, m: int) -> np.ndarray:
    """(groups, N) positions < m as one packed uint8 run of log2(m) bits each, most significant bit first."""
    bits = np.unpackbits(indices.astype(np.uint8)[..., None], axis=-1)[..., 8 - (m.bit_length() - 1):]
    return np.packbits(bits.reshape(-1))


def _unpack_indices(packed: np.ndarray, groups: int, n: int, m: int) -> np.ndarray:
    width = m.bit_length() - 1
    bits = np.unpackbits(packed, count=groups * n * width).reshape(groups, n, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1))


def _encode(host: dict[str, Params], prunable: list,
            nm_pattern: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """The file's arrays: each prunable kernel as packed mask bits (or N:M indices) and kept values, every
    other leaf dense; and the dense leaves' paths per group."""
    arrays: dict[str, np.ndarray] = {}
    flat_masks = traverse_util.flatten_dict(host["masks"])
    flat_weights = traverse_util.flatten_dict(host["weights"])
    for kernel_path in prunable:
        kernel = np.asarray(flat_weights[kernel_path], np.float32)
        mask = np.asarray(flat_masks[kernel_path])
        keep = mask.astype(bool).reshape(-1)
        prefix = f"{KERNEL_PREFIX}/{_encode_path(kernel_path)}"
        if nm_pattern is None:
            arrays[f"{prefix}/bits"] = np.packbits(keep)
        else:
            arrays[f"{prefix}/nm_indices"] = _pack_indices(nm.group_indices(mask, *nm_pattern), nm_pattern[1])
        arrays[f"{prefix}/shape"] = np.asarray(kernel.shape, np.int64)
        arrays[f"{prefix}/values"] = kernel.reshape(-1)[keep]
    paths: dict[str, list[list[Any]]] = {}
    for group in DENSE_GROUPS:
        flat = flat_weights if group == "weights" else traverse_util.flatten_dict(host[group])
        paths[group] = []
        for leaf_path, leaf in flat.items():
            if group == "weights" and leaf_path in flat_masks:
                continue
            arrays[f"{group}/{_encode_path(leaf_path)}"] = np.asarray(leaf, np.float32)
            paths[group].append(_json_path(leaf_path))
    return arrays, paths


# ---------------------------------------------------------------- load


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
    size: ExportSize
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


class _Corrupt(ValueError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Corrupt(message)


def load_subnetwork(path: str | os.PathLike) -> Subnetwork:
    """Reads and checks an export of :func:`export_subnetwork`.

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
        raise ValueError(f"{path} is not a readable vpns_jax subnetwork export ({_one_line(error)})") from None
    try:
        subnetwork = _build(arrays)
    except _Corrupt as error:
        raise ValueError(f"{path} is not a valid vpns_jax subnetwork export: {error}") from None
    subnetwork.size = dataclasses.replace(subnetwork.size, file_bytes=path.stat().st_size)
    return subnetwork


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _build(arrays: dict[str, np.ndarray]) -> Subnetwork:
    meta, (graphdef, template_weights, template_stats, prunable) = _read_meta(arrays)
    model, prompt_spec = meta["model"], prompts.PromptSpec(**meta["prompt"])
    flat_template = traverse_util.flatten_dict(template_weights)
    nm_pattern = _nm_pattern(meta)
    flat_weights, flat_masks = _decode_kernels(arrays, prunable, flat_template, nm_pattern)
    for kernel_path, leaf in flat_template.items():
        if kernel_path not in flat_masks:
            flat_weights[kernel_path] = _array(arrays, f"weights/{_encode_path(kernel_path)}", leaf.shape)
    flat_stats = {p: _array(arrays, f"batch_stats/{_encode_path(p)}", leaf.shape)
                  for p, leaf in traverse_util.flatten_dict(template_stats).items()}
    program = _array(arrays, "prompt/program", (prompt_spec.output_size, prompt_spec.output_size, 3))
    rng = _array(arrays, RNG_KEY, (2,), np.uint32)
    to_tree = lambda flat: jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))  # noqa: E731
    weights, masks, batch_stats = to_tree(flat_weights), to_tree(flat_masks), to_tree(flat_stats)
    prompt = {"program": jnp.asarray(program)}
    class_names = None if meta["class_names"] is None else tuple(meta["class_names"])
    return Subnetwork(
        model_name=model["name"], num_classes=int(model["num_classes"]), width=float(model["width"]),
        stem=model["stem"], prompt_spec=prompt_spec, eval_with_prompt=meta["eval_with_prompt"],
        label_map=np.asarray(meta["label_map"], np.int32), class_names=class_names, graphdef=graphdef,
        weights=weights, masks=masks, batch_stats=batch_stats, prompt=prompt, rng=rng, meta=meta,
        size=compute_size(weights, batch_stats, masks, prompt, nm_pattern=nm_pattern), nm_pattern=nm_pattern,
        model_options=dict(model.get("options") or {}),
    )


def _nm_pattern(meta: dict[str, Any]) -> tuple[int, int] | None:
    """(N, M) of the file's N:M masks; None for a file without the field (per-weight bits, as before it)."""
    if NM_KEY not in meta:
        return None
    try:
        return nm.parse_nm(meta[NM_KEY])
    except ValueError as error:
        raise _Corrupt(f"bad metadata ({_one_line(error)})") from None


def _read_meta(arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], tuple]:
    """The file's metadata, checked (format and version, the model it names, label map and class names), and
    ``_model_template`` of that model."""
    _require(META_KEY in arrays, f"no '{META_KEY}' entry")
    raw = arrays[META_KEY]
    _require(raw.dtype == np.uint8 and raw.ndim == 1, "the metadata entry is not a uint8 byte string")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Corrupt("the metadata is not JSON") from None
    _require(isinstance(meta, dict) and meta.get("format") == FORMAT, f"the metadata does not say format {FORMAT!r}")
    version = meta.get("format_version")
    _require(version == FORMAT_VERSION, f"format version {version!r}, this code reads version {FORMAT_VERSION}")
    try:
        model = meta["model"]
        prompts.PromptSpec(**meta["prompt"])
        template = _model_template(model["name"], model["num_classes"], model["width"], model["stem"],
                                   model.get("options"))
        prunable = template[-1]
        label_map = np.asarray(meta["label_map"], np.int32)
        class_names = meta["class_names"]
        eval_with_prompt = meta["eval_with_prompt"]
        stored_prunable = [tuple(p) for p in meta["prunable_paths"]]
    except (KeyError, TypeError, ValueError) as error:
        raise _Corrupt(f"bad metadata ({_one_line(error)})") from None
    _require(isinstance(eval_with_prompt, bool), "eval_with_prompt is not a bool")
    _require(stored_prunable == prunable, "its prunable kernels are not those of the model it names")
    fits = label_map.ndim == 1 and label_map.size > 0 and np.all((label_map >= 0) & (label_map < model["num_classes"]))
    _require(bool(fits), f"label map {meta['label_map']} does not fit a {model['num_classes']}-class head")
    if class_names is not None:
        _require(isinstance(class_names, list) and len(class_names) == len(label_map)
                 and all(isinstance(n, str) for n in class_names), "class names do not match the label map")
    return meta, template


def _array(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """The stored array ``name``, checked to have ``shape`` and ``dtype``."""
    _require(name in arrays, f"array '{name}' is missing")
    value = arrays[name]
    _require(value.dtype == dtype and value.shape == tuple(shape),
             f"array '{name}' is {value.dtype} {value.shape}, expected {np.dtype(dtype)} {tuple(shape)}")
    return value


def _decode_keep(arrays: dict[str, np.ndarray], prefix: str, shape: tuple[int, ...],
                 nm_pattern: tuple[int, int] | None) -> np.ndarray:
    """A kernel's flat bool keep mask, from its packed bits or its N:M indices."""
    size = math.prod(shape)
    if nm_pattern is None:
        bits = _array(arrays, f"{prefix}/bits", ((size + 7) // 8,), np.uint8)
        return np.unpackbits(bits, count=size).astype(bool)
    n, m = nm_pattern
    packed = _array(arrays, f"{prefix}/nm_indices", (_index_bytes(shape, nm_pattern),), np.uint8)
    groups = size // shape[nm.GROUP_AXIS] * math.ceil(shape[nm.GROUP_AXIS] / m)
    try:
        return nm.from_group_indices(_unpack_indices(packed, groups, n, m), shape, n, m).reshape(-1)
    except ValueError as error:
        raise _Corrupt(f"kernel {prefix}: {_one_line(error)}") from None


def _decode_kernels(arrays: dict[str, np.ndarray], prunable: list, flat_template: dict,
                    nm_pattern: tuple[int, int] | None) -> tuple[dict[tuple, np.ndarray], dict[tuple, np.ndarray]]:
    """(kernels, 0/1 masks) of the prunable kernels, unpacked from their mask bits (or N:M indices) and kept
    values."""
    flat_weights, flat_masks = {}, {}
    for kernel_path in prunable:
        shape = flat_template[kernel_path].shape
        size = math.prod(shape)
        prefix = f"{KERNEL_PREFIX}/{_encode_path(kernel_path)}"
        stored_shape = _array(arrays, f"{prefix}/shape", (len(shape),), np.int64)
        _require(tuple(int(s) for s in stored_shape) == shape,
                 f"kernel {prefix} has shape {stored_shape.tolist()}, the model {shape}")
        keep = _decode_keep(arrays, prefix, shape, nm_pattern)
        values = _array(arrays, f"{prefix}/values", (int(np.count_nonzero(keep)),))
        kernel = np.zeros(size, np.float32)
        kernel[keep] = values
        flat_weights[kernel_path] = kernel.reshape(shape)
        flat_masks[kernel_path] = keep.astype(np.float32).reshape(shape)
    return flat_weights, flat_masks


# ---------------------------------------------------------------- size report


def random_subnetwork_size(model_name: str, density: float, *, num_classes: int = 1000, width: float = 1.0,
                           stem: str = "imagenet", prompt_spec: prompts.PromptSpec | None = None,
                           directory: str | os.PathLike | None = None, seed: int = 0,
                           nm_pattern: tuple[int, int] | None = None) -> ExportSize:
    """The export size of ``model_name`` at ``density``, with random weights and the masks of its init scores.

    No training: the sizes depend only on the shapes and the kept count (the
    random values stand in for every leaf, BatchNorm statistics included). With
    ``directory`` the export is also written there (and its file size reported).
    ``nm_pattern`` (N, M): N:M masks of the init scores instead (``density`` is then ignored).
    """
    spec = prompt_spec or prompts.PromptSpec()
    # Random values on the model's shapes: initialising the model itself compiles one op per leaf shape (slow).
    model = nnx.eval_shape(
        lambda: create_model(model_name, num_classes=num_classes, width=width, stem=stem, rngs=nnx.Rngs(seed))
    )
    _, weights, batch_stats = functional.split_model(model)
    rng = np.random.default_rng(seed)
    weights, batch_stats = (jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, np.float32)), tree)
                            for tree in (weights, batch_stats))
    kinds = functional.leaf_kinds(model)
    scores = jax.jit(lambda w: masking.init_scores(w, kinds))(weights)
    if nm_pattern is None:
        masks = jax.jit(masking.masks_from_scores)(scores, jnp.asarray(masking.prune_counts(scores, density)))
    else:
        masks = jax.jit(nm.nm_masks, static_argnums=(1, 2))(scores, *nm_pattern)
    prompt = prompts.init_prompt(spec)
    if directory is None:
        return compute_size(weights, batch_stats, masks, prompt, nm_pattern=nm_pattern)
    return export_subnetwork(
        pathlib.Path(directory) / f"{model_name}_density_{density}.npz", model_name=model_name,
        num_classes=num_classes, width=width, stem=stem, weights=weights, batch_stats=batch_stats, masks=masks,
        prompt_spec=spec, prompt=prompt, label_map=np.arange(min(10, num_classes)), overwrite=True,
        nm_pattern=nm_pattern,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpns_jax.io.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_report", action="store_true", help="print dense vs compressed export sizes")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1, 0.01])
    parser.add_argument("--prompt_size", type=int, default=224, help="input and output size of the pad prompt")
    parser.add_argument("--pad_size", type=int, default=16)
    parser.add_argument("--no_write", action="store_true", help="skip writing the files (no on-disk size)")
    parser.add_argument("--pattern", default="", help="an N:M pattern such as 2:4 (density N/M) instead of densities")
    args = parser.parse_args(argv)
    if not args.size_report:
        parser.error("nothing to do: pass --size_report")
    try:
        pattern = nm.parse_nm(args.pattern) if args.pattern else None
    except ValueError as error:
        parser.error(str(error))
    spec = prompts.PromptSpec("pad", input_size=args.prompt_size, output_size=args.prompt_size, pad_size=args.pad_size)
    print(f"{args.model} width {args.width:g}, {args.num_classes} classes, {args.stem} stem, {spec.kind} prompt "
          f"{spec.output_size} px (random weights, masks from the init scores)")
    densities = [pattern[0] / pattern[1]] if pattern else args.densities
    with tempfile.TemporaryDirectory() as directory:
        for density in densities:
            size = random_subnetwork_size(
                args.model, masking.validate_density(density), num_classes=args.num_classes, width=args.width,
                stem=args.stem, prompt_spec=spec, directory=None if args.no_write else directory, nm_pattern=pattern,
            )
            print(f"{args.pattern + ' ' if pattern else ''}density {density:g}: {size.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
