"""A sweep's results as the paper's accuracy table: methods x sparsity, mean(std) and 95 % interval over seeds.

    python -m experiments.table --root=experiments/results/sweep --densities=0.5,0.2,0.1,0.05 \\
        --out=experiments/results/sweep/table

writes ``OUT.md`` and ``OUT.csv`` and prints the markdown and the ranking of the
methods at each column. Columns are labelled by sparsity in % (density 0.1 ->
'90'); cells are test accuracy in % as mean(sample std, ddof=1) [95 % Student-t
interval] over seeds. A second table gives each method minus VPNs, paired by
seed (the same seed is the same data order and initial state), with the
interval of the mean difference and the paired t-test p-value; 'n.s.' marks a
difference that is not significant at 5 % (or rests on one seed).
A method without a row at a column's exact density (LTH, whose rounds sit at
0.8^r) takes the row nearest in log ratio if it is within a factor 1.25, and the
cell is marked with a dagger and footnoted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from experiments import stats, sweep
from vpns_jax import cli

# How the tables show two methods' rows: the dense finetune as the reference of every column, LTH's rounds
# (densities 0.8^r) matched to the nearest requested density.
DENSE_METHOD = "dense"
ROUND_METHODS = ("lth",)

REFERENCE = "vpns"  # the method the differences are taken from
# Farthest a row's density may be from a column's (either way) to stand in for it.
NEAREST_FACTOR = 1.25
MARK = "†"
# Table row order: baselines first, the paper's method last; unknown methods follow alphabetically.
METHOD_ORDER = ("dense", "random", "omp", "lth", "snip", "grasp", "synflow", "slim", "hydra", "bip",
                "random_vp", "omp_vp", "lth_vp", "vpns")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method at one column density: test accuracy in % over the seeds that have a row for it."""

    method: str
    density: float  # the column's density
    seeds: tuple[int, ...]
    used_densities: tuple[float, ...]  # per seed, the density of the row taken
    nearest: bool  # some row was taken at a density other than the column's
    accuracies: tuple[float, ...]  # per seed, in %

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def estimate(self) -> stats.Estimate | None:
        """Mean, std and 95 % interval over the seeds; None without a value."""
        return stats.estimate(self.accuracies) if self.accuracies else None

    @property
    def mean(self) -> float | None:
        return self.estimate.mean if self.accuracies else None

    @property
    def std(self) -> float | None:
        """Sample std; None with fewer than two seeds."""
        return self.estimate.std if self.accuracies else None

    def by_seed(self) -> dict[int, float]:
        """Accuracy (%) of each seed."""
        return dict(zip(self.seeds, self.accuracies))


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table: ``cells[(method, density)]`` for every method and column density."""

    methods: tuple[str, ...]
    densities: tuple[float, ...]
    cells: dict[tuple[str, float], Cell]


def sparsity_label(density: float) -> str:
    """The column label: sparsity in %, e.g. density 0.1 -> '90', 0.005 -> '99.5'."""
    return f"{round((1 - density) * 100, 4):g}"


def collect(root: str | pathlib.Path, *, by_folder: bool = False) -> list[dict[str, Any]]:
    """Every results row under ``root`` (``<method>/seed_<s>/results.json``) with method, seed and workdir added.

    A row's own ``method`` field wins over its folder's name, unless ``by_folder`` (variants of one method,
    e.g. the ablations, are told apart by their folders).
    """
    rows = []
    for path in pathlib.Path(root).glob("*/seed_*/results.json"):
        workdir = path.parent
        try:
            seed = int(workdir.name.removeprefix("seed_"))
        except ValueError:
            continue
        for row in json.loads(path.read_text()):
            method = workdir.parent.name if by_folder else row.get("method") or workdir.parent.name
            rows.append({**row, "method": method, "seed": seed,
                         "workdir": str(workdir)})
    rows.sort(key=lambda r: (r["method"], r["seed"], -float(r["density"])))
    return rows


def _order(methods: set[str]) -> tuple[str, ...]:
    known = [m for m in METHOD_ORDER if m in methods]
    return tuple(known + sorted(methods - set(known)))


def _pick(rows: list[dict[str, Any]], method: str, density: float) -> tuple[dict[str, Any] | None, bool]:
    """One seed's row for a column: exact density, else nearest within the factor; (row, nearest?)."""
    exact = [r for r in rows if math.isclose(float(r["density"]), density, rel_tol=1e-6)]
    if exact:
        return exact[-1], False
    if method == DENSE_METHOD:
        return max(rows, key=lambda r: float(r["density"])), False  # one model serves every column
    best = min(rows, key=lambda r: abs(math.log(float(r["density"]) / density)))
    if abs(math.log(float(best["density"]) / density)) <= math.log(NEAREST_FACTOR) + 1e-9:
        return best, True
    return None, False


