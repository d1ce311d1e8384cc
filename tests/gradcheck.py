"""Helpers that hold a gradient under ``jax.jit`` to the eager one and to JAX's own autodiff, as production compiles.

The suite compiles with ``--xla_backend_optimization_level=0`` (conftest.py) for speed. At that level XLA:CPU
fuses and recomputes too little for the failure these checks exist for to show: a backward that re-compares
values XLA recomputed with another fusion (the max-pool bug: 44 % relative error on the stem's kernel gradient
at the default level, 1e-7 at level 0). :func:`production_jit` therefore compiles each program at XLA's default
level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# XLA's default backend optimisation level: what a user's run compiles with.
PRODUCTION_OPTIONS = {"xla_backend_optimization_level": 3}


def production_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` jitted and compiled with XLA's default optimisations, whatever the suite's XLA_FLAGS.

    One compile per argument shapes and dtypes: pass data as arguments, not as closed-over constants.
    """
    jitted = jax.jit(fn)
    compiled = {}

    def call(*args):
        key = (jax.tree.structure(args), tuple((np.shape(a), str(jnp.asarray(a).dtype)) for a in jax.tree.leaves(args)))
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile(compiler_options=PRODUCTION_OPTIONS)
        return compiled[key](*args)

    return call


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run op by op (``jax.disable_jit``): no fusion, nothing recomputed."""

    def call(*args):
        with jax.disable_jit():
            return fn(*args)

    return call


def relative_errors(got: Any, want: Any, floor: float = 1e-3) -> dict[str, float]:
    """Per leaf of two pytrees: ``||got - want|| / max(||want||, floor * the largest leaf's ||want||)``.

    The floor keeps a leaf whose true gradient is zero (a conv bias before a train-mode BatchNorm: the
    mean subtraction cancels it) from dividing rounding noise by rounding noise.
    """
    flat_got, flat_want = _flat(got), {k: np.asarray(v, np.float64) for k, v in _flat(want).items()}
    largest = max(float(np.linalg.norm(w)) for w in flat_want.values())
    errors = {}
    for name, w in flat_want.items():
        diff = float(np.linalg.norm(np.asarray(flat_got[name], np.float64) - w))
        scale = max(float(np.linalg.norm(w)), floor * largest)
        errors[name] = diff / scale if scale > 0 else diff
    return errors


def worst(errors: dict[str, float]) -> tuple[str, float]:
    """The leaf with the largest error, and that error."""
    name = max(errors, key=errors.get)
    return name, errors[name]


def mnist_like(rng: np.random.Generator, shape: tuple[int, int, int, int]) -> np.ndarray:
    """NHWC images in [0, 1] like MNIST's: an exact-zero background and a rectangle of 8-bit grey levels,
    identical in every channel, so that whole pooling windows tie at zero after a ReLU."""
    n, h, w, c = shape
    images = np.zeros(shape)
    for i in range(n):
        top, left = rng.integers(1, max(2, h // 3), 2)
        bottom, right = rng.integers(max(top + 1, 2 * h // 3), h, 2)
        images[i, top:bottom, left:right] = rng.integers(0, 256, (bottom - top, right - left, 1)) / 255.0
    return images


def _flat(tree: Any) -> dict[str, Any]:
    if isinstance(tree, dict):
        return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}
    return {str(i): v for i, v in enumerate(jax.tree.leaves(tree))}
