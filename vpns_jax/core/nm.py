"""N:M sparsity: every group of M consecutive kernel entries keeps its N largest |s|.

Groups run along a kernel's input dimension (axis -2), the matmul's reduction dimension that sparse hardware reads.
Selection is exact and sort-free (rank by M comparisons, ties to the lower index); a cut group of r = I mod M
entries keeps min(N, r). ``ste_nm_masks`` have ``masking.ste_masks``'s straight-through gradient; ``group_indices``
is the form ``vpns_jax.io.subnetwork_format`` stores. Rules and counts: docs/method.md, section 4.6.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[Any, Any]
MAX_M = 16
GROUP_AXIS = -2  # the input dimension of HWIO conv and (in, out) dense kernels
_PATTERN = re.compile(r"(\d+):(\d+)")
# Below every |s|: padding that fills a cut group to M never outranks a real entry.
_PAD = -1.0


def pattern_problem(pattern: str) -> str:
    """Why ``pattern`` is not a valid 'N:M' string ('' if it is), e.g. "has M = 5, but M must be a power of two ..."."""
    match = _PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    if match is None:
        return "is not 'N:M' with integers N and M"
    n, m = int(match.group(1)), int(match.group(2))
    if not (2 <= m <= MAX_M and m & (m - 1) == 0):
        # Powers of two: the sparse hardware formats, and N / M (the density) is exact in binary.
        return (f"has M = {m}, but M must be a power of two in 2..{MAX_M} "
                "(the hardware formats are 2:4, 1:4 and 4:8)")
    if not 1 <= n < m:
        return f"has N = {n}, but 1 <= N < M (N of every M entries kept)"
    return ""


def parse_nm(pattern: str) -> tuple[int, int]:
    """(N, M) of an 'N:M' string (integers, M a power of two in 2..16, 1 <= N < M); a one-line ValueError saying
    which rule it breaks."""
    problem = pattern_problem(pattern)
    if problem:
        raise ValueError(f"N:M pattern {pattern!r} {problem}: use e.g. '2:4'")
    n, m = pattern.split(":")
    return int(n), int(m)


def check_nm(n: int, m: int) -> tuple[int, int]:
    """``(n, m)`` if they form a valid pattern (``parse_nm``'s rules); a one-line ValueError otherwise."""
    return parse_nm(f"{n}:{m}")


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) < 2:
        raise ValueError(f"N:M groups run along a kernel's input dimension (axis -2); shape {shape} has none")


