"""Checks of a vpns_jax config before anything runs, and the config's fingerprint.

``validate`` finds the first bad field of a config (``vpns_jax/config/base.py`` holds the
schema) and raises ``ConfigError`` with one line naming the field as it is
overridden on the command line (``config.a.b``), its value and the fix. It only
looks at the config itself (and the number of devices): whether a dataset is
prepared or ``model.init_from`` exists is for the trainer to decide.

``fingerprint`` is the config as a plain JSON dict without the fields that do not
change results (checkpointing, logging, data-loading threads and paths, the
compilation cache), so a workdir can refuse to resume under a different config.
``ConfigError``, ``group_optimizer`` and ``mask_pattern`` come from ``vpns_jax.config_fields`` (re-exported here).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from vpns_jax import methods, models
from vpns_jax.config_fields import (ConfigError, check_choice, check_int_at_least, check_optimizer, get,  # noqa: F401
                                    group_optimizer, is_int, is_real, mask_pattern, plain)
from vpns_jax.core import health, masking, prompts
from vpns_jax.core.nm import pattern_problem
from vpns_jax.data import registry
from vpns_jax.models import layers
from vpns_jax.models import vit as vit_models

STEMS = ("imagenet", "cifar")
# Models that only have the ImageNet stem (models.create_model refuses 'cifar' for them).
IMAGENET_STEM_ONLY = ("vgg16", "vgg16_bn")
# Fields that do not change results: left out of the fingerprint (a prefix drops a whole sub-config).
NON_RESULT_FIELDS = (
    "checkpoint",
    "log_every_steps",
    "data.num_threads",
    "data.workers",
    "data.auto_prepare",
    "data.data_dir",
    "compilation_cache_dir",
    # Changes nothing until a step goes NaN/Inf; a run stopped by one resumes with 'skip'.
    "on_nonfinite",
    # Extra test evaluations read the state and a separate test stream: the training is the same.
    "eval.every_epochs",
)
# Result fields added after workdirs were fingerprinted: left out at their default (which reproduces the
# behaviour from before them), so those workdirs still resume; any other value is in the fingerprint.
OMITTED_AT_DEFAULT = {"mask.min_layer_density": 0.0, "mask.pattern": "unstructured",
                      "model.vit": {option: 0 for option in vit_models.VIT_OPTIONS}}


def _check_dtype(config: Any) -> None:
    dtype = get(config, "model.dtype")
    if dtype == "float64":
        raise ConfigError("config.model.dtype='float64' is not a training dtype: use 'float32' or 'bfloat16'; "
                          "float64 checks go through the functional API with x64 on (docs/performance.md, Precision)")
    check_choice(config, "model.dtype", models.COMPUTE_DTYPES)
    if dtype != "float32":  # float32 runs everywhere; only the others cost a probe
        try:
            models.check_dtype_runs(dtype)
        except ValueError as error:
            raise ConfigError(f"config.model.dtype={dtype!r}: {error}") from None


def _check_batch(config: Any, path: str, num_devices: int) -> None:
    value = check_int_at_least(config, path, 1, "a global batch size, over all devices")
    if value % num_devices:
        lower = value - value % num_devices
        upper = lower + num_devices
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"config.{path}={value} is not divisible by the {num_devices} devices: use a multiple of {num_devices}, "
            f"e.g. {options}"
        )


def _check_classes(config: Any, path: str, dataset: str) -> int:
    """Checks a class subset of ``dataset``; returns the number of classes the task then has."""
    classes = get(config, path)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ConfigError(f"config.{path}={classes!r} must be a tuple of class indices, or () for every class")
    available = registry.DATASETS[dataset].num_classes
    seen = set()
    for c in classes:
        if not is_int(c) or c < 0:
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
    densities = get(config, "densities")
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


def prompt_spec(config: Any) -> prompts.PromptSpec:
    """The ``prompts.PromptSpec`` of ``config.prompt`` (ValueError if PromptSpec rejects it)."""
    fields = ("kind", "input_size", "output_size", "pad_size", "mask_size")
    return prompts.PromptSpec(**{field: get(config, f"prompt.{field}") for field in fields})


def validate(config: Any, *, num_devices: int) -> None:
    """Raises ``ConfigError`` (one line: field, value, fix) at the first field vpns_jax cannot run with.

    ``num_devices`` is the number of devices the global batches are split over.
    An empty ``model.init_from`` without source pretraining is not an error here:
    the trainer decides what to do with it. The method's fields are checked by
    the method registry (``vpns_jax.methods.check_config``).
    """
    if not is_int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be an integer >= 1")
    check_choice(config, "method", methods.names())
    check_int_at_least(config, "seed", 0)
    _check_densities(config)
    num_classes = _check_model(config)
    _check_data(config, num_classes, num_devices)
    if get(config, "source.enabled"):  # only checked when it runs
        _check_source(config, num_classes, num_devices)
    _check_prompt(config)
    check_choice(config, "mask.scope", masking.THRESHOLD_SCOPES)
    masks_from = get(config, "transfer.masks_from")
    if not isinstance(masks_from, str):
        raise ConfigError(f"config.transfer.masks_from={masks_from!r} must be a workdir path, or '' for no transfer")
    _check_min_layer_density(config)
    _check_mask_pattern(config)
    methods.check_config(config)
    if not isinstance(get(config, "eval.with_prompt"), bool):
        raise ConfigError(f"config.eval.with_prompt={get(config, 'eval.with_prompt')!r} must be True or False")
    check_int_at_least(config, "checkpoint.every_steps", 1, "iterations between checkpoints")
    check_int_at_least(config, "checkpoint.max_to_keep", 1, "checkpoints kept on disk")
    check_int_at_least(config, "log_every_steps", 1)
    check_choice(config, "on_nonfinite", health.ON_NONFINITE)
    check_int_at_least(config, "eval.every_epochs", 0, "0 = test only at the end")


def _check_min_layer_density(config: Any) -> None:
    """The layer floor: a fraction in [0, 1), and only where this run chooses its masks."""
    value = get(config, "mask.min_layer_density")
    try:
        masking.validate_min_layer_density(value)
    except ValueError:
        raise ConfigError(f"config.mask.min_layer_density={value!r} must be a fraction in [0, 1): use 0 for the "
                          "authors' rule, or e.g. 0.01 to keep at least 1% of every layer") from None
    if value and get(config, "transfer.masks_from"):
        raise ConfigError(f"config.mask.min_layer_density={value!r} has no effect with config.transfer.masks_from "
                          "(the masks come from that run): use 0 here, and the floor in the run that found them")


def _check_mask_pattern(config: Any) -> None:
    """An N:M granularity: a method that makes N:M masks, densities (N/M,), and no field that N:M masks ignore."""
    _, nm = methods.check_pattern(config)  # a malformed granularity, or N:M for a method without, is refused here
    if nm is None:
        return
    n, m = nm
    pattern = get(config, "mask.granularity")
    densities = tuple(get(config, "densities"))
    if densities != (n / m,):
        raise ConfigError(f"config.mask.granularity={pattern!r} keeps N/M = {n / m!r} of every group, but "
                          f"config.densities={densities!r}: set config.densities=({n / m!r},)")
    floor = get(config, "mask.min_layer_density")
    if floor:
        raise ConfigError(f"config.mask.min_layer_density={floor!r} does not apply to N:M masks (every group keeps "
                          f"{n} of {m}, so no layer empties): use 0 with config.mask.granularity={pattern!r}")
    if get(config, "mask.scope") != "global":
        raise ConfigError(f"config.mask.scope={get(config, 'mask.scope')!r} does not apply to N:M masks (each group "
                          f"of {m} chooses its own {n}): use 'global' with config.mask.granularity={pattern!r}")
    if get(config, "transfer.masks_from"):
        raise ConfigError(f"config.mask.granularity={pattern!r} has no effect with config.transfer.masks_from (the "
                          "masks come from that run): use 'weight' here, and the pattern in the run that found them")


def _check_model(config: Any) -> int:
    """Checks ``config.model``; returns the source head's number of classes."""
    check_choice(config, "model.name", models.MODEL_NAMES)
    check_choice(config, "model.stem", STEMS)
    name, stem = get(config, "model.name"), get(config, "model.stem")
    if name in IMAGENET_STEM_ONLY and stem != "imagenet":
        raise ConfigError(f"config.model.stem={stem!r} is not available for {name}: use 'imagenet'")
    width = get(config, "model.width")
    if not is_real(width) or not width > 0:
        raise ConfigError(f"config.model.width={width!r} must be a positive width multiplier, e.g. 1.0 or 0.25")
    _check_dtype(config)
    check_choice(config, "model.conv_impl", layers.CONV_IMPLS)
    check_choice(config, "model.pool_impl", layers.POOL_IMPLS)
    _check_vit(config)
    return check_int_at_least(config, "model.num_classes", 1, "the source head's classes")


