"""The method registry: names to ``Method`` objects, and the questions the trainer and the checks ask it.

``register`` adds a method (a fork's own, see ``experiments/custom_method.py``);
``make_plan``, ``check_config``, ``initial_scores`` and ``unit_masks`` answer for
the method ``config.method`` names, including subnetwork transfer
(``config.transfer.masks_from``, ``vpns_jax.methods.transfer``), which replaces
a method's mask finding by the masks of another run.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vpns_jax.config_fields import ConfigError, mask_pattern
from vpns_jax.methods import transfer
from vpns_jax.methods.base import Method, MethodContext, Params, Plan, Section, Unit

_METHODS: dict[str, Method] = {}
_BUILTIN: set[str] = set()


def register(method: Method, *, builtin: bool = False) -> Method:
    """Adds ``method`` under ``method.name``; a later registration of a non-built-in name replaces the earlier."""
    if not method.name or not method.name.isidentifier():
        raise ValueError(f"a method needs a name that is a Python identifier, got {method.name!r}")
    if method.name in _BUILTIN:
        raise ValueError(f"method {method.name!r} is built in: give yours another name")
    _METHODS[method.name] = method
    if builtin:
        _BUILTIN.add(method.name)
    return method


def names() -> tuple[str, ...]:
    """The registered methods' names, built-in first, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The method called ``name`` (a one-line error listing the known ones otherwise)."""
    if name not in _METHODS:
        raise ConfigError(f"config.method={name!r} is unknown: use one of {', '.join(_METHODS)}")
    return _METHODS[name]


def sections(builtin_only: bool = False) -> tuple[Section, ...]:
    """Every section the registered (or only the built-in) methods read, once each, in first-use order."""
    found: dict[str, Section] = {}
    for name, method in _METHODS.items():
        if builtin_only and name not in _BUILTIN:
            continue
        for section in method.sections:
            found.setdefault(section.name, section)
    return tuple(found.values())


def add_sections(config: ml_collections.ConfigDict, method: Method | None = None) -> None:
    """Adds the default config sections of ``method`` (default: every built-in method) that ``config`` lacks."""
    for section in method.sections if method is not None else sections(builtin_only=True):
        if section.name not in config:
            config[section.name] = section.defaults()


def check_config(config: Any) -> None:
    """The methods' config checks: every registered section present in ``config``, then the plan of
    ``config.method`` (its own checks, granularity and transfer)."""
    method = get_method(config.method)
    missing = [section.name for section in method.sections if section.name not in config]
    if missing:
        raise ConfigError(f"config.{missing[0]} is missing, but method {method.name!r} reads it: start the config "
                          "from vpns_jax/config/base.py's get_config() (and add the method's sections to it)")
    for section in sections():
        if section.name in config:
            section.validate(config)
    make_plan(config)


def nm_methods() -> tuple[str, ...]:
    """The registered methods that make N:M masks (``Method.supports_nm``)."""
    return tuple(name for name, method in _METHODS.items() if method.supports_nm)


def check_pattern(config: Any) -> tuple[str, tuple[int, int] | None]:
    """``mask_pattern(config)``, after checking that the method makes masks of that pattern."""
    method = get_method(config.method)
    granularity, nm = mask_pattern(config)
    if nm is not None and not method.supports_nm:
        raise ConfigError(
            f"config.mask.granularity={config.mask.granularity!r} is not available for method {method.name!r}: use "
            f"one of {', '.join(nm_methods())}, or granularity 'weight'")
    return granularity, nm


def make_plan(config: Any) -> Plan:
    """The plan of ``config`` (its method, mask pattern and granularity, epochs and densities)."""
    method = get_method(config.method)
    granularity, _ = check_pattern(config)
    if granularity not in method.granularities:
        raise ConfigError(
            f"config.mask.granularity={granularity!r} is not available for method {method.name!r}: use one of "
            f"{', '.join(map(repr, method.granularities))}"
        )
    if config.mask.min_layer_density and granularity not in method.floor_granularities:
        raise ConfigError(
            f"config.mask.min_layer_density={config.mask.min_layer_density!r} is not applied by method "
            f"{method.name!r} with {granularity!r} masks: use 0 with it, or a method whose masks come from scores")
    method.check(config)
    if not config.transfer.masks_from:
        return method.plan(config)
    plan = method.transfer_plan(config)
    if plan is None:
        transferable = [name for name, m in _METHODS.items() if m.transfer_plan(config) is not None]
        raise ConfigError(f"config.transfer.masks_from is set, but method {method.name!r} does not find a mask to "
                          f"transfer: use one of {', '.join(transferable)}")
    return plan


def initial_scores(plan: Plan, run: MethodContext) -> Params:
    """The scores every unit of ``plan`` starts from ({} when the masks are transferred)."""
    return {} if run.config.transfer.masks_from else plan.method.initial_scores(run)


def unit_start(plan: Plan, run: MethodContext, unit: Unit, index: int) -> tuple[Params | None, Params | None]:
    """(masks, prompt) a unit starts from: transferred, or the method's (masks None: from the scores; prompt
    None: a zero prompt)."""
    if run.config.transfer.masks_from:
        return transfer.transferred(run, unit.density)
    return plan.method.unit_masks(run, unit, index), None