def _grouped(a: Any, m: int, fill: Any, xp: Any = jnp) -> Any:
    """``a`` (..., I, O) padded with ``fill`` along axis -2 to a multiple of m and viewed as (..., I / m, m, O);
    ``xp`` is jax.numpy (traced) or numpy (host)."""
    size = a.shape[GROUP_AXIS]
    padded = math.ceil(size / m) * m
    widths = [(0, 0)] * a.ndim
    widths[a.ndim - 2] = (0, padded - size)
    a = xp.pad(a, widths, constant_values=fill)
    return a.reshape(a.shape[:-2] + (padded // m, m, a.shape[-1]))


def nm_keep(magnitudes: jax.Array, n: int, m: int) -> jax.Array:
    """Boolean keep mask of one kernel's non-negative ``magnitudes``: per group the N largest, ties to lower index."""
    n, m = check_nm(n, m)
    _check_shape(magnitudes.shape)
    grouped = _grouped(magnitudes, m, _PAD)
    position = jnp.arange(m).reshape(m, 1)  # an entry's index in its group, broadcast over (m, O)
    rank = jnp.zeros(grouped.shape, jnp.int32)
    # M comparisons per entry, one elementwise pass each (no (m, m) intermediate): exact, sort-free.
    for j in range(m):
        other = grouped[..., j:j + 1, :]
        rank = rank + ((other > grouped) | ((other == grouped) & (j < position))).astype(jnp.int32)
    keep = (rank < n).reshape(grouped.shape[:-3] + (-1, grouped.shape[-1]))
    return keep[..., :magnitudes.shape[GROUP_AXIS], :]


def nm_masks(scores: Params, n: int, m: int) -> Params:
    """Hard float32 0/1 masks keeping, in every group of M along each kernel's axis -2, the N largest |s|."""
    return jax.tree.map(lambda s: nm_keep(jnp.abs(s), n, m).astype(jnp.float32), scores)


def ste_nm_masks(scores: Params, n: int, m: int) -> Params:
    """Masks whose forward value is exactly ``nm_masks`` and whose gradient w.r.t. |s| is the identity (written
    hard + (a - stop_gradient(a)), as ``masking.ste_masks``, so the forward stays exactly 0 or 1)."""
    def one(s):
        a = jnp.abs(s)
        return nm_keep(a, n, m).astype(a.dtype) + (a - jax.lax.stop_gradient(a))

    return jax.tree.map(one, scores)


def kept_count(shape: tuple[int, ...], n: int, m: int) -> int:
    """Entries an N:M mask of a kernel of ``shape`` keeps: P * (N * full groups + min(N, r)), r = I mod M."""
    n, m = check_nm(n, m)
    shape = tuple(int(s) for s in shape)
    _check_shape(shape)
    size = shape[GROUP_AXIS]
    runs = math.prod(shape) // size if size else 0
    return runs * (n * (size // m) + min(n, size % m))


def kept_counts(tree: Params, n: int, m: int) -> Params:
    """``kept_count`` of every leaf of ``tree`` (arrays or anything with a shape), as Python ints."""
    return jax.tree.map(lambda leaf: kept_count(np.shape(leaf), n, m), tree)


def _host_grouped(mask: Any, m: int) -> np.ndarray:
    """A 0/1 ``mask`` (..., I, O) as bool (..., I / m, m, O), cut groups padded with False (host-side)."""
    mask = np.asarray(mask)
    _check_shape(mask.shape)
    return _grouped(mask != 0, m, False, np)


def group_kept(mask: Any, m: int) -> np.ndarray:
    """Kept entries of every group of a 0/1 ``mask`` (..., I, O), as int64 (..., ceil(I / m), O); host-side."""
    return _host_grouped(mask, m).sum(axis=-2, dtype=np.int64)


def group_sizes(size: int, m: int) -> np.ndarray:
    """Real entries of each group of an input dimension of ``size``: m, ..., m, then r = size mod m if r > 0."""
    sizes = np.full(math.ceil(size / m), m, np.int64)
    if size % m:
        sizes[-1] = size % m
    return sizes


def is_nm(mask: Any, n: int, m: int) -> bool:
    """Whether every group of ``mask`` keeps exactly min(N, its size): an N:M mask of this module's rule."""
    mask = np.asarray(mask)
    expected = np.minimum(n, group_sizes(mask.shape[GROUP_AXIS], m)).reshape(-1, 1)
    return bool(np.all(group_kept(mask, m) == expected))


def _flat_groups(mask: np.ndarray, m: int) -> np.ndarray:
    """A 0/1 ``mask`` (..., I, O) as bool (groups, m), groups in C order of (..., I / m, O), cut groups padded."""
    return np.moveaxis(_host_grouped(mask, m), -2, -1).reshape(-1, m)


def _slots_used(shape: tuple[int, ...], n: int, m: int) -> np.ndarray:
    """(groups, n) bool: which of a group's n index slots hold a kept entry (min(n, its size) of them)."""
    per_group = np.minimum(n, group_sizes(shape[GROUP_AXIS], m)).reshape(-1, 1)  # along I / m, same for every O
    counts = np.broadcast_to(per_group, shape[:-2] + (per_group.shape[0], shape[-1])).reshape(-1, 1)
    return np.arange(n) < counts


def group_indices(mask: Any, n: int, m: int) -> np.ndarray:
    """uint8 (groups, n): each group's kept positions (0..m-1) ascending, unused slots 0 (a cut group of r < n
    entries uses r), groups in C order of (..., I / m, O). ``mask`` must be N:M; ``from_group_indices`` inverts it."""
    mask = np.asarray(mask)
    if not is_nm(mask, n, m):
        raise ValueError(f"mask of shape {mask.shape} is not {n}:{m}: some group keeps other than min({n}, its size)")
    groups = _flat_groups(mask, m)
    order = np.argsort(~groups, axis=1, kind="stable")[:, :n]  # kept positions first, each run ascending
    return np.where(_slots_used(mask.shape, n, m), order, 0).astype(np.uint8)


def from_group_indices(indices: np.ndarray, shape: tuple[int, ...], n: int, m: int) -> np.ndarray:
    """The bool mask of ``shape`` that ``group_indices`` gives ``indices``; a ValueError if they are not
    such indices (out of the group, not ascending, unused slots not 0)."""
    shape = tuple(int(s) for s in shape)
    used = _slots_used(shape, n, m)
    indices = np.asarray(indices, np.int64)
    if indices.shape != used.shape:
        raise ValueError(f"N:M indices have shape {indices.shape}, expected {used.shape}")
    size = shape[GROUP_AXIS]
    cut = np.broadcast_to(group_sizes(size, m).reshape(-1, 1), shape[:-2] + (math.ceil(size / m), shape[-1]))
    if (np.any(np.where(used, indices >= cut.reshape(-1, 1), indices != 0))
            or np.any((np.diff(indices, axis=1) <= 0) & used[:, 1:])):
        raise ValueError("N:M indices are not ascending positions inside their groups (unused slots 0)")
    groups = np.zeros((used.shape[0], m + 1), bool)
    np.put_along_axis(groups, np.where(used, indices, m), True, axis=1)  # unused slots land in column m
    grouped = np.moveaxis(groups[:, :m].reshape(shape[:-2] + (-1, shape[-1], m)), -1, -2)
    return grouped.reshape(shape[:-2] + (-1, shape[-1]))[..., :size, :]