def model_arguments(config: Any) -> dict[str, Any]:
    """``create_model``'s keyword arguments from ``config``, all but ``rngs``: the architecture, the kernels'
    compute settings and, for a ViT, its input side and shape overrides (``models.model_options``)."""
    name = get(config, "model.name")
    return {"num_classes": get(config, "model.num_classes"), "width": get(config, "model.width"),
            "stem": get(config, "model.stem"), "dtype": get(config, "model.dtype"),
            "conv_impl": get(config, "model.conv_impl"), "pool_impl": get(config, "model.pool_impl"),
            **models.model_options(name, get(config, "prompt.output_size"), plain(get(config, "model.vit")))}


def _check_vit(config: Any) -> None:
    """``model.vit`` only for ViTs, a shape that builds, an input side the patches tile; no BatchNorm method."""
    name, options = get(config, "model.name"), plain(get(config, "model.vit"))
    if name not in vit_models.VIT_NAMES:
        given = {key: value for key, value in options.items() if value not in (0, None)}
        if given:
            key, value = next(iter(given.items()))
            raise ConfigError(f"config.model.vit.{key}={value!r} applies only to ViT models "
                              f"({', '.join(vit_models.VIT_NAMES)}), not {name}: leave model.vit at 0 for a CNN")
        return
    try:
        shape = vit_models.vit_shape(name, options, get(config, "model.width"))
    except ValueError as error:
        raise ConfigError(f"config.model.vit: {error}") from None
    size = get(config, "prompt.output_size")
    if is_int(size) and size % shape.patch_size:
        raise ConfigError(f"config.prompt.output_size={size!r} (the ViT's input side) is not a multiple of {name}'s "
                          f"patch size {shape.patch_size}: use a multiple of it, or another model.vit.patch_size")
    plain_size = get(config, "prompt.input_size")
    if plain_size != size:
        # Unprompted images (source pretraining, evaluation without the prompt) reach the model at input_size, and a
        # ViT's position embedding fixes one side; a CNN's global pooling takes both.
        raise ConfigError(f"config.prompt.input_size={plain_size!r} differs from prompt.output_size={size!r}, the "
                          f"ViT's input side, and {name} also sees unprompted images at input_size: use "
                          f"prompt.input_size={size!r} with a ViT, and prompt.kind 'pad', 'fix' or 'random'")
    if get(config, "method") == "slim":
        raise ConfigError(f"config.method='slim' prunes by BatchNorm scales, and {name} has none: use 'vpns' "
                          "with mask.granularity='channel' for a ViT's heads and MLP units")


