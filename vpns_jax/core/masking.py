"""Score-based weight masks: which leaves are prunable, score init, thresholds, straight-through masks.

Scores and masks are nested dicts of the prunable kernels (every conv and dense kernel) at their weights paths.
Density d prunes k = int((1 - d) * N) entries per threshold group (``'global'``: all leaves, VPNs and the authors'
HYDRA; ``'layer'``: each leaf, the original HYDRA); an entry is kept iff |s| > tau, the group's k-th smallest |s|
(ties at tau pruned; k = 0 keeps all). ``min_layer_density`` f > 0 lowers each leaf's threshold to its own at
density f, so a leaf keeps at least ceil(f * n) entries (ties aside) and d becomes a lower bound (docs/methods.md,
"Semantics worth knowing").
"""

from __future__ import annotations

import dataclasses
import functools
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

# Bit patterns of non-negative floats sort like the values, so an exact k-th smallest is a search over integer
# candidates that only counts entries <= each: no sort. A memory-bound pass costs about the same for 7 candidates
# as for one, so each round counts _PIVOTS of them; a sorted strided sample seeds the first (Floyd-Rivest).
_PIVOTS = 7
_SAMPLE_SIZE = 1 << 14
_SAMPLE_SIGMAS = 4.0
# Leaves smaller than this are concatenated per group and reduced as one array (fewer reductions compile faster);
# larger leaves are reduced in place.
_SMALL_LEAF = 1 << 18


def prunable_paths(kinds: Params) -> list[tuple[Any, ...]]:
    """Paths (in the weights dict) of every conv and dense kernel."""
    flat = traverse_util.flatten_dict(kinds)
    return [path for path, kind in flat.items() if kind in PRUNABLE_KINDS]


def init_scores(weights: Params, kinds: Params) -> Params:
    """HYDRA's scaled score init, s = sqrt(6 / fan_in) * W / max|W| per layer, fan_in the product of all but the
    last kernel dimension; float32 scores, float64 for float64 weights."""
    flat = traverse_util.flatten_dict(weights)
    scores = {}
    for path in prunable_paths(kinds):
        w = flat[path]
        fan_in = math.prod(w.shape[:-1])
        peak = jnp.max(jnp.abs(w))
        scale = jnp.where(peak > 0, math.sqrt(6.0 / fan_in) / jnp.where(peak > 0, peak, 1.0), 0.0)
        scores[path] = (w * scale).astype(jnp.promote_types(w.dtype, jnp.float32))
    return traverse_util.unflatten_dict(scores)


def validate_density(density: float) -> float:
    """Returns ``density`` if it is a keep ratio in (0, 1]; a one-line error otherwise."""
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise ValueError(f"density {density!r} is not a keep ratio in (0, 1]: use e.g. 0.1 to keep 10% of the weights")
    return float(density)


