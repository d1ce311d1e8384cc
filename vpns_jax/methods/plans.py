"""The pruning methods selectable by ``config.method``, as plans over the shared steps.

A plan says which stages a method trains (each a ``steps.Phase`` with its own
optimiser groups and epochs) and which units a run is made of. A unit is one
trained network: VPNs, HYDRA, BiP and the prune-at-init baselines train one
unit per density, each from the same initial state; OMP and LTH first train a
dense unit (the dense finetune whose weights give the magnitudes), and LTH's
later units are its rounds, each pruning 20 % of what the previous one kept
(docs/method.md, section 7). Stages, by number:
  0  dense: every weight (and, for structured VPNs, the prompt) with all-ones masks;
  1  mask finding: scores (and the prompt for VPNs; the weights too for BiP);
  2  finetune with the masks fixed (and the prompt for VPNs and the "+ VP" variants).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vpns_jax import config_checks
from vpns_jax.core import optim, steps
from vpns_jax.methods import oneshot

# config.vpns.streams -> the phases' streams: both batches, the (prompted) clean batch alone, the plain one alone.
VPNS_STREAMS = {"two": "two", "prompted": "clean", "plain": "one"}
DEFAULT_ABLATION = ((1, 2), "two")  # config.vpns of the paper's VPNs
# How each method gets its masks.
LEARNED = "learned"  # scores trained with straight-through masks (vpns, hydra, bip)
ONE_SHOT = ("magnitude", "lth", "random", "snip", "grasp", "synflow", "slim")


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's recipe."""

    name: str
    masks: str  # LEARNED, one of ONE_SHOT, or 'none' (dense)
    finetune_prompt: bool = False  # stage 2 trains a prompt on the two VPNs streams
    dense_unit: bool = False  # a dense finetune unit comes first (its weights decide the masks)
    granularities: tuple[str, ...] = ("weight",)
    summary: str = ""


