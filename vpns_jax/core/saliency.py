"""Importance scores of the prunable kernels for one-shot masks: magnitude, random, SNIP, GraSP, SynFlow; and the
iterative pruners built on them (an LTH round, iterative SynFlow).

Each score is a tree shaped like the masking scores (the prunable conv and dense kernels at their weight
paths); ``selection.keep_largest`` turns it into exact masks. docs/method.md (section 7.2) gives each
baseline's recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpns_jax.core import masking, selection

Params = dict[Any, Any]
# loss_fn(weights, batch, temperature) -> scalar; the logits are divided by temperature.
LossFn = Callable[[Params, Any, float], jax.Array]
# apply_fn(weights, batch_stats, x) -> model output, evaluated as the model runs at test time.
ApplyFn = Callable[[Params, Params, jax.Array], jax.Array]

# Below every valid importance of the entries that may still be kept, so that an
# entry pruned earlier is never chosen while a kept entry is available.
_PRUNED = -1.0


def _prunable(weights: Params, kinds: Params) -> Params:
    flat = traverse_util.flatten_dict(weights)
    return traverse_util.unflatten_dict({path: flat[path] for path in masking.prunable_paths(kinds)})


def _merge(weights: Params, kernels: Params) -> Params:
    """``weights`` with the leaves of ``kernels`` put in at their paths."""
    flat = traverse_util.flatten_dict(weights)
    flat.update(traverse_util.flatten_dict(kernels))
    return traverse_util.unflatten_dict(flat)


def _ones_like(tree: Params) -> Params:
    return jax.tree.map(lambda x: np.ones(np.shape(x), np.float32), tree)


def _check_masks(masks: Params, kernels: Params) -> Params:
    """``masks`` as float32 numpy, after checking that they cover ``kernels`` and are binary."""
    if set(traverse_util.flatten_dict(masks)) != set(traverse_util.flatten_dict(kernels)):
        raise ValueError("masks must hold exactly the prunable kernels (conv and dense), at their weight paths")
    masks = jax.tree.map(lambda m: np.asarray(m, np.float32), masks)
    flat_kernels = traverse_util.flatten_dict(kernels)
    for path, mask in traverse_util.flatten_dict(masks).items():
        if mask.shape != np.shape(flat_kernels[path]):
            raise ValueError(f"mask at {path} has shape {mask.shape}, its kernel {np.shape(flat_kernels[path])}")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"mask at {path} is not binary (0/1)")
    return masks


def _kept(masks: Params) -> int:
    return int(sum(np.count_nonzero(m) for m in jax.tree.leaves(masks)))


def _restrict(importance: Params, masks: Params) -> Params:
    """Importance of kept entries as is, pruned entries below any kept one (importance >= 0)."""
    return jax.tree.map(lambda s, m: np.where(m > 0, np.asarray(s, np.float32), _PRUNED), importance, masks)


def magnitude_importance(weights: Params, kinds: Params) -> Params:
    """|W| of every prunable kernel: global magnitude pruning as OMP and LTH use (not HYDRA's scaled init)."""
    return jax.tree.map(jnp.abs, _prunable(weights, kinds))


def random_importance(kinds_or_like: Params, key: jax.Array, kinds: Params | None = None) -> Params:
    """I.i.d. U[0, 1) float32 importance per entry, for the Random baseline.

    ``kinds_or_like`` gives the shapes: a tree shaped like the importance (e.g.
    ``magnitude_importance(weights, kinds)`` or a mask tree), or the full weights
    together with ``kinds``, which then selects the prunable kernels. With a
    per-layer ``selection.keep_largest`` every layer keeps exactly its share: the
    reference's per-layer Bernoulli(d) mask has these counts only in expectation.
    """
    like = kinds_or_like if kinds is None else _prunable(kinds_or_like, kinds)
    leaves, treedef = jax.tree.flatten(like)
    if any(not hasattr(leaf, "shape") for leaf in leaves):
        raise ValueError("random_importance needs arrays for shapes: pass weights with kinds=, or an importance tree")
    keys = jax.random.split(key, max(len(leaves), 1))
    drawn = [jax.random.uniform(k, tuple(leaf.shape), jnp.float32) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, drawn)


def lth_round(weights: Params, masks: Params | None, kinds: Params, fraction: float = 0.2, *,
              min_layer_density: float = 0.0) -> Params:
    """One IMP round: prune round(fraction * kept) of the kept entries with the smallest |W| globally.

    As torch's ``prune.global_unstructured(..., L1Unstructured, amount=fraction)``
    applied again each round: the count is taken over the entries that
    ``masks`` still keeps (``None``: all of them), entries already pruned stay
    pruned, and |W| ties are resolved by flattened order (torch's ``topk`` order
    is unspecified). ``min_layer_density``: ``selection.keep_largest``'s layer
    floor. Returns the new float32 numpy masks.
    """
    floor = masking.validate_min_layer_density(min_layer_density)
    importance = magnitude_importance(weights, kinds)
    masks = _ones_like(importance) if masks is None else _check_masks(masks, importance)
    keep = selection.lth_schedule(_kept(masks), 1, fraction)[0]
    return selection.keep_largest(_restrict(importance, masks), [keep], "global", min_layer_density=floor)


def _materialise(batches: Iterable) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise ValueError("no batches given: SNIP and GraSP need at least one data batch")
    return batches


def _tree_add(a: Params | None, b: Params) -> Params:
    return b if a is None else jax.tree.map(jnp.add, a, b)


def _kernel_grad(loss_fn: LossFn, temperature: float) -> Callable[[Params, Params, Any], Params]:
    """Gradient of the loss w.r.t. the prunable kernels, the other weights held fixed."""

    def loss_of_kernels(kernels: Params, weights: Params, batch: Any) -> jax.Array:
        return loss_fn(_merge(weights, kernels), batch, temperature)

    return jax.grad(loss_of_kernels)


def snip_importance(loss_fn: LossFn, weights: Params, kinds: Params, batches: Iterable) -> Params:
    """SNIP's connection sensitivity |g * W| of every prunable kernel (Lee et al. 2019); keep the largest.

    ``loss_fn(weights, batch, temperature)`` (any jittable one) returns one batch's scalar loss with the
    logits divided by ``temperature``; SNIP passes 1.0. g is the gradient summed over ``batches``. The
    trainer builds ``loss_fn`` in training mode (docs/method.md, section 7.2).
    """
    kernels = _prunable(weights, kinds)
    grad_fn = jax.jit(_kernel_grad(loss_fn, 1.0))
    g = None
    for batch in _materialise(batches):
        g = _tree_add(g, grad_fn(kernels, weights, batch))
    return jax.tree.map(lambda gi, w: jnp.abs(gi * w), g, kernels)


def grasp_importance(
    loss_fn: LossFn, weights: Params, kinds: Params, batches: Iterable, temperature: float = 200.0
) -> Params:
    """GraSP (Wang et al. 2020) importance W * Hg of every prunable kernel; keep the largest (may be negative).

    g is the gradient of the temperature-scaled loss (as ``snip_importance``'s) summed over ``batches``, Hg
    the Hessian-vector product of that summed loss, both w.r.t. the prunable kernels only. Keeping the
    largest W * Hg is GraSP's rule of removing the highest S = -W * Hg.
    """
    kernels = _prunable(weights, kinds)
    batches = _materialise(batches)
    grad_fn = _kernel_grad(loss_fn, temperature)

    # jvp returns the gradient with the product, so one compiled function serves
    # both passes (the first with a zero tangent): one compile instead of two.
    @jax.jit
    def grad_and_hvp(kernels: Params, weights: Params, batch: Any, vector: Params) -> tuple[Params, Params]:
        return jax.jvp(lambda k: grad_fn(k, weights, batch), (kernels,), (vector,))

    zeros = jax.tree.map(jnp.zeros_like, kernels)
    g = None
    for batch in batches:
        g = _tree_add(g, grad_and_hvp(kernels, weights, batch, zeros)[0])
    hg = None
    for batch in batches:
        hg = _tree_add(hg, grad_and_hvp(kernels, weights, batch, g)[1])
    return jax.tree.map(lambda h, w: h * w, hg, kernels)


def _synflow_rescale(kernel: jax.Array) -> jax.Array:
    # Mean over output units of each unit's incoming L1 norm: dividing by it keeps
    # positive activations at about the input's size through every layer.
    norm = jnp.sum(kernel) / kernel.shape[-1]
    return kernel / jnp.where(norm > 0, norm, 1.0)


def _synflow_scores(
    apply_fn: ApplyFn,
    input_shape: tuple[int, ...],
    rescale: bool,
    weights: Params,
    batch_stats: Params,
    kernels: Params,
    masks: Params,
) -> tuple[jax.Array, Params]:
    """(R, |theta * dR/dtheta|) of the linearised network, theta the masked kernels."""
    positive = jax.tree.map(jnp.abs, weights)
    stats = jax.tree.map(jnp.abs, batch_stats)
    theta = jax.tree.map(lambda k, m: jnp.abs(k) * m, kernels, masks)
    if rescale:
        theta = jax.tree.map(_synflow_rescale, theta)
    x = jnp.ones((1, *input_shape), jnp.float32)

    def flow(theta: Params) -> jax.Array:
        return jnp.sum(apply_fn(_merge(positive, theta), stats, x))

    r, grads = jax.value_and_grad(flow)(theta)
    return r, jax.tree.map(lambda t, gr: jnp.abs(t * gr), theta, grads)


@functools.lru_cache(maxsize=8)
def _synflow_jit(apply_fn: ApplyFn, input_shape: tuple[int, ...], rescale: bool) -> Callable:
    # Cached so that one apply_fn scored at several densities compiles once.
    return jax.jit(functools.partial(_synflow_scores, apply_fn, input_shape, rescale))


def _synflow_fn(apply_fn: ApplyFn, input_shape: Sequence[int], rescale: bool) -> Callable:
    return _synflow_jit(apply_fn, tuple(int(d) for d in input_shape), bool(rescale))


def _checked(r: jax.Array, scores: Params, rescale: bool) -> Params:
    finite_scores = all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(scores))
    if not (bool(jnp.isfinite(r)) and finite_scores):
        fix = "check the weights for inf/nan" if rescale else "pass rescale=True (per-layer kernel normalisation)"
        raise ValueError(f"SynFlow overflowed float32 (R = {float(r):.3g}, scores finite: {finite_scores}): {fix}")
    return scores


