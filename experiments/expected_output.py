"""Checks a run of the offline default against README.md's "Expected output of `make run`".

    python -m experiments.expected_output [--workdir=DIR] [--readme=README.md] [--widen=1.0] [--zero_shot]

Without ``DIR/results.json`` it first runs the command `make run` issues (``python -m vpns_jax.main
--config=configs/default.py``) with ``--workdir=DIR`` (default ``workdir/default``, as `make run`; about 3
minutes on 2 CPU cores) and reads the table it prints; with one, it reads that finished run's rows (formatted
as the run prints them, ``io.workdir.format_results``). Either way it compares the rows with the README's
block: the same densities in the same order, each sparsity equal to the README's as printed (4 decimals), and
each test accuracy inside that density's seed range in the README's spread table, widened at both ends by
``--widen`` times that density's seed standard deviation (default 1; 0: the bare min - max).

Why widened: the range holds 3 seeds, and a 4th seed falls outside the range of 3 with probability 1/2
(its rank among 4 is uniform). Another CPU or jaxlib changes last bits and, through the threshold, the masks,
so its seed-7 run is in effect a new draw. One standard deviation each side (0.92 points at density 0.5, 0.14
to 0.27 at the others) keeps the check to what the README calls a healthy run, and still fails a run that
misses by more than a point, let alone one that does not learn (the source model's zero-shot accuracy is far
below: ``--zero_shot`` measures it).

``--zero_shot`` also reads the run's cached ``source_model.npz`` and measures its test accuracy on the target
classes through frequency label mapping, as each unit starts before any stage-1/2 training (dense, zero
prompt; no training), prints it, and fails a density whose test accuracy does not exceed it.

Prints the rows and ``expected output: ok (...)``; exit status 0 when everything matches, 1 with one line
``expected output: mismatch: ...`` naming every difference, 2 on a bad command line or a failed run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Expected output of `make run`"
COMMAND = ["-m", "vpns_jax.main", "--config=configs/default.py"]  # what `make run` runs, after the interpreter
HEADER = "method  density  sparsity  test acc"


@dataclasses.dataclass(frozen=True)
class Row:
    """One printed results row, as text where the check is exact."""

    density: str  # as printed ('0.5', '0.05')
    sparsity: str  # as printed, 4 decimals
    test_accuracy: float  # a fraction


@dataclasses.dataclass(frozen=True)
class Spread:
    """One density's line of the README's spread table, in percent."""

    std: float
    low: float
    high: float


def parse_rows(text: str) -> list[Row]:
    """The results rows of a printed table (``format_results``): lines after the header with 7 columns."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADER in line), None)
    if start is None:
        raise ValueError(f"no results table (a line with {HEADER!r})")
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != 7:
            break
        rows.append(Row(density=cells[1], sparsity=cells[2], test_accuracy=float(cells[3])))
    return rows


def readme_block(readme: str) -> str:
    """The code block of the README's "Expected output" section."""
    section = readme.split(SECTION, 1)
    if len(section) != 2:
        raise ValueError(f"the README has no section {SECTION!r}")
    block = re.search(r"```\n(.*?)```", section[1], re.S)
    if block is None:
        raise ValueError(f"the README's section {SECTION!r} has no code block")
    return block.group(1)


def readme_spread(readme: str) -> dict[str, Spread]:
    """{density as printed: its spread} from the section's table rows ``| 0.5 (50 %) | ... | m (s) | lo – hi |``."""
    section = readme.split(SECTION, 1)[-1].split("\n## ", 1)[0]
    spread = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.match(r"^\d", cells[0]):
            continue
        std = re.fullmatch(r"[\d.]+ \(([\d.]+)\)", cells[-2])
        low_high = re.fullmatch(r"([\d.]+) [–-] ([\d.]+)", cells[-1])
        if std and low_high:
            spread[cells[0].split()[0]] = Spread(float(std.group(1)), float(low_high.group(1)),
                                                 float(low_high.group(2)))
    if not spread:
        raise ValueError(f"the README's section {SECTION!r} has no spread table (mean (std) | min – max)")
    return spread