def summarize(rows: Sequence[dict[str, Any]], densities: Sequence[float],
              methods: Sequence[str] | None = None) -> Summary:
    """Mean and sample std of test accuracy (%) over seeds per method and column density.

    ``methods`` sets the rows and their order (default: every method in ``rows``, paper order).
    """
    methods = tuple(methods) if methods else _order({r["method"] for r in rows})
    cells = {}
    for method in methods:
        by_seed: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            if row["method"] == method:
                by_seed.setdefault(int(row["seed"]), []).append(row)
        for density in densities:
            picked = [(seed, *_pick(seed_rows, method, density)) for seed, seed_rows in sorted(by_seed.items())]
            picked = [(seed, row, nearest) for seed, row, nearest in picked if row is not None]
            accuracies = [100 * float(row["test_accuracy"]) for _, row, _ in picked]
            cells[(method, density)] = Cell(
                method=method, density=density,
                seeds=tuple(seed for seed, _, _ in picked),
                used_densities=tuple(float(row["density"]) for _, row, _ in picked),
                nearest=any(nearest for _, _, nearest in picked),
                accuracies=tuple(accuracies),
            )
    return Summary(methods=methods, densities=tuple(densities), cells=cells)


def format_cell(cell: Cell, seeds_expected: int) -> str:
    """'92.00(2.00) [87.03, 96.97]' (mean, sample std, 95 % interval); '92.00(-)' with one seed, '†' at a nearby
    density, ' [n=2]' below ``seeds_expected`` seeds."""
    if cell.mean is None:
        return "n/a"
    text = f"{cell.mean:.2f}({'-' if cell.std is None else f'{cell.std:.2f}'})"
    interval = cell.estimate
    if interval.low is not None:
        text += f" [{interval.low:.2f}, {interval.high:.2f}]"
    if cell.nearest:
        text += MARK
    if cell.n < seeds_expected:
        text += f" [n={cell.n}]"
    return text


def _all_seeds(summary: Summary) -> list[int]:
    return sorted({seed for cell in summary.cells.values() for seed in cell.seeds})


def _used(cell: Cell) -> str:
    return "/".join(f"{d:.4g}" for d in sorted(set(cell.used_densities), reverse=True))


def format_markdown(summary: Summary) -> str:
    """The table as markdown: one row per method (dense first when present), one column per sparsity."""
    seeds = _all_seeds(summary)
    lines = [
        "| Sparsity (%) | " + " | ".join(sparsity_label(d) for d in summary.densities) + " |",
        "| :-- | " + " | ".join("--:" for _ in summary.densities) + " |",
    ]
    for method in summary.methods:
        cells = [format_cell(summary.cells[(method, d)], len(seeds)) for d in summary.densities]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    plural = "seed" if len(seeds) == 1 else "seeds"
    lines += ["", f"Test accuracy (%), mean(sample std) [95 % t interval] over {len(seeds)} {plural} "
                  f"({', '.join(map(str, seeds))}); '-': one seed."]
    marked = [summary.cells[(m, d)] for m in summary.methods for d in summary.densities
              if summary.cells[(m, d)].nearest]
    if marked:
        uses = "; ".join(f"{c.method} at {_used(c)} for {sparsity_label(c.density)}" for c in marked)
        lines.append(f"{MARK} LTH at its round density 0.8^r nearest the column (any method: the nearest "
                     f"density it ran, within a factor {NEAREST_FACTOR:g}): {uses}.")
    return "\n".join(lines) + "\n"


def differences(summary: Summary, reference: str = REFERENCE) -> dict[tuple[str, float], stats.PairedDifference]:
    """Each other method minus ``reference`` at each column, paired by seed (cells without a common seed are
    left out)."""
    out = {}
    for method in summary.methods:
        for density in summary.densities:
            cell, ref = summary.cells[(method, density)], summary.cells.get((reference, density))
            if method != reference and ref is not None and set(cell.seeds) & set(ref.seeds):
                out[(method, density)] = stats.paired_difference(cell.by_seed(), ref.by_seed())
    return out


def format_tables(summary: Summary) -> str:
    """The accuracy table, followed by the differences from :data:`REFERENCE` when it is one of several rows."""
    markdown = format_markdown(summary)
    if REFERENCE in summary.methods and len(summary.methods) > 1:
        markdown += "\n" + format_differences(summary)
    return markdown


