"""Figures of a sweep: accuracy against sparsity per method, and the kept fraction per layer of found masks.

    python -m experiments.plots --root=experiments/results/sweep --out=experiments/results/sweep \\
        [--densities=0.5,0.2,0.1,0.05] [--layer_methods=vpns,hydra,omp,lth,random] [--layer_density=0.1]

writes ``accuracy_vs_sparsity.png`` and, for each layer method, the mask of its
first seed at the density nearest ``--layer_density`` as ``layer_density_<method>.png``.
Figures are drawn with matplotlib's Agg canvas, without pyplot's global state.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import stats, table
from vpns_jax import cli

ACCURACY_FILE = "accuracy_vs_sparsity.png"
DPI = 150


def _save(figure: Figure, path: str | pathlib.Path) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)


# Matplotlib's default cycle has 10 colours; an ablation suite has more lines, told apart by marker and dash too.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "--", ":")


def _style(index: int) -> dict[str, Any]:
    # Past ten, the marker shifts against the colour, so points drawn without lines stay apart too.
    return {"color": f"C{index % 10}", "marker": MARKERS[(index + 5 * (index // 10)) % len(MARKERS)],
            "linestyle": LINESTYLES[(index // 10) % len(LINESTYLES)]}


def _figure(lines: int) -> tuple[Figure, Any]:
    figure = Figure(figsize=(6.4 if lines <= 6 else 8.4, 4.4))
    return figure, figure.add_subplot()


def _legend(axes: Any, lines: int) -> None:
    # Many lines: the legend goes beside the axes so it hides none of them.
    if lines <= 6:
        axes.legend(fontsize="small")
    else:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_accuracy_vs_sparsity(summary: table.Summary, path: str | pathlib.Path) -> None:
    """One line per method (error bars: sample std over seeds) of test accuracy % against sparsity %; a PNG.

    Points sit at the densities actually used (an LTH round near a column is drawn
    at its own sparsity); the dense model is a dashed horizontal line.
    """
    figure, axes = _figure(len(summary.methods))
    for index, method in enumerate(summary.methods):
        cells = [summary.cells[(method, d)] for d in summary.densities]
        cells = [c for c in cells if c.mean is not None]
        if not cells:
            continue
        if method == table.DENSE_METHOD:
            axes.axhline(cells[0].mean, color="black", linestyle="--", linewidth=1, label=method)
            continue
        x = [100 * (1 - float(np.mean(c.used_densities))) for c in cells]
        y = [c.mean for c in cells]
        errors = [c.std or 0.0 for c in cells]
        axes.errorbar(x, y, yerr=errors, markersize=4, capsize=3, label=method, **_style(index))
    _sparsity_axis(axes, summary.densities)
    axes.set_ylabel("test accuracy (%)")
    _legend(axes, len(summary.methods))
    _save(figure, path)


def _sparsity_axis(axes: Any, densities: Sequence[float]) -> None:
    axes.set_xticks([100 * (1 - d) for d in densities], [table.sparsity_label(d) for d in densities])
    axes.set_xlabel("sparsity (%)")
    axes.grid(alpha=0.3)


def difference_points(summary: table.Summary, reference: str = table.REFERENCE
                      ) -> dict[str, list[tuple[float, stats.Estimate]]]:
    """{method: [(sparsity %, its paired difference from ``reference`` in points)]} for every method that has
    a seed in common with ``reference`` at some column."""
    paired = table.differences(summary, reference)
    points = {}
    for method in summary.methods:
        at = [(100 * (1 - d), paired[(method, d)].difference) for d in summary.densities if (method, d) in paired]
        if at:
            points[method] = at
    return points


def plot_differences(summary: table.Summary, path: str | pathlib.Path, reference: str = table.REFERENCE) -> None:
    """Each method minus ``reference`` paired by seed (points: mean; bars: 95 % t interval) against sparsity
    %, with zero marked; a PNG. Methods sit side by side around each column so their bars do not overlap."""
    points_of = difference_points(summary, reference)
    methods = list(points_of)
    figure, axes = _figure(len(methods))
    # Spread the methods over 60 % of the smallest gap between columns.
    columns = sorted(100 * (1 - d) for d in summary.densities)
    gap = min((b - a for a, b in zip(columns, columns[1:])), default=10.0)
    offsets = np.linspace(-0.3 * gap, 0.3 * gap, len(methods)) if len(methods) > 1 else [0.0]
    for index, (method, offset) in enumerate(zip(methods, offsets)):
        points = points_of[method]
        x = [sparsity + offset for sparsity, _ in points]
        y = [d.mean for _, d in points]
        bars = [[0.0 if d.low is None else d.mean - d.low for _, d in points],
                [0.0 if d.high is None else d.high - d.mean for _, d in points]]
        axes.errorbar(x, y, yerr=bars, markersize=4, capsize=2, label=method, **{**_style(index), "linestyle": "none"})
    axes.axhline(0.0, color="black", linewidth=1)
    _sparsity_axis(axes, summary.densities)
    axes.set_ylabel(f"test accuracy minus {reference} (points)")
    _legend(axes, len(methods))
    _save(figure, path)


def _leaves(masks: Mapping[Any, Any], path: tuple[str, ...] = ()):
    """(layer name, array) for every non-empty leaf; a trailing 'kernel' is dropped as it names no layer."""
    for key, value in masks.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*path, str(key)))
        elif np.size(value):
            name = path if str(key) == "kernel" and path else (*path, str(key))
            yield "/".join(name), np.asarray(value)


def layer_densities(masks: Mapping[Any, Any]) -> dict[str, float]:
    """Kept fraction (mask mean) of every leaf of a nested mask dict, named by its '/'-joined path.

    Conv kernels (4-D) come first and dense kernels after them, each in stored
    order: the .npz stores names sorted, which would put ResNet's 'fc' second.
    """
    leaves = sorted(_leaves(masks), key=lambda item: item[1].ndim == 2)
    return {name: float(np.mean(leaf)) for name, leaf in leaves}


def kept_fraction(masks: Mapping[Any, Any]) -> float:
    """Kept fraction over all leaves together (each entry counts once)."""
    leaves = [leaf for _, leaf in _leaves(masks)]
    return float(sum(np.sum(leaf) for leaf in leaves) / max(1, sum(leaf.size for leaf in leaves)))


def plot_layer_densities(masks: Mapping[Any, Any], path: str | pathlib.Path, title: str) -> None:
    """Bar chart of the kept fraction per prunable layer of one mask (convs, then dense layers); a PNG."""
    densities = layer_densities(masks)
    figure = Figure(figsize=(max(6.4, 0.28 * len(densities) + 1.5), 4.4))
    axes = figure.add_subplot()
    positions = np.arange(len(densities))
    axes.bar(positions, list(densities.values()), color="tab:blue")
    axes.set_xticks(positions, list(densities), rotation=90, fontsize="x-small")
    axes.set_ylim(0, 1)
    axes.set_ylabel("kept fraction")
    axes.set_title(title, fontsize="medium")
    axes.grid(axis="y", alpha=0.3)
    _save(figure, path)


def nearest_subnetwork(workdir: str | pathlib.Path, density: float) -> tuple[float, pathlib.Path] | None:
    """(density, masks.npz) of the workdir's subnetwork nearest ``density`` in log ratio, or None if there is none."""
    found = []
    for masks in pathlib.Path(workdir).glob("subnetworks/density_*/masks.npz"):
        try:
            found.append((float(masks.parent.name.removeprefix("density_")), masks))
        except ValueError:
            continue
    if not found:
        return None
    return min(found, key=lambda item: abs(math.log(item[0] / density)))


