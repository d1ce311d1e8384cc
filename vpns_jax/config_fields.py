"""Reading and checking one config field: the one-line ``ConfigError`` every check raises, and optimiser groups.

Shared by the run-wide checks (``vpns_jax.config_checks``) and the methods'
own config sections (``vpns_jax.methods``): a message names the field as it is
overridden on the command line (``config.a.b``), its value and the fix.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from vpns_jax.core import nm, optim, steps

OPTIMIZERS = ("sgd", "adam")


class ConfigError(ValueError):
    """A config field has a value vpns_jax cannot run with; the message names the field and the fix."""


def get(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        try:
            value = value[part]
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"config.{path} is missing: start the config from vpns_jax/config/base.py's get_config()"
            ) from None
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(config: Any, path: str, choices: Sequence[str]) -> None:
    value = get(config, path)
    if value not in choices:
        raise ConfigError(f"config.{path}={value!r} is unknown: use one of {', '.join(map(repr, choices))}")


def check_int_at_least(config: Any, path: str, minimum: int, what: str = "") -> int:
    value = get(config, path)
    if not is_int(value) or value < minimum:
        hint = f" ({what})" if what else ""
        raise ConfigError(f"config.{path}={value!r} must be an integer >= {minimum}{hint}")
    return int(value)


def check_optimizer(config: Any, path: str) -> None:
    check_choice(config, f"{path}.optimizer", OPTIMIZERS)
    lr = get(config, f"{path}.lr")
    if not is_real(lr) or not lr > 0:
        raise ConfigError(f"config.{path}.lr={lr!r} must be a positive learning rate, e.g. 1e-4")
    for field in ("weight_decay", "momentum", "clip_value"):
        value = get(config, f"{path}.{field}")
        if not is_real(value) or not value >= 0:
            raise ConfigError(f"config.{path}.{field}={value!r} must be a number >= 0 (0 turns it off)")


def check_fraction(config: Any, path: str, what: str) -> None:
    value = get(config, path)
    if not is_real(value) or not 0 < value < 1:
        raise ConfigError(f"config.{path}={value!r} must be a fraction in (0, 1): {what}")


# Fields folded into another: old path -> (new path, old value -> new value).
RENAMED_FIELDS = {"mask.pattern": ("mask.granularity", {"unstructured": "weight"})}


def renamed_field_error(path: str, value: Any) -> ConfigError:
    """The one-line error for a field that was folded into another, naming the new spelling of ``value``."""
    new_path, values = RENAMED_FIELDS[path]
    new_value = values.get(value, value) if isinstance(value, str) else value
    return ConfigError(f"config.{path} was folded into config.{new_path}: use --config.{new_path}={new_value} "
                       f"(in a config file, config.{new_path} = {new_value!r})")


def mask_pattern(config: Any) -> tuple[str, tuple[int, int] | None]:
    """(granularity, (N, M) or None) of ``config.mask.granularity``: 'weight', 'channel' or an 'N:M' string.

    The one place that reads what a mask's unit is; N:M masks are per-weight, so their granularity is 'weight'.
    """
    if "pattern" in config.mask:
        raise renamed_field_error("mask.pattern", config.mask.pattern)
    granularity = get(config, "mask.granularity")
    if granularity in steps.GRANULARITIES:  # else an N:M string: per-weight masks kept N of every M
        return granularity, None
    problem = nm.pattern_problem(granularity)
    if problem:
        raise ConfigError(f"config.mask.granularity={granularity!r} {problem}: use 'weight', 'channel', or an N:M "
                          "pattern such as '2:4' or '1:4'")
    return "weight", nm.parse_nm(granularity)


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
        raise ConfigError(f"optimiser config {plain(cfg)}: {error}") from None


def plain(value: Any) -> Any:
    """A JSON-able copy: mappings become dicts with string keys, sequences lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-able")
