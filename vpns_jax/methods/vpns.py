"""VPNs: a visual prompt and mask scores learned with the weights frozen, then weights and prompt finetuned.

Unstructured (``mask.granularity='weight'``, docs/method.md, sections 1-5): stage 1
trains scores and prompt on VPNs' two streams, stage 2 the weights and prompt
through the fixed masks. ``config.vpns`` ablates which stages learn a prompt and
which streams feed them. Structured (``'channel'``, section 8): a dense warm-up
with the prompt, then channel scores and prompt, then the finetune.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vpns_jax.config_fields import ConfigError, check_fraction, group_optimizer, mask_pattern
from vpns_jax.core.phases import Phase
from vpns_jax.methods.base import (STAGE2, LearnedScores, Plan, Section, Unit, finetune_plan, optimizer,
                                   weights_groups)
from vpns_jax.methods.iterations import CleanStream, OneStream, TwoStreams

# The paper's VPNs (docs/method.md, section 1): masks and prompt with frozen weights, then weights and prompt.
VPNS_PHASES = {1: Phase(("scores", "prompt"), TwoStreams()), 2: Phase(("weights", "prompt"), TwoStreams())}
# config.vpns.streams -> the phases' iteration: both batches, the (prompted) clean batch alone, the plain one alone.
VPNS_STREAMS = {"two": TwoStreams(), "prompted": CleanStream(), "plain": OneStream()}
DEFAULT_ABLATION = ((1, 2), "two")  # config.vpns of the paper's VPNs


def _stage1_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"epochs": 30, "scores": optimizer("adam", 1e-4),
                                      "prompt": optimizer("adam", 1e-4)})


def _ablation_defaults() -> ml_collections.ConfigDict:
    # Ablations of unstructured VPNs (all else unchanged: optimisers, schedules, epochs). prompt_stages: the
    # stages that learn a prompt, (1, 2) as the paper, () for none (the state keeps the export format's zero
    # frame, never differentiated); streams: 'two' (prompted clean batch + plain augmented batch, the paper),
    # 'prompted' (the clean batch only, prompted in prompt_stages) or 'plain' (the augmented batch only).
    return ml_collections.ConfigDict({"prompt_stages": (1, 2), "streams": "two"})


def _structured_defaults() -> ml_collections.ConfigDict:
    # Structured (mask.granularity='channel') VPNs: dense warm-up, pruning, finetune (the authors' D repo).
    return ml_collections.ConfigDict({
        "warmup_epochs": 5,
        "prune_epochs": 5,
        "finetune_epochs": 30,
        "channel_max": 0.25,  # at most this channel sparsity in the stem and the first stage
        "scores": optimizer("adam", 1.0, weight_decay=0.1, clip_value=0.25),
        "prompt": optimizer("adam", 1e-3),
    })


def ablation(config: Any) -> tuple[tuple[int, ...], str]:
    """``config.vpns``'s (prompt stages, streams), checked."""
    prompt_stages, streams = tuple(config.vpns.prompt_stages), config.vpns.streams
    if streams not in VPNS_STREAMS:
        raise ConfigError(
            f"config.vpns.streams={streams!r} is unknown: use one of {', '.join(map(repr, VPNS_STREAMS))}")
    if not set(prompt_stages) <= {1, 2} or len(set(prompt_stages)) != len(prompt_stages):
        raise ConfigError(
            f"config.vpns.prompt_stages={prompt_stages!r} must list stages 1 and/or 2 once each, e.g. (1, 2) or ()")
    if streams == "plain" and prompt_stages:
        raise ConfigError(
            f"config.vpns.streams='plain' never shows the prompt to the network, but config.vpns.prompt_stages="
            f"{prompt_stages!r}: set config.vpns.prompt_stages=() with it")
    return prompt_stages, streams


def _check_ablation(config: Any) -> None:
    """The ablation fields are valid, and changed only for what they ablate: unstructured VPNs' mask search."""
    if ablation(config) != DEFAULT_ABLATION and (config.method != "vpns" or mask_pattern(config)[0] != "weight"
                                                  or config.transfer.masks_from):
        prompt_stages, streams = ablation(config)
        raise ConfigError(
            f"config.vpns (prompt_stages={prompt_stages!r}, streams={streams!r}) ablates unstructured VPNs' "
            "mask search only: use it with method 'vpns', mask.granularity 'weight' and no transfer")


STAGE1 = Section("stage1", _stage1_defaults, epochs=("epochs",), optimizers=("scores", "prompt"))
ABLATION = Section("vpns", _ablation_defaults, check=_check_ablation)
STRUCTURED = Section(
    "structured", _structured_defaults, epochs=("warmup_epochs", "prune_epochs", "finetune_epochs"),
    optimizers=("scores", "prompt"),
    check=lambda config: check_fraction(config, "structured.channel_max",
                                        "the largest channel sparsity of a capped layer, e.g. 0.25"))


class VPNs(LearnedScores):
    name = "vpns"
    summary = "prompt + scores (weights frozen), then weights + prompt"
    granularities = ("weight", "channel")
    supports_nm = True
    sections = (STAGE1, STAGE2, ABLATION, STRUCTURED)

    def check(self, config: Any) -> None:
        _check_ablation(config)

    def plan(self, config: Any) -> Plan:
        if mask_pattern(config)[0] == "channel":
            return self._channel_plan(config)
        prompt_stages, streams = ablation(config)
        phases = {stage: Phase((trained,) + (("prompt",) if stage in prompt_stages else ()), VPNS_STREAMS[streams])
                  for stage, trained in ((1, "scores"), (2, "weights"))}
        groups = {1: {"scores": group_optimizer(config.stage1.scores)}, 2: weights_groups(config, 2 in prompt_stages)}
        if 1 in prompt_stages:
            groups[1]["prompt"] = group_optimizer(config.stage1.prompt)
        epochs = {1: config.stage1.epochs, 2: config.stage2.epochs}
        return Plan(self, phases, groups, epochs, tuple(Unit(float(d), (1, 2)) for d in config.densities))

    def _channel_plan(self, config: Any) -> Plan:
        """Structured VPNs: warm-up (weights, prompt), channel scores and prompt, finetune (weights, prompt)."""
        cfg = config.structured
        phases = {0: Phase(("weights", "prompt"), TwoStreams()), 1: Phase(("scores", "prompt"), TwoStreams()),
                  2: Phase(("weights", "prompt"), TwoStreams())}
        groups = {0: weights_groups(config, True),
                  1: {"scores": group_optimizer(cfg.scores), "prompt": group_optimizer(cfg.prompt)},
                  2: weights_groups(config, True)}
        epochs = {0: cfg.warmup_epochs, 1: cfg.prune_epochs, 2: cfg.finetune_epochs}
        return Plan(self, phases, groups, epochs, tuple(Unit(float(d), (0, 1, 2)) for d in config.densities))

    def transfer_plan(self, config: Any) -> Plan:
        return finetune_plan(self, config, prompt=True, epochs=config.stage2.epochs)
