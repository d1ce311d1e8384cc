"""The recipe's iterations (``phases.Iteration``): which data streams feed a phase, and how.

VPNs' iteration follows the authors' ``train()`` (docs/method.md, sections 1
and 11): ``TwoStreams`` takes (a) the prompted clean batch: one step of the
stage's model-side group and of the prompt; then (b) the un-prompted augmented
batch: one step of the model-side group only, the prompt and its optimiser
state left as they were. The baselines take one augmented batch
(``OneStream``, section 7); VPNs' one-stream ablation the clean batch alone
(``CleanStream``). BiP's bilevel iteration lives in ``bip.py``.
"""

from __future__ import annotations

import dataclasses

import jax

from vpns_jax.core import optim, steps
from vpns_jax.core.phases import OneStepPerBatch

# The data streams a run offers (data.run_data): the clean view (VPNs' prompted batch), the augmented view, and
# a second, independently shuffled augmented view (BiP's score batch).
DATA_STREAMS = ("clean", "augmented", "second")


@dataclasses.dataclass(frozen=True)
class TwoStreams(OneStepPerBatch):
    """VPNs': the clean batch through the prompt (if the phase trains one), then the plain augmented batch."""

    streams = ("clean", "augmented")

    def updates_per_iteration(self) -> dict[str, int]:
        return dict(optim.TWO_STREAM_UPDATES)  # the prompt steps on the first batch only

    def __call__(self, spec, state, batches, *, stage, key):
        key_a, key_b = jax.random.split(key)
        prompted = "prompt" in spec.phases[stage].trains
        state, loss_a, acc_a = steps.sub_step(spec, state, batches[0], stage=stage, prompted=prompted, key=key_a)
        state, loss_b, acc_b = steps.sub_step(spec, state, batches[1], stage=stage, prompted=False, key=key_b)
        return state, {"loss_prompted": loss_a, "accuracy_prompted": acc_a, "loss_plain": loss_b,
                       "accuracy_plain": acc_b}


@dataclasses.dataclass(frozen=True)
class OneStream(OneStepPerBatch):
    """The baselines': one plain augmented batch."""

    streams = ("augmented",)

    def __call__(self, spec, state, batches, *, stage, key):
        key_a, _ = jax.random.split(key)
        state, loss, accuracy = steps.sub_step(spec, state, batches[0], stage=stage, prompted=False, key=key_a)
        return state, {"loss_plain": loss, "accuracy_plain": accuracy}


@dataclasses.dataclass(frozen=True)
class CleanStream(OneStepPerBatch):
    """VPNs' one-stream ablation: the clean batch alone, through the prompt if the phase trains one."""

    streams = ("clean",)

    def __call__(self, spec, state, batches, *, stage, key):
        key_a, _ = jax.random.split(key)
        prompted = "prompt" in spec.phases[stage].trains
        state, loss, accuracy = steps.sub_step(spec, state, batches[0], stage=stage, prompted=prompted, key=key_a)
        name = "prompted" if prompted else "clean"
        return state, {f"loss_{name}": loss, f"accuracy_{name}": accuracy}
