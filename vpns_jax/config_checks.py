"""Checks of a vpns_jax config before anything runs, and the config's fingerprint.

``validate`` finds the first bad field of a config (``configs/base.py`` holds the
schema) and raises ``ConfigError`` with one line naming the field as it is
overridden on the command line (``config.a.b``), its value and the fix. It only
looks at the config itself (and the number of devices): whether a dataset is
prepared or ``model.init_from`` exists is for the trainer to decide.

``fingerprint`` is the config as a plain JSON dict without the fields that do not
change results (checkpointing, logging, data-loading threads and paths, the
compilation cache), so a workdir can refuse to resume under a different config.
``group_optimizer`` turns one optimiser ConfigDict into an ``optim.GroupOptimizer``.
"""

from __future__ import annotations

import copy
import json
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from vpns_jax import models
from vpns_jax.core import health, masking, optim, prompts
from vpns_jax.data import registry

STEMS = ("imagenet", "cifar")
OPTIMIZERS = ("sgd", "adam")
# Models that only have the ImageNet stem (models.create_model refuses 'cifar' for them).
IMAGENET_STEM_ONLY = ("vgg16", "vgg16_bn")
# Optimiser groups of each stage, by config path.
OPTIMIZER_FIELDS = ("stage1.scores", "stage1.prompt", "stage2.weights", "stage2.bn", "stage2.prompt",
                    "hydra.scores", "bip.scores", "structured.scores", "structured.prompt")
# Epoch counts of every stage of every method.
EPOCH_FIELDS = ("stage1.epochs", "stage2.epochs", "hydra.prune_epochs", "hydra.finetune_epochs", "bip.epochs",
                "finetune.epochs", "finetune.dense_epochs", "structured.warmup_epochs", "structured.prune_epochs",
                "structured.finetune_epochs", "slim.epochs")
# Fields that do not change results: left out of the fingerprint (a prefix drops a whole sub-config).
NON_RESULT_FIELDS = (
    "checkpoint",
    "log_every_steps",
    "data.num_threads",
    "data.auto_prepare",
    "data.data_dir",
    "compilation_cache_dir",
    # Changes nothing until a step goes NaN/Inf; a run stopped by one resumes with 'skip'.
    "on_nonfinite",
    # Extra test evaluations read the state and a separate test stream: the training is the same.
    "eval.every_epochs",
)


class ConfigError(ValueError):
    """A config field has a value vpns_jax cannot run with; the message names the field and the fix."""


def _get(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        try:
            value = value[part]
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"config.{path} is missing: start the config from configs/base.py's get_config()"
            ) from None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_choice(config: Any, path: str, choices: Sequence[str]) -> None:
    value = _get(config, path)
    if value not in choices:
        raise ConfigError(f"config.{path}={value!r} is unknown: use one of {', '.join(map(repr, choices))}")


def _check_int_at_least(config: Any, path: str, minimum: int, what: str = "") -> int:
    value = _get(config, path)
    if not _is_int(value) or value < minimum:
        hint = f" ({what})" if what else ""
        raise ConfigError(f"config.{path}={value!r} must be an integer >= {minimum}{hint}")
    return int(value)


def _check_batch(config: Any, path: str, num_devices: int) -> None:
    value = _check_int_at_least(config, path, 1, "a global batch size, over all devices")
    if value % num_devices:
        lower = value - value % num_devices
        upper = lower + num_devices
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"config.{path}={value} is not divisible by the {num_devices} devices: use a multiple of {num_devices}, "
            f"e.g. {options}"
        )


def _check_optimizer(config: Any, path: str) -> None:
    _check_choice(config, f"{path}.optimizer", OPTIMIZERS)
    lr = _get(config, f"{path}.lr")
    if not _is_real(lr) or not lr > 0:
        raise ConfigError(f"config.{path}.lr={lr!r} must be a positive learning rate, e.g. 1e-4")
    for field in ("weight_decay", "momentum", "clip_value"):
        value = _get(config, f"{path}.{field}")
        if not _is_real(value) or not value >= 0:
            raise ConfigError(f"config.{path}.{field}={value!r} must be a number >= 0 (0 turns it off)")


