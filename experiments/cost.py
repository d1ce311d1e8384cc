"""The cost of a method from its runs' epoch records: time per epoch, peak memory, time- and steps-to-accuracy.

    python -m experiments.cost --root=experiments/results/ablations --level=0.9 [--out=ROOT/cost]

Reads every ``ROOT/<method>/seed_<s>/metrics.jsonl`` (the layout of
``experiments.sweep``). The trainer writes one record per finished epoch
(``phase: epoch``): its training seconds (iterations only: no evaluation, no
checkpointing), the unit's cumulative training seconds and optimiser steps, the
peak memory so far, and, with ``--config.eval.every_epochs=N``, the test
accuracy. From those, per method and density, over seeds (mean and 95 %
interval, ``experiments.stats``):

* seconds per epoch of each stage (the median over its epochs), and peak memory;
* time-to-accuracy: the training seconds (and optimiser steps) until the test
  accuracy first reaches ``--level``; a seed that never reaches it counts as not
  reached, and the cell says how many did;
* accuracy at equal budgets: the test accuracy at the last evaluation within
  the optimiser steps, and within the training seconds, that every method spent.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from experiments import stats
from vpns_jax import cli
from vpns_jax.io import metrics

BUDGETS = ("optimizer_steps", "train_seconds")


def epoch_records(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The epoch records of a workdir in training order; an epoch recorded twice (a run killed after the
    record but before its checkpoint, then resumed) keeps its last record."""
    last: dict[tuple, dict[str, Any]] = {}
    for record in metrics.read_metrics(workdir):
        if record.get("phase") == "epoch":
            last[(record["density"], record["stage"], record["epoch"])] = record
    order = {key: i for i, key in enumerate(last)}
    return sorted(last.values(), key=lambda r: order[(r["density"], r["stage"], r["epoch"])])


def _of(records: Sequence[dict[str, Any]], density: float) -> list[dict[str, Any]]:
    return [r for r in records if math.isclose(float(r["density"]), density, rel_tol=1e-6)]


def seconds_per_epoch(records: Sequence[dict[str, Any]], density: float, stage: int) -> float | None:
    """Median training seconds of the density's epochs of ``stage``; None without one."""
    # The median, because a process's first epoch of each stage also compiles its step; time-to-accuracy
    # keeps that time, as a user waits for it too.
    seconds = [r["epoch_seconds"] for r in _of(records, density) if r["stage"] == stage]
    return statistics.median(seconds) if seconds else None


def peak_memory(records: Sequence[dict[str, Any]], density: float) -> float | None:
    """The largest peak memory (MiB) recorded while the density trained."""
    peaks = [r["peak_memory_mb"] for r in _of(records, density) if "peak_memory_mb" in r]
    return max(peaks) if peaks else None


def to_accuracy(records: Sequence[dict[str, Any]], density: float, level: float,
                by: str = "train_seconds") -> float | None:
    """``by`` (training seconds or optimiser steps) at the density's first test accuracy >= ``level``; None
    if no evaluation reached it."""
    if by not in BUDGETS:
        raise ValueError(f"budget {by!r} is unknown: use one of {BUDGETS}")
    for record in _of(records, density):
        if "test_accuracy" in record and record["test_accuracy"] >= level:
            return record[by]
    return None


def accuracy_within(records: Sequence[dict[str, Any]], density: float, budget: float,
                    by: str = "optimizer_steps") -> float | None:
    """The density's test accuracy at its last evaluation within ``budget`` of ``by``; None if none was."""
    if by not in BUDGETS:
        raise ValueError(f"budget {by!r} is unknown: use one of {BUDGETS}")
    within = [r for r in _of(records, density) if "test_accuracy" in r and r[by] <= budget]
    return within[-1]["test_accuracy"] if within else None


@dataclasses.dataclass(frozen=True)
class CostCell:
    """One method at one density over its seeds."""

    seconds_per_epoch: dict[int, stats.Estimate]  # by stage
    peak_memory_mb: stats.Estimate | None
    seconds_to_level: stats.Estimate | None  # over the seeds that reached the level
    steps_to_level: stats.Estimate | None
    reached: int  # seeds that reached the level
    seeds: int


def cost_cell(runs: Sequence[Sequence[dict[str, Any]]], density: float, level: float) -> CostCell:
    """The cost of one method at ``density`` from each seed's epoch records."""
    stages = sorted({r["stage"] for records in runs for r in _of(records, density)})
    per_stage = {}
    for stage in stages:
        values = [v for records in runs if (v := seconds_per_epoch(records, density, stage)) is not None]
        per_stage[stage] = stats.estimate(values)
    peaks = [v for records in runs if (v := peak_memory(records, density)) is not None]
    seconds = [v for records in runs if (v := to_accuracy(records, density, level, "train_seconds")) is not None]
    steps = [v for records in runs if (v := to_accuracy(records, density, level, "optimizer_steps")) is not None]
    return CostCell(per_stage, stats.estimate(peaks) if peaks else None,
                    stats.estimate(seconds) if seconds else None, stats.estimate(steps) if steps else None,
                    reached=len(seconds), seeds=len(runs))


