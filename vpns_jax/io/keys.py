"""The one spelling of a pytree path in a file: dict keys joined by '/', an integer key written '#<int>'.

Shared by the array files (``io.array_files``) and the subnetwork export (``io.subnetwork_format``), so that an
integer key (a ResNet block index) reads back as an int from either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

INT_PREFIX = "#"
SEPARATOR = "/"


def encode_key(key: Any) -> str:
    """``key`` as one part of a stored path: an int as '#<int>', a plain str as it is."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return f"{INT_PREFIX}{int(key)}"
    if not isinstance(key, str):
        raise TypeError(f"tree key {key!r} is neither a str nor an int")
    if not key or SEPARATOR in key or key.startswith(INT_PREFIX):
        raise ValueError(f"tree key {key!r} cannot be stored: it is empty, holds '/' or starts with '#'")
    return key


def decode_key(part: str) -> str | int:
    """The key :func:`encode_key` wrote as ``part``."""
    return int(part[len(INT_PREFIX):]) if part.startswith(INT_PREFIX) else part


def encode_path(path: Sequence[Any]) -> str:
    """A pytree path (a sequence of keys) as one '/'-joined string."""
    return SEPARATOR.join(encode_key(key) for key in path)


def decode_path(name: str) -> list[str | int]:
    """The keys of a path :func:`encode_path` wrote."""
    return [decode_key(part) for part in name.split(SEPARATOR)]
