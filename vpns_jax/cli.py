"""What every vpns_jax command line shares: one-line errors with exit status 2, tracebacks only on request."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

EXIT_ERROR = 2


class Stopped(BaseException):
    """A stop requested by SIGINT or SIGTERM (a BaseException, as KeyboardInterrupt, so no ``except Exception``
    on the way up swallows it)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM, with where it was (``where``: 'at density d, stage s, step n', ...)."""

    def __init__(self, signum: int, where: str):
        super().__init__(signum, where)
        self.signum, self.where = signum, where


_REQUESTED: list[int] = []  # signals received while stop requests are deferred (see stop_requests)
_LAST_BLOCK: list[int] = []  # the first of them, once the block closed


@contextlib.contextmanager
def stop_requests():
    """While open, SIGINT and SIGTERM only request a stop, raised by ``raise_if_stopped`` at the next safe point: a
    KeyboardInterrupt inside an XLA compile or device transfer can crash the process. A second signal stops at once;
    ``requested_stop`` tells the signal after the block."""
    def request(signum: int, frame) -> None:
        if _REQUESTED:
            raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)
        _REQUESTED.append(signum)

    previous = {signum: signal.signal(signum, request) for signum in (signal.SIGINT, signal.SIGTERM)}
    _REQUESTED.clear()
    _LAST_BLOCK.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _LAST_BLOCK[:] = _REQUESTED[:1]
        _REQUESTED.clear()


def requested_stop() -> int | None:
    """The signal of the stop requested in the last ``stop_requests`` block that closed, if any."""
    return _LAST_BLOCK[0] if _LAST_BLOCK else None


def raise_if_stopped() -> None:
    """Raises ``Stopped`` if a stop was requested (called between steps, batches and phases)."""
    if _REQUESTED:
        raise Stopped(_REQUESTED[0])


def signal_number(stop: BaseException) -> int:
    """The signal behind a KeyboardInterrupt, ``Stopped`` or ``Interrupted``."""
    return getattr(stop, "signum", signal.SIGINT)


def report_interrupt(stop: BaseException) -> int:
    """One line for a run stopped by a signal; the exit status 128 + signal (130 for SIGINT, 143 for SIGTERM)."""
    where = getattr(stop, "where", "while starting")
    print(f"interrupted {where}; rerun the same command to resume", file=sys.stderr)
    return 128 + signal_number(stop)


def report_error(error: BaseException, *, verbose: bool, prefix: str = "error") -> int:
    """Prints ``error`` as one line on stderr (after its traceback when ``verbose``); returns the exit status."""
    if verbose:
        traceback.print_exception(error)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prefix}: {message}", file=sys.stderr)
    return EXIT_ERROR


def watch_parent(parent: int, on_lost: Callable[[], object]) -> None:
    """Calls ``on_lost`` from a daemon thread once this process's parent ``parent`` is gone (checked every
    second): an orphaned child must not go on alone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        on_lost()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose own usage errors are one line and exit status 2 as well."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")
