"""Runs must learn: the shrunk offline default's test accuracy against its source model's zero-shot accuracy.

    python -m experiments.runs_learn [--seeds=7,9,17] [--data_dir=DIR] [--workdir=DIR] [--out=FILE.md]

For each seed, runs the offline default shrunk to a size the test suite can afford (:data:`LEARNING`: width
1/16, a source model pretrained for one epoch on 2,048 images of classes 0-4, then VPNs at density 0.1 on 512
images of classes 5-9 for 2 + 1 epochs at the default's learning rates, tested on 1,000 images), then measures
the zero-shot accuracy of the same run's cached source model: dense, frequency label mapping, no prompt, no
training (:func:`experiments.expected_output.zero_shot_accuracy`). The gain is the difference in points.

Prints (and with ``--out`` writes, with the command, date, commit and machine) a table of the seeds' test
accuracy, zero-shot accuracy, gain and wall time. Exit status 1 when a seed gains less than
:data:`MIN_GAIN_POINTS`, the margin ``tests/test_learning.py`` requires of seed 7 (it runs the same function).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from experiments import measurement
from experiments.expected_output import zero_shot_accuracy
from experiments.kill_resume import ROOT, env, prepare_data

# The shrunk default that learns: every field not named here is configs/default.py's, learning rates included
# (experiments.kill_resume.SHRUNK lowers them 30-300x, so that its runs stay comparable across device counts,
# and learns nothing in its 12 iterations: its gains over zero-shot were -0.21 to +0.03 over 3 seeds).
LEARNING = [
    "--config.model.width=0.0625", "--config.densities=(0.1,)",
    "--config.data.train_limit=512", "--config.data.test_limit=1000",
    "--config.source.train_limit=2048", "--config.source.epochs=1",
    "--config.stage1.epochs=2", "--config.stage2.epochs=1", "--config.checkpoint.every_steps=1000",
]
# Seeds 7, 9 and 17 gained +45.9 to +53.4 points on the shared 2-core CPU
# (docs/measurements/runs_learn_cpu.md); a run that learns nothing gains about 0. Less than half the
# smallest gain, so another CPU's last bits cannot fail a healthy run.
MIN_GAIN_POINTS = 20.0


@dataclasses.dataclass(frozen=True)
class Learned:
    """One seed's outcome, accuracies as fractions."""
    seed: int
    test_accuracy: float
    zero_shot: float
    seconds: float

    @property
    def gain_points(self) -> float:
        return 100 * (self.test_accuracy - self.zero_shot)


def learning_run(workdir: str | os.PathLike, data_dir: str | os.PathLike, cache: str | os.PathLike,
                 seed: int) -> Learned:
    """Runs :data:`LEARNING` with ``seed`` on ``workdir`` (a new folder) and measures its zero-shot accuracy."""
    workdir = pathlib.Path(workdir)
    flags = [f"--config.data.data_dir={data_dir}", f"--config.compilation_cache_dir={cache}",
             f"--config.seed={seed}", *LEARNING]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vpns_jax.main", "--config=configs/default.py",
                           f"--workdir={workdir}", *flags], capture_output=True, text=True,
                          env=env(fast_compile=True), timeout=600, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"the run with seed {seed} exited {done.returncode}: {done.stderr[-2000:]}")
    (row,) = json.loads((workdir / "results.json").read_text())
    return Learned(seed, row["test_accuracy"], zero_shot_accuracy(workdir, flags), seconds)


def format_learned(outcomes: Sequence[Learned]) -> str:
    """The outcomes as a markdown table."""
    lines = ["| seed | test acc (density 0.1) | zero-shot acc | gain, points | wall s |",
             "| --: | --: | --: | --: | --: |"]
    lines += [f"| {o.seed} | {o.test_accuracy:.4f} | {o.zero_shot:.4f} | {o.gain_points:+.1f} | {o.seconds:.0f} |"
              for o in outcomes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The check's command line: 0 when every seed gains at least :data:`MIN_GAIN_POINTS`, else 1."""
    from vpns_jax import cli

    parser = cli.OneLineParser(prog="python -m experiments.runs_learn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="7,9,17", help="Comma-separated seeds (default 7,9,17).")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default WORKDIR/tfds); prepared if needed.")
    parser.add_argument("--workdir", default=None, help="A new or empty folder (default: a new temporary one).")
    parser.add_argument("--out", default=None, help="Also write the table, with how it was made, to this file.")
    args = parser.parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds} is not a comma-separated list of integers, e.g. 7,9,17")
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="runs_learn_")).absolute()
    if any(root.glob("seed_*")):
        parser.error(f"{root} holds an earlier check (seed_*/): give a new --workdir")
    try:
        data_dir = prepare_data(args.data_dir or root / "tfds")
    except FileNotFoundError as error:
        return cli.report_error(error, verbose=False)
    print(f"workdir {root}")
    outcomes = []
    for seed in seeds:
        try:
            outcomes.append(learning_run(root / f"seed_{seed}", data_dir, root / "xla_cache", seed))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            return cli.report_error(error, verbose=False)
    table = format_learned(outcomes)
    print(table)
    short = [o.seed for o in outcomes if o.gain_points < MIN_GAIN_POINTS]
    verdict = (f"every seed gains at least {MIN_GAIN_POINTS:g} points" if not short else
               f"seeds {short} gain less than {MIN_GAIN_POINTS:g} points")
    print(verdict)
    if args.out:
        header = measurement.header("Runs must learn: the shrunk default against its zero-shot accuracy",
                                    f"python -m experiments.runs_learn --seeds={args.seeds} --out={args.out}")
        pathlib.Path(args.out).write_text(header + table + f"\n\n{verdict}.\n")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
