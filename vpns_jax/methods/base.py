"""What a pruning method is: its config sections, its plan (stages, phases, optimisers, units) and its masks.

A ``Method`` declares everything the trainer, the config checks and the sweep
need: its ``sections``, its ``plan(config)``, where its masks come from
(``initial_scores``, ``unit_masks``) and its ``transfer_plan``. The trainer
calls these and never branches on a method's name. Stages by number: 0 dense,
1 mask finding, 2 finetune with the masks fixed (docs/method.md, sections 1 and 7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections

from vpns_jax.config_fields import check_int_at_least, check_optimizer, group_optimizer, mask_pattern
from vpns_jax.core import masking, optim, steps, structured
from vpns_jax.core.phases import Phase
from vpns_jax.methods.iterations import DATA_STREAMS, OneStream, TwoStreams

Params = dict[Any, Any]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One trained network of a run."""

    density: float  # keep ratio of its masks (1.0 for a dense unit)
    stages: tuple[int, ...]
    round: int | None = None  # LTH's round (0 = its dense unit); reported in the results when set
    dense: bool = False  # trains the dense network whose weights later units read


@dataclasses.dataclass(frozen=True)
class Plan:
    """Stages (phases, optimiser groups, epochs) and units of one run."""

    method: Method
    phases: dict[int, Phase]
    groups: dict[int, dict[str, optim.GroupOptimizer]]
    epochs: dict[int, int]
    units: tuple[Unit, ...]

    def __post_init__(self):
        for stage, phase in self.phases.items():
            if set(phase.iteration.streams) - set(DATA_STREAMS):
                raise ValueError(f"stage {stage}'s iteration reads {phase.iteration.streams!r}: a run offers the "
                                 f"streams {DATA_STREAMS}")


@dataclasses.dataclass(frozen=True)
class Section:
    """A config section a method reads: ``config.<name>`` with its defaults and checks.

    ``epochs`` and ``optimizers`` name fields checked as epoch counts (integers
    >= 1) and optimiser groups; ``check`` runs any further check of the section.
    """

    name: str
    defaults: Callable[[], ml_collections.ConfigDict]
    epochs: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None

    def validate(self, config: Any) -> None:
        """Raises ``ConfigError`` at the section's first bad field."""
        for field in self.epochs:
            check_int_at_least(config, f"{self.name}.{field}", 1)
        for field in self.optimizers:
            check_optimizer(config, f"{self.name}.{field}")
        if self.check is not None:
            self.check(config)


def optimizer(name: str, lr: float, weight_decay: float = 1e-4, momentum: float = 0.9,
              clip_value: float = 0.0) -> ml_collections.ConfigDict:
    """One parameter group's torch-style optimiser config (``optim.GroupOptimizer``); clip_value 0 = no clipping."""
    return ml_collections.ConfigDict({"optimizer": name, "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                      "clip_value": clip_value})


def _stage2_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "epochs": 30,  # VPNs' stage 2
        "weights": optimizer("sgd", 0.01),  # conv/dense kernels and biases
        "bn": optimizer("sgd", 0.01),  # BatchNorm affine
        "prompt": optimizer("sgd", 0.01),
    })


# The finetune optimisers of every method: weights, BatchNorm and (VPNs, "+ VP") prompt groups.
STAGE2 = Section("stage2", _stage2_defaults, epochs=("epochs",), optimizers=("weights", "bn", "prompt"))


def weights_groups(config: Any, prompt: bool) -> dict[str, optim.GroupOptimizer]:
    """The finetune's optimiser groups (``config.stage2``): weights, BatchNorm and, with ``prompt``, the prompt."""
    groups = {"weights": group_optimizer(config.stage2.weights), "bn": group_optimizer(config.stage2.bn)}
    if prompt:
        groups["prompt"] = group_optimizer(config.stage2.prompt)
    return groups


def finetune_phase(prompt: bool) -> Phase:
    """A finetune with the masks fixed: weights and prompt on VPNs' two streams, or weights on one stream."""
    return Phase(("weights", "prompt"), TwoStreams()) if prompt else Phase(("weights",), OneStream())