def first_seed_workdir(root: str | pathlib.Path, method: str) -> pathlib.Path | None:
    """The workdir of ``method``'s smallest seed under ``root``, or None."""
    seeds = []
    for workdir in (pathlib.Path(root) / method).glob("seed_*"):
        try:
            seeds.append((int(workdir.name.removeprefix("seed_")), workdir))
        except ValueError:
            continue
    return min(seeds)[1] if seeds else None


def main(argv: Sequence[str] | None = None) -> int:
    """The plots' command line: writes the accuracy plot and one layer-density plot per layer method."""
    parser = cli.OneLineParser(prog="python -m experiments.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="The sweep's root folder.")
    parser.add_argument("--out", default=None, help="Folder for the PNGs (default: ROOT).")
    parser.add_argument("--densities", default=None, help="Column densities (default: the sweep's).")
    parser.add_argument("--layer_methods", default="vpns,hydra,omp,lth,random",
                        help="Methods to draw the per-layer densities of.")
    parser.add_argument("--layer_density", type=float, default=0.1,
                        help="Density of the mask drawn (the nearest one the method ran).")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or args.root)
    rows = table.collect(args.root)
    if not rows:
        return cli.report_error(FileNotFoundError(f"no */seed_*/results.json under {args.root}"), verbose=False)
    densities = table.parse_floats(args.densities) or table.default_densities(args.root, rows)
    plot_accuracy_vs_sparsity(table.summarize(rows, densities), out / ACCURACY_FILE)
    print(f"wrote {out / ACCURACY_FILE}")

    from vpns_jax.io import array_files  # pulls in jax: only once there are masks to read

    for method in filter(None, args.layer_methods.split(",")):
        workdir = first_seed_workdir(args.root, method)
        found = nearest_subnetwork(workdir, args.layer_density) if workdir else None
        if found is None:
            print(f"{method}: no subnetworks/density_*/masks.npz under {args.root}/{method}; no layer plot")
            continue
        density, masks_path = found
        masks = array_files.load_arrays(masks_path)
        title = f"{method}, {workdir.name.replace('_', ' ')}, density {density:.4g} (kept {kept_fraction(masks):.4f})"
        path = out / f"layer_density_{method}.png"
        plot_layer_densities(masks, path, title)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
