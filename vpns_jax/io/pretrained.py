"""torchvision weights as vpns_jax weights: read a state dict, map it onto a model's weights tree.

The models keep torchvision's module names, so a state-dict name maps to a
weights path by one rule: split at '.', integer parts become int keys, and the
last part is renamed

* ``weight`` -> ``kernel`` of a conv (OIHW -> HWIO) or Linear ((out, in) -> (in, out)),
  or ``scale`` of a BatchNorm;
* ``bias`` -> ``bias``;
* ``running_mean`` / ``running_var`` -> ``mean`` / ``var`` in ``batch_stats``;
* ``num_batches_tracked`` (BatchNorm bookkeeping) is consumed and dropped.

Which leaf is a BatchNorm, and the shape each one needs, come from the
model's own (weights, batch_stats) trees, e.g. from ``functional.split_model``
of ``create_model(name, num_classes=..., width=..., stem=...)``.

torch is optional: only reading a ``.pth``/``.pt`` needs it (``torch.load``
with ``weights_only=True``, which never runs pickled code). ``.safetensors``
and ``.npz`` files (torchvision names as keys) are read without it.
"""

from __future__ import annotations

import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

Params = dict[Any, Any]

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
NPZ_SUFFIX = ".npz"
SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX, NPZ_SUFFIX)

_MAX_LISTED = 6
_DROPPED = "num_batches_tracked"
_STAT_NAMES = {"running_mean": "mean", "running_var": "var"}
FIX_HINT = "check the model name, width, stem and num_classes"


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of a torchvision-style state dict file as numpy arrays, by state-dict name.

    ``.pth``/``.pt`` need torch (loaded with ``weights_only=True``);
    ``.safetensors`` and ``.npz`` (loaded without pickle) do not.
    """
    path = pathlib.Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown weights file type {path.suffix or '(none)'!r}; give one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (pip install torch); or give the weights as .safetensors or .npz"
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run the file's pickled code: never do that here.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else "unsupported content")
        raise ValueError(
            f"{path} holds more than tensors and is refused (torch.load with weights_only=True: {reason}); "
            "save model.state_dict() or convert the file to .safetensors"
        ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (a dict of tensors)")
    not_tensors = [str(name) for name, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} is not a flat state dict: {_listed(not_tensors)} are not tensors "
            "(save model.state_dict() itself)"
        )
    arrays = {}
    for name, tensor in loaded.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        arrays[str(name)] = tensor.numpy()
    return arrays


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _summary(missing: list[str], unexpected: list[str], misshapen: list[str]) -> str:
    """Counts per kind, then the first few problems taken from each kind in turn, then how many more."""
    kinds = {"missing": missing, "unexpected": unexpected, "misshapen": misshapen}
    counts = ", ".join(f"{len(items)} {kind}" for kind, items in kinds.items() if items)
    queues = [list(items) for items in kinds.values() if items]
    ordered = []
    while any(queues):
        ordered += [queue.pop(0) for queue in queues if queue]
    return f"{counts}: {_listed(ordered)}"


def _path(name: str) -> tuple[str | int, ...]:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def _torch_name(path: tuple[Any, ...], leaf: str) -> str:
    return ".".join(str(part) for part in (*path, leaf))


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of one of our kernels: HWIO -> OIHW, (in, out) -> (out, in)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
    """A torch kernel in our layout: OIHW -> HWIO, (out, in) -> (in, out)."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    return np.transpose(array)


def from_torchvision(
    state_dict: Mapping[str, Any], weights_template: Params, batch_stats_template: Params
) -> tuple[Params, Params]:
    """Maps a torchvision state dict onto trees shaped like the templates; float32 numpy leaves.

    Every state-dict tensor must be used exactly once (``num_batches_tracked``
    of a BatchNorm counts as used) and every template leaf filled with the
    shape it has: otherwise one ValueError lists the missing, unexpected and
    misshapen tensors (shapes in torch's layout).
    """
    want_w = traverse_util.flatten_dict(weights_template) if weights_template else {}
    want_s = traverse_util.flatten_dict(batch_stats_template) if batch_stats_template else {}
    got_w: dict[tuple[Any, ...], np.ndarray] = {}
    got_s: dict[tuple[Any, ...], np.ndarray] = {}
    source_of: dict[tuple[str, tuple[Any, ...]], str] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    misshapen: list[str] = []

    for name, tensor in state_dict.items():
        parts = _path(str(name))
        prefix, leaf = parts[:-1], parts[-1]
        is_bn = (*prefix, "mean") in want_s
        if leaf == _DROPPED and is_bn:
            continue
        if leaf == "weight":
            target = ("weights", (*prefix, "scale" if (*prefix, "scale") in want_w else "kernel"))
        elif leaf == "bias":
            target = ("weights", (*prefix, "bias"))
        elif leaf in _STAT_NAMES:
            target = ("batch_stats", (*prefix, _STAT_NAMES[leaf]))
        else:
            target = None
        want, got = (want_w, got_w) if target and target[0] == "weights" else (want_s, got_s)
        if target is None or target[1] not in want:
            unexpected.append(f"unexpected {name}")
            continue
        if target in source_of:
            unexpected.append(f"{name} maps to the same tensor as {source_of[target]}")
            continue
        source_of[target] = str(name)
        array = np.asarray(tensor)
        expected = tuple(want[target[1]].shape)
        is_kernel = target[1][-1] == "kernel"
        torch_expected = _torch_layout(expected) if is_kernel else expected
        if tuple(array.shape) != torch_expected:
            misshapen.append(f"{name} has shape {tuple(array.shape)}, the model needs {torch_expected}")
            continue
        got[target[1]] = np.ascontiguousarray(_from_torch_layout(array) if is_kernel else array, dtype=np.float32)

    renamed = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    for part, want in (("weights", want_w), ("batch_stats", want_s)):
        for path in want:
            if (part, path) not in source_of:
                missing.append(f"missing {_torch_name(path[:-1], renamed.get(path[-1], path[-1]))}")
    if missing or unexpected or misshapen:
        summary = _summary(missing, unexpected, misshapen)
        raise ValueError(f"the state dict does not fit the model ({summary}): {FIX_HINT}")
    return traverse_util.unflatten_dict(got_w), traverse_util.unflatten_dict(got_s)


def is_torchvision_npz(path: str | pathlib.Path) -> bool:
    """Whether the .npz at ``path`` is a state dict by torchvision names, not our {'weights', 'batch_stats'} trees."""
    with np.load(pathlib.Path(path), allow_pickle=False) as data:
        names = data.files
    ours = any(name.split("/", 1)[0] in ("weights", "batch_stats") for name in names)
    return bool(names) and not ours


__all__ = ["SUFFIXES", "from_torchvision", "is_torchvision_npz", "read_state_dict"]
