"""Resumable run state on disk: orbax checkpoints, the workdir's config guard and plain array files.

* :class:`Checkpointer` keeps the latest training states of a run (an orbax
  ``CheckpointManager`` with two items: the ``state`` pytree and a JSON
  ``meta`` dict that says where the run is).
* :func:`guard_workdir` refuses to resume a workdir that holds a run of another config.
* :func:`workdir_lock` refuses a second run on a workdir that a live run holds.
* :func:`save_arrays` / :func:`load_arrays` store a nested dict of arrays as one
  ``.npz`` (final masks, weights and prompt per density, the cached source model).
* :func:`write_atomically` writes every such file (and config.json, the results, the
  exported subnetworks): a failed or interrupted write leaves the previous file whole.

A write that the disk refuses (full, read-only, ...) is a one-line :class:`DiskError`
naming the file or checkpoint folder and the fix; the checkpoint a rerun resumes from
is still the previous complete one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging as std_logging
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

T = TypeVar("T")
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
REPLACED_DIR = "replaced"  # where --replace_workdir moves a run of another config
_MAX_LISTED_KEYS = 5
# Integer dict keys (e.g. ResNet's block index) are stored as '#<int>' so that they come back as ints.
_INT_PREFIX = "#"
# Marks an empty dict in an .npz, whose keys otherwise only name leaves: '<path>/' holds a zero-size array.
_EMPTY_SUFFIX = "/"
# How to go on after a write the disk refused: nothing good was replaced, so the same command resumes.
RERUN_HINT = "then rerun the same command to resume (or start afresh with another --workdir)"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
# tensorstore (orbax's array writer) reports a failed write as a ValueError whose message holds the OS error code.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
# Orbax writes step <n> into '<n>.orbax-checkpoint-tmp' and renames it when complete.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_WRITERS_TIMEOUT_S = 60.0  # how long a failed save waits for orbax's other writer threads to end


class DiskError(OSError):
    """A file or checkpoint the disk did not take (full, read-only, ...): one line naming the path and the fix.

    The write it stands for replaced nothing: the previous file or checkpoint is still the one in use.
    """


def is_disk_trouble(error: BaseException) -> bool:
    """Whether ``error`` is an OS error, or tensorstore's report of one (which orbax raises as a ValueError)."""
    return isinstance(error, OSError) or _TENSORSTORE_ERRNO.search(str(error)) is not None


def disk_error(what: str, error: BaseException, *, hint: str = RERUN_HINT) -> DiskError | None:
    """``error``, raised while doing ``what`` (e.g. 'cannot write /w/a.npz'), as a one-line :class:`DiskError`:
    ``'<what>: <reason>; <fix>, <hint>'``. None when ``error`` is no OS error (a bug or a bad value, which
    the caller raises as it is); ``error`` itself when it already is a DiskError.
    """
    if isinstance(error, DiskError):
        return error
    if isinstance(error, OSError):
        code = error.errno
        reason = error.strerror or " ".join(str(error).split())[:200] or type(error).__name__
    else:
        found = _TENSORSTORE_ERRNO.search(str(error))
        if found is None:
            return None
        code = int(found.group(1))
        reason = os.strerror(code)
    if code:
        reason = f"{reason} [{errno.errorcode.get(code, code)}]"
    if code in _NO_SPACE:
        fix = "free space on that disk"
    elif code == errno.EFBIG:
        fix = "raise the file size limit (ulimit -f) or use a disk that takes larger files"
    elif code in _NOT_WRITABLE:
        fix = "make that folder writable"
    elif code in _IN_THE_WAY:
        fix = "move aside what is in the way"
    else:
        fix = "check that the disk has space and is writable"
    problem = DiskError(f"{what}: {reason}; {fix}, {hint}")
    problem.errno = code
    return problem


