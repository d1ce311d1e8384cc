"""torchvision weights as vpns_jax weights: read a state dict, map it onto a model's weights tree.

The models keep torchvision's module names, so a state-dict name maps to a
weights path by one rule: split at '.', integer parts become int keys, and the
last part is renamed

* ``weight`` -> ``kernel`` of a conv (OIHW -> HWIO) or Linear ((out, in) -> (in, out)),
  or ``scale`` of a BatchNorm;
* ``bias`` -> ``bias``;
* ``running_mean`` / ``running_var`` -> ``mean`` / ``var`` in ``batch_stats``;
* ``num_batches_tracked`` (BatchNorm bookkeeping) is consumed and dropped;
* ViTs: ``weight`` is also a LayerNorm's ``scale``; torch MultiheadAttention's
  ``in_proj_weight`` / ``in_proj_bias`` -> ``in_proj`` ``kernel`` (transposed) /
  ``bias``; ``mlp.linear_1`` / ``mlp.linear_2`` (older files) are ``mlp.0`` /
  ``mlp.3``; ``class_token`` and ``encoder.pos_embedding`` keep their names, the
  position embedding interpolated bicubically when the file's patch grid differs
  from the model's (``vpns_jax.models.vit.interpolate_pos_embedding``).

Which leaf is a BatchNorm, and the shape each one needs, come from the
model's own (weights, batch_stats) trees, e.g. from ``functional.split_model``
of ``create_model(name, num_classes=..., width=..., stem=...)``.

torch is optional: only reading a ``.pth``/``.pt`` needs it (``torch.load``
with ``weights_only=True``, which never runs pickled code). ``.safetensors``
and ``.npz`` files (torchvision names as keys) are read without it.

Weights are checked where they enter (:func:`check_tensors`): every tensor of a
file is float16, bfloat16, float32 or float64 and finite, BatchNorm counters
(``num_batches_tracked``, integers in torchvision files) excepted. A file that
cannot be read at all gives one line naming it and what it should be.
"""

from __future__ import annotations

import math
import pathlib
import pickle
import zipfile
import zlib
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
FIX_HINT = "check the model name, width, stem and num_classes (a ViT's: also config.model.vit and prompt.output_size)"

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
NPZ = "a NumPy .npz archive of plain arrays"
_TORCH_FILE = "a torch .pth/.pt file"
_UNPICKLER = "WeightsUnpickler error"  # where torch's weights_only message says what it refused
_SAFETENSORS_FILE = "a safetensors file"
WEIGHTS_FILES = ("a weights file written by python -m vpns_jax.convert, or a torchvision .pth/.safetensors state dict "
                 "(download or convert it again if this one was cut short)")
# What torch.save starts a file with: a zip archive (torch >= 1.6), a pickle of protocol >= 2 (older files, such
# as some torchvision downloads), or a tar archive (torch < 0.4, "ustar" at byte 257).
_TORCH_ZIP, _PICKLE, _TAR_MAGIC, _TAR_AT = b"PK\x03\x04", b"\x80", b"ustar", 257


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of a torchvision-style state dict file as numpy arrays, by state-dict name, checked.

    ``.pth``/``.pt`` need torch (loaded with ``weights_only=True``);
    ``.safetensors`` and ``.npz`` (loaded without pickle) do not. A file that
    cannot be read, or a tensor that is not float or not finite
    (:func:`check_tensors`), is a one-line ValueError naming the file.
    """
    path = pathlib.Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown weights file type {path.suffix or '(none)'!r}; give one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if suffix in TORCH_SUFFIXES:
        arrays = _read_torch(path)
    elif suffix == SAFETENSORS_SUFFIX:
        arrays = _read_safetensors(path)
    else:
        arrays = _read_npz(path)
    check_tensors(path, arrays)
    return arrays


def unreadable(path: pathlib.Path, what: str, reason: object) -> ValueError:
    """The one-line error for a weights file that cannot be read: the file, what it should be, why not, the fix."""
    why = " ".join(str(reason).split()) or type(reason).__name__
    return ValueError(f"{path} cannot be read: it is not {what} ({why}); give {WEIGHTS_FILES}")


def check_tensors(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Raises one ValueError line unless every tensor is of FLOAT_DTYPES and finite (names listed by key).

    ``num_batches_tracked`` counters are exempt: torchvision stores them as
    int64, and they never become weights (``from_torchvision`` drops a
    BatchNorm's and reports any other as unexpected).
    """
    checked = {name: array for name, array in arrays.items() if str(name).rsplit(".", 1)[-1] != _DROPPED}
    # An int or bool tensor would be cast to float silently and load as a model of zeros and ones.
    not_float = [f"{name}: {array.dtype}" for name, array in checked.items() if array.dtype.name not in FLOAT_DTYPES]
    if not_float:
        raise _not_float(path, not_float)
    not_finite = [str(name) for name, array in checked.items() if not np.isfinite(array).all()]
    if not_finite:
        raise ValueError(
            f"{path} holds NaN/Inf values (in {_listed(not_finite)}): every weight must be finite; the file is "
            "damaged or comes from a diverged training, use another"
        )


