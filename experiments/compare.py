"""How far a rerun moved a results table: every (method, sparsity) cell after minus before, paired by seed.

    python -m experiments.compare --before=OLD_ROOT --after=NEW_ROOT [--densities=0.5,0.2,0.1,0.05] \\
        [--by_folder] [--out=FILE.md]

Both roots hold ``<method>/seed_<s>/results.json`` cells (a sweep's, or the
ablation suite's with ``--by_folder``, whose variants share a method). For each
cell present in both, prints the mean test accuracy (%) before and after, the
change paired by seed with its 95 % interval and paired t-test p-value
(``experiments.stats``), and the largest change of any one seed; then the
largest change of any cell's mean and of any seed. The rerun of committed
results after a fix is read with it: did a number move, and by how much.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Sequence

from experiments import stats, table
from vpns_jax import cli


@dataclasses.dataclass(frozen=True)
class Change:
    """One cell's accuracy before and after a rerun, paired by seed."""

    method: str
    density: float
    before: float
    after: float
    paired: stats.PairedDifference
    largest_seed_change: float  # signed, the largest in magnitude


def changes(before: table.Summary, after: table.Summary) -> list[Change]:
    """Every cell both summaries hold with at least one seed in common, in ``after``'s order."""
    out = []
    for method in after.methods:
        for density in after.densities:
            old, new = before.cells.get((method, density)), after.cells.get((method, density))
            if old is None or new is None or not set(old.seeds) & set(new.seeds):
                continue
            paired = stats.paired_difference(new.by_seed(), old.by_seed())
            per_seed = [new.by_seed()[s] - old.by_seed()[s] for s in paired.seeds]
            out.append(Change(method, density, old.mean, new.mean, paired, max(per_seed, key=abs)))
    return out


def format_changes(found: Sequence[Change]) -> str:
    """The markdown table of ``found`` and a closing line with the largest changes."""
    if not found:
        return "No cell in common.\n"
    lines = ["| method | sparsity (%) | before | after | after - before, paired by seed | largest seed change |",
             "| :-- | --: | --: | --: | --: | --: |"]
    for c in found:
        lines.append(f"| {c.method} | {table.sparsity_label(c.density)} | {c.before:.2f} | {c.after:.2f} | "
                     f"{stats.format_difference(c.paired)} | {c.largest_seed_change:+.2f} |")
    by_mean = max(found, key=lambda c: abs(c.paired.difference.mean))
    by_seed = max(found, key=lambda c: abs(c.largest_seed_change))
    significant = sum(c.paired.significant() for c in found)
    lines.append("")
    lines.append(f"Largest change of a cell's mean: {by_mean.paired.difference.mean:+.2f} points ({by_mean.method} at "
                 f"{table.sparsity_label(by_mean.density)} % sparsity); of one seed: "
                 f"{by_seed.largest_seed_change:+.2f} ({by_seed.method} at {table.sparsity_label(by_seed.density)} "
                 f"%). Significant at 5 %: {significant} of {len(found)} cells.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the comparison, and writes it to ``--out`` if given."""
    parser = cli.OneLineParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="Root of the earlier cells.")
    parser.add_argument("--after", required=True, help="Root of the rerun's cells.")
    parser.add_argument("--densities", default=None, help="Column densities (default: the earlier root's).")
    parser.add_argument("--by_folder", action="store_true", help="Rows by folder name (the ablation variants).")
    parser.add_argument("--out", default=None, help="Markdown file to write the comparison to.")
    args = parser.parse_args(argv)
    rows = {}
    for side in ("before", "after"):
        root = getattr(args, side)
        rows[side] = table.collect(root, by_folder=args.by_folder)
        if not rows[side]:
            return cli.report_error(FileNotFoundError(f"no */seed_*/results.json under --{side}={root}"),
                                    verbose=False)
    densities = table.parse_floats(args.densities) or table.default_densities(args.before, rows["before"])
    summaries = {side: table.summarize(rows[side], densities) for side in rows}
    text = format_changes(changes(summaries["before"], summaries["after"]))
    print(text, end="")
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
