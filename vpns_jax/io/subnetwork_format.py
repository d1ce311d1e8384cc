"""The subnetwork file format: one ``.npz`` (read back without pickle), its layout, sizes and templates.

``io.export.export_subnetwork`` writes it and ``io.subnetwork.load_subnetwork`` reads it. It holds:

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
'#<int>' (``io.keys``). The loader checks all of it and rebuilds ``W * m``
exactly (zeros at pruned entries) and the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from vpns_jax.core import masking, nm, prompts
from vpns_jax.io import keys
from vpns_jax.models import create_model, functional

Params = dict[Any, Any]

FORMAT = "vpns_jax.subnetwork"
FORMAT_VERSION = 1
META_KEY = "meta"
RNG_KEY = "rng"
KERNEL_PREFIX = "kernels"
NM_KEY = "mask_pattern"  # metadata: 'N:M' when the kernels store N:M indices
DENSE_GROUPS = ("weights", "batch_stats", "prompt")
PROMPT_FIELDS = tuple(field.name for field in dataclasses.fields(prompts.PromptSpec))


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


def nm_index_bytes(shape: tuple[int, ...], pattern: tuple[int, int]) -> int:
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
            indices += nm_index_bytes(np.shape(mask), nm_pattern)
    rest = [leaf for path, leaf in flat_weights.items() if path not in flat_masks]
    rest += jax.tree.leaves(batch_stats) + jax.tree.leaves(prompt)
    rest_bytes = 4 * sum(int(np.prod(np.shape(leaf))) for leaf in rest)
    return ExportSize(prunable, kept, bitmask, 4 * kept, rest_bytes, file_bytes, indices)


def json_path(path: Sequence[Any]) -> list[Any]:
    """A pytree path as the metadata's JSON list (numpy ints as ints)."""
    return [int(key) if isinstance(key, (int, np.integer)) else key for key in path]


def model_template(model_name: str, num_classes: int, width: float, stem: str,
                   options: Mapping[str, Any] | None = None):
    """(graphdef, abstract weights, abstract batch_stats, prunable paths) of the model, without initialising it.

    ``options``: ``create_model``'s ViT-only arguments (``models.model_options``)."""
    model = nnx.eval_shape(lambda: create_model(model_name, num_classes=num_classes, width=width, stem=stem,
                                                rngs=nnx.Rngs(0), **dict(options or {})))
    graphdef, weights, batch_stats = functional.split_model(model)
    return graphdef, weights, batch_stats, masking.prunable_paths(functional.leaf_kinds(model))


def check_tree(name: str, got: Params, expected: Params) -> None:
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


def pack_indices(indices: np.ndarray, m: int) -> np.ndarray:
    """(groups, N) positions < m as one packed uint8 run of log2(m) bits each, most significant bit first."""
    bits = np.unpackbits(indices.astype(np.uint8)[..., None], axis=-1)[..., 8 - (m.bit_length() - 1):]
    return np.packbits(bits.reshape(-1))


def unpack_indices(packed: np.ndarray, groups: int, n: int, m: int) -> np.ndarray:
    """The (groups, N) positions :func:`pack_indices` packed."""
    width = m.bit_length() - 1
    bits = np.unpackbits(packed, count=groups * n * width).reshape(groups, n, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1))


def encode_arrays(host: dict[str, Params], prunable: list,
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
        prefix = f"{KERNEL_PREFIX}/{keys.encode_path(kernel_path)}"
        if nm_pattern is None:
            arrays[f"{prefix}/bits"] = np.packbits(keep)
        else:
            arrays[f"{prefix}/nm_indices"] = pack_indices(nm.group_indices(mask, *nm_pattern), nm_pattern[1])
        arrays[f"{prefix}/shape"] = np.asarray(kernel.shape, np.int64)
        arrays[f"{prefix}/values"] = kernel.reshape(-1)[keep]
    paths: dict[str, list[list[Any]]] = {}
    for group in DENSE_GROUPS:
        flat = flat_weights if group == "weights" else traverse_util.flatten_dict(host[group])
        paths[group] = []
        for leaf_path, leaf in flat.items():
            if group == "weights" and leaf_path in flat_masks:
                continue
            arrays[f"{group}/{keys.encode_path(leaf_path)}"] = np.asarray(leaf, np.float32)
            paths[group].append(json_path(leaf_path))
    return arrays, paths


class Corrupt(ValueError):
    """A file that is not a valid export; the loader reports it as a ValueError naming the file."""


def require(condition: bool, message: str) -> None:
    """Raises :class:`Corrupt` with ``message`` unless ``condition``."""
    if not condition:
        raise Corrupt(message)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def read_array(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """The stored array ``name``, checked to have ``shape`` and ``dtype``."""
    require(name in arrays, f"array '{name}' is missing")
    value = arrays[name]
    require(value.dtype == dtype and value.shape == tuple(shape),
            f"array '{name}' is {value.dtype} {value.shape}, expected {np.dtype(dtype)} {tuple(shape)}")
    return value


def _decode_keep(arrays: dict[str, np.ndarray], prefix: str, shape: tuple[int, ...],
                 nm_pattern: tuple[int, int] | None) -> np.ndarray:
    """A kernel's flat bool keep mask, from its packed bits or its N:M indices."""
    size = math.prod(shape)
    if nm_pattern is None:
        bits = read_array(arrays, f"{prefix}/bits", ((size + 7) // 8,), np.uint8)
        return np.unpackbits(bits, count=size).astype(bool)
    n, m = nm_pattern
    packed = read_array(arrays, f"{prefix}/nm_indices", (nm_index_bytes(shape, nm_pattern),), np.uint8)
    groups = size // shape[nm.GROUP_AXIS] * math.ceil(shape[nm.GROUP_AXIS] / m)
    try:
        return nm.from_group_indices(unpack_indices(packed, groups, n, m), shape, n, m).reshape(-1)
    except ValueError as error:
        raise Corrupt(f"kernel {prefix}: {one_line(error)}") from None


def decode_kernels(arrays: dict[str, np.ndarray], prunable: list, flat_template: dict,
                   nm_pattern: tuple[int, int] | None) -> tuple[dict[tuple, np.ndarray], dict[tuple, np.ndarray]]:
    """(kernels, 0/1 masks) of the prunable kernels, unpacked from their mask bits (or N:M indices) and kept
    values."""
    flat_weights, flat_masks = {}, {}
    for kernel_path in prunable:
        shape = flat_template[kernel_path].shape
        size = math.prod(shape)
        prefix = f"{KERNEL_PREFIX}/{keys.encode_path(kernel_path)}"
        stored_shape = read_array(arrays, f"{prefix}/shape", (len(shape),), np.int64)
        require(tuple(int(s) for s in stored_shape) == shape,
                f"kernel {prefix} has shape {stored_shape.tolist()}, the model {shape}")
        keep = _decode_keep(arrays, prefix, shape, nm_pattern)
        values = read_array(arrays, f"{prefix}/values", (int(np.count_nonzero(keep)),))
        kernel = np.zeros(size, np.float32)
        kernel[keep] = values
        flat_weights[kernel_path] = kernel.reshape(shape)
        flat_masks[kernel_path] = keep.astype(np.float32).reshape(shape)
    return flat_weights, flat_masks