def synflow_importance(
    apply_fn: ApplyFn,
    weights: Params,
    batch_stats: Params,
    kinds: Params,
    input_shape: Sequence[int],
    masks: Params | None = None,
    rescale: bool = False,
) -> Params:
    """SynFlow's data-free score |theta * dR/dtheta| of every prunable kernel (Tanaka et al. 2020).

    Every weight and BatchNorm statistic is replaced by its absolute value, the prunable kernels are
    multiplied by ``masks``, and R = sum(apply_fn(weights, batch_stats, ones((1, *input_shape)))), with
    ``apply_fn`` in eval mode and ``input_shape`` one example's (H, W, C). A non-finite R (float32
    overflow) raises a ValueError; ``rescale=True`` first divides each kernel by the mean L1 norm of its
    output units (docs/method.md, section 7.2, says when that keeps the ranking exact).
    """
    kernels = _prunable(weights, kinds)
    masks = _ones_like(kernels) if masks is None else _check_masks(masks, kernels)
    r, scores = _synflow_fn(apply_fn, input_shape, rescale)(weights, batch_stats, kernels, masks)
    return _checked(r, scores, rescale)


def synflow_masks(
    apply_fn: ApplyFn,
    weights: Params,
    batch_stats: Params,
    kinds: Params,
    input_shape: Sequence[int],
    density: float,
    iterations: int = 100,
    masks: Params | None = None,
    rescale: bool = False,
    min_layer_density: float = 0.0,
) -> Params:
    """Iterative SynFlow: for i = 1..n keep density**(i/n) of the entries by the current score, globally.

    The score is recomputed on the masked network each iteration (see
    ``synflow_importance``); each step keeps ``selection.keep_counts`` of its
    density, never revives a pruned entry, and the last step (i = n) keeps
    exactly ``keep_counts(..., density)``, plus what the layer floor
    ``min_layer_density`` (applied at every step) adds. Returns float32 numpy masks.
    """
    density = masking.validate_density(density)
    floor = masking.validate_min_layer_density(min_layer_density)
    if iterations < 1:
        raise ValueError(f"SynFlow needs at least 1 iteration, got {iterations}")
    kernels = _prunable(weights, kinds)
    masks = _ones_like(kernels) if masks is None else _check_masks(masks, kernels)
    target = int(selection.keep_counts(kernels, density)[0])
    if _kept(masks) < target:
        raise ValueError(f"the starting masks keep {_kept(masks)} entries, fewer than the target {target}")
    score_fn = _synflow_fn(apply_fn, input_shape, rescale)
    for i in range(1, iterations + 1):
        keep = min(int(selection.keep_counts(kernels, density ** (i / iterations))[0]), _kept(masks))
        scores = _checked(*score_fn(weights, batch_stats, kernels, masks), rescale)
        masks = selection.keep_largest(_restrict(scores, masks), [keep], "global", min_layer_density=floor)
    return masks


__all__ = [
    "grasp_importance",
    "lth_round",
    "magnitude_importance",
    "random_importance",
    "snip_importance",
    "synflow_importance",
    "synflow_masks",
]
