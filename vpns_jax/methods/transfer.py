"""Subnetwork transfer: each density's masks (and prompt) from a finished run's workdir, only finetuned here.

The source run is another dataset's run of the same model (``config.transfer.masks_from``);
what it left in ``subnetworks/density_<d>/`` is read here. A method says how it
finetunes transferred masks (``Method.transfer_plan``).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from vpns_jax.config_fields import ConfigError
from vpns_jax.io import checkpoint, workdir
from vpns_jax.methods.base import MethodContext, Params

TRANSFERRED_FILES = ("masks.npz", "prompt.npz")  # what config.transfer.masks_from takes from each density


def check_sources(config: Any) -> None:
    """A one-line error when the source workdir lacks a finished subnetwork of one of ``config.densities``."""
    source = pathlib.Path(config.transfer.masks_from)
    missing = [d for d in config.densities
               if not all((workdir.unit_folder(source, d) / name).is_file() for name in TRANSFERRED_FILES)]
    if missing:
        raise ConfigError(
            f"config.transfer.masks_from={config.transfer.masks_from!r} has no finished subnetwork for densities "
            f"{missing} (no {' or '.join(TRANSFERRED_FILES)} in {workdir.unit_folder(source, missing[0])}): run "
            "them there first, or list only the densities it has")


def transferred(run: MethodContext, density: float) -> tuple[Params, Params | None]:
    """Masks and prompt of ``density`` from the source run (prompt None when its geometry differs: only the
    mask transfers then)."""
    folder = workdir.unit_folder(pathlib.Path(run.config.transfer.masks_from), density)
    masks, prompt = (checkpoint.load_arrays(folder / name) for name in TRANSFERRED_FILES)  # check_sources ran
    expected = run.ones_masks()
    if jax.tree.structure(expected) != jax.tree.structure(masks) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(masks))):
        raise ConfigError(
            f"config.transfer.masks_from: the masks in {folder} do not fit {run.config.model.name} at width "
            f"{run.config.model.width}: transfer between runs of the same model")
    if prompt["program"].shape != run.zero_prompt["program"].shape:
        return masks, None
    return masks, prompt
