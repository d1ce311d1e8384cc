"""The ablation suite: what the visual prompt adds to VPNs' sparsification, on the offline default.

    python -m experiments.ablations [--root=experiments/results/ablations] [--seeds=7,9,17] \\
        [--densities=0.5,0.2,0.1,0.05] [--variants=vpns,no_prompt,...] [--level=0.9] [--dry_run]

Runs every variant of :data:`VARIANTS` at every seed and density through
``experiments.sweep`` (one resumable workdir per variant and seed, all pruning
the first cell's source model, every epoch tested for time-to-accuracy), then
writes under ROOT:

* ``table.md`` / ``table.csv``: test accuracy per variant and sparsity, mean(std)
  [95 % interval] over seeds, and each variant minus ``vpns`` paired by seed with
  its interval and paired t-test p-value ('n.s.' where not significant);
* ``cost.md``: seconds per epoch, peak memory, seconds and optimiser steps until
  the test accuracy first reaches ``--level``, and every variant's accuracy at
  equal optimiser steps and at equal training seconds (``experiments.cost``);
* ``accuracy_vs_sparsity.png`` and ``differences_vs_sparsity.png`` (each variant
  minus ``vpns`` with its 95 % interval); ``command.txt``, ``manifest.json``
  (every cell's command and wall time, and the git commit, package versions and
  machine of the last invocation: ``measurement.provenance``) and ``wall_time.txt``
  (their sum over every invocation).

A rerun skips finished cells and resumes unfinished ones.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import sys
import time
from collections.abc import Callable, Sequence

from experiments import cost, plots, sweep, table
from vpns_jax import cli

V = sweep.Variant
# Everything but the named change stays VPNs' (configs/default.py): optimisers, schedules, epochs, streams.
# Ordered by what the question needs most, so an interrupted suite has the central comparisons first.
VARIANTS = {
    "vpns": V("vpns"),
    "no_prompt": V("vpns", {"vpns.prompt_stages": "()"}),  # the same two streams, the clean one unprompted
    "hydra": V("hydra"),
    "plain_stream": V("vpns", {"vpns.streams": "plain", "vpns.prompt_stages": "()"}),  # the augmented batch alone
    "prompted_stream": V("vpns", {"vpns.streams": "prompted"}),  # the prompted clean batch alone
    "clean_stream": V("vpns", {"vpns.streams": "prompted", "vpns.prompt_stages": "()"}),  # it alone, unprompted
    "prompt_stage1": V("vpns", {"vpns.prompt_stages": "(1,)"}),
    "prompt_stage2": V("vpns", {"vpns.prompt_stages": "(2,)"}),
    "eval_with_prompt": V("vpns", {"eval.with_prompt": "True"}),
    "pad_8": V("vpns", {"prompt.pad_size": "8"}),
    "pad_16": V("vpns", {"prompt.pad_size": "16"}),  # the whole 32 px image is the frame
    "fix": V("vpns", {"prompt.kind": "fix", "prompt.mask_size": "16"}),  # 115 of 224 px, scaled to 32
    "random": V("vpns", {"prompt.kind": "random", "prompt.mask_size": "16"}),
    "expand": V("vpns", {"prompt.kind": "expand", "prompt.input_size": "24"}),  # 24 px image in a 32 px frame
}
# Test every epoch: the cost table's time-to-accuracy needs the accuracy along the way.
OVERRIDES = {"eval.every_epochs": "1"}


def suite_parser(module: str, doc: str, *, config: str, root: str,
                 variants: Sequence[str] | None) -> cli.OneLineParser:
    """A suite's command line: --config, --root, --seeds, --dry_run, and with ``variants`` --variants and
    --densities."""
    parser = cli.OneLineParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=config, help="Config file.")
    parser.add_argument("--root", default=root, help="Folder of the cell workdirs.")
    if variants is not None:
        parser.add_argument("--variants", default=",".join(variants),
                            help=f"Comma-separated, of: {', '.join(variants)}.")
        parser.add_argument("--densities", default="0.5,0.2,0.1,0.05", help="Comma-separated keep ratios.")
    parser.add_argument("--seeds", default="7,9,17", help="Comma-separated seeds.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run and write nothing.")
    return parser


def _parser() -> cli.OneLineParser:
    parser = suite_parser("experiments.ablations", __doc__, config="configs/default.py",
                          root="experiments/results/ablations", variants=list(VARIANTS))
    parser.add_argument("--level", type=float, default=0.9, help="Test accuracy for time-to-accuracy.")
    return parser


def reports(root: pathlib.Path, variants: Sequence[str], densities: Sequence[float], level: float,
            summary: table.Summary | None = None) -> dict[str, str]:
    """{file name: text} of the accuracy and difference tables and the cost tables of the cells under ``root``
    (``summary``: their accuracy summary, when the caller has it already)."""
    if summary is None:
        summary = table.summarize(table.collect(root, by_folder=True), densities, methods=variants)
    runs = cost.collect(root)
    return {"table.md": table.format_tables(summary), "table.csv": table.format_csv(summary),
            "cost.md": cost.format_report({v: runs[v] for v in variants if v in runs}, densities, level)}


def write_reports(root: pathlib.Path, variants: Sequence[str], densities: Sequence[float], level: float) -> None:
    """:func:`reports` written under ``root``, and the plots."""
    summary = table.summarize(table.collect(root, by_folder=True), densities, methods=variants)
    for name, text in reports(root, variants, densities, level, summary).items():
        (root / name).write_text(text)
    plots.plot_accuracy_vs_sparsity(summary, root / "accuracy_vs_sparsity.png")
    if table.REFERENCE in variants and len(variants) > 1:
        plots.plot_differences(summary, root / "differences_vs_sparsity.png")


def parse_grid(names: str, table_of: dict[str, sweep.Variant], seeds: str,
               densities: str) -> tuple[list[str], list[int], list[float]]:
    """The ``--variants``, ``--seeds`` and ``--densities`` of a suite; a ValueError naming a bad one."""
    variants = [v for v in names.split(",") if v.strip()]
    unknown = [v for v in variants if v not in table_of]
    if unknown or not variants:
        raise ValueError(f"--variants: unknown {unknown or 'none given'}; use some of {', '.join(table_of)}")
    seed_list, density_list = sweep.parse_list(seeds, int), sweep.parse_list(densities, float)
    if not seed_list or not density_list or any(not 0 < d <= 1 for d in density_list):
        raise ValueError("--seeds and --densities need values; densities are keep ratios in (0, 1]")
    return variants, seed_list, density_list


def run_suite(config: str, table_of: dict[str, sweep.Variant], variants: Sequence[str], seeds: Sequence[int],
              densities: Sequence[float], root: pathlib.Path, overrides: dict[str, str], *, command: list[str],
              dry_run: bool, write: Callable[[], None]) -> int:
    """Runs (or resumes) the suite's cells through ``experiments.sweep``, then ``write``s its reports and
    ``wall_time.txt``; returns 0 when every cell finished."""
    started = time.monotonic()
    status = sweep.run_sweep(config, variants, seeds, densities, root, overrides, command=command,
                             variants=table_of, dry_run=dry_run)
    if dry_run or status:
        return status
    write()
    wall = time.monotonic() - started
    cells = json.loads((root / sweep.MANIFEST_FILE).read_text())["cells"]
    total = sum(cell["wall_s"] for cell in cells)
    (root / "wall_time.txt").write_text(
        f"{total:.0f} s ({total / 3600:.2f} h) of cell runs over every invocation of {shlex.join(command)} "
        f"({len(cells)} cells; per cell in {sweep.MANIFEST_FILE}); this invocation {wall:.0f} s\n")
    print(f"wrote the reports under {root} ({wall:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The suite's command line; returns 0 when every cell finished and the reports are written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        variants, seeds, densities = parse_grid(args.variants, VARIANTS, args.seeds, args.densities)
    except ValueError as error:
        return cli.report_error(error, verbose=False)
    root = pathlib.Path(args.root)
    return run_suite(args.config, VARIANTS, variants, seeds, densities, root, OVERRIDES,
                     command=[sys.executable, "-m", "experiments.ablations", *argv], dry_run=args.dry_run,
                     write=lambda: write_reports(root, variants, densities, args.level))


if __name__ == "__main__":
    sys.exit(main())