def _check_classes(config: Any, path: str, dataset: str) -> int:
    """Checks a class subset of ``dataset``; returns the number of classes the task then has."""
    classes = _get(config, path)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ConfigError(f"config.{path}={classes!r} must be a tuple of class indices, or () for every class")
    available = registry.DATASETS[dataset].num_classes
    seen = set()
    for c in classes:
        if not _is_int(c) or c < 0:
            raise ConfigError(f"config.{path}={tuple(classes)!r} holds {c!r}: use class indices that are integers >= 0")
        if c >= available:
            raise ConfigError(
                f"config.{path}={tuple(classes)!r} holds {c}, but {dataset} has classes 0..{available - 1}: "
                f"use indices below {available}"
            )
        if c in seen:
            raise ConfigError(f"config.{path}={tuple(classes)!r} lists class {c} twice: list each class once")
        seen.add(c)
    return len(classes) or available


def _check_densities(config: Any) -> None:
    densities = _get(config, "densities")
    if isinstance(densities, (str, bytes)) or not isinstance(densities, Sequence) or not densities:
        raise ConfigError(
            f"config.densities={densities!r} must be a non-empty tuple of keep ratios in (0, 1], e.g. (0.5, 0.1)"
        )
    seen = set()
    for d in densities:
        try:
            masking.validate_density(d)
        except ValueError:
            raise ConfigError(
                f"config.densities={tuple(densities)!r} holds {d!r}, not a keep ratio in (0, 1]: "
                "use e.g. 0.1 to keep 10% of the weights"
            ) from None
        if float(d) in seen:
            raise ConfigError(
                f"config.densities={tuple(densities)!r} lists {d!r} twice: each density is one run, so list each once"
            )
        seen.add(float(d))


def _check_prompt(config: Any) -> None:
    try:
        prompt_spec(config)
    except ConfigError:
        raise
    except ValueError as error:
        # PromptSpec names its fields 'PromptSpec.<field>'; they are config.prompt.<field> here.
        raise ConfigError(" ".join(str(error).replace("PromptSpec.", "config.prompt.").split())) from None


def _check_fraction(config: Any, path: str, what: str) -> None:
    value = _get(config, path)
    if not _is_real(value) or not 0 < value < 1:
        raise ConfigError(f"config.{path}={value!r} must be a fraction in (0, 1): {what}")


def prompt_spec(config: Any) -> prompts.PromptSpec:
    """The ``prompts.PromptSpec`` of ``config.prompt`` (ValueError if PromptSpec rejects it)."""
    fields = ("kind", "input_size", "output_size", "pad_size", "mask_size")
    return prompts.PromptSpec(**{field: _get(config, f"prompt.{field}") for field in fields})


