"""Exact 0/1 masks from an importance tree: kept counts, top-k with deterministic ties, the layer floor, N:M, and
LTH's round counts.

Host-side numpy, exact: a density d keeps N - int((1 - d) * N) entries per group (``masking.prune_counts``),
and among equal importances the entry first in the group's flattened order (leaves in ``jax.tree`` order, each
in C order) is kept. docs/methods.md (layer collapse) explains the layer floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vpns_jax.core import masking, nm

Params = dict[Any, Any]


def keep_counts(importance: Params, density: float, scope: str = "global") -> np.ndarray:
    """Entries to keep per group: N - int((1 - density) * N), as ``masking.prune_counts``."""
    prune = masking.prune_counts(importance, density, scope).astype(np.int64)
    sizes = np.array([int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(importance)], dtype=np.int64)
    if scope == "global":
        sizes = np.array([sizes.sum()], dtype=np.int64)
    return sizes - prune


def _group_members(num_leaves: int, scope: str) -> list[list[int]]:
    if scope == "global":
        return [list(range(num_leaves))]
    if scope == "layer":
        return [[i] for i in range(num_leaves)]
    raise ValueError(f"threshold scope {scope!r} is unknown: use one of {masking.THRESHOLD_SCOPES}")


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest ``values``; ties go to the lowest index.

    O(N): one partition finds the k-th largest value t, everything above t is
    kept, and the remaining places go to the first entries equal to t.
    """
    n = values.size
    if k <= 0:
        return np.zeros(n, bool)
    if k >= n:
        return np.ones(n, bool)
    t = np.partition(values, n - k)[n - k]
    keep = values > t
    missing = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(values == t)[:missing]] = True
    return keep


def keep_largest(importance: Params, keep: np.ndarray | Sequence[int], scope: str = "global",
                 min_layer_density: float = 0.0) -> Params:
    """Float32 0/1 numpy masks shaped like ``importance`` keeping exactly ``keep[g]`` entries per group.

    The largest importances are kept; any sign is allowed; ties as in the module docstring. ``scope`` is
    'global' (one group, ``keep`` of length 1) or 'layer' (one group per leaf). ``min_layer_density`` f (0:
    none) is the layer floor: a leaf of n entries keeping fewer than n - int((1 - f) * n) keeps its own top
    that many instead (ties again to the first), so every leaf keeps max(its share, its floor).
    """
    leaves, treedef = jax.tree.flatten(importance)
    arrays = [np.asarray(leaf) for leaf in leaves]
    groups = _group_members(len(arrays), scope)
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    if keep.shape[0] != len(groups):
        raise ValueError(f"keep has {keep.shape[0]} counts but scope {scope!r} has {len(groups)} groups")
    masks: list[np.ndarray | None] = [None] * len(arrays)
    for count, members in zip(keep, groups):
        values = np.concatenate([arrays[i].ravel() for i in members]) if members else np.zeros(0, np.float32)
        if not 0 <= count <= values.size:
            raise ValueError(f"cannot keep {count} entries of a group of {values.size}")
        if not np.all(np.isfinite(values)):
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            raise ValueError(f"importance has {bad} non-finite entries (nan/inf); masks need finite scores")
        selected = _top_k(values, int(count)).astype(np.float32)
        offset = 0
        for i in members:
            size = arrays[i].size
            masks[i] = selected[offset : offset + size].reshape(arrays[i].shape)
            offset += size
    floor = masking.validate_min_layer_density(min_layer_density)
    if floor:
        masks = _with_floor(arrays, masks, masking.floor_prune_counts(importance, floor))
    return jax.tree.unflatten(treedef, masks)


_nm_masks = jax.jit(nm.nm_masks, static_argnums=(1, 2))  # one compile per kernel shapes, not one per op


def keep_nm(importance: Params, n: int, m: int) -> Params:
    """Float32 0/1 numpy masks keeping the N largest |importance| of every group of M along each kernel's
    input dimension (``nm.nm_masks``: ties to the lower input index, a cut group of r < M keeps min(N, r))."""
    return jax.tree.map(lambda mask: np.asarray(mask, np.float32), _nm_masks(importance, *nm.check_nm(n, m)))


def _with_floor(arrays: list[np.ndarray], masks: list[np.ndarray], most_pruned: np.ndarray) -> list[np.ndarray]:
    """Each leaf's mask, or its own top n - most_pruned entries where it keeps fewer."""
    out = []
    for values, mask, most in zip(arrays, masks, most_pruned):
        floor = values.size - int(most)
        # The group's selection in this leaf is the leaf's top entries in the same order (ties to the first),
        # so the leaf's own top ``floor`` holds it: replacing the mask only adds entries.
        if np.count_nonzero(mask) < floor:
            mask = _top_k(values.ravel(), floor).astype(np.float32).reshape(values.shape)
        out.append(mask)
    return out


def _check_fraction(fraction: float) -> float:
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"pruning fraction {fraction!r} must be in (0, 1), e.g. 0.2 for LTH's 20% per round")
    return float(fraction)


def _lth_prune_count(kept: int, fraction: float) -> int:
    # torch's _compute_nparams_toprune: Python round (half to even) of amount * unpruned.
    return round(fraction * kept)


def lth_schedule(num_weights: int, rounds: int, fraction: float = 0.2) -> list[int]:
    """Kept counts after IMP rounds 1 ... ``rounds`` (``saliency.lth_round``) on ``num_weights`` entries: each
    round prunes round(fraction * kept), as torch's ``prune.global_unstructured`` with ``L1Unstructured``."""
    fraction = _check_fraction(fraction)
    kept, counts = int(num_weights), []
    for _ in range(rounds):
        kept -= _lth_prune_count(kept, fraction)
        counts.append(kept)
    return counts


def lth_rounds_for(density: float, fraction: float = 0.2) -> int:
    """Fewest IMP rounds r whose nominal density (1 - fraction)**r is at most ``density``.

    The trainer runs this many rounds for its smallest requested density and
    reports every round on the way, so each requested density has a round at or
    below it. A relative tolerance of 1e-9 absorbs float error (0.64 -> 2 rounds,
    not 3). Density 0.1 needs 11 rounds (0.086); the paper's plots stop after 10
    (0.107), which ``lth_rounds_for(0.8 ** 10)`` gives. Exact kept counts differ
    from the nominal density by the per-round rounding (``lth_schedule``).
    """
    density = masking.validate_density(density)
    fraction = _check_fraction(fraction)
    rounds = 0
    while (1.0 - fraction) ** rounds > density * (1.0 + 1e-9):
        rounds += 1
    return rounds


__all__ = ["keep_counts", "keep_largest", "keep_nm", "lth_rounds_for", "lth_schedule"]