def compare(readme: str, printed: str, *, widen: float = 1.0) -> list[str]:
    """Every difference between the rows in ``printed`` and the README's expected output; [] when they match.

    Densities: the same, in the same order. Sparsity: equal as printed. Test accuracy: within the density's
    seed min - max, widened by ``widen`` x its seed std at both ends.
    """
    expected, spread = parse_rows(readme_block(readme)), readme_spread(readme)
    try:
        got = parse_rows(printed)
    except ValueError as error:
        return [str(error)]
    if [r.density for r in got] != [r.density for r in expected]:
        return [f"densities {[r.density for r in got]} != README's {[r.density for r in expected]}"]
    problems = []
    for want, row in zip(expected, got):
        if row.sparsity != want.sparsity:
            problems.append(f"density {row.density}: sparsity {row.sparsity} != README's {want.sparsity}")
        band = spread.get(row.density)
        if band is None:
            problems.append(f"density {row.density}: no line in the README's spread table")
            continue
        # In percent to 2 decimals, as both tables print it (100 * 0.947 is 94.6999... in floats).
        low, high = round(band.low - widen * band.std, 2), round(band.high + widen * band.std, 2)
        percent = round(100 * row.test_accuracy, 2)
        if not low <= percent <= high:
            problems.append(f"density {row.density}: test acc {percent:.2f} % outside "
                            f"{low:.2f} – {high:.2f} (README {band.low:.2f} – {band.high:.2f} ± {widen:g} x "
                            f"std {band.std:.2f})")
    return problems


def zero_shot_accuracy(workdir: pathlib.Path, overrides: Sequence[str] = ()) -> float:
    """Test accuracy of ``workdir``'s cached source model, dense, through frequency label mapping computed as a
    unit's start computes it (zero prompt): the run's accuracy before any stage-1/2 training. No training.
    ``overrides``: the run's ``--config.*`` flags beyond the default's."""
    from vpns_jax import evaluation, main
    from vpns_jax.context import RunContext
    from vpns_jax.core import parallel

    if not (workdir / "source_model.npz").is_file():
        raise FileNotFoundError(f"{workdir / 'source_model.npz'} is missing: --zero_shot needs a finished run")
    config = main.parse_flags(["vpns_jax.main", f"--config={ROOT / 'configs' / 'default.py'}",
                               f"--workdir={workdir}", *overrides]).config
    mesh = parallel.make_mesh()
    context = RunContext(config, workdir, mesh)
    context.start(None)  # reads the cached source model: nothing is trained or written
    try:
        unit = context.plan.units[0]
        dense = context.state(unit, unit.stages[-1], masks=context.ones_masks())
        state = context.label_mapped(dense)
        return evaluation.test_metrics(context.spec, state, context.data.test, mesh,
                                       with_prompt=config.eval.with_prompt and context.uses_prompt)["test_accuracy"]
    finally:
        context.data.close()


def printed_rows(workdir: pathlib.Path) -> str:
    """The rows the run in ``workdir`` prints: read from its results.json, or from running the default there."""
    from vpns_jax.io import workdir as workdir_files

    results = workdir / workdir_files.RESULTS_JSON
    if results.is_file():
        return workdir_files.format_results(json.loads(results.read_text()))
    done = subprocess.run([sys.executable, *COMMAND, f"--workdir={workdir}"], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"the default run failed (exit {done.returncode}): "
                           f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return "\n".join(line for line in done.stdout.splitlines() if not line.startswith("results:"))


def main(argv: Sequence[str] | None = None) -> int:
    from vpns_jax import cli

    parser = cli.OneLineParser(prog="python -m experiments.expected_output", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdir/default",
                        help="A finished run of the default to read, or where to run it (default workdir/default).")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="The README holding the expected output.")
    parser.add_argument("--widen", type=float, default=1.0,
                        help="Widen each density's seed range by this many seed stds at both ends (default 1).")
    parser.add_argument("--zero_shot", action="store_true",
                        help="Also measure the source model's zero-shot accuracy and require every density above it.")
    args = parser.parse_args(argv)
    if args.widen < 0:
        parser.error(f"--widen={args.widen} is negative")
    readme, workdir = pathlib.Path(args.readme).read_text(), pathlib.Path(args.workdir)
    try:
        printed = printed_rows(workdir)
    except RuntimeError as error:
        return cli.report_error(error, verbose=False)
    print(printed)
    problems = compare(readme, printed, widen=args.widen)
    summary = f"{len(parse_rows(readme_block(readme)))} rows, README range ± {args.widen:g} std"
    if args.zero_shot:
        zero_shot = zero_shot_accuracy(workdir)
        rows = parse_rows(printed)
        print(f"zero-shot (source model, frequency label mapping, no training): test acc {zero_shot:.4f}; gains: "
              + ", ".join(f"{r.density} {100 * (r.test_accuracy - zero_shot):+.2f} points" for r in rows))
        problems += [f"density {r.density}: test acc {r.test_accuracy:.4f} does not exceed the zero-shot "
                     f"{zero_shot:.4f}" for r in rows if r.test_accuracy <= zero_shot]
        summary += f", every density above zero-shot {zero_shot:.4f}"
    if problems:
        print("expected output: mismatch: " + "; ".join(problems))
        return 1
    print(f"expected output: ok ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
