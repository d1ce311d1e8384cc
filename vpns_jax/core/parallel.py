"""The device mesh and shardings of data-parallel runs: state replicated, batches split over ``data``.

No pmap: steps are plain ``jax.jit`` functions whose inputs carry these
shardings, and XLA inserts the gradient all-reduces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) with the ``data`` axis."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (model state, optimiser state, prompt)."""
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """A global batch must split evenly over devices and processes; a one-line error otherwise."""
    devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"global batch size {global_batch_size} does not divide by the {devices} devices of the mesh: "
            f"use a multiple of {devices}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch_size} does not divide by the {jax.process_count()} processes"
        )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global jax Arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}


def replicate(tree, mesh: Mesh):
    """Places a pytree (e.g. a training state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
