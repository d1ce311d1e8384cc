"""One run per workdir, of one config: the workdir lock and the config.json guard.

:func:`workdir_lock` refuses a second run on a workdir that a live run holds; :func:`guard_workdir` refuses to
resume a workdir that holds a run of another config (or moves that run aside with ``replace``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from vpns_jax.io import disk

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
REPLACED_DIR = "replaced"  # where --replace_workdir moves a run of another config
_MAX_LISTED_KEYS = 5


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
            disk.write_atomically(path, lambda file: file.write((text + "\n").encode()))
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
    differing = sorted(key for key in flat_stored.keys() | flat_current.keys()
                       if flat_stored.get(key, ...) != flat_current.get(key, ...))
    listed = ", ".join(differing[:_MAX_LISTED_KEYS])
    if len(differing) > _MAX_LISTED_KEYS:
        listed += f" and {len(differing) - _MAX_LISTED_KEYS} more"
    raise WorkdirConfigError(f"workdir {workdir} holds a run of a different config (differs in: {listed}); {hint}")


def _replace_run(workdir: pathlib.Path, text: str) -> None:
    """Moves everything in ``workdir`` but the lock and earlier replaced runs into a new ``replaced/<time>-*``
    folder, then writes ``text`` as the config."""
    archive = workdir / REPLACED_DIR
    with disk.disk_errors(f"cannot make a folder in {archive} to move the run of another config into",
                     hint="then rerun the same command"):
        archive.mkdir(exist_ok=True)
        target = pathlib.Path(tempfile.mkdtemp(dir=archive, prefix=time.strftime("%Y%m%d-%H%M%S-")))
    # config.json moves last: a run killed half-way still holds the old config, so the next run with the
    # flag moves the rest.
    for entry in sorted(workdir.iterdir(), key=lambda entry: entry.name == CONFIG_FILE):
        if entry.name not in (LOCK_FILE, REPLACED_DIR):
            os.replace(entry, target / entry.name)
    logging.warning("moved the run of another config out of %s into %s", workdir, target)
    disk.write_atomically(workdir / CONFIG_FILE, lambda file: file.write((text + "\n").encode()))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaves of a JSON-normalised nested dict; an empty dict is a leaf."""
    if isinstance(tree, dict) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}
