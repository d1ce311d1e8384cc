"""What every vpns_jax command line shares: one-line errors with exit status 2, tracebacks only on request."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import NoReturn

EXIT_ERROR = 2


def report_error(error: BaseException, *, verbose: bool, prefix: str = "error") -> int:
    """Prints ``error`` as one line on stderr (after its traceback when ``verbose``); returns the exit status."""
    if verbose:
        traceback.print_exception(error)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prefix}: {message}", file=sys.stderr)
    return EXIT_ERROR


class OneLineParser(argparse.ArgumentParser):
    """argparse whose own usage errors are one line and exit status 2 as well."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")
