"""Resumable run state on disk: orbax checkpoints, the workdir's config guard and plain array files.

* :class:`Checkpointer` keeps the latest training states of a run (an orbax
  ``CheckpointManager`` with two items: the ``state`` pytree and a JSON
  ``meta`` dict that says where the run is).
* :func:`guard_workdir` refuses to resume a workdir that holds a run of another config.
* :func:`workdir_lock` refuses a second run on a workdir that a live run holds.
* :func:`save_arrays` / :func:`load_arrays` store a nested dict of arrays as one
  ``.npz`` (final masks, weights and prompt per density, the cached source model).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import tempfile
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


class Checkpointer:
    """The last ``max_to_keep`` checkpoints of a run under ``directory``, each a ``state`` pytree and a JSON ``meta``.

    Saves are synchronous: :meth:`save` returns only once the checkpoint is
    complete on disk. Orbax writes each step into ``<step>.orbax-checkpoint-tmp``
    and renames it to ``<step>`` only when everything is written (atomic
    finalisation), and it never lists a temporary folder as a step. A process
    killed in the middle of a save therefore leaves the previous checkpoint as
    :meth:`latest_step`, and the leftover temporary folder is replaced when that
    step is saved again. This class adds no checks of its own on top of that.

    Multi-process runs: every process must call :meth:`save` and
    :meth:`restore` (orbax's saves are collective; each process writes its own
    shards and process 0 alone writes the metadata and the JSON item). Do not
    wrap these calls in rank checks.

    Steps must increase from one save to the next: saving a step at or below
    :meth:`latest_step` raises (orbax would silently skip it).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,
        )
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
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
        )
        self._manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax declined to save checkpoint step {step} in {self.directory}")

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
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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


def write_atomically(path: pathlib.Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


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


def save_arrays(path: str | os.PathLike, tree: Mapping[Any, Any]) -> None:
    """Writes a nested dict of arrays to the ``.npz`` at ``path``, atomically (temp file + rename).

    Keys are the '/'-joined dict paths, integer keys stored as '#<int>'. Each
    process may call it; every writer uses its own temporary file.
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
    write_atomically(pathlib.Path(path), lambda file: np.savez(file, **flat))


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