def _check_data(config: Any, num_classes: int, num_devices: int) -> None:
    _check_task(config, "data", "name", num_classes, "target",
                "label mapping gives each target class its own source class")
    check_int_at_least(config, "data.test_limit", 0, "0 = every test example")
    _check_batch(config, "data.batch_size", num_devices)
    _check_batch(config, "data.eval_batch_size", num_devices)
    check_int_at_least(config, "data.num_threads", 1, "loader threads")
    check_int_at_least(config, "data.workers", -1, "worker processes: -1 = auto, 0 = none")


def _check_source(config: Any, num_classes: int, num_devices: int) -> None:
    _check_task(config, "source", "dataset", num_classes, "source", "the source head needs one output per class")
    check_int_at_least(config, "source.epochs", 1)
    _check_batch(config, "source.batch_size", num_devices)
    check_optimizer(config, "source.optimizer")


def _check_task(config: Any, section: str, dataset_field: str, num_classes: int, what: str, why: str) -> None:
    """A task's dataset, its classes (no more than the head has) and its training-example limit."""
    check_choice(config, f"{section}.{dataset_field}", tuple(registry.DATASETS))
    dataset = get(config, f"{section}.{dataset_field}")
    count = _check_classes(config, f"{section}.classes", dataset)
    if count > num_classes:
        raise ConfigError(
            f"config.model.num_classes={num_classes} is smaller than the {count} {what} classes of "
            f"{dataset}: {why}, so use >= {count}"
        )
    check_int_at_least(config, f"{section}.train_limit", 0, "0 = every training example")


def fingerprint(config: Any) -> dict[str, Any]:
    """The config as a plain JSON-able dict, without the ``NON_RESULT_FIELDS`` (and the ``OMITTED_AT_DEFAULT``
    fields at their defaults).

    Two configs with equal fingerprints give the same results. Sequences become
    lists, so a fingerprint read back from JSON compares equal to a fresh one.
    """
    result = copy.deepcopy(plain(config))
    mask = result.get("mask")
    if isinstance(mask, dict) and not pattern_problem(mask.get("granularity")):
        # Workdirs hold N:M masks as granularity 'weight' with a pattern field, the layout before the one field.
        mask.update(granularity="weight", pattern=mask["granularity"])
    for path in NON_RESULT_FIELDS:
        node, leaf = _parent(result, path)
        node.pop(leaf, None)
    for path, default in OMITTED_AT_DEFAULT.items():
        node, leaf = _parent(result, path)
        if leaf in node and node[leaf] == default:
            del node[leaf]
    json.dumps(result)  # fails loudly if anything is not JSON-able
    return result


def _parent(tree: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """(the dict holding the dotted ``path``'s leaf, or an empty one where there is none; the leaf's name)."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return (node if isinstance(node, dict) else {}), leaf