@contextlib.contextmanager
def disk_errors(what: str, *, hint: str = RERUN_HINT) -> Iterator[None]:
    """Raises an OS error (or tensorstore's report of one) from inside as :func:`disk_error` ``(what, ...)``,
    chained to it (``--verbose`` shows its traceback); every other exception passes through unchanged."""
    try:
        yield
    except Exception as error:
        if isinstance(error, DiskError) or not is_disk_trouble(error):
            raise
        raise disk_error(what, error, hint=hint) from error


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

    Saves are synchronous: :meth:`save` returns only once the checkpoint is
    complete on disk. Orbax writes each step into ``<step>.orbax-checkpoint-tmp``
    and renames it to ``<step>`` only when everything is written (atomic
    finalisation), and it never lists a temporary folder as a step. A process
    killed in the middle of a save therefore leaves the previous checkpoint as
    :meth:`latest_step`, and the leftover temporary folder is replaced when that
    step is saved again. On top of that, this class checks that steps increase and
    reports a refused write (below).

    Multi-process runs: every process must call :meth:`save` and
    :meth:`restore` (orbax's saves are collective; each process writes its own
    shards and process 0 alone writes the metadata and the JSON item). Do not
    wrap these calls in rank checks.

    Steps must increase from one save to the next: saving a step at or below
    :meth:`latest_step` raises (orbax would silently skip it).

    A save the disk refuses (full, read-only) raises a one-line :class:`DiskError`
    naming the folder and the step a rerun resumes from, which is the previous
    complete checkpoint; the failed save's temporary folder is removed (a
    single-process run) to give the space back.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            # Orbax would list no checkpoint in it (a silent restart) and fail only at the first save.
            raise DiskError(f"checkpoint folder {self.directory} is a file, not a folder; move it aside, "
                            f"{RERUN_HINT}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,
        )
        with disk_errors(f"cannot create the checkpoint folder {self.directory}"):
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
            if not is_disk_trouble(error):
                raise
            raise disk_error(f"cannot save checkpoint step {step} in {self.directory}", error,
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
        """Waits for orbax's outstanding work and closes it; a write that failed there is a :class:`DiskError`."""
        with disk_errors(f"cannot finish writing the checkpoints in {self.directory}"):
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


class WorkdirConfigError(ValueError):
    """The workdir holds a run of another config."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir/.lock`` for the duration; raises :class:`WorkdirLockedError` at once
    if another run holds it.

    An ``flock`` on the open file, so the kernel releases it when its process ends,
    killed or not: a stale lock file never blocks a resume. The file holds the
    holder's pid, for the message. Only process 0 of a multi-process run locks
    (the processes share the workdir).
    """
    if jax.process_index() != 0:
        yield
        return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise WorkdirLockedError(
                f"workdir {workdir} is in use by another run (process {holder}, lock {path}); "
                "wait for it to finish or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaves of a JSON-normalised nested dict; an empty dict is a leaf."""
    if isinstance(tree, dict) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def write_atomically(path: str | os.PathLike, write: Callable[[Any], Any], *, hint: str = RERUN_HINT) -> None:
    """``write(file)`` into a temporary file beside ``path``, synced to disk, then renamed onto ``path``.

    A write that fails or is interrupted leaves ``path`` as it was (or absent) and no temporary file. An OS
    error (disk full, read-only, ...) is raised as a one-line :class:`DiskError` naming ``path``, ending in
    ``hint``; any other error of ``write`` passes through unchanged.
    """
    path = pathlib.Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
        tmp = None
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(OSError):  # a failing disk must not hide the error that matters
                os.unlink(tmp)
        if not isinstance(error, OSError) or isinstance(error, DiskError):
            raise
        raise disk_error(f"cannot write {path}", error, hint=hint) from error
    _sync_folder(path.parent)


def _sync_folder(folder: pathlib.Path) -> None:
    """Makes a rename in ``folder`` durable, so a power cut right after it keeps the new file. Best effort:
    not every file system syncs folders, and the file is already whole in place."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def guard_workdir(workdir: str | os.PathLike, fingerprint: Mapping[str, Any], *, replace: bool = False) -> None:
    """Ties ``workdir`` to the run config ``fingerprint`` (a JSON-serialisable nested dict).

    The first run writes ``workdir/config.json`` (process 0 only); a later run
    with a different fingerprint (or an unreadable config.json) raises
    :class:`WorkdirConfigError` naming the differing dotted keys. With
    ``replace``, that run is moved into ``workdir/replaced/<time>/`` instead and
    the new fingerprint written; process 0 decides and acts, the others wait for
    it. Nothing is ever overwritten or deleted.
    """
    if not replace:
        _guard(pathlib.Path(workdir), fingerprint, replace=False)
        return
    if jax.process_index() == 0:
        _guard(pathlib.Path(workdir), fingerprint, replace=True)
    multihost_utils.sync_global_devices("workdir guarded")


def _guard(workdir: pathlib.Path, fingerprint: Mapping[str, Any], *, replace: bool) -> None:
    path = workdir / CONFIG_FILE
    # Normalised as JSON sees it (tuples -> lists, keys -> strings) so that equal configs compare equal.
    text = json.dumps(fingerprint, sort_keys=True, indent=2)
    current = json.loads(text)
    if not path.exists():
        if jax.process_index() == 0:
            write_atomically(path, lambda file: file.write((text + "\n").encode()))
        return
    hint = f"use another --workdir, or pass --replace_workdir to move that run into {workdir / REPLACED_DIR}/ and " \
           "start afresh"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        if replace:
            return _replace_run(workdir, text)
        raise WorkdirConfigError(f"workdir {workdir} has an unreadable {CONFIG_FILE} ({error}); {hint}") from error
    if stored == current:
        return
    if replace:
        return _replace_run(workdir, text)
    flat_stored, flat_current = _flatten(stored), _flatten(current)
    differing = sorted(
        key for key in flat_stored.keys() | flat_current.keys() if flat_stored.get(key, ...) != flat_current.get(key, ...)
    )
    listed = ", ".join(differing[:_MAX_LISTED_KEYS])
    if len(differing) > _MAX_LISTED_KEYS:
        listed += f" and {len(differing) - _MAX_LISTED_KEYS} more"
    raise WorkdirConfigError(f"workdir {workdir} holds a run of a different config (differs in: {listed}); {hint}")


def _replace_run(workdir: pathlib.Path, text: str) -> None:
    """Moves everything in ``workdir`` but the lock and earlier replaced runs into a new ``replaced/<time>-*``
    folder, then writes ``text`` as the config."""
    archive = workdir / REPLACED_DIR
    with disk_errors(f"cannot make a folder in {archive} to move the run of another config into",
                     hint="then rerun the same command"):
        archive.mkdir(exist_ok=True)
        target = pathlib.Path(tempfile.mkdtemp(dir=archive, prefix=time.strftime("%Y%m%d-%H%M%S-")))
    # config.json moves last: a run killed half-way still holds the old config, so the next run with the
    # flag moves the rest.
    for entry in sorted(workdir.iterdir(), key=lambda entry: entry.name == CONFIG_FILE):
        if entry.name not in (LOCK_FILE, REPLACED_DIR):
            os.replace(entry, target / entry.name)
    logging.warning("moved the run of another config out of %s into %s", workdir, target)
    write_atomically(workdir / CONFIG_FILE, lambda file: file.write((text + "\n").encode()))


def _encode_key(key: Any) -> str:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return f"{_INT_PREFIX}{int(key)}"
    if not isinstance(key, str):
        raise TypeError(f"array tree key {key!r} is neither a str nor an int")
    if not key or "/" in key or key.startswith(_INT_PREFIX):
        raise ValueError(f"array tree key {key!r} cannot be stored: it is empty, holds '/' or starts with '#'")
    return key


def _decode_key(part: str) -> str | int:
    return int(part[len(_INT_PREFIX):]) if part.startswith(_INT_PREFIX) else part


def _host_array(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if not value.is_fully_replicated:
            raise ValueError("save_arrays needs arrays that this process holds whole (replicated or local)")
        value = value.addressable_data(0)
    array = np.asarray(jax.device_get(value))
    if array.dtype.kind not in "biufc":
        raise TypeError(f"array of dtype {array.dtype} cannot be stored without pickling")
    return array


def save_arrays(path: str | os.PathLike, tree: Mapping[Any, Any], *, hint: str = RERUN_HINT) -> None:
    """Writes a nested dict of arrays to the ``.npz`` at ``path``, atomically (:func:`write_atomically`).

    Keys are the '/'-joined dict paths, integer keys stored as '#<int>'. Each
    process may call it; every writer uses its own temporary file. A write the
    disk refuses is a one-line :class:`DiskError` naming ``path`` and ending in
    ``hint``; the previous file stays as it was.
    """
    flat: dict[str, np.ndarray] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            if not node and prefix:
                flat[prefix + _EMPTY_SUFFIX] = np.zeros((0,), np.uint8)
            for key, value in node.items():
                visit(value, f"{prefix}/{_encode_key(key)}" if prefix else _encode_key(key))
        else:
            flat[prefix] = _host_array(node)

    if not isinstance(tree, Mapping):
        raise TypeError(f"save_arrays takes a dict of arrays, not {type(tree).__name__}")
    visit(tree, "")
    write_atomically(pathlib.Path(path), lambda file: np.savez(file, **flat), hint=hint)


def load_arrays(path: str | os.PathLike) -> dict:
    """The nested dict of numpy arrays that :func:`save_arrays` wrote to ``path``."""
    tree: dict = {}
    with np.load(pathlib.Path(path), allow_pickle=False) as data:
        for name in data.files:
            empty = name.endswith(_EMPTY_SUFFIX)
            parts = [_decode_key(part) for part in name.rstrip(_EMPTY_SUFFIX).split("/")]
            node = tree
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            if empty:
                node.setdefault(parts[-1], {})
            else:
                node[parts[-1]] = data[name]
    return tree