def validate_min_layer_density(value: float) -> float:
    """Returns ``value`` if it is a layer floor in [0, 1) (0 = no floor); a one-line error otherwise."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) < 1.0):
        raise ValueError(f"min_layer_density {value!r} is not a fraction in [0, 1): use 0 for no floor, or e.g. "
                         "0.01 to keep at least 1% of every layer")
    return float(value)


def floor_prune_counts(scores: Params, min_layer_density: float) -> np.ndarray:
    """Per leaf, the most entries the layer floor lets go: int((1 - f) * n), as ``prune_counts`` at density f with
    scope 'layer' (float64, so f = 0.9 keeps all 10 of n = 10, as density 0.9 would)."""
    floor = validate_min_layer_density(min_layer_density)
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(scores)]
    return np.array([int((1.0 - floor) * n) for n in sizes], dtype=np.int32)


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


def _sample_pivots(bits: list[jax.Array], groups: Sequence[int], group: int, k: jax.Array) -> jax.Array:
    """_PIVOTS candidate bit patterns around the k-th smallest of ``group``: quantiles of a strided sample,
    evenly spaced over _SAMPLE_SIGMAS binomial standard deviations either side of the sample rank of k."""
    members = [b for b, g in zip(bits, groups) if g == group]
    total = sum(b.size for b in members)
    stride = max(1, total // _SAMPLE_SIZE)
    sample = jnp.sort(jnp.concatenate([b[::stride] for b in members]))
    size = sample.shape[0]
    rank = k.astype(jnp.float32) * size / total
    spread = _SAMPLE_SIGMAS * jnp.sqrt(rank * (1.0 - rank / size)) + 1.0
    offsets = jnp.linspace(-1.0, 1.0, _PIVOTS)
    positions = jnp.clip(rank + offsets * spread, 0, size - 1).astype(jnp.int32)
    return sample[positions]


def _reduce_flat(operands: tuple[jax.Array, ...], inits: tuple[int, ...], combine) -> tuple[jax.Array, ...]:
    """One variadic reduction of same-shaped flat integer arrays to scalars; ``combine`` merges two tuples."""
    return jax.lax.reduce(operands, tuple(jnp.asarray(i, o.dtype) for i, o in zip(inits, operands)), combine, (0,))


def _count_at_most(bits: list[jax.Array], groups: Sequence[int], num_groups: int, pivots: jax.Array) -> jax.Array:
    """(groups, pivots) counts of entries <= each group's pivots, one variadic reduction per flat array."""
    per_group = jnp.zeros((num_groups, pivots.shape[1]), jnp.int32)
    for b, g in zip(bits, groups):
        operands = tuple((b <= pivots[g, i]).astype(jnp.int32) for i in range(pivots.shape[1]))
        counts = _reduce_flat(operands, (0,) * len(operands), lambda x, y: tuple(u + v for u, v in zip(x, y)))
        per_group = per_group.at[g].add(jnp.stack(counts))
    return per_group


@functools.partial(jax.jit, static_argnames="groups")
def kth_smallest(values: Sequence[jax.Array], groups: tuple[int, ...], ks: jax.Array) -> jax.Array:
    """Exact k-th smallest (1-based) of the non-negative ``values`` in each group (``groups[i]`` is that of
    ``values[i]``; ``ks``: one k >= 1 per group). Jitted, so eager callers compile the search once per shape.

    Each group narrows a bracket of bit patterns lo < hi with count(<= lo) < k <= count(<= hi), a pass per round
    (at most 11), until the k-th entry is its bracket's smallest or largest, which one min/max pass reads off.
    """
    num_groups = ks.shape[0]
    arrays, groups = _search_leaves(values, groups, num_groups)
    # float64 searches int64 patterns (under jax_enable_x64); narrower floats widen to float32 exactly.
    float_dtype = jnp.float64 if jnp.result_type(*arrays) == jnp.float64 else jnp.float32
    bit_dtype = jnp.int64 if float_dtype == jnp.float64 else jnp.int32
    bits = [jax.lax.bitcast_convert_type(a.astype(float_dtype), bit_dtype) for a in arrays]
    search = _BitSearch(bits, tuple(groups), jnp.asarray(groups, dtype=jnp.int32), num_groups,
                        jnp.asarray(ks, jnp.int32))
    ks, big = search.ks, search.largest_bits
    # Splitting the bit range into _PIVOTS + 1 parts per round finishes any input in this many rounds.
    max_rounds = math.ceil((8 * jnp.dtype(bit_dtype).itemsize - 1) / math.log2(_PIVOTS + 1))

    def search_round(state):
        bracket, rounds = state
        return search.narrow(bracket, search.split_evenly(bracket)), rounds + 1

    def keep_searching(state) -> jax.Array:
        bracket, rounds = state
        return jnp.any(~search.finished(bracket)) & (rounds < max_rounds)

    sizes = jnp.zeros(num_groups, jnp.int32).at[search.group_index].add(jnp.asarray([b.size for b in bits], jnp.int32))
    smallest, largest = search.per_group_extremes([_min_max(b, b) for b in bits])
    bracket = (smallest - 1, largest, jnp.zeros(num_groups, jnp.int32), sizes)
    sampled = jnp.stack([_sample_pivots(bits, groups, g, ks[g]) for g in range(num_groups)])
    bracket = search.narrow(bracket, sampled)
    bracket, _ = jax.lax.while_loop(keep_searching, search_round, (bracket, 0))
    lo, hi, c_lo, c_hi = bracket
    # The k-th entry is the smallest above lo when lo's count is k - 1 (or hi is lo + 1), else the largest up to hi.
    above_lo, up_to_hi = search.per_group_extremes([
        _min_max(jnp.where(b > lo[g], b, big), jnp.where(b <= hi[g], b, -1))
        for b, g in zip(bits, groups)
    ])
    answer = jnp.where((c_lo == ks - 1) | (hi - lo <= 1), above_lo, up_to_hi)
    return jax.lax.bitcast_convert_type(answer, float_dtype)


