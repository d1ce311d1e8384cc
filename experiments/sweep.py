"""Runs a grid of pruning jobs, one ``vpns_jax.main`` subprocess per (method, seed) cell.

    python -m experiments.sweep --config=configs/default.py --methods=vpns,hydra,omp,random,lth \\
        --densities=0.5,0.2,0.1,0.05 --seeds=7,9,17 --root=experiments/results/sweep \\
        [--set source.epochs=1 ...] [--dry_run]

Each cell gets its own workdir ``ROOT/<method>/seed_<s>`` and runs every
density in one job (the trainer loops over them). Run it from the repository
root: workdirs and the config path are passed on as given, so a rerun from the
same place issues the same commands.

Source model sharing: when the config pretrains its own source model
(``source.enabled`` and no ``model.init_from``), only the first cell pretrains;
every later cell gets ``--config.source.enabled=False
--config.model.init_from=<first cell>/source_model.npz``. All cells therefore
prune the same source model, as the paper's cells all start from the same
ImageNet weights. The sharing cell is recorded in the manifest and kept on
reruns even if the method or seed order changes (each workdir is tied to its
config, so a cell must keep its command).

Resuming: a cell whose workdir holds the results of a finished run of the
requested densities is skipped; any other cell is rerun with the same command and the trainer resumes
it. A failed cell is reported with the tail of its stderr and the sweep goes on;
the exit status is then 1. Writes ``ROOT/manifest.json`` (rewritten atomically
after every cell; a cell's ``wall_s`` adds up its runs over every invocation
that finished it or failed, so a resumed sweep keeps its earlier cost; and
what this invocation ran on, ``measurement.provenance``: the git commit, the
package versions, the machine and the date) and
``ROOT/command.txt`` (this sweep's command line); each cell's output goes to
``sweep_stdout.log`` / ``sweep_stderr.log`` in its workdir.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import measurement
from vpns_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
# vpns_jax.source_model.SOURCE_FILE, not imported here as that module pulls in jax.
SOURCE_FILE = "source_model.npz"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"  # the run's config fingerprint (vpns_jax.io.workdir_guard.guard_workdir)
MANIFEST_FILE = "manifest.json"
COMMAND_FILE = "command.txt"
STDOUT_LOG = "sweep_stdout.log"
STDERR_LOG = "sweep_stderr.log"
# Set by the sweep for each cell (key -> the sweep's flag): a --set of these would contradict the cell layout.
RESERVED_KEYS = {"method": "--methods", "seed": "--seeds", "densities": "--densities"}
STDERR_TAIL_LINES = 20


@dataclasses.dataclass(frozen=True)
class Cell:
    """One job of the sweep: a method (or named variant) at a seed, with its workdir and full command line."""

    method: str  # the cell's name: its folder, and the row label of the tables
    seed: int
    workdir: pathlib.Path
    command: tuple[str, ...]
    # The shared source model this cell loads; None when it runs as the config says (maybe pretraining).
    source_from: pathlib.Path | None = None
    config_method: str = ""  # the config.method it runs when ``method`` names a variant ('' = ``method``)
    densities: tuple[float, ...] = ()  # the keep ratios it runs

    @property
    def runs(self) -> str:
        """The config.method this cell runs."""
        return self.config_method or self.method


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named cell kind: a method with extra config overrides (an ablation of it).

    ``densities``, where given, are the only keep ratios the variant runs instead of the sweep's: an N:M
    pattern keeps N/M of every group, so its cells run that one density.
    """

    method: str
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    densities: tuple[float, ...] = ()


def cell_workdir(root: str | os.PathLike, method: str, seed: int) -> pathlib.Path:
    """The workdir of the (method, seed) cell under ``root``."""
    return pathlib.Path(root) / method / f"seed_{seed}"


