"""Runs the gradient checks of ``tests/isolated/`` (``check_*.py``) in a process of their own.

They compile programs at XLA's default optimisation level (``tests/gradcheck.py``) and switch x64 on and off
around float64 cases. Run inside the suite's process, two full runs crashed in later tests' compiles (an abort in
test_phases, a segfault in test_shrink); in a process of their own they leave nothing behind. A failure shows
the inner pytest's report.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a pytest of its own over tests/isolated/: about 5 minutes

ROOT = pathlib.Path(__file__).resolve().parent.parent
ISOLATED = ROOT / "tests" / "isolated"


def test_the_gradient_checks_pass_in_their_own_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a cache of their own
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "python_files=check_*.py", "-o", "addopts=",
         "-q", str(ISOLATED)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout.splitlines()[-1] and "failed" not in result.stdout.splitlines()[-1], report
