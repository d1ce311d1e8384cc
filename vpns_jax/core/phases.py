"""Phases: what one training stage updates, and the ``Iteration`` that feeds its batches to the optimiser steps.

A method is a few stages, each a ``Phase``. The core knows no particular
iteration: the recipe's (one or two data streams, BiP's bilevel step) live with
the methods (``vpns_jax.methods.iterations``, ``vpns_jax.methods.bip``), and a
fork brings its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

from vpns_jax.core import optim

SUBTREES = ("weights", "scores", "prompt")  # the TrainState subtrees a phase may train


class Iteration(Protocol):
    """How one training iteration of a phase feeds its batches to the optimiser steps.

    ``streams`` names the data streams it reads, one batch each, in order.
    Called inside the jitted ``steps.train_iteration`` with the spec
    (``steps.StepSpec``), the state (``steps.TrainState``) and the batches;
    returns the new state and named metrics (every ``loss*`` metric is checked
    for finiteness).
    """

    streams: tuple[str, ...]

    def updates_per_iteration(self) -> dict[str, int]: ...

    def check(self, phase: Phase) -> None: ...

    def __call__(self, spec: Any, state: Any, batches: tuple[dict[str, jax.Array], ...], *, stage: int,
                 key: jax.Array) -> tuple[Any, dict[str, jax.Array]]: ...


class OneStepPerBatch:
    """A base for iterations: any phase, one optimiser step per label and batch (what the schedules count)."""

    def updates_per_iteration(self) -> dict[str, int]:
        return {label: 1 for label in optim.LABELS}

    def check(self, phase: Phase) -> None:
        del phase


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training stage: the state subtrees it updates and the ``Iteration`` that feeds them.

    ``bn_l1`` adds an L1 penalty on BatchNorm scales (Network Slimming's sparsity training).
    """

    trains: tuple[str, ...]
    iteration: Iteration
    bn_l1: float = 0.0

    def __post_init__(self):
        if isinstance(self.iteration, str) or not hasattr(self.iteration, "streams"):
            raise TypeError(f"a phase's iteration must be an Iteration (e.g. methods.iterations.OneStream()), "
                            f"got {self.iteration!r}")
        unknown = set(self.trains) - set(SUBTREES)
        if unknown or not self.trains:
            raise ValueError(f"a phase trains some of weights, scores, prompt; got {self.trains!r}")
        self.iteration.check(self)

    @property
    def num_batches(self) -> int:
        """Batches one iteration takes."""
        return len(self.iteration.streams)

    @property
    def updates_per_iteration(self) -> dict[str, int]:
        """Optimiser steps each label takes per iteration (for the per-epoch schedules)."""
        return self.iteration.updates_per_iteration()