class MethodContext(Protocol):
    """What a method may read from the run it belongs to (``vpns_jax.context.RunContext`` implements it)."""

    config: Any
    kinds: Params  # functional.leaf_kinds of the model
    channel_groups: tuple  # models.channels.ChannelGroup per scored conv ('channel' granularity)
    source: tuple[Params, Params]  # the pretrained weights and BatchNorm statistics every unit starts from
    zero_prompt: Params  # the prompt every unit starts from
    spec: steps.StepSpec

    def ones_masks(self) -> Params:
        """All-ones masks shaped like the method's (host arrays)."""

    def mapped_state(self, unit: Unit, masks: Params | None = None, prompt: Params | None = None) -> steps.TrainState:
        """A state of ``unit`` at its first stage with these masks, label-mapped through them."""

    def finished_unit(self, index: int) -> tuple[Params, Params]:
        """(final weights, masks) of the run's unit ``index``, as saved when it finished."""

    def training_batches(self, count: int) -> list[dict]:
        """The first ``count`` full batches of the label-mapping stream, placed on the mesh."""

    def transfer_arrays(self, density: float) -> tuple[Params, Params]:
        """(masks, prompt) that the run in ``config.transfer.masks_from`` saved for ``density`` (host arrays)."""


class Method:
    """Base of every method; subclass it, set the class attributes and override ``plan`` (and the masks)."""

    name: str = ""
    summary: str = ""  # one line for docs and listings
    granularities: tuple[str, ...] = ("weight",)  # mask granularities it supports
    # Granularities whose masks honour config.mask.min_layer_density: weight masks chosen by
    # selection.keep_largest or from scores; channel masks only from scores (steps.masks_from_scores).
    floor_granularities: tuple[str, ...] = ("weight",)
    # Whether it makes N:M masks (config.mask.granularity='N:M'): from scores through steps.masks_from_scores, or
    # one-shot by reading run.spec.nm in its unit_masks.
    supports_nm: bool = False
    sections: tuple[Section, ...] = (STAGE2,)

    def check(self, config: Any) -> None:
        """Checks beyond the sections' (e.g. of field combinations); raises ``ConfigError``."""

    def plan(self, config: Any) -> Plan:
        """The stages and units of a run of this method under ``config``."""
        raise NotImplementedError(f"method {self.name!r} has no plan")

    def initial_scores(self, run: MethodContext) -> Params:
        """The scores every unit starts from; {} for a method that learns none."""
        del run
        return {}

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params | None:
        """The fixed masks of unit ``index`` (None: derived from the scores). By default all-ones."""
        del unit, index
        return run.ones_masks()

    def transfer_plan(self, config: Any) -> Plan | None:
        """The plan when ``config.transfer.masks_from`` gives the masks (only a finetune); None: not transferable."""
        del config
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class LearnedScores(Method):
    """A method whose masks come from scores trained with straight-through masks (VPNs, HYDRA, BiP)."""

    floor_granularities = ("weight", "channel")

    def initial_scores(self, run: MethodContext) -> Params:
        """HYDRA-style scores from the source weights, or one score per channel (seeded) for channel masks."""
        if mask_pattern(run.config)[0] == "channel":
            return structured.init_channel_scores(run.channel_groups, jax.random.PRNGKey(run.config.seed))
        return masking.init_scores(run.source[0], run.kinds)

    def unit_masks(self, run: MethodContext, unit: Unit, index: int) -> Params | None:
        """None while the unit's first stage trains scores; all-ones for a dense warm-up before them."""
        del index
        return None if "scores" in run.spec.phases[unit.stages[0]].trains else run.ones_masks()


def finetune_plan(method: Method, config: Any, *, prompt: bool, epochs: int) -> Plan:
    """Only a finetune per density (masks given from outside): the shared transfer plan."""
    return Plan(method, {2: finetune_phase(prompt)}, {2: weights_groups(config, prompt)}, {2: epochs},
                tuple(Unit(float(d), (2,)) for d in config.densities))