def _not_float(path: pathlib.Path, named_dtypes: list[str]) -> ValueError:
    return ValueError(
        f"{path} holds tensors that are not floating point ({_listed(named_dtypes)}): every weight must be "
        f"{', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]}; give the float weights of the model, not a "
        "quantized or integer export"
    )


def require_zip(path: pathlib.Path, what: str = NPZ) -> None:
    """Raises the one-line :func:`unreadable` error unless ``path`` is a whole zip archive (as every .npz is)."""
    try:
        with open(path, "rb") as file:
            whole = zipfile.is_zipfile(file)
    except OSError as error:
        raise unreadable(path, what, error) from None
    # np.load would call a text file "pickled data", and a cut one "not a zip file": say both plainly.
    if not whole:
        raise unreadable(path, what, "no complete zip archive in it")


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    require_zip(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise unreadable(path, NPZ, error) from None


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise unreadable(path, _SAFETENSORS_FILE, error) from None


def _require_torch_file(path: pathlib.Path) -> None:
    """Refuses a file that torch.save cannot have written, with or without torch installed."""
    try:
        with open(path, "rb") as file:
            head = file.read(_TAR_AT + len(_TAR_MAGIC))
    except OSError as error:
        raise unreadable(path, _TORCH_FILE, error) from None
    if not (head.startswith((_TORCH_ZIP, _PICKLE)) or head[_TAR_AT:] == _TAR_MAGIC):
        raise unreadable(path, _TORCH_FILE, f"it starts with {head[:8]!r}: not a zip archive or a pickle")


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    _require_torch_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (pip install torch); or give the weights as .safetensors or .npz"
        ) from None
    loaded = _torch_load(path, torch)
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
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds each bfloat16 exactly
            tensor = tensor.float()
        try:
            arrays[str(name)] = tensor.numpy()
        except (TypeError, RuntimeError):  # float8, quantized, ...: numpy has no such type, nor do we
            raise _not_float(path, [f"{name}: {str(tensor.dtype).removeprefix('torch.')}"]) from None
    return arrays