def format_differences(summary: Summary, reference: str = REFERENCE) -> str:
    """Markdown: each method minus ``reference`` per column, '+1.20 [+0.40, +2.00] p=0.012' or '... n.s.'."""
    paired = differences(summary, reference)
    lines = [
        f"| Minus {reference} | " + " | ".join(sparsity_label(d) for d in summary.densities) + " |",
        "| :-- | " + " | ".join("--:" for _ in summary.densities) + " |",
    ]
    for method in summary.methods:
        if method != reference:
            cells = [stats.format_difference(paired[(method, d)]) if (method, d) in paired else "n/a"
                     for d in summary.densities]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"Test accuracy difference (percentage points) from {reference}, paired by seed: mean [95 % t "
                  "interval] and the paired t-test p-value; n.s.: not significant at 5 % (always with one seed)."]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("method", "density", "sparsity_pct", "mean_accuracy_pct", "std_accuracy_pct", "ci_low_pct",
              "ci_high_pct", "n", "seeds", "used_density", "nearest", "minus_vpns_pct", "minus_vpns_low",
              "minus_vpns_high", "minus_vpns_p")


def format_csv(summary: Summary) -> str:
    """One CSV row per method x column density: mean, std (blank with one seed), n, seeds, the densities used."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    paired = differences(summary)
    number = lambda value, digits=4: "" if value is None else f"{value:.{digits}f}"  # noqa: E731
    for method in summary.methods:
        for density in summary.densities:
            cell = summary.cells[(method, density)]
            interval = cell.estimate
            diff = paired.get((method, density))
            writer.writerow([
                method, f"{density:g}", sparsity_label(density), number(cell.mean), number(cell.std),
                number(interval and interval.low), number(interval and interval.high),
                cell.n, " ".join(map(str, cell.seeds)), _used(cell), str(cell.nearest).lower(),
                number(diff and diff.difference.mean), number(diff and diff.difference.low),
                number(diff and diff.difference.high),
                "" if diff is None or diff.p_value is None else f"{diff.p_value:.4g}",
            ])
    return text.getvalue()


def ranking(summary: Summary, density: float, *, include_dense: bool = False) -> list[tuple[str, float]]:
    """(method, mean accuracy %) at one column, best first; methods without a value there are left out."""
    column = next((d for d in summary.densities if math.isclose(d, density, rel_tol=1e-6)), None)
    if column is None:
        raise ValueError(f"density {density} is not a column of the table ({summary.densities})")
    ranked = [(m, summary.cells[(m, column)].mean) for m in summary.methods
              if summary.cells[(m, column)].mean is not None and (include_dense or m != DENSE_METHOD)]
    return sorted(ranked, key=lambda item: -item[1])


def format_rankings(summary: Summary) -> str:
    """One markdown list item per column: '- sparsity 90 %: vpns 92.00 > hydra 91.00 > ...'."""
    return "\n".join(
        f"- sparsity {sparsity_label(d)} %: " + " > ".join(f"{m} {acc:.2f}" for m, acc in ranking(summary, d))
        for d in summary.densities
    ) + "\n"


def default_densities(root: str | pathlib.Path, rows: Sequence[dict[str, Any]]) -> list[float]:
    """The sweep's densities from its manifest, else every density that a non-round, non-dense method ran."""
    try:
        return [float(d) for d in json.loads((pathlib.Path(root) / sweep.MANIFEST_FILE).read_text())["densities"]]
    except (OSError, ValueError, KeyError, TypeError):
        skip = (*ROUND_METHODS, DENSE_METHOD)
        return sorted({float(r["density"]) for r in rows if r["method"] not in skip}, reverse=True)


def parse_floats(text: str | None) -> list[float] | None:
    """'0.5,0.1' -> [0.5, 0.1]; None or '' -> None."""
    return [float(part) for part in text.split(",") if part.strip()] if text else None


def table_files(summary: Summary) -> tuple[str, str]:
    """The texts of ``table.md`` (tables, then the rankings) and ``table.csv`` for ``summary``."""
    markdown = format_tables(summary) + "\nRanking by mean accuracy:\n\n" + format_rankings(summary)
    return markdown, format_csv(summary)


def main(argv: Sequence[str] | None = None) -> int:
    """The table's command line: writes OUT.md and OUT.csv, prints the markdown and the rankings."""
    parser = cli.OneLineParser(prog="python -m experiments.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="The sweep's root folder.")
    parser.add_argument("--densities", default=None, help="Column densities (default: the sweep's).")
    parser.add_argument("--methods", default=None, help="Rows and their order (default: every method found).")
    parser.add_argument("--out", default=None, help="Output path prefix (default: ROOT/table -> table.md, table.csv).")
    args = parser.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        return cli.report_error(FileNotFoundError(f"no */seed_*/results.json under {args.root}"), verbose=False)
    densities = parse_floats(args.densities) or default_densities(args.root, rows)
    methods = args.methods.split(",") if args.methods else None
    summary = summarize(rows, densities, methods)
    markdown, csv_text = table_files(summary)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.root) / "table"
    md_path, csv_path = out.parent / f"{out.name}.md", out.parent / f"{out.name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown)
    csv_path.write_text(csv_text)
    print(markdown, end="")
    print(f"wrote {md_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
