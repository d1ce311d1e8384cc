"""Worker processes that decode and augment examples, so the input pipeline scales with CPU cores.

Workers are spawned (a process that has started JAX must not ``fork``), get the run's sources once, and build chunks
with the same ``examples.load_pixels`` as in-process loading, so a batch holds the same bytes either way. They exit
when their parent does, even after a SIGKILL (docs/data.md, "Who builds the batches").
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from vpns_jax import cli
from vpns_jax.data import examples

_SOURCES: dict[str, Sequence[dict[str, Any]]] = {}  # in a worker process: the sources it was started with


def _start_worker(sources: Mapping[str, Sequence[dict[str, Any]]], parent: int) -> None:
    # Ctrl-C reaches the whole process group: the training process reports it; a worker would print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _SOURCES.update(sources)
    # An orphaned worker would block on its task queue forever: its copy of the queue keeps the pipe open.
    cli.watch_parent(parent, lambda: os._exit(0))


def _ready() -> int:
    return os.getpid()


def _load(key: str, indices: np.ndarray, task: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return examples.load_pixels(_SOURCES[key], indices, **task)


class WorkerPool:
    """``workers`` processes holding ``sources`` (by key), started now so their start-up overlaps the caller's."""

    def __init__(self, sources: Mapping[str, Sequence[dict[str, Any]]], workers: int):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {workers!r}")
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise RuntimeError("a data worker re-ran the main script and reached code that starts workers: "
                               "put the script's top-level code under if __name__ == '__main__':")
        self.workers = workers
        self._lengths = {key: len(source) for key, source in sources.items()}
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(dict(sources), os.getpid()))
        self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        self._warming = [self._executor.submit(_ready) for _ in range(workers)]

    def source(self, key: str) -> RemoteSource:
        """The pool's source ``key``, to pass to ``pipeline.BatchStream`` in place of the source itself."""
        if key not in self._lengths:
            raise KeyError(f"the worker pool holds no source {key!r}: it has {sorted(self._lengths)}")
        return RemoteSource(self, key, self._lengths[key])

    def submit(self, key: str, indices: np.ndarray, task: Mapping[str, Any]) -> concurrent.futures.Future:
        """Starts ``examples.load_pixels(source key, indices, **task)`` in a worker."""
        try:
            return self._executor.submit(_load, key, indices, dict(task))
        except BrokenProcessPool as error:
            raise worker_died(error) from error

    def wait_ready(self) -> None:
        """Blocks until every worker has started (for benchmarks that time loading, not start-up)."""
        for future in self._warming:
            future.result()

    def close(self) -> None:
        """Stops the workers; pending loads are cancelled."""
        self._finalizer()


class RemoteSource:
    """One source of a ``WorkerPool``: its length here, its examples in the workers."""

    def __init__(self, pool: WorkerPool, key: str, length: int):
        self.pool, self.key, self.length = pool, key, length

    def __len__(self) -> int:
        return self.length

    def submit(self, indices: np.ndarray, task: Mapping[str, Any]) -> concurrent.futures.Future:
        """Starts loading ``indices`` in a worker; the future gives (uint8 images, int32 labels)."""
        return self.pool.submit(self.key, indices, task)


def worker_died(error: BaseException) -> RuntimeError:
    """The one-line error for a data worker that died (killed, or out of memory)."""
    return RuntimeError(f"a data worker process died ({error}; its own message, if any, is above): lower "
                        "config.data.workers or free memory, then rerun the same command to resume")