def validate(config: Any, *, num_devices: int) -> None:
    """Raises ``ConfigError`` (one line: field, value, fix) at the first field vpns_jax cannot run with.

    ``num_devices`` is the number of devices the global batches are split over.
    An empty ``model.init_from`` without source pretraining is not an error here:
    the trainer decides what to do with it.
    """
    if not _is_int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be an integer >= 1")

    from vpns_jax import methods  # methods builds on this module

    _check_choice(config, "method", tuple(methods.METHODS))
    _check_int_at_least(config, "seed", 0)
    _check_densities(config)

    # Model.
    _check_choice(config, "model.name", models.MODEL_NAMES)
    _check_choice(config, "model.stem", STEMS)
    name, stem = _get(config, "model.name"), _get(config, "model.stem")
    if name in IMAGENET_STEM_ONLY and stem != "imagenet":
        raise ConfigError(f"config.model.stem={stem!r} is not available for {name}: use 'imagenet'")
    width = _get(config, "model.width")
    if not _is_real(width) or not width > 0:
        raise ConfigError(f"config.model.width={width!r} must be a positive width multiplier, e.g. 1.0 or 0.25")
    num_classes = _check_int_at_least(config, "model.num_classes", 1, "the source head's classes")

    # Target data.
    _check_choice(config, "data.name", tuple(registry.DATASETS))
    dataset = _get(config, "data.name")
    num_target = _check_classes(config, "data.classes", dataset)
    if num_target > num_classes:
        raise ConfigError(
            f"config.model.num_classes={num_classes} is smaller than the {num_target} target classes of "
            f"{dataset}: label mapping gives each target class its own source class, so use >= {num_target}"
        )
    _check_int_at_least(config, "data.train_limit", 0, "0 = every training example")
    _check_int_at_least(config, "data.test_limit", 0, "0 = every test example")
    _check_batch(config, "data.batch_size", num_devices)
    _check_batch(config, "data.eval_batch_size", num_devices)

    # Source pretraining: only checked when it runs.
    if _get(config, "source.enabled"):
        _check_choice(config, "source.dataset", tuple(registry.DATASETS))
        source = _get(config, "source.dataset")
        num_source = _check_classes(config, "source.classes", source)
        if num_source > num_classes:
            raise ConfigError(
                f"config.model.num_classes={num_classes} is smaller than the {num_source} source classes of "
                f"{source}: the source head needs one output per class, so use >= {num_source}"
            )
        _check_int_at_least(config, "source.train_limit", 0, "0 = every training example")
        _check_int_at_least(config, "source.epochs", 1)
        _check_batch(config, "source.batch_size", num_devices)
        _check_optimizer(config, "source.optimizer")

    _check_prompt(config)
    _check_choice(config, "mask.scope", masking.THRESHOLD_SCOPES)

    _check_choice(config, "mask.granularity", ("weight", "channel"))
    for path in EPOCH_FIELDS:
        _check_int_at_least(config, path, 1)
    for path in OPTIMIZER_FIELDS:
        _check_optimizer(config, path)
    _check_fraction(config, "finetune.lth_fraction", "pruned per LTH round, e.g. 0.2")
    _check_fraction(config, "structured.channel_max", "the largest channel sparsity of a capped layer, e.g. 0.25")
    for path in ("bip.bilevel_lr", "slim.l1", "oneshot.grasp_temperature"):
        value = _get(config, path)
        if not _is_real(value) or value < 0 or (path == "oneshot.grasp_temperature" and value == 0):
            raise ConfigError(f"config.{path}={value!r} must be a number >= 0 (the temperature > 0)")
    _check_int_at_least(config, "oneshot.batches", 1, "training batches the saliency is summed over")
    _check_int_at_least(config, "oneshot.synflow_iterations", 1)
    masks_from = _get(config, "transfer.masks_from")
    if not isinstance(masks_from, str):
        raise ConfigError(f"config.transfer.masks_from={masks_from!r} must be a workdir path, or '' for no transfer")
    methods.make_plan(config)  # the method's own checks (granularity, transfer)

    with_prompt = _get(config, "eval.with_prompt")
    if not isinstance(with_prompt, bool):
        raise ConfigError(f"config.eval.with_prompt={with_prompt!r} must be True or False")

    _check_int_at_least(config, "checkpoint.every_steps", 1, "iterations between checkpoints")
    _check_int_at_least(config, "checkpoint.max_to_keep", 1, "checkpoints kept on disk")
    _check_int_at_least(config, "log_every_steps", 1)
    _check_choice(config, "on_nonfinite", health.ON_NONFINITE)
    _check_int_at_least(config, "eval.every_epochs", 0, "0 = test only at the end")


def group_optimizer(cfg: Any) -> optim.GroupOptimizer:
    """The ``optim.GroupOptimizer`` of one optimiser ConfigDict (optimizer, lr, weight_decay, momentum)."""
    try:
        return optim.GroupOptimizer(
            name=cfg.optimizer,
            learning_rate=float(cfg.lr),
            weight_decay=float(cfg.weight_decay),
            momentum=float(cfg.momentum),
            clip_value=float(cfg.get("clip_value", 0.0)),
        )
    except ValueError as error:
        raise ConfigError(f"optimiser config {_plain(cfg)}: {error}") from None


def _plain(value: Any) -> Any:
    """A JSON-able copy: mappings become dicts with string keys, sequences lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-able")


def fingerprint(config: Any) -> dict[str, Any]:
    """The config as a plain JSON-able dict, without the ``NON_RESULT_FIELDS``.

    Two configs with equal fingerprints give the same results. Sequences become
    lists, so a fingerprint read back from JSON compares equal to a fresh one.
    """
    plain = copy.deepcopy(_plain(config))
    for path in NON_RESULT_FIELDS:
        *parents, leaf = path.split(".")
        node = plain
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    json.dumps(plain)  # fails loudly if anything is not JSON-able
    return plain