def _torch_load(path: pathlib.Path, torch: Any) -> Any:
    """torch.load with weights_only=True; its failures as one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run the file's pickled code: never do that here.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is None:  # no class or function named: a broken stream, or content other than tensors
            unpickler = next((line[line.index(_UNPICKLER):] for line in lines if _UNPICKLER in line), None)
            raise unreadable(path, f"{_TORCH_FILE} of plain tensors", unpickler or type(error).__name__) from None
        raise ValueError(
            f"{path} holds more than tensors and is refused (torch.load with weights_only=True: {refused}); "
            "save model.state_dict() or convert the file to .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # e.g. a zip archive cut short
        raise unreadable(path, _TORCH_FILE, error) from None


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
    parts = tuple(int(part) if part.isdigit() else part for part in name.split("."))
    # Older torchvision files name a ViT MLP's Linears linear_1 / linear_2 (its _load_from_state_dict renames them).
    return tuple(_MLP_ALIASES.get(part, part) if i and parts[i - 1] == "mlp" else part
                 for i, part in enumerate(parts))


_MLP_ALIASES = {"linear_1": 0, "linear_2": 3}
# torch MultiheadAttention's fused projection, held by an ``in_proj`` Linear here.
_IN_PROJ = {"in_proj_weight": ("in_proj", "kernel"), "in_proj_bias": ("in_proj", "bias")}


def _torch_name(path: tuple[Any, ...]) -> str:
    """The state-dict name of a weights or batch-stats leaf (the inverse of :func:`_target`)."""
    *prefix, leaf = path
    if prefix and prefix[-1] == "in_proj" and leaf in ("kernel", "bias"):
        return ".".join(str(part) for part in (*prefix[:-1], f"in_proj_{'weight' if leaf == 'kernel' else leaf}"))
    renamed = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    return ".".join(str(part) for part in (*prefix, renamed.get(leaf, leaf)))


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


def _target(parts: tuple[Any, ...], want_w: Params, want_s: Params) -> tuple[str, tuple[Any, ...]] | None:
    """Where the tensor named ``parts`` goes: ('weights' or 'batch_stats', path), or None (unexpected)."""
    prefix, leaf = parts[:-1], parts[-1]
    if leaf == "weight":
        target = ("weights", (*prefix, "scale" if (*prefix, "scale") in want_w else "kernel"))
    elif leaf == "bias":
        target = ("weights", (*prefix, "bias"))
    elif leaf in _STAT_NAMES:
        target = ("batch_stats", (*prefix, _STAT_NAMES[leaf]))
    elif leaf in _IN_PROJ:
        target = ("weights", (*prefix, *_IN_PROJ[leaf]))
    else:  # a parameter kept by its own name (a ViT's class_token, encoder.pos_embedding)
        target = ("weights", parts)
    return target if target[1] in (want_w if target[0] == "weights" else want_s) else None


def _fitted(name: str, path: tuple[Any, ...], array: np.ndarray, expected: tuple[int, ...]) -> np.ndarray | str:
    """``array`` in our layout as float32, or the misshapen message (shapes in torch's layout).

    A ViT position embedding made for another grid is interpolated to the model's
    (``vit.interpolate_pos_embedding``, torchvision's ``interpolate_embeddings``).
    """
    is_kernel = path[-1] == "kernel"
    torch_expected = _torch_layout(expected) if is_kernel else expected
    if tuple(array.shape) != torch_expected and path[-1] == "pos_embedding" and _regrids(array.shape, expected):
        from vpns_jax.models.vit import interpolate_pos_embedding

        array = interpolate_pos_embedding(np.asarray(array, np.float32), math.isqrt(expected[1] - 1))
    if tuple(array.shape) != torch_expected:
        return f"{name} has shape {tuple(array.shape)}, the model needs {torch_expected}"
    return np.ascontiguousarray(_from_torch_layout(array) if is_kernel else array, dtype=np.float32)


def _regrids(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether both shapes are (1, 1 + g*g, D) position embeddings of the same D (any grids g)."""
    square = lambda n: n >= 1 and math.isqrt(n) ** 2 == n  # noqa: E731
    return (len(shape) == len(expected) == 3 and shape[0] == expected[0] == 1 and shape[2] == expected[2]
            and square(shape[1] - 1) and square(expected[1] - 1))


def from_torchvision(
    state_dict: Mapping[str, Any], weights_template: Params, batch_stats_template: Params
) -> tuple[Params, Params]:
    """Maps a torchvision state dict onto trees shaped like the templates; float32 numpy leaves.

    Every state-dict tensor must be used exactly once (``num_batches_tracked``
    of a BatchNorm counts as used) and every template leaf filled with the
    shape it has: otherwise one ValueError lists the missing, unexpected and
    misshapen tensors (shapes in torch's layout). ViT names map as well:
    ``self_attention.in_proj_weight`` / ``in_proj_bias`` to ``in_proj``'s kernel
    (transposed) and bias, ``mlp.linear_1`` / ``linear_2`` as ``mlp.0`` / ``mlp.3``,
    ``class_token`` and ``encoder.pos_embedding`` as they are (the latter
    interpolated bicubically when the file's patch grid differs from the model's).
    """
    want_w = traverse_util.flatten_dict(weights_template) if weights_template else {}
    want_s = traverse_util.flatten_dict(batch_stats_template) if batch_stats_template else {}
    got: dict[str, dict[tuple[Any, ...], np.ndarray]] = {"weights": {}, "batch_stats": {}}
    source_of: dict[tuple[str, tuple[Any, ...]], str] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    misshapen: list[str] = []

    for name, tensor in state_dict.items():
        parts = _path(str(name))
        if parts[-1] == _DROPPED and (*parts[:-1], "mean") in want_s:
            continue
        target = _target(parts, want_w, want_s)
        if target is None:
            unexpected.append(f"unexpected {name}")
            continue
        if target in source_of:
            unexpected.append(f"{name} maps to the same tensor as {source_of[target]}")
            continue
        source_of[target] = str(name)
        want = want_w if target[0] == "weights" else want_s
        fitted = _fitted(str(name), target[1], np.asarray(tensor), tuple(want[target[1]].shape))
        if isinstance(fitted, str):
            misshapen.append(fitted)
        else:
            got[target[0]][target[1]] = fitted

    for part, want in (("weights", want_w), ("batch_stats", want_s)):
        missing += [f"missing {_torch_name(path)}" for path in want if (part, path) not in source_of]
    if missing or unexpected or misshapen:
        summary = _summary(missing, unexpected, misshapen)
        raise ValueError(f"the state dict does not fit the model ({summary}): {FIX_HINT}")
    return traverse_util.unflatten_dict(got["weights"]), traverse_util.unflatten_dict(got["batch_stats"])


def is_torchvision_npz(path: str | pathlib.Path) -> bool:
    """Whether the .npz at ``path`` is a state dict by torchvision names, not our {'weights', 'batch_stats'} trees.

    A file that is no .npz archive is the one-line :func:`unreadable` ValueError.
    """
    path = pathlib.Path(path)
    require_zip(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            names = data.files
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise unreadable(path, NPZ, error) from None
    ours = any(name.split("/", 1)[0] in ("weights", "batch_stats") for name in names)
    return bool(names) and not ours


__all__ = ["FLOAT_DTYPES", "SUFFIXES", "check_tensors", "from_torchvision", "is_torchvision_npz", "read_state_dict",
           "require_zip", "unreadable"]
