"""Writes the disk may refuse: one-line :class:`DiskError` reports and atomic file writes.

Every file a run writes (arrays, config.json, results, exported subnetworks) goes through
:func:`write_atomically`, so a failed or interrupted write leaves the previous file whole; a write the disk
refuses (full, read-only, ...) is a one-line :class:`DiskError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

# How to go on after a write the disk refused: nothing good was replaced, so the same command resumes.
RERUN_HINT = "then rerun the same command to resume (or start afresh with another --workdir)"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
# tensorstore (orbax's array writer) reports a failed write as a ValueError whose message holds the OS error code.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


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