def _search_leaves(values: Sequence[jax.Array], groups: tuple[int, ...],
                   num_groups: int) -> tuple[list[jax.Array], list[int]]:
    """The flat arrays the search reads and their groups: large leaves alone, a group's small ones concatenated."""
    arrays, array_groups = [], []
    for group in range(num_groups):
        members = [v.reshape(-1) for v, g in zip(values, groups) if g == group]
        small = [m for m in members if m.size < _SMALL_LEAF]
        for array in [m for m in members if m.size >= _SMALL_LEAF] + ([jnp.concatenate(small)] if small else []):
            arrays.append(array)
            array_groups.append(group)
    return arrays, array_groups


def _min_max(smaller: jax.Array, larger: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _reduce_flat((smaller, larger), (jnp.iinfo(smaller.dtype).max, -1),
                        lambda x, y: (jnp.minimum(x[0], y[0]), jnp.maximum(x[1], y[1])))


@dataclasses.dataclass(frozen=True)
class _BitSearch:
    """The bracket arithmetic of ``kth_smallest`` over the integer bit patterns of non-negative floats.

    A bracket is (lo, hi, count(<= lo), count(<= hi)), one entry per group.
    """

    bits: list[jax.Array]
    groups: tuple[int, ...]  # the group of each array in ``bits``
    group_index: jax.Array
    num_groups: int
    ks: jax.Array

    def per_group_extremes(self, per_leaf: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
        smallest, largest = (jnp.stack(column) for column in zip(*per_leaf))
        bit_dtype = self.bits[0].dtype
        return (jnp.full(self.num_groups, self.largest_bits, bit_dtype).at[self.group_index].min(smallest),
                jnp.full(self.num_groups, -1, bit_dtype).at[self.group_index].max(largest))

    @property
    def largest_bits(self) -> int:
        """The largest value of the bit patterns' integer type."""
        return int(jnp.iinfo(self.bits[0].dtype).max)

    def finished(self, bracket) -> jax.Array:
        lo, hi, c_lo, c_hi = bracket
        return (c_lo == self.ks - 1) | (c_hi == self.ks) | (hi - lo <= 1)

    def narrow(self, bracket, pivots: jax.Array):
        lo, hi, c_lo, c_hi = bracket
        pivots = jnp.clip(pivots, lo[:, None] + 1, jnp.maximum(hi - 1, lo + 1)[:, None])
        counts = _count_at_most(self.bits, self.groups, self.num_groups, pivots)
        enough = counts >= self.ks[:, None]
        # The largest pivot short of k raises lo; the smallest pivot reaching k lowers hi.
        new_lo = jnp.max(jnp.where(enough, -1, pivots), axis=1)
        new_c_lo = jnp.max(jnp.where(enough, -1, counts), axis=1)
        new_hi = jnp.min(jnp.where(enough, pivots, self.largest_bits), axis=1)
        new_c_hi = jnp.min(jnp.where(enough, counts, jnp.iinfo(jnp.int32).max), axis=1)
        active = ~self.finished(bracket)
        raise_lo, lower_hi = active & (new_lo > lo), active & (new_hi < hi)
        return (jnp.where(raise_lo, new_lo, lo), jnp.where(lower_hi, new_hi, hi),
                jnp.where(raise_lo, new_c_lo, c_lo), jnp.where(lower_hi, new_c_hi, c_hi))

    @staticmethod
    def split_evenly(bracket) -> jax.Array:
        lo, hi, _, _ = bracket
        step = jnp.maximum((hi - lo) // (_PIVOTS + 1), 1)
        return lo[:, None] + step[:, None] * jnp.arange(1, _PIVOTS + 1, dtype=lo.dtype)


def thresholds(scores: Params, ks: jax.Array, scope: str = "global") -> jax.Array:
    """Per-group threshold tau on |s|: the k-th smallest, or -1 (keep all) where k = 0."""
    magnitudes = [jnp.abs(s) for s in jax.tree.leaves(scores)]
    ks = jnp.asarray(ks, jnp.int32)
    tau = kth_smallest(magnitudes, tuple(_groups(len(magnitudes), scope)), jnp.maximum(ks, 1))
    return jnp.where(ks >= 1, tau, -1.0)


def _leaf_thresholds(scores: Params, ks: jax.Array, scope: str, min_layer_density: float) -> list[jax.Array]:
    tau = jax.lax.stop_gradient(thresholds(scores, ks, scope))
    taus = [tau[g] for g in _groups(len(jax.tree.leaves(scores)), scope)]
    if not validate_min_layer_density(min_layer_density):
        return taus  # no floor: the authors' rule, not one operation more
    # The floor's counts depend only on shapes and the (static) floor, so they are constants under jit.
    floor = jax.lax.stop_gradient(thresholds(scores, floor_prune_counts(scores, min_layer_density), "layer"))
    # The smaller threshold keeps what either rule keeps: the floor only adds entries to a leaf.
    return [jnp.minimum(t, floor[i]) for i, t in enumerate(taus)]


def masks_from_scores(scores: Params, ks: jax.Array, scope: str = "global", min_layer_density: float = 0.0) -> Params:
    """Binary float32 masks 1[|s| > tau], without gradient; ``min_layer_density`` (a Python float, static under
    jit) is the layer floor of the module docstring."""
    leaves, treedef = jax.tree.flatten(scores)
    taus = _leaf_thresholds(scores, ks, scope, min_layer_density)
    masks = [(jnp.abs(s) > t).astype(jnp.float32) for s, t in zip(leaves, taus)]
    return jax.tree.unflatten(treedef, masks)


def ste_masks(scores: Params, ks: jax.Array, scope: str = "global", min_layer_density: float = 0.0) -> Params:
    """Masks whose forward value is exactly 1[|s| > tau] and whose gradient w.r.t. |s| is the identity, so
    dL/ds = sign(s) * W * dL/dw for pruned entries too; ``min_layer_density`` as in ``masks_from_scores``.

    m + (a - stop_gradient(a)), not a + stop_gradient(m - a), which can round 1 to 0.99999994 in float32.
    """
    leaves, treedef = jax.tree.flatten(scores)
    taus = _leaf_thresholds(scores, ks, scope, min_layer_density)
    masks = []
    for s, t in zip(leaves, taus):
        a = jnp.abs(s)
        hard = (a > t).astype(a.dtype)
        masks.append(hard + (a - jax.lax.stop_gradient(a)))
    return jax.tree.unflatten(treedef, masks)


def collapsed_layers(masks: Params) -> list[str]:
    """Dotted names of the mask leaves that keep nothing (weight masks: kernels; channel masks: groups): such a
    layer passes no signal, so on the network's only path the output does not depend on the input."""
    flat = traverse_util.flatten_dict(masks) if masks else {}
    return [".".join(str(p) for p in path) for path, mask in flat.items()
            if np.size(mask) and not np.any(np.asarray(mask))]


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