METHODS = {
    m.name: m
    for m in (
        Method("vpns", LEARNED, finetune_prompt=True, granularities=("weight", "channel"),
               summary="prompt + scores (weights frozen), then weights + prompt"),
        Method("hydra", LEARNED, summary="scores (weights frozen), then weights; no prompt, one stream"),
        Method("bip", LEARNED, summary="bi-level: a weight step and an implicit-gradient score step per iteration"),
        Method("omp", "magnitude", dense_unit=True, summary="dense finetune, global magnitude mask, rewind, finetune"),
        Method("omp_vp", "magnitude", finetune_prompt=True, dense_unit=True, summary="OMP finetuned with a prompt"),
        Method("lth", "lth", dense_unit=True, summary="iterative magnitude pruning, 20% per round, rewind"),
        Method("lth_vp", "lth", finetune_prompt=True, dense_unit=True, summary="LTH finetuned with a prompt"),
        Method("random", "random", summary="per-layer uniform random mask, finetune"),
        Method("random_vp", "random", finetune_prompt=True, summary="random mask finetuned with a prompt"),
        Method("snip", "snip", summary="SNIP |g*W| at the pretrained weights, finetune"),
        Method("grasp", "grasp", summary="GraSP W*Hg at the pretrained weights, finetune"),
        Method("synflow", "synflow", summary="iterative SynFlow at the pretrained weights, finetune"),
        Method("dense", "none", summary="full finetune, no mask"),
        Method("slim", "slim", dense_unit=True, granularities=("channel",),
               summary="Network Slimming: L1 on BatchNorm scales, prune channels by |scale|, finetune"),
    )
}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One trained network of a run."""

    density: float  # keep ratio of its masks (1.0 for a dense unit)
    stages: tuple[int, ...]
    round: int = 0  # LTH's round (0 = the dense unit); 0 elsewhere
    dense: bool = False  # trains the dense network whose weights later units read


@dataclasses.dataclass(frozen=True)
class Plan:
    """Stages (phases, optimiser groups, epochs) and units of one run."""

    method: Method
    phases: dict[int, steps.Phase]
    groups: dict[int, dict[str, optim.GroupOptimizer]]
    epochs: dict[int, int]
    units: tuple[Unit, ...]


def get_method(name: str) -> Method:
    """The method called ``name`` (a one-line error listing the known ones otherwise)."""
    if name not in METHODS:
        raise config_checks.ConfigError(f"config.method={name!r} is unknown: use one of {', '.join(METHODS)}")
    return METHODS[name]


def lth_densities(smallest: float, fraction: float) -> list[float]:
    """Nominal round densities (1 - fraction)^r, r = 1.., down to the first at or below ``smallest``."""
    rounds = max(1, oneshot.lth_rounds_for(smallest, fraction))
    return [(1.0 - fraction) ** r for r in range(1, rounds + 1)]


def _weights_groups(config: Any, prompt: bool) -> dict[str, optim.GroupOptimizer]:
    group = config_checks.group_optimizer
    groups = {"weights": group(config.stage2.weights), "bn": group(config.stage2.bn)}
    if prompt:
        groups["prompt"] = group(config.stage2.prompt)
    return groups


def _finetune(prompt: bool) -> steps.Phase:
    return steps.Phase(("weights", "prompt"), "two") if prompt else steps.Phase(("weights",), "one")


def make_plan(config: Any) -> Plan:
    """The plan of ``config`` (its method, mask granularity, epochs and densities)."""
    method = get_method(config.method)
    granularity = config.mask.granularity
    if granularity not in method.granularities:
        raise config_checks.ConfigError(
            f"config.mask.granularity={granularity!r} is not available for method {method.name!r}: use one of "
            f"{', '.join(map(repr, method.granularities))}"
        )
    group = config_checks.group_optimizer
    densities = tuple(float(d) for d in config.densities)
    finetune_epochs = config.finetune.epochs
    ablation = _vpns_ablation(config)
    if ablation != DEFAULT_ABLATION and (method.name != "vpns" or granularity != "weight"
                                         or config.transfer.masks_from):
        raise config_checks.ConfigError(
            f"config.vpns (prompt_stages={ablation[0]!r}, streams={ablation[1]!r}) ablates unstructured VPNs' "
            "mask search only: use it with method 'vpns', mask.granularity 'weight' and no transfer")
    if config.transfer.masks_from:
        # The masks (and prompt) come from another run: only the finetune stage runs here.
        if method.masks != LEARNED and method.name not in ("omp", "omp_vp"):
            raise config_checks.ConfigError(
                f"config.transfer.masks_from is set, but method {method.name!r} does not find a mask to transfer: "
                "use vpns, hydra, bip or omp")
        prompt = method.name == "vpns" or method.finetune_prompt
        epochs = config.stage2.epochs if method.name == "vpns" else finetune_epochs
        return Plan(method, {2: _finetune(prompt)}, {2: _weights_groups(config, prompt)}, {2: epochs},
                    tuple(Unit(d, (2,)) for d in densities))

    if granularity == "channel":
        return _channel_plan(config, method, densities)
    if method.name == "vpns":
        prompt_stages, streams = ablation
        phases = {stage: steps.Phase((trained,) + (("prompt",) if stage in prompt_stages else ()),
                                     VPNS_STREAMS[streams])
                  for stage, trained in ((1, "scores"), (2, "weights"))}
        groups = {1: {"scores": group(config.stage1.scores)}, 2: _weights_groups(config, 2 in prompt_stages)}
        if 1 in prompt_stages:
            groups[1]["prompt"] = group(config.stage1.prompt)
        epochs = {1: config.stage1.epochs, 2: config.stage2.epochs}
        units = tuple(Unit(d, (1, 2)) for d in densities)
    elif method.name == "hydra":
        phases = {1: steps.Phase(("scores",), "one"), 2: steps.Phase(("weights",), "one")}
        groups = {1: {"scores": group(config.hydra.scores)}, 2: _weights_groups(config, False)}
        epochs = {1: config.hydra.prune_epochs, 2: config.hydra.finetune_epochs}
        units = tuple(Unit(d, (1, 2)) for d in densities)
    elif method.name == "bip":
        phases = {1: steps.Phase(("weights", "scores"), "bilevel")}
        groups = {1: {**_weights_groups(config, False), "scores": group(config.bip.scores)}}
        epochs = {1: config.bip.epochs}
        units = tuple(Unit(d, (1,)) for d in densities)
    else:
        phases = {2: _finetune(method.finetune_prompt)}
        groups = {2: _weights_groups(config, method.finetune_prompt)}
        epochs = {2: finetune_epochs}
        if method.masks == "none":
            units = (Unit(1.0, (2,), dense=True),)
        elif method.dense_unit:
            phases[0] = steps.Phase(("weights",), "one")
            groups[0] = _weights_groups(config, False)
            epochs[0] = config.finetune.dense_epochs
            dense = Unit(1.0, (0,), dense=True)
            if method.masks == "lth":
                rounds = lth_densities(min(densities), config.finetune.lth_fraction)
                units = (dense,) + tuple(Unit(d, (2,), round=r) for r, d in enumerate(rounds, start=1))
            else:
                units = (dense,) + tuple(Unit(d, (2,)) for d in densities)
        else:
            units = tuple(Unit(d, (2,)) for d in densities)
    return Plan(method, phases, groups, epochs, units)


def _vpns_ablation(config: Any) -> tuple[tuple[int, ...], str]:
    """``config.vpns``'s (prompt stages, streams), checked."""
    prompt_stages, streams = tuple(config.vpns.prompt_stages), config.vpns.streams
    if streams not in VPNS_STREAMS:
        raise config_checks.ConfigError(
            f"config.vpns.streams={streams!r} is unknown: use one of {', '.join(map(repr, VPNS_STREAMS))}")
    if not set(prompt_stages) <= {1, 2} or len(set(prompt_stages)) != len(prompt_stages):
        raise config_checks.ConfigError(
            f"config.vpns.prompt_stages={prompt_stages!r} must list stages 1 and/or 2 once each, e.g. (1, 2) or ()")
    if streams == "plain" and prompt_stages:
        raise config_checks.ConfigError(
            f"config.vpns.streams='plain' never shows the prompt to the network, but config.vpns.prompt_stages="
            f"{prompt_stages!r}: set config.vpns.prompt_stages=() with it")
    return prompt_stages, streams


