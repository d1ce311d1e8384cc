"""Deterministic, resumable, per-process batches from prepared TFDS datasets, without TensorFlow.

Batch ``b`` of epoch ``e`` of a ``BatchStream`` is a pure function of (seed, stream, e, b), so a position is two
integers and a restart sees exactly the batches an uninterrupted run would, whatever the number of processes, loader
threads or worker processes. Batches hold uint8 pixels, scaled to [0, 1] on the device by ``unit_pixels`` (which the
trainer hands to ``parallel.global_batch``), bit for bit (docs/data.md, "Transforms and streams").
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from vpns_jax.data import registry, workers
from vpns_jax.data.examples import PAD_LABEL, load_pixels, read_examples

VIEWS = ("clean", "augmented")


def open_split(
    name: str, split: str, data_dir: str | None = None, *, labels_only: bool = False
) -> Sequence[dict[str, Any]]:
    """Random-access examples ({'image': uint8 HWC, 'label': int, ...}) of a prepared split.

    Fails at once, offline, if the split is not prepared as array_record under ``data_dir``. ``labels_only`` leaves
    the other features undecoded (bytes), for fast label scans.
    """
    import vpns_jax.data.builders  # noqa: F401  (registers our TFDS builders)

    spec = registry.get_dataset_spec(name)
    version_dir = registry.prepared_dir(spec, data_dir)
    formats = registry.prepared_file_formats(version_dir)
    if "array_record" not in formats:
        raise registry.DataNotFoundError(
            f"dataset {name!r} in {version_dir} is prepared as {formats[0]}, which has no random access: "
            f"pip install tensorflow-cpu, then python -m vpns_jax.data.prepare --dataset={name} --convert"
        )
    relative = version_dir.relative_to(registry.resolve_data_dir(data_dir) / spec.tfds_name)
    *config, version = relative.parts
    identifier = "/".join([spec.tfds_name, *config]) + f":{version}"
    builder = tfds.builder(identifier, data_dir=str(registry.resolve_data_dir(data_dir)))
    options: dict[str, Any] = {}
    if labels_only:
        options["decoders"] = {key: tfds.decode.SkipDecoding() for key in builder.info.features if key != "label"}
    if formats[0] != "array_record":
        options["file_format"] = "array_record"  # a converted alternative
    return builder.as_data_source(split, **options)


def read_labels(name: str, split: str, data_dir: str | None = None) -> np.ndarray:
    """Every label of a prepared split, in order, without decoding images (batched reads)."""
    source = open_split(name, split, data_dir, labels_only=True)
    labels = []
    for start in range(0, len(source), 4096):
        keys = list(range(start, min(start + 4096, len(source))))
        labels += [int(example["label"]) for example in source.__getitems__(keys)]
    return np.asarray(labels, np.int64)


class ClassSubset(Sequence):
    """The examples of ``classes`` only (the first ``limit`` of them), relabelled 0..len(classes)-1 in order.

    For class splits of one dataset (source task on classes 0-4, target on 5-9); ``labels`` (``read_labels``)
    spares decoding every example to find them.
    """

    def __init__(self, source: Sequence[dict[str, Any]], classes: Sequence[int], limit: int | None = None,
                 labels: Sequence[int] | None = None):
        relabel = {int(c): new for new, c in enumerate(classes)}
        if labels is None:
            labels = [int(source[i]["label"]) for i in range(len(source))]
        elif len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for a source of {len(source)} examples")
        self.indices = [i for i, label in enumerate(labels) if label in relabel][:limit]
        self.labels = [relabel[int(labels[i])] for i in self.indices]
        self.source = source

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[self.indices[index]], "label": self.labels[index]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several examples in one read of the underlying source (``examples.read_examples``)."""
        records = read_examples(self.source, [self.indices[i] for i in indices])
        return [{**record, "label": self.labels[i]} for i, record in zip(indices, records)]