def collect(root: str | pathlib.Path) -> dict[str, list[list[dict[str, Any]]]]:
    """{method (the cell folder's name): [each seed's epoch records]} under ``root``."""
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for workdir in sorted(pathlib.Path(root).glob("*/seed_*")):
        records = epoch_records(workdir)
        if records:
            runs.setdefault(workdir.parent.name, []).append(records)
    return runs


def format_table(runs: dict[str, list[list[dict[str, Any]]]], densities: Sequence[float], level: float) -> str:
    """Markdown: per method and density, s/epoch per stage, peak MiB, seconds and steps to ``level``."""
    lines = [f"| method | density | s/epoch (stage: median epoch, mean ± 95 % over seeds) | peak MiB "
             f"| s to {level:.0%} | steps to {level:.0%} | reached |",
             "| :-- | --: | :-- | --: | --: | --: | --: |"]
    for method, method_runs in runs.items():
        for density in densities:
            cell = cost_cell(method_runs, density, level)
            if not cell.seconds_per_epoch:
                continue
            epochs = "; ".join(f"{stage}: {stats.format_estimate(e)}" for stage, e in cell.seconds_per_epoch.items())
            show = lambda e, digits=1: "n/a" if e is None else stats.format_estimate(e, digits)  # noqa: E731
            lines.append(f"| {method} | {density:g} | {epochs} | {show(cell.peak_memory_mb, 0)} | "
                         f"{show(cell.seconds_to_level)} | {show(cell.steps_to_level, 0)} | "
                         f"{cell.reached}/{cell.seeds} |")
    return "\n".join(lines) + "\n"


def common_budget(runs: dict[str, list[list[dict[str, Any]]]], density: float, by: str) -> float | None:
    """The budget every method and seed spent at ``density``: the smallest final ``by`` among them."""
    finals = [at[-1][by] for method_runs in runs.values() for records in method_runs
              if (at := _of(records, density))]
    return min(finals) if finals else None


def format_budget_table(runs: dict[str, list[list[dict[str, Any]]]], densities: Sequence[float]) -> str:
    """Markdown: per method and density, the test accuracy (%, mean ± 95 %) at the last evaluation within
    the optimiser steps and within the training seconds that every method spent (:func:`common_budget`)."""
    lines = ["| method | density | accuracy within N optimiser steps | accuracy within T training s |",
             "| :-- | --: | :-- | :-- |"]
    for density in densities:
        budgets = {by: common_budget(runs, density, by) for by in BUDGETS}
        if budgets["optimizer_steps"] is None:
            continue
        for method, method_runs in runs.items():
            cells = []
            for by, label in (("optimizer_steps", "N={:.0f} steps"), ("train_seconds", "T={:.1f} s")):
                accuracies = [100 * a for records in method_runs
                              if (a := accuracy_within(records, density, budgets[by], by)) is not None]
                shown = stats.format_estimate(stats.estimate(accuracies)) if accuracies else "n/a"
                cells.append(f"{shown} ({label.format(budgets[by])}, {len(accuracies)}/{len(method_runs)} seeds)")
            lines.append(f"| {method} | {density:g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def format_report(runs: dict[str, list[list[dict[str, Any]]]], densities: Sequence[float], level: float) -> str:
    """The cost table and the accuracy at equal budgets, as one markdown report."""
    return (f"## Cost and time to {level:.0%} test accuracy\n\n{format_table(runs, densities, level)}\n"
            "## Accuracy at equal budgets\n\nEach method's test accuracy at its last evaluation within the "
            "optimiser steps (N) and the training seconds (T) that every method and seed spent at that "
            "density, so none is cut short of a budget another did not reach.\n\n"
            + format_budget_table(runs, densities))


def main(argv: Sequence[str] | None = None) -> int:
    """The cost table's command line: prints it and writes OUT.md."""
    parser = cli.OneLineParser(prog="python -m experiments.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="A sweep's root folder (<method>/seed_<s> workdirs).")
    parser.add_argument("--level", type=float, required=True, help="The test accuracy to reach, e.g. 0.9.")
    parser.add_argument("--densities", required=True, help="Densities, e.g. 0.5,0.1.")
    parser.add_argument("--out", default=None, help="Output path prefix (default: ROOT/cost -> cost.md).")
    args = parser.parse_args(argv)
    runs = collect(args.root)
    if not runs:
        return cli.report_error(FileNotFoundError(
            f"no epoch records under {args.root}/*/seed_*/metrics.jsonl: run the cells first"), verbose=False)
    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    text = format_report(runs, densities, args.level)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.root) / "cost"
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
