"""benchmarks/device_check.py --smoke: the one-command device check runs and writes its table (on CPU here).

Each check runs the command in a process of its own, as a user would, and reads the markdown it wrote: the
smoke run compiles a dozen XLA programs, and compile-heavy tests inside the suite's process were followed by
crashes in later tests' compiles (tests/test_isolated_gradient_checks.py). Two runs in all, shared by the tests
of this module: one smoke run, and one with no time budget, which must compile nothing.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # benchmarks/device_check.py end to end in subprocesses

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_CHOICES = {("float32", "lax"), ("float32", "im2col"), ("bfloat16", "auto")}
PROGRAMS = ["dense train step", "threshold", "VPNs stage-1 iteration", "VPNs stage-2 iteration", "eval step"]
COMPILED = "Finished XLA compilation"  # what JAX_LOG_COMPILES=1 logs for every program XLA compiles


def _run(out: pathlib.Path, *args: str) -> tuple[str, str]:
    """(the markdown written to ``out``, stderr) of ``device_check.py --smoke --out=out *args``."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # nothing from the suite's cache
    env["JAX_LOG_COMPILES"] = "1"
    command = [sys.executable, "benchmarks/device_check.py", "--smoke", f"--out={out}", *args]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} ran past {error.timeout} s\nstdout tail:\n{str(error.stdout)[-3000:]}"
                    f"\nstderr tail:\n{str(error.stderr)[-3000:]}")
    report = f"exit {done.returncode}\nstdout tail:\n{done.stdout[-3000:]}\nstderr tail:\n{done.stderr[-5000:]}"
    assert done.returncode == 0 and out.is_file(), report
    return out.read_text(), done.stderr


def _cells(text: str, conv: tuple[str, ...] = ("lax", "im2col", "auto")) -> list[list[str]]:
    """The step table's JAX rows (conv column in ``conv``) as lists of stripped cells."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    return [row for row in rows if row[2] in conv]


@pytest.fixture(scope="module")
def smoke(fashion_data_dir, tmp_path_factory) -> tuple[str, str]:
    return _run(tmp_path_factory.mktemp("device_check") / "smoke.md", f"--data_dir={fashion_data_dir}")


@pytest.fixture(scope="module")
def no_budget(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("device_check")
    return _run(folder / "budget0.md", "--budget_s=0", f"--data_dir={folder / 'none'}")


def test_smoke_run_reports_the_device_and_every_section(smoke):
    text, stderr = smoke
    assert text.startswith("# Device check") and "- backend: cpu" in text and "- commit: " in text
    assert "--smoke" in text.splitlines()[2]  # the command line, as run
    pipeline = [line for line in text.splitlines() if line.startswith("- input pipeline, 32 px, ")]
    assert [line.split(", ")[2].split(":")[0].split(" ")[1] for line in pipeline] == ["threads", "worker"], pipeline
    assert all(float(line.split(": ")[1].split(" ")[0]) > 0 for line in pipeline)  # images/s, in-process and a worker
    assert "- PyTorch reference: skipped (" in text or "- PyTorch reference: torch " in text
    assert "offline default end to end: not run in --smoke" in text
    assert COMPILED in stderr  # the compile log the budget-0 check relies on does show compiles


def test_smoke_run_times_every_program_once_and_every_kernel_choice(smoke):
    rows = _cells(smoke[0])
    # The first kernel choice runs the five programs; the others the dense step: 7 rows, each really timed.
    assert len(rows) == 7, rows
    assert all(row[0] == "imagenet 32 px, batch 2" for row in rows)
    assert {(row[1], row[2]) for row in rows} == KERNEL_CHOICES
    assert [row[3].split(" (")[0] for row in rows[:5]] == PROGRAMS and rows[:5][0][1:3] == ["float32", "lax"]
    assert all(row[3] == "dense train step" for row in rows[5:])
    assert all(float(row[5]) > 0 and float(row[4]) >= 0 and float(row[7]) > 0 for row in rows)
    assert all(float(row[6]) > 0 for row in rows if not row[3].startswith("threshold"))


def test_rows_past_the_time_budget_are_listed_as_skipped_and_nothing_compiles(no_budget):
    text, stderr = no_budget
    rows = _cells(text)
    assert len(rows) == 3 and all(row[3] == "skipped: time budget" for row in rows), rows
    assert {(row[1], row[2]) for row in rows} == KERNEL_CHOICES
    assert "- input pipeline: skipped (DataNotFoundError" in text
    assert "- PyTorch reference: " in text and "offline default end to end: not run in --smoke" in text
    assert COMPILED not in stderr, stderr[-3000:]