def open_subset(name: str, split: str, data_dir: str | None = None, *, classes: Sequence[int] = (),
                limit: int = 0) -> Sequence[dict[str, Any]]:
    """A prepared split, restricted to ``classes`` (relabelled 0..k-1) and to its first ``limit`` examples
    when either is given (0 / () = all)."""
    source = open_split(name, split, data_dir)
    if not (classes or limit):
        return source
    classes = classes or range(registry.get_dataset_spec(name).num_classes)
    return ClassSubset(source, classes, limit or None, labels=read_labels(name, split, data_dir))


def _assemble(parts: list[concurrent.futures.Future]) -> dict[str, np.ndarray]:
    try:
        images, labels = zip(*(part.result() for part in parts))
    except BrokenProcessPool as error:
        raise workers.worker_died(error) from error
    return {"image": np.concatenate(images), "label": np.concatenate(labels)}


class BatchStream:
    """Batches of one view of a split, for this process, at explicit (epoch, batch) positions.

    This process reads its ``global_batch_size / process_count`` rows of each global batch, from ``source`` itself
    (``num_threads`` threads) or a ``workers.RemoteSource`` (worker processes): the same bytes either way. The
    ``prefetch`` batches after the current one are built while it is used.
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]] | workers.RemoteSource,
        *,
        global_batch_size: int,
        image_size: int,
        view: str,
        seed: int,
        stream: int = 0,
        training: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 4,
        prefetch: int = 2,
    ):
        if view not in VIEWS:
            raise ValueError(f"view {view!r} is unknown: use one of {VIEWS}")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size <= 0 or global_batch_size % self.process_count:
            raise ValueError(
                f"global batch size {global_batch_size} does not divide by the {self.process_count} processes"
            )
        self.source = source
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("the split is empty: check the dataset and split name")
        if training and self.num_examples < global_batch_size:
            raise ValueError(
                f"the split has {self.num_examples} examples, fewer than one global batch of {global_batch_size}: "
                "lower the batch size"
            )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.image_size, self.view, self.seed, self.stream, self.training = image_size, view, seed, stream, training
        self.epoch = 0
        self.batch = 0
        self._prefetch = prefetch
        self._remote = isinstance(source, workers.RemoteSource)
        # Workers take whole batches while enough are in flight to keep each busy (fewer, larger tasks amortise
        # the pool's round trip), else shares.
        self._chunks = max(1, source.pool.workers // (prefetch + 1)) if self._remote else max(1, num_threads)
        # Batches are assembled one after another in their own thread; their chunks load in the example
        # threads (or worker processes), which never wait on anything, so no pool waits on itself.
        self._batch_pool = concurrent.futures.ThreadPoolExecutor(1)
        self._example_pool = None if self._remote else concurrent.futures.ThreadPoolExecutor(self._chunks)
        self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._order: tuple[int | None, np.ndarray | None] = (None, None)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch when training (the remainder is dropped); all, padded, otherwise."""
        if self.training:
            return self.num_examples // self.global_batch_size
        return math.ceil(self.num_examples / self.global_batch_size)

    def global_indices(self, epoch: int, batch: int) -> np.ndarray:
        """Example indices of global batch ``batch`` of ``epoch`` (-1 marks padding)."""
        order = self._epoch_order(epoch)
        indices = order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]
        return np.pad(indices, (0, self.global_batch_size - len(indices)), constant_values=-1)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: its permutation when training, computed once per epoch (a draw per
        batch is costly on large splits)."""
        if self._order[0] != epoch:
            if self.training:
                order = np.random.default_rng((self.seed, self.stream, epoch)).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._order = (epoch, order)
        return self._order[1]

    def local_indices(self, epoch: int, batch: int) -> np.ndarray:
        """This process's rows of the global batch."""
        start = self.process_index * self.local_batch_size
        return self.global_indices(epoch, batch)[start : start + self.local_batch_size]

    def _start(self, epoch: int, batch: int) -> concurrent.futures.Future:
        """Starts building this process's batch at a position; the future gives what ``load`` returns."""
        indices = self.local_indices(epoch, batch)
        task = {"view": self.view, "image_size": self.image_size, "seed": self.seed, "stream": self.stream,
                "epoch": epoch}
        chunks = np.array_split(indices, min(len(indices), self._chunks))
        if self._remote:
            parts = [self.source.submit(chunk, task) for chunk in chunks]
        else:
            parts = [self._example_pool.submit(load_pixels, self.source, chunk, **task) for chunk in chunks]
        return self._batch_pool.submit(_assemble, parts)

    def load(self, epoch: int, batch: int) -> dict[str, np.ndarray]:
        """This process's batch at a position: {'image': (b, S, S, 3) uint8, 'label': (b,) int32}; the pixels are
        ``ToTensor``'s input, scaled to [0, 1] on the device by ``unit_pixels``."""
        return self._start(epoch, batch).result()

    def _position_after(self, epoch: int, batch: int) -> tuple[int, int]:
        batch += 1
        return (epoch + 1, 0) if batch >= self.batches_per_epoch else (epoch, batch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The batch at the current position; then the position advances (into the next epoch at the end)."""
        position = (self.epoch, self.batch)
        ahead = position
        for _ in range(self._prefetch + 1):
            if ahead not in self._pending:
                self._pending[ahead] = self._start(*ahead)
            ahead = self._position_after(*ahead)
        batch = self._pending.pop(position).result()
        self.epoch, self.batch = self._position_after(*position)
        return batch

    def epoch_batches(self, epoch: int = 0):
        """Every batch of one epoch in order, without moving the stream's position (for evaluation)."""
        ahead: collections.deque[concurrent.futures.Future] = collections.deque()
        started = 0
        for _ in range(self.batches_per_epoch):
            while started < self.batches_per_epoch and len(ahead) <= self._prefetch:
                ahead.append(self._start(epoch, started))
                started += 1
            yield ahead.popleft().result()

    def get_state(self) -> dict[str, int]:
        """The position of the next batch, as plain ints (JSON-serialisable)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def set_state(self, state: dict[str, int]) -> None:
        """Resumes at a saved position; prefetched batches from elsewhere are dropped."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"stream position {state} is outside the {self.batches_per_epoch} batches of an epoch")
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self.epoch, self.batch = epoch, batch


def training_streams(
    source: Sequence[dict[str, Any]], *, global_batch_size: int, image_size: int, seed: int, **kwargs: Any
) -> tuple[BatchStream, BatchStream]:
    """The reference's two training loaders over one training set, each with its own shuffle:
    the clean view for the prompted sub-step and the augmented view for the plain one."""
    clean = BatchStream(source, global_batch_size=global_batch_size, image_size=image_size, view="clean",
                        seed=seed, stream=0, **kwargs)
    augmented = BatchStream(source, global_batch_size=global_batch_size, image_size=image_size, view="augmented",
                            seed=seed, stream=1, **kwargs)
    return clean, augmented


def eval_stream(source: Sequence[dict[str, Any]], *, global_batch_size: int, image_size: int,
                **kwargs: Any) -> BatchStream:
    """The test split in order, clean view, last batch padded with label -1."""
    return BatchStream(source, global_batch_size=global_batch_size, image_size=image_size, view="clean",
                       seed=0, training=False, **kwargs)


# ToTensor's x / 255 for every uint8 value, computed once by numpy's correctly rounded division. XLA turns a
# division by a constant into a multiplication by its reciprocal, which differs in the last bit for some values.
_UNIT_PIXELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


@jax.jit
def unit_pixels(pixels: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1], bit for bit ``ToTensor``'s scaling (the input pipeline's last step,
    done on the device: a quarter of the bytes cross to it). Keeps the input's sharding."""
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"unit_pixels scales uint8 pixels, got {pixels.dtype}")
    return jnp.asarray(_UNIT_PIXELS)[pixels.astype(jnp.int32)]
