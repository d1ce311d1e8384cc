"""The device mesh and shardings of data-parallel runs: state replicated, batches split over ``data``.

No pmap: steps are plain ``jax.jit`` functions whose inputs carry these shardings; XLA inserts the all-reduces.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

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


PixelScale = Callable[[jax.Array], jax.Array]  # uint8 pixels on the device -> the floats the steps read


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, *,
                 scale_pixels: PixelScale | None = None) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global jax Arrays sharded over ``data``; uint8 arrays (the input
    pipeline's pixels) go through ``scale_pixels`` on the device (``data.pipeline.unit_pixels``: [0, 1])."""
    pixels = [key for key, value in local.items() if value.dtype == np.uint8]
    if pixels and scale_pixels is None:
        raise TypeError(f"batch arrays {pixels} are uint8 pixels: pass scale_pixels (data.pipeline.unit_pixels)")
    sharding = batch_sharding(mesh)
    placed = {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}
    return {key: scale_pixels(value) if key in pixels else value for key, value in placed.items()}


def prefetch_to_device(local_batches: Iterator[Any], mesh: Mesh, size: int = 2, *,
                       scale_pixels: PixelScale | None = None) -> Iterator[Any]:
    """The global form (``global_batch`` of every batch in each item) of ``local_batches``, ``size`` items ahead:
    their host-to-device copies and pixel scaling are queued while the steps before them run."""
    ahead: collections.deque = collections.deque()
    local_batches = iter(local_batches)

    def enqueue(count: int) -> None:
        for item in itertools.islice(local_batches, count):
            ahead.append(jax.tree.map(lambda b: global_batch(b, mesh, scale_pixels=scale_pixels), item,
                                      is_leaf=_is_batch))

    enqueue(size)
    while ahead:
        yield ahead.popleft()
        enqueue(1)


def _is_batch(node: Any) -> bool:
    return isinstance(node, Mapping) and all(isinstance(v, np.ndarray) for v in node.values())


def replicate(tree, mesh: Mesh):
    """Places a pytree (e.g. a training state) on every device of the mesh; leaves already global are kept.

    With several processes, a leaf held whole here is rebuilt with ``make_array_from_process_local_data``:
    ``device_put`` onto a mesh of one device per process gives arrays orbax cannot save (jax 0.10)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(place, tree)
