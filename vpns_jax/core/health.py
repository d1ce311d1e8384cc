"""Training health: a step whose loss or update is NaN/Inf never reaches the state, and the run stops or skips.

On the device, :func:`keep_if_finite` keeps the state from before a non-finite step; on the host, :class:`FiniteCheck`
reads each step's flag one step late (so the host never waits between dispatches) and stops the run or skips the
batch (``config.on_nonfinite``). So every checkpoint holds a finite state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from absl import logging

ON_NONFINITE = ("stop", "skip")
FINITE = "finite"  # the metrics key of the step's flag
State = TypeVar("State")


class NonFiniteLossError(RuntimeError):
    """A training step's loss or update was NaN/Inf and the run is set to stop."""


def all_finite(*trees: Any) -> jax.Array:
    """A scalar bool: every floating-point entry of ``trees`` is finite."""
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


def keep_if_finite(new: State, old: State, losses: Mapping[str, jax.Array], updated: Any) -> tuple[State, jax.Array]:
    """``(new, True)`` when ``losses`` and the ``updated`` parameters are finite, else ``(old, False)``; the select
    fuses into the optimiser's update, and a frozen leaf (one array in both) costs nothing."""
    finite = all_finite(losses, updated)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old), finite


class FiniteCheck:
    """Reads each step's ``finite`` flag one step late: raises :class:`NonFiniteLossError` ('stop') or calls
    ``on_skip(step)`` ('skip') on a bad one. Call ``flush()`` before a checkpoint save and at the end of a stage.
    """

    def __init__(self, on_nonfinite: str, hint: str, on_skip: Callable[[int], None] | None = None):
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite {on_nonfinite!r} is unknown: use one of {ON_NONFINITE}")
        self.on_nonfinite = on_nonfinite
        self.hint = hint
        self.on_skip = on_skip
        self.skipped = 0
        self._pending: tuple[jax.Array, int, str] | None = None

    def push(self, flag: jax.Array, step: int, where: str) -> None:
        """Records the new step's flag, number and description ('density 0.1, stage 1, step 12 ...'); checks the
        previous step's."""
        self.flush()
        self._pending = (flag, step, where)

    def flush(self) -> None:
        """Checks the step recorded last, waiting for it to finish."""
        if self._pending is None:
            return
        flag, step, where = self._pending
        self._pending = None
        if bool(jax.device_get(flag)):
            return
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"the loss or an update became NaN/Inf at {where}; the run stopped and its checkpoints hold the state "
                f"from before that step: {self.hint}, or set --config.on_nonfinite=skip to skip such batches"
            )
        self.skipped += 1
        logging.warning("skipped a batch whose loss or update was NaN/Inf at %s (%d skipped so far)", where,
                        self.skipped)
        if self.on_skip is not None:
            self.on_skip(step)
