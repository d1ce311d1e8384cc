"""Subnetwork transfer: each density's masks (and prompt) from a finished run, only finetuned here.

The source run is another dataset's run of the same model (``config.transfer.masks_from``); the run context
reads what it left for a density (``MethodContext.transfer_arrays``) and this module checks that it fits. A
method says how it finetunes transferred masks (``Method.transfer_plan``).
"""

from __future__ import annotations

import jax

from vpns_jax.config_fields import ConfigError
from vpns_jax.methods.base import MethodContext, Params


def transferred(run: MethodContext, density: float) -> tuple[Params, Params | None]:
    """Masks and prompt of ``density`` from the source run (prompt None when its geometry differs: only the
    mask transfers then)."""
    masks, prompt = run.transfer_arrays(density)
    expected = run.ones_masks()
    if jax.tree.structure(expected) != jax.tree.structure(masks) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(masks))):
        raise ConfigError(
            f"config.transfer.masks_from: the masks of density {density} in {run.config.transfer.masks_from} do "
            f"not fit {run.config.model.name} at width {run.config.model.width}: transfer between runs of the same "
            "model")
    if prompt["program"].shape != run.zero_prompt["program"].shape:
        return masks, None
    return masks, prompt
