"""N:M sparsity against unstructured masks at the same density, on the offline default.

    python -m experiments.nm_suite [--root=workdir/nm] [--seeds=7,9,17] [--methods=vpns,hydra,omp] [--dry_run]

For each method, three variants prune the shared source model: unstructured at densities 0.5 and 0.25
(``<method>``), 2:4 at 0.5 (``<method>_2_4``) and 1:4 at 0.25 (``<method>_1_4``), every seed, through
``experiments.sweep`` (omp is one-shot magnitude, then its finetune). Writes under ROOT ``table.md`` (accuracy
per variant and sparsity over seeds; then, per method, each pattern minus that method's unstructured masks,
paired by seed), ``table.csv``, ``accuracy_vs_sparsity.png``, ``manifest.json``, ``command.txt`` and
``wall_time.txt``. A rerun skips finished cells.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from experiments import ablations, plots, sweep, table
from vpns_jax import cli

METHODS = ("vpns", "hydra", "omp")
# Pattern -> the one density it keeps (N/M).
PATTERNS = {"2:4": 0.5, "1:4": 0.25}
DENSITIES = (0.5, 0.25)


def variant_name(method: str, pattern: str) -> str:
    """'vpns_2_4' for ('vpns', '2:4')."""
    return f"{method}_{pattern.replace(':', '_')}"


def variants(methods: Sequence[str]) -> dict[str, sweep.Variant]:
    """Each method unstructured, then at each pattern of :data:`PATTERNS` at its own density."""
    out = {}
    for method in methods:
        out[method] = sweep.Variant(method)
        for pattern, density in PATTERNS.items():
            out[variant_name(method, pattern)] = sweep.Variant(method, {"mask.granularity": pattern}, (density,))
    return out


def report(root: pathlib.Path, methods: Sequence[str], rows: list | None = None) -> str:
    """The accuracy table of every variant, then each method's patterns minus its unstructured masks
    (``rows``: the cells' ``table.collect``, when the caller has read them)."""
    names = list(variants(methods))
    rows = table.collect(root, by_folder=True) if rows is None else rows
    text = table.format_markdown(table.summarize(rows, DENSITIES, methods=names))
    for method in methods:
        family_names = [n for n in names if n == method or n.startswith(f"{method}_")]
        family = table.summarize(rows, DENSITIES, methods=family_names)
        text += "\n" + table.format_differences(family, reference=method)
    return text


def write_reports(root: pathlib.Path, methods: Sequence[str]) -> None:
    """:func:`report` as ``table.md``, the CSV and the accuracy plot under ``root``."""
    rows = table.collect(root, by_folder=True)
    summary = table.summarize(rows, DENSITIES, methods=list(variants(methods)))
    (root / "table.md").write_text(report(root, methods, rows))
    (root / "table.csv").write_text(table.format_csv(summary))
    plots.plot_accuracy_vs_sparsity(summary, root / "accuracy_vs_sparsity.png")


def _parser() -> cli.OneLineParser:
    parser = ablations.suite_parser("experiments.nm_suite", __doc__, config="configs/default.py", root="workdir/nm",
                                    variants=None)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of: {', '.join(METHODS)}.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The suite's command line; returns 0 when every cell finished and the reports are written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        methods = [m for m in args.methods.split(",") if m.strip()]
        if not methods or any(m not in METHODS for m in methods):
            raise ValueError(f"--methods: use some of {', '.join(METHODS)}, got {args.methods!r}")
        table_of = variants(methods)
        names, seeds, _ = ablations.parse_grid(",".join(table_of), table_of, args.seeds, "0.5,0.25")
    except ValueError as error:
        return cli.report_error(error, verbose=False)
    root = pathlib.Path(args.root)
    return ablations.run_suite(args.config, table_of, names, seeds, DENSITIES, root, {},
                               command=[sys.executable, "-m", "experiments.nm_suite", *argv], dry_run=args.dry_run,
                               write=lambda: write_reports(root, methods))


if __name__ == "__main__":
    sys.exit(main())
