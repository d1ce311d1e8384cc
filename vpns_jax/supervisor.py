"""The parent of a multi-process run's training process: turns the distributed runtime's abort into one line.

The runtime aborts a process that lost a peer from its own thread (SIGABRT), which no handler in that process can
intercept, so a multi-process ``python -m vpns_jax.main`` runs the training as a child (marked by
:data:`SUPERVISED_ENV`). This parent passes the child's output through but holds back error and fatal log lines and
what follows them; on the runtime's abort it prints one line and exits ``EXIT_PEER_LOST``, else it exits with the
child's status. It forwards SIGINT and SIGTERM; the child ends itself if the parent dies (docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

from vpns_jax import cli, distributed

SUPERVISED_ENV = "VPNS_JAX_SUPERVISOR_PID"
# Where a glog-format line starts ("E1201 11:35:23"; absl's Python logging writes the same), one byte class per
# position: such a line may start right after a progress bar's redraw, in the middle of a line.
_LOG_START = [b"EFW"] + [b"0123456789"] * 4 + [b" "] + ([b"0123456789"] * 2 + [b":"]) * 2 + [b"0123456789"] * 2
# The distributed runtime's warnings (a lost coordinator shows first as one), known by their C++ source file.
_RUNTIME_WARNING = re.compile(rb"W\d{4} [\d:.]+ +\d+ (coordination\w*|preemption\w*|client|distributed\w*)\.(cc|h):")
_OWN_LINE = re.compile(rb"(error|interrupted|warning)[: ]")
_OWN_LINE_BYTES = 12  # enough to tell "interrupted " from anything else
_RUNTIME_ABORT = b"distributed service detected fatal errors"


class StderrFilter:
    """Splits a child's stderr, fed in arbitrary chunks, into what to show now and what to hold back.

    From the first error or fatal log line (or distributed-runtime warning) on, everything but the program's own
    one-line messages is held. Lines end at ``\\n`` or ``\\r``, so progress bars are shown as they redraw.
    """

    def __init__(self) -> None:
        self.held = bytearray()
        self._pending = b""  # bytes of the current line not routed yet
        self._route: str | None = None  # the current line's: None (at its start), "show", "hold" or "log"

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` to show now; the rest is held, or waits until it can be judged."""
        shown = bytearray()
        for piece in re.split(rb"(?<=[\r\n])", data):
            if piece:
                self._route_piece(piece, shown)
        return bytes(shown)

    def flush(self) -> bytes:
        """Whatever was waiting to be judged, at the end of the stream (held or returned)."""
        shown = bytearray()
        if self._pending:
            self._route_piece(b"\n", shown)
            if shown.endswith(b"\n"):
                del shown[-1]
            elif self.held.endswith(b"\n"):
                del self.held[-1]
        return bytes(shown)

    def _route_piece(self, piece: bytes, shown: bytearray) -> None:
        ended = piece.endswith((b"\n", b"\r"))
        text, self._pending = self._pending + piece, b""
        if self._route == "hold":
            self.held += text
        elif self._route == "log":
            self._pending = text
            if ended:
                self._end_log_line(shown)
        elif self._route is None and self.held:  # a line starts while holding: only the program's own pass
            if not ended and len(text) < _OWN_LINE_BYTES:
                self._pending = text
                return
            self._route = "show" if _OWN_LINE.match(text) else "hold"
            (shown if self._route == "show" else self.held).extend(text)
        else:
            start, complete = _log_start(text)
            shown += text[:start]
            self._pending = text[start:]
            if complete:
                self._route = "log"
                if ended:
                    self._end_log_line(shown)
                return
            self._route = "show"
        if ended and self._route != "log":
            self._route = None

    def _end_log_line(self, shown: bytearray) -> None:
        line, self._pending, self._route = self._pending, b"", None
        if line.startswith((b"E", b"F")) or _RUNTIME_WARNING.match(line):
            self.held += line
        else:
            shown += line


def _log_start(text: bytes) -> tuple[int, bool]:
    """(where, complete): the first place in ``text`` where a glog-format line starts, and whether its whole
    start is there; ``(len(text), False)`` where none can start. An incomplete start is at the end of ``text``."""
    for start, byte in enumerate(text):
        if byte not in b"EFW":
            continue
        candidate = text[start:start + len(_LOG_START)]
        if all(character in allowed for character, allowed in zip(candidate, _LOG_START)):
            return start, len(candidate) == len(_LOG_START)
    return len(text), False


def supervise(argv: Sequence[str], process_id: int | None, num_processes: int | None,
              child_command: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (program name first) as a supervised child (see the module docstring;
    ``child_command`` replaces ``python -m vpns_jax.main ARGS`` in tests); returns the exit status to end with."""
    child_command = child_command or [sys.executable, "-m", "vpns_jax.main", *argv[1:]]
    child = subprocess.Popen(child_command, stderr=subprocess.PIPE,
                             env={**os.environ, SUPERVISED_ENV: str(os.getpid())}, start_new_session=True)

    def forward(signum: int, frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    stream, stderr, last = StderrFilter(), sys.stderr.buffer, b"\n"
    try:
        while chunk := os.read(child.stderr.fileno(), 1 << 16):
            shown = stream.feed(chunk)
            stderr.write(shown)
            stderr.flush()
            last = shown[-1:] or last
        shown = stream.flush()
        stderr.write(shown)
        last = shown[-1:] or last
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status == -signal.SIGABRT and _RUNTIME_ABORT in stream.held:
        if last not in (b"\n", b"\r"):  # a progress bar was left mid-line
            stderr.write(b"\n")
        stderr.flush()
        print(distributed.peer_lost_message(process_id, num_processes, _abort_reason(bytes(stream.held))),
              file=sys.stderr)
        return distributed.EXIT_PEER_LOST
    if status != distributed.EXIT_PEER_LOST:  # the child said it in one line already
        stderr.write(stream.held)
    stderr.flush()
    return 128 - status if status < 0 else status


def _abort_reason(held: bytes) -> str:
    """What the runtime's fatal log line says happened (its absl status), as text."""
    for line in held.decode(errors="replace").splitlines():
        if _RUNTIME_ABORT.decode() in line:
            status = line.partition("absl::Status: ")[2].strip()
            return "the distributed runtime reported " + status.split(". ")[0].rstrip(".")
    return "the distributed runtime aborted"


def watch_parent() -> None:
    """In a supervised child: forgets the marker (processes this one starts are not supervised children) and
    kills this process if the supervising parent dies, as if the kill had reached both."""
    parent = os.environ.pop(SUPERVISED_ENV, None)
    if parent is None:
        return
    cli.watch_parent(int(parent), lambda: os.kill(os.getpid(), signal.SIGKILL))


def supervised() -> bool:
    """Whether this process is a supervised child (before :func:`watch_parent` forgets the marker)."""
    return SUPERVISED_ENV in os.environ
