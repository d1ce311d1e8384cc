"""A nested dict of arrays as one ``.npz``, read back without pickle.

Stores the final masks, weights and prompt of each density and the cached source model. Keys are the
'/'-joined dict paths (``io.keys``: integer keys as '#<int>'); an empty dict is kept as '<path>/' holding a
zero-size array.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vpns_jax.io import disk, keys

# Marks an empty dict in an .npz, whose keys otherwise only name leaves: '<path>/' holds a zero-size array.
_EMPTY_SUFFIX = "/"


def _host_array(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if not value.is_fully_replicated:
            raise ValueError("save_arrays needs arrays that this process holds whole (replicated or local)")
        value = value.addressable_data(0)
    array = np.asarray(jax.device_get(value))
    if array.dtype.kind not in "biufc":
        raise TypeError(f"array of dtype {array.dtype} cannot be stored without pickling")
    return array


def save_arrays(path: str | os.PathLike, tree: Mapping[Any, Any], *, hint: str = disk.RERUN_HINT) -> None:
    """Writes a nested dict of arrays to the ``.npz`` at ``path``, atomically (``disk.write_atomically``).

    Keys are the '/'-joined dict paths, integer keys stored as '#<int>'. Each
    process may call it; every writer uses its own temporary file. A write the
    disk refuses is a one-line ``disk.DiskError`` naming ``path`` and ending in
    ``hint``; the previous file stays as it was.
    """
    flat: dict[str, np.ndarray] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            if not node and prefix:
                flat[prefix + _EMPTY_SUFFIX] = np.zeros((0,), np.uint8)
            for key, value in node.items():
                visit(value, f"{prefix}/{keys.encode_key(key)}" if prefix else keys.encode_key(key))
        else:
            flat[prefix] = _host_array(node)

    if not isinstance(tree, Mapping):
        raise TypeError(f"save_arrays takes a dict of arrays, not {type(tree).__name__}")
    visit(tree, "")
    disk.write_atomically(pathlib.Path(path), lambda file: np.savez(file, **flat), hint=hint)


def load_arrays(path: str | os.PathLike) -> dict:
    """The nested dict of numpy arrays that :func:`save_arrays` wrote to ``path``."""
    tree: dict = {}
    with np.load(pathlib.Path(path), allow_pickle=False) as data:
        for name in data.files:
            empty = name.endswith(_EMPTY_SUFFIX)
            parts = keys.decode_path(name.rstrip(_EMPTY_SUFFIX))
            node = tree
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            if empty:
                node.setdefault(parts[-1], {})
            else:
                node[parts[-1]] = data[name]
    return tree