def load_config(config_path: str) -> Any:
    """The ConfigDict of a config file (``path.py`` or ``path.py:arg``)."""
    path, _, arg = config_path.partition(":")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{pathlib.Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``['a.b=1', ...]`` -> ``{'a.b': '1'}`` (a leading ``config.`` is dropped); refuses the sweep's own keys."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not key=value")
        if key in RESERVED_KEYS:
            raise ValueError(f"--set {key}=... is set by the sweep itself: use {RESERVED_KEYS[key]}")
        overrides[key] = value
    return overrides


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().strip("'\"").lower() in ("true", "1", "yes")
    return bool(value)


def pretrains_source(config: Any, overrides: Mapping[str, str]) -> bool:
    """Whether a job of ``config`` with ``overrides`` pretrains its own source model (the trainer's rule)."""
    enabled = _as_bool(overrides.get("source.enabled", config.source.enabled))
    init_from = str(overrides.get("model.init_from", config.model.init_from)).strip().strip("'\"")
    return enabled and not init_from


def format_densities(densities: Sequence[float]) -> str:
    """The ``--config.densities`` value: a Python tuple literal, e.g. ``(0.5, 0.1)`` or ``(0.5,)``."""
    return repr(tuple(float(d) for d in densities))


def build_command(config_path: str, workdir: pathlib.Path, method: str, seed: int, densities: Sequence[float],
                  overrides: Mapping[str, str], source_from: pathlib.Path | None = None) -> list[str]:
    """The ``vpns_jax.main`` command line of one cell; ``source_from`` swaps pretraining for that source model."""
    command = [
        sys.executable, "-m", "vpns_jax.main", f"--config={config_path}", f"--workdir={workdir}",
        f"--config.method={method}", f"--config.seed={seed}", f"--config.densities={format_densities(densities)}",
    ]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    if source_from is not None:
        command += ["--config.source.enabled=False", f"--config.model.init_from={source_from}"]
    return command


def plan(config_path: str, methods: Sequence[str], seeds: Sequence[int], densities: Sequence[float],
         root: str | os.PathLike, overrides: Mapping[str, str], *, share_source: bool,
         source_cell: tuple[str, int] | None = None, variants: Mapping[str, Variant] | None = None) -> list[Cell]:
    """Every cell of the sweep, methods outer and seeds inner, with its command.

    A name in ``variants`` runs that variant's method with its overrides on top of
    ``overrides``; any other name is a method. With ``share_source``,
    ``source_cell`` (default: the first cell) pretrains the source model and every
    other cell loads it from that cell's workdir.
    """
    variants = variants or {}
    pairs = [(method, seed) for method in methods for seed in seeds]
    if share_source and source_cell not in pairs:
        source_cell = pairs[0] if pairs else None
    source = cell_workdir(root, *source_cell) / SOURCE_FILE if share_source and source_cell else None
    cells = []
    for method, seed in pairs:
        workdir = cell_workdir(root, method, seed)
        source_from = source if source is not None and (method, seed) != source_cell else None
        variant = variants.get(method, Variant(method))
        cell_densities = tuple(float(d) for d in (variant.densities or densities))
        command = build_command(config_path, workdir, variant.method, seed, cell_densities,
                                {**overrides, **variant.overrides}, source_from)
        cells.append(Cell(method, seed, workdir, tuple(command), source_from,
                          config_method="" if variant.method == method else variant.method,
                          densities=cell_densities))
    return cells


def _same_density(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def is_complete(workdir: str | os.PathLike, densities: Sequence[float]) -> bool:
    """Whether the cell finished a run of exactly ``densities``: the trainer writes results.json only once every
    unit is done, and the workdir's config.json records the densities that run was given (whatever units its
    method made of them: LTH's rounds, a dense finetune)."""
    workdir = pathlib.Path(workdir)
    try:
        rows = json.loads((workdir / RESULTS_FILE).read_text())
        ran = [float(d) for d in json.loads((workdir / CONFIG_FILE).read_text())["densities"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(rows) and len(ran) == len(densities) and all(_same_density(a, b) for a, b in zip(ran, densities))


def run_cell(cell: Cell) -> tuple[int, str]:
    """Runs ``cell``'s command with its output in log files in the workdir; returns (exit status, stderr tail)."""
    cell.workdir.mkdir(parents=True, exist_ok=True)
    stderr_path = cell.workdir / STDERR_LOG
    with open(cell.workdir / STDOUT_LOG, "w") as stdout, open(stderr_path, "w") as stderr:
        returncode = subprocess.run(list(cell.command), stdout=stdout, stderr=stderr, check=False).returncode
    lines = stderr_path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return returncode, "\n".join(line for line in lines[-STDERR_TAIL_LINES:])


def write_json_atomically(path: pathlib.Path, data: Any) -> None:
    """``data`` as JSON at ``path`` via a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _read_manifest(root: pathlib.Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        return {}


def _manifest_source_cell(root: pathlib.Path) -> tuple[str, int] | None:
    try:
        recorded = _read_manifest(root).get("source_cell")
        return (str(recorded["method"]), int(recorded["seed"])) if recorded else None
    except (KeyError, TypeError, ValueError):
        return None


def _earlier_wall_seconds(root: pathlib.Path) -> dict[tuple[str, int], float]:
    """Each cell's wall seconds over the earlier invocations of a sweep in ``root`` (its manifest)."""
    earlier = {}
    for record in _read_manifest(root).get("cells", []):
        try:
            earlier[(str(record["method"]), int(record["seed"]))] = float(record["wall_s"])
        except (KeyError, TypeError, ValueError):
            continue
    return earlier


def parse_list(text: str, kind: type) -> list:
    """The comma-separated values of ``text`` as ``kind`` (blank parts skipped)."""
    return [kind(part) for part in text.split(",") if part.strip()]


def _parser() -> cli.OneLineParser:
    parser = cli.OneLineParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.py", help="Config file (path.py or path.py:arg).")
    parser.add_argument("--methods", default="vpns", help="Comma-separated methods, e.g. vpns,hydra,omp.")
    parser.add_argument("--densities", default=None, help="Comma-separated keep ratios (default: the config's).")
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds (default: the config's seed).")
    parser.add_argument("--root", default="experiments/results/sweep", help="Folder holding the cell workdirs.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra config override for every cell (repeatable), e.g. --set source.epochs=1.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run and write nothing.")
    return parser


def run_sweep(config_path: str, methods: Sequence[str], seeds: Sequence[int], densities: Sequence[float],
              root: str | os.PathLike, overrides: Mapping[str, str], *, command: Sequence[str],
              variants: Mapping[str, Variant] | None = None, dry_run: bool = False) -> int:
    """Runs (or resumes, or with ``dry_run`` prints) every cell; writes the manifest and ``command`` (this
    sweep's own command line) under ``root``; returns 0 when every cell is complete, else 1."""
    config = load_config(config_path)
    root = pathlib.Path(root)
    share = pretrains_source(config, overrides)
    cells = plan(config_path, methods, seeds, densities, root, overrides, share_source=share,
                 source_cell=_manifest_source_cell(root), variants=variants)
    source_cell = next(((c.method, c.seed) for c in cells if c.source_from is None), None) if share else None
    if share:
        print(f"source model: pretrained by {source_cell[0]} seed {source_cell[1]}, shared with every other cell")

    # A rerun resumes cells and skips finished ones: the manifest's wall seconds add up over invocations.
    earlier_wall = _earlier_wall_seconds(root)
    records: list[dict[str, Any]] = []
    manifest = {
        "command": list(command),
        "config": config_path, "methods": list(methods), "seeds": list(seeds), "densities": list(densities),
        "overrides": dict(overrides),
        "variants": {name: dataclasses.asdict(v) for name, v in (variants or {}).items() if name in methods},
        "source_cell": {"method": source_cell[0], "seed": source_cell[1]} if source_cell else None,
        # This invocation's commit, packages and machine (a dry run writes nothing, so asks for none); the
        # skipped cells of a resumed sweep may have run on earlier ones.
        **({} if dry_run else measurement.provenance()),
        "cells": records,
    }
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
        (root / COMMAND_FILE).write_text(shlex.join(manifest["command"]) + "\n")

    failed = 0
    for index, cell in enumerate(cells, 1):
        label = f"[{index}/{len(cells)}] {cell.method} seed {cell.seed}"
        before = earlier_wall.get((cell.method, cell.seed), 0.0)
        record = {"method": cell.method, "seed": cell.seed, "workdir": str(cell.workdir),
                  "command": list(cell.command), "status": "planned", "wall_s": before}
        records.append(record)
        if is_complete(cell.workdir, cell.densities):
            record["status"] = "skipped"
            print(f"{label}: complete, skipped ({cell.workdir / RESULTS_FILE})")
        elif dry_run:
            print(f"{label}: would run\n  {shlex.join(cell.command)}")
        elif cell.source_from is not None and not cell.source_from.exists():
            record["status"] = "blocked"
            failed += 1
            print(f"{label}: BLOCKED, the shared source model {cell.source_from} is missing "
                  "(its cell failed?); rerun the sweep once it exists")
        else:
            print(f"{label}: running in {cell.workdir} (logs: {STDOUT_LOG}, {STDERR_LOG})", flush=True)
            start = time.monotonic()
            returncode, tail = run_cell(cell)
            wall = time.monotonic() - start
            record["wall_s"] = round(before + wall, 1)
            record["returncode"] = returncode
            if returncode == 0:
                record["status"] = "done"
                print(f"{label}: done in {wall:.1f} s")
            else:
                record["status"] = "failed"
                failed += 1
                print(f"{label}: FAILED (exit {returncode}) after {wall:.1f} s; stderr tail:\n{tail}")
        if not dry_run:
            write_json_atomically(root / MANIFEST_FILE, manifest)
    if failed:
        print(f"{failed} of {len(cells)} cells failed or were blocked; see {root / MANIFEST_FILE}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The sweep's command line; returns the exit status (0 when every cell is complete)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        overrides = parse_overrides(args.overrides)
        methods = parse_list(args.methods, str)
        densities = parse_list(args.densities, float) if args.densities else [float(d) for d in config.densities]
        seeds = parse_list(args.seeds, int) if args.seeds else [int(config.seed)]
        if not methods or not densities or not seeds:
            raise ValueError("--methods, --densities and --seeds need at least one value each")
        if any(not 0 < d <= 1 for d in densities):
            raise ValueError(f"densities are keep ratios in (0, 1], got {densities}")
    except Exception as error:  # noqa: BLE001 - a bad command line is one line, as in vpns_jax.main
        return cli.report_error(error, verbose=False)
    return run_sweep(args.config, methods, seeds, densities, args.root, overrides,
                     command=[sys.executable, "-m", "experiments.sweep", *argv], dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