def _channel_plan(config: Any, method: Method, densities: tuple[float, ...]) -> Plan:
    """Structured plans: VPNs' warm-up, pruning and finetune epochs; Slimming's sparsity training then finetune."""
    group = config_checks.group_optimizer
    cfg = config.structured
    if method.name == "vpns":
        phases = {0: steps.Phase(("weights", "prompt")), 1: steps.Phase(("scores", "prompt")),
                  2: steps.Phase(("weights", "prompt"))}
        groups = {0: _weights_groups(config, True),
                  1: {"scores": group(cfg.scores), "prompt": group(cfg.prompt)},
                  2: _weights_groups(config, True)}
        epochs = {0: cfg.warmup_epochs, 1: cfg.prune_epochs, 2: cfg.finetune_epochs}
        return Plan(method, phases, groups, epochs, tuple(Unit(d, (0, 1, 2)) for d in densities))
    # Network Slimming: one sparsity-regularised dense training, then each density prunes its BatchNorm scales.
    phases = {0: steps.Phase(("weights",), "one", bn_l1=float(config.slim.l1)), 2: steps.Phase(("weights",), "one")}
    groups = {0: _weights_groups(config, False), 2: _weights_groups(config, False)}
    epochs = {0: config.slim.epochs, 2: cfg.finetune_epochs}
    units = (Unit(1.0, (0,), dense=True),) + tuple(Unit(d, (2,)) for d in densities)
    return Plan(method, phases, groups, epochs, units)
