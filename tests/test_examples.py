"""The forkable example in experiments/ runs end to end (tiny settings) and reports a real result."""

import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the examples end to end in subprocesses

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_functional_loop_example_runs(fashion_data_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "functional_loop.py"), "--density", "0.1", "--width", "0.0625",
         "--pretrain_steps", "4", "--iterations", "3", "--batch_size", "32",
         "--train_images", "128", "--test_images", "96", "--data_dir", fashion_data_dir],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pruned, total = re.search(r"sparsity over prunable kernels: .*\(([\d,]+) of ([\d,]+) pruned\)", result.stdout).groups()
    total = int(total.replace(",", ""))
    assert int(pruned.replace(",", "")) == int((1 - 0.1) * total)  # exact k of the global threshold
    match = re.search(r"test accuracy at density 0.1: ([0-9.]+) \(96 images\)", result.stdout)
    assert match and 0.0 <= float(match.group(1)) <= 1.0
