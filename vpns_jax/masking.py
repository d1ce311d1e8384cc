"""Score-based weight masks: which leaves are prunable, score init, thresholds, straight-through masks.

Scores and masks are nested dicts holding only the prunable kernels (every conv
and dense kernel; never biases or BatchNorm), at the same paths as in the
weights dict. A density d (the keep ratio) prunes k = int((1 - d) * N) entries
per threshold group: one group over all prunable leaves (``'global'``, VPNs and
the authors' HYDRA) or one group per leaf (``'layer'``, the original HYDRA).
The threshold tau is the k-th smallest |s| of the group and an entry is kept
iff |s| > tau (ties at tau are pruned); k = 0 keeps everything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpns_jax.models import functional

Params = dict[Any, Any]
THRESHOLD_SCOPES = ("global", "layer")
PRUNABLE_KINDS = (functional.CONV_KERNEL, functional.DENSE_KERNEL)

# Bit patterns of non-negative float32 values sort like the values, so an exact
# k-th smallest is a binary search over [0, bits(+inf)]: 31 counting passes, no sort.
_INF_BITS = 0x7F800000
_SEARCH_ROUNDS = 31


def prunable_paths(kinds: Params) -> list[tuple[Any, ...]]:
    """Paths (in the weights dict) of every conv and dense kernel."""
    flat = traverse_util.flatten_dict(kinds)
    return [path for path, kind in flat.items() if kind in PRUNABLE_KINDS]


def init_scores(weights: Params, kinds: Params) -> Params:
    """HYDRA's scaled score init: s = sqrt(6 / fan_in) * W / max|W|, per layer.

    fan_in is kh*kw*in for an HWIO conv kernel and in for an (in, out) dense
    kernel, i.e. the product of all but the last dimension in both layouts.
    """
    flat = traverse_util.flatten_dict(weights)
    scores = {}
    for path in prunable_paths(kinds):
        w = flat[path]
        fan_in = math.prod(w.shape[:-1])
        peak = jnp.max(jnp.abs(w))
        scale = jnp.where(peak > 0, math.sqrt(6.0 / fan_in) / jnp.where(peak > 0, peak, 1.0), 0.0)
        scores[path] = (w * scale).astype(jnp.float32)
    return traverse_util.unflatten_dict(scores)


def validate_density(density: float) -> float:
    """Returns ``density`` if it is a keep ratio in (0, 1]; a one-line error otherwise."""
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise ValueError(f"density {density!r} is not a keep ratio in (0, 1]: use e.g. 0.1 to keep 10% of the weights")
    return float(density)


def prune_counts(scores: Params, density: float, scope: str = "global") -> np.ndarray:
    """Entries to prune per threshold group, k = int((1 - d) * N) in float64 as torch computes it."""
    density = validate_density(density)
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(scores)]
    if scope == "global":
        sizes = [sum(sizes)]
    elif scope != "layer":
        raise ValueError(f"threshold scope {scope!r} is unknown: use one of {THRESHOLD_SCOPES}")
    return np.array([int((1.0 - density) * n) for n in sizes], dtype=np.int32)


def _groups(num_leaves: int, scope: str) -> list[int]:
    if scope == "global":
        return [0] * num_leaves
    if scope == "layer":
        return list(range(num_leaves))
    raise ValueError(f"threshold scope {scope!r} is unknown: use one of {THRESHOLD_SCOPES}")


def kth_smallest(values: Sequence[jax.Array], groups: Sequence[int], ks: jax.Array) -> jax.Array:
    """Exact k-th smallest (1-based) of the non-negative ``values`` in each group.

    ``groups[i]`` is the group of ``values[i]``; ``ks`` holds one k >= 1 per group.
    A binary search on float32 bit patterns: each round counts entries <= the
    candidate, so the cost is O(N) per round and nothing is sorted.
    """
    num_groups = ks.shape[0]
    bits = [jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32) for v in values]
    group_index = jnp.asarray(groups, dtype=jnp.int32)

    def count_at_most(candidate: jax.Array) -> jax.Array:
        per_leaf = jnp.stack([jnp.sum(b <= candidate[g], dtype=jnp.int32) for b, g in zip(bits, groups)])
        return jnp.zeros(num_groups, jnp.int32).at[group_index].add(per_leaf)

    def search_round(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = count_at_most(mid) >= ks
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo = jnp.zeros(num_groups, jnp.int32)
    hi = jnp.full(num_groups, _INF_BITS, jnp.int32)
    lo, _ = jax.lax.fori_loop(0, _SEARCH_ROUNDS, search_round, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def thresholds(scores: Params, ks: jax.Array, scope: str = "global") -> jax.Array:
    """Per-group threshold tau on |s|: the k-th smallest, or -1 (keep all) where k = 0."""
    magnitudes = [jnp.abs(s) for s in jax.tree.leaves(scores)]
    ks = jnp.asarray(ks, jnp.int32)
    tau = kth_smallest(magnitudes, _groups(len(magnitudes), scope), jnp.maximum(ks, 1))
    return jnp.where(ks >= 1, tau, -1.0)


def _leaf_thresholds(scores: Params, ks: jax.Array, scope: str) -> list[jax.Array]:
    tau = jax.lax.stop_gradient(thresholds(scores, ks, scope))
    return [tau[g] for g in _groups(len(jax.tree.leaves(scores)), scope)]


def masks_from_scores(scores: Params, ks: jax.Array, scope: str = "global") -> Params:
    """Binary float32 masks 1[|s| > tau], without gradient."""
    leaves, treedef = jax.tree.flatten(scores)
    taus = _leaf_thresholds(scores, ks, scope)
    masks = [(jnp.abs(s) > t).astype(jnp.float32) for s, t in zip(leaves, taus)]
    return jax.tree.unflatten(treedef, masks)


def ste_masks(scores: Params, ks: jax.Array, scope: str = "global") -> Params:
    """Masks whose forward value is exactly 1[|s| > tau] and whose gradient w.r.t. |s| is the identity.

    So dL/ds = sign(s) * W * dL/dw, for pruned entries too. Written as
    m + (a - stop_gradient(a)) rather than a + stop_gradient(m - a), which can
    round 1 to 0.99999994 in float32.
    """
    leaves, treedef = jax.tree.flatten(scores)
    taus = _leaf_thresholds(scores, ks, scope)
    masks = []
    for s, t in zip(leaves, taus):
        a = jnp.abs(s)
        hard = (a > t).astype(a.dtype)
        masks.append(hard + (a - jax.lax.stop_gradient(a)))
    return jax.tree.unflatten(treedef, masks)


def apply_masks(weights: Params, masks: Params) -> Params:
    """Weights with every masked kernel multiplied by its mask; other leaves as they are."""
    flat = traverse_util.flatten_dict(weights)
    for path, mask in traverse_util.flatten_dict(masks).items():
        flat[path] = flat[path] * mask
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """Kept entries of one prunable kernel."""

    name: str
    size: int
    kept: int

    @property
    def density(self) -> float:
        return self.kept / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall sparsity, over the prunable kernels and over every model parameter."""

    layers: tuple[LayerSparsity, ...]
    prunable_size: int
    prunable_kept: int
    model_size: int
    model_kept: int

    @property
    def prunable_sparsity(self) -> float:
        """Fraction of pruned entries among conv and dense kernels (the paper's sparsity)."""
        return 1.0 - self.prunable_kept / self.prunable_size

    @property
    def model_sparsity(self) -> float:
        """Fraction of pruned entries among all parameters (biases and BatchNorm count as kept)."""
        return 1.0 - self.model_kept / self.model_size

    def format(self) -> str:
        """A plain-text table, one row per prunable kernel plus the two labelled totals."""
        width = max([len(layer.name) for layer in self.layers] + [len("layer")])
        rows = [f"{'layer':<{width}}  {'size':>12}  {'kept':>12}  {'density':>8}"]
        for layer in self.layers:
            rows.append(f"{layer.name:<{width}}  {layer.size:>12,}  {layer.kept:>12,}  {layer.density:>8.4f}")
        rows.append(
            f"sparsity over prunable kernels: {self.prunable_sparsity:.4%} "
            f"({self.prunable_size - self.prunable_kept:,} of {self.prunable_size:,} pruned)"
        )
        rows.append(
            f"sparsity over all parameters:   {self.model_sparsity:.4%} "
            f"({self.model_size - self.model_kept:,} of {self.model_size:,} pruned)"
        )
        return "\n".join(rows)


def sparsity_report(weights: Params, masks: Params) -> SparsityReport:
    """Counts the entries that ``masks`` keeps, per layer and overall."""
    flat_masks = traverse_util.flatten_dict(masks)
    model_size = sum(int(np.prod(w.shape)) for w in jax.tree.leaves(weights))
    layers = []
    for path, mask in flat_masks.items():
        kept = int(np.count_nonzero(np.asarray(mask)))
        layers.append(LayerSparsity(".".join(str(p) for p in path), int(np.prod(mask.shape)), kept))
    prunable_size = sum(layer.size for layer in layers)
    prunable_kept = sum(layer.kept for layer in layers)
    return SparsityReport(
        layers=tuple(layers),
        prunable_size=prunable_size,
        prunable_kept=prunable_kept,
        model_size=model_size,
        model_kept=model_size - (prunable_size - prunable_kept),
    )
