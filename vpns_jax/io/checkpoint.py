"""The latest training states of a run: an orbax ``CheckpointManager`` of a ``state`` pytree and a JSON ``meta``.

A save the disk refuses is a one-line ``disk.DiskError`` naming the folder and the step a rerun resumes from,
which is still the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import pathlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging

from vpns_jax.io import disk

T = TypeVar("T")
# Orbax writes step <n> into '<n>.orbax-checkpoint-tmp' and renames it when complete.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_WRITERS_TIMEOUT_S = 60.0  # how long a failed save waits for orbax's other writer threads to end


@contextlib.contextmanager
def _quiet_orbax_save() -> Iterator[None]:
    """Around one orbax save: holds back orbax's ERROR logs, and after a failure waits for its writer threads.

    Orbax's writer threads log a failed write with its traceback before the save raises it; the save raises it
    as one line instead, with the traceback chained for ``--verbose``, so the held logs are dropped then (and
    logged after a save that succeeds). A save raises at its first failed item while the writers of the other
    items still run: waiting for them (up to ``_WRITERS_TIMEOUT_S``) keeps their logs held too, and lets the
    failed save's temporary folder be removed after them, not under them.
    """
    held: list[std_logging.LogRecord] = []

    def hold(record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            held.append(record)
            return False
        return True

    logger = logging.get_absl_logger()
    running = set(threading.enumerate())
    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        deadline = time.monotonic() + _WRITERS_TIMEOUT_S
        for thread in set(threading.enumerate()) - running:
            if type(thread).__module__.startswith("orbax."):  # its writer threads, not long-lived pools
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        raise
    finally:
        logger.removeFilter(hold)
    for record in held:
        logger.handle(record)


class Checkpointer:
    """The last ``max_to_keep`` checkpoints of a run under ``directory``, each a ``state`` pytree and a JSON ``meta``.

    Saves are synchronous and atomic: orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it
    when complete, so a process killed mid-save leaves the previous checkpoint as :meth:`latest_step`. Steps
    must increase (orbax would silently skip an older one). Every process of a multi-process run must call
    :meth:`save` and :meth:`restore` (orbax's saves are collective): no rank checks around them.

    A save the disk refuses (full, read-only) raises a one-line ``disk.DiskError`` naming the folder and the
    step a rerun resumes from; the failed save's temporary folder is removed (single-process runs) to give the
    space back.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            # Orbax would list no checkpoint in it (a silent restart) and fail only at the first save.
            raise disk.DiskError(f"checkpoint folder {self.directory} is a file, not a folder; move it aside, "
                                 f"{disk.RERUN_HINT}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,
        )
        with disk.disk_errors(f"cannot create the checkpoint folder {self.directory}"):
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Writes ``state`` and ``meta`` (JSON-serialisable) as checkpoint ``step``; returns when it is complete."""
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"checkpoint step {step} is not after the latest step {latest} in {self.directory}: "
                "steps must increase"
            )
        json.dumps(meta)  # a clear error here rather than a half-made checkpoint
        try:
            with _quiet_orbax_save():
                saved = self._manager.save(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
                )
                # Orbax's writer threads raise a failed write here at the latest.
                self._manager.wait_until_finished()
        except Exception as error:
            if not disk.is_disk_trouble(error):
                raise
            raise disk.disk_error(f"cannot save checkpoint step {step} in {self.directory}", error,
                                  hint=self._after_failed_save(step)) from error
        if not saved:
            raise RuntimeError(f"orbax declined to save checkpoint step {step} in {self.directory}")

    def _after_failed_save(self, step: int) -> str:
        """Removes what the failed save of ``step`` wrote; the hint naming the step a rerun resumes from."""
        if jax.process_count() == 1:  # other processes may still be writing their shards into it
            for leftover in self.directory.glob(f"{step}{_ORBAX_TMP_SUFFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        latest = self.latest_step()
        with contextlib.suppress(Exception):  # from disk: a failure after the rename leaves the new step complete
            self._manager.reload()
            latest = self.latest_step()
        where = f"from checkpoint step {latest}" if latest is not None else "from the start (no checkpoint yet)"
        return f"then rerun the same command to resume {where} (or start afresh with another --workdir)"

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, oldest first."""
        return sorted(self._manager.all_steps())

    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)

    def restore_meta(self, step: int | None = None) -> dict:
        """The ``meta`` dict of checkpoint ``step`` (default: the latest), without reading the state."""
        step = self._step_or_latest(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Checkpoint ``step`` (default: the latest) as ``(state, meta)``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``) with the caller's structure: the restored state has
        exactly that tree structure (dataclasses, NamedTuples, None fields) and
        those dtypes. Leaves that carry a ``sharding`` are placed accordingly;
        those without one get the sharding they were saved with (which needs the
        same device topology as the saving run).
        """
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        state = restored.state
        expected, got = jax.tree.structure(abstract_state), jax.tree.structure(state)
        if expected != got:
            raise ValueError(f"checkpoint step {step} in {self.directory} restored as {got}, expected {expected}")
        return state, restored.meta

    def newest_readable(self, read: Callable[[int], T]) -> T | None:
        """``read(step)`` of the newest checkpoint it succeeds on; None when there is no checkpoint.

        A checkpoint that fails to read (truncated or corrupted files) is reported
        as a warning and the one before it is tried; it stays on disk, untouched.
        When every checkpoint fails, a one-line error names each failure.
        """
        problems = []
        for step in reversed(self.all_steps()):
            try:
                return read(step)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                problem = " ".join(str(error).split())[:300] or type(error).__name__
                problems.append(f"step {step}: {problem}")
                logging.warning("checkpoint step %d in %s is unreadable (%s); trying the one before it",
                                step, self.directory, problem)
        if problems:
            raise ValueError(f"no checkpoint in {self.directory} reads back whole ({'; '.join(problems)[:600]}); "
                             f"move {self.directory} away to start this run afresh")
        return None

    def close(self) -> None:
        """Waits for orbax's outstanding work and closes it; a write that failed there is a ``disk.DiskError``."""
        with disk.disk_errors(f"cannot finish writing the checkpoints in {self.directory}"):
            self._manager.wait_until_finished()
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        # The error on its way out (e.g. a failed save) is the one to report, not a second one from closing.
        try:
            self.close()
        except Exception as error:  # noqa: BLE001 - any, so that it does not replace the first
            logging.info("closing the checkpoints in %s after an error failed too: %s", self.directory, error)
