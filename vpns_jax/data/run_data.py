"""The data a run reads: its datasets prepared (offline ones on demand), the training streams, the test stream."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils

from vpns_jax.data import pipeline, prepare, registry, workers

OFFLINE_PREPARABLE = ("fashion_mnist", "digits")


@dataclasses.dataclass
class RunData:
    """A run's data streams and what it needs to know about its target classes."""

    streams: dict[str, pipeline.BatchStream]  # training streams by name (methods.iterations.DATA_STREAMS)
    mapping: pipeline.BatchStream  # augmented training batches, every example once: label mapping, saliencies
    test: pipeline.BatchStream
    num_target: int
    class_names: list[str] | None
    pool: workers.WorkerPool | None = None  # the worker processes behind the streams, if any

    def close(self) -> None:
        """Stops the worker processes (the streams cannot load after this)."""
        if self.pool is not None:
            self.pool.close()

    @property
    def iterations_per_epoch(self) -> int:
        """Training iterations per epoch (every training stream has the same number of batches)."""
        return self.streams["clean"].batches_per_epoch


AUTO_WORKERS_CAP = 16  # each worker holds its own Python, NumPy and PIL: a few hundred MB


def worker_count(setting: int) -> int:
    """Worker processes for ``config.data.workers``: ``-1`` (auto) is none on the CPU backend, where training
    already uses every core, else one per core but one (for the training loop), at most ``AUTO_WORKERS_CAP``."""
    if setting >= 0:
        return setting
    if jax.default_backend() == "cpu":
        return 0
    return min(AUTO_WORKERS_CAP, max(1, (os.cpu_count() or 2) - 1))


def stream_sources(sources: dict[str, Sequence], setting: int) -> tuple[dict[str, Sequence], workers.WorkerPool | None]:
    """``sources`` as the streams should read them: themselves (``num_threads`` threads here) or, with worker
    processes, their ``workers.RemoteSource`` in a new pool (returned too, for closing)."""
    count = worker_count(setting)
    if count == 0:
        return sources, None
    pool = workers.WorkerPool(sources, count)
    return {key: pool.source(key) for key in sources}, pool


def ensure_prepared(name: str, data_dir: str | None, auto_prepare: bool) -> None:
    """Prepares an offline dataset that is missing (process 0; the others wait), else leaves the error to open_split."""
    spec = registry.get_dataset_spec(name)
    try:
        registry.prepared_dir(spec, data_dir)
        return
    except registry.DataNotFoundError:
        if not (auto_prepare and name in OFFLINE_PREPARABLE):
            raise
    if jax.process_index() == 0:
        prepare.prepare(name, data_dir=data_dir)
    multihost_utils.sync_global_devices(f"prepared {name}")


def dataset_class_names(name: str, data_dir: str | None = None, classes: Sequence[int] = (),
                        num_target: int | None = None) -> list[str] | None:
    """Names of the target classes of a prepared dataset, or None if its label feature has none: those of
    ``classes`` (as ``config.data.classes``, in its order), else the first ``num_target`` (default: all)."""
    spec = registry.get_dataset_spec(name)
    try:
        source = pipeline.open_split(name, spec.test_split, data_dir, labels_only=True)
        names = list(source.dataset_info.features["label"].names)
    except (AttributeError, KeyError, TypeError):  # a data source or label feature without names
        return None
    chosen = [int(c) for c in classes] if classes else list(range(num_target if num_target is not None else len(names)))
    if not names or any(not 0 <= c < len(names) for c in chosen):
        return None
    return [str(names[c]) for c in chosen]


def _nonempty(subset, config: Any, split: str):
    """``subset``, or a one-line error when the split holds no example of the configured classes."""
    if len(subset) == 0:
        raise ValueError(
            f"the {split} split of {config.data.name!r} has no examples of config.data.classes="
            f"{tuple(config.data.classes) or 'all'}: choose classes it has, or prepare the dataset again "
            "(python -m vpns_jax.data.prepare)")
    return subset


def open_run_data(config: Any) -> RunData:
    """Prepares the config's datasets if needed and opens its streams."""
    data_dir = config.data.data_dir or None
    names = [config.data.name] + ([config.source.dataset] if config.source.enabled else [])
    for name in dict.fromkeys(names):
        ensure_prepared(name, data_dir, config.data.auto_prepare)
        registry.check_class_count(registry.get_dataset_spec(name), data_dir)  # metadata only: cheap
    data_spec = registry.get_dataset_spec(config.data.name)
    num_target = len(config.data.classes) or data_spec.num_classes  # config_checks.validate: it fits the head
    train, test = (_nonempty(pipeline.open_subset(config.data.name, split, data_dir, classes=config.data.classes,
                                                  limit=limit), config, split)
                   for split, limit in ((data_spec.train_split, config.data.train_limit),
                                        (data_spec.test_split, config.data.test_limit)))
    readable, pool = stream_sources({"train": train, "test": test}, config.data.workers)
    train, test = readable["train"], readable["test"]
    size, threads, seed = config.prompt.input_size, config.data.num_threads, config.seed
    batch, eval_batch = config.data.batch_size, config.data.eval_batch_size
    clean, augmented = pipeline.training_streams(train, global_batch_size=batch, image_size=size, seed=seed,
                                                 num_threads=threads)
    # BiP's score step reads a second, independently shuffled augmented stream.
    second = pipeline.BatchStream(train, global_batch_size=batch, image_size=size, view="augmented", seed=seed,
                                  stream=4, num_threads=threads)
    # The reference computes the label mapping over the augmented training loader, every example once.
    mapping = pipeline.BatchStream(train, global_batch_size=eval_batch, image_size=size, view="augmented",
                                   seed=seed, stream=2, training=False, num_threads=threads)
    test_stream = pipeline.eval_stream(test, global_batch_size=eval_batch, image_size=size, num_threads=threads)
    class_names = dataset_class_names(config.data.name, data_dir, config.data.classes, num_target)
    return RunData({"clean": clean, "augmented": augmented, "second": second}, mapping, test_stream, num_target,
                   class_names, pool)

