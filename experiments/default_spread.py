"""What `make run` prints, and how much it moves from seed to seed: the offline default run at several seeds.

    python -m experiments.default_spread --seeds=7,9,17 --root=workdir/default_spread \\
        --out=docs/measurements/default_spread.md

Each seed is the command `make run` issues (``python -m vpns_jax.main
--config=configs/default.py``) with ``--config.seed=S`` and a workdir of its
own, so each pretrains its own source model, as a user's run with another seed
would. The output file holds the command, date, commit and machine, the printed
table of every seed, and per density the mean, sample standard deviation and
range of test accuracy over the seeds. Finished seeds are reused (the trainer
resumes a workdir), so a rerun after a kill only runs what is missing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

from experiments import measurement


def run_seed(seed: int, root: pathlib.Path) -> tuple[list[dict], str, float]:
    """(results rows, printed table, wall seconds) of the default run at ``seed``."""
    workdir = root / f"seed_{seed}"
    command = [sys.executable, "-m", "vpns_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
               f"--config.seed={seed}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"seed {seed} failed: {done.stderr.strip().splitlines()[-1:]}")
    table = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("results:"))
    return json.loads((workdir / "results.json").read_text()), table, time.perf_counter() - started


def spread_table(rows_by_seed: dict[int, list[dict]]) -> str:
    """Markdown: per density, each seed's test accuracy (%), their mean (sample std) and range."""
    seeds = list(rows_by_seed)
    densities = [row["density"] for row in rows_by_seed[seeds[0]]]
    lines = ["| density | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (std) | min – max |",
             "| :-- | " + " | ".join("--:" for _ in seeds) + " | --: | --: |"]
    for i, density in enumerate(densities):
        accuracies = [100 * rows_by_seed[s][i]["test_accuracy"] for s in seeds]
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        lines.append(f"| {density:g} | " + " | ".join(f"{a:.2f}" for a in accuracies)
                     + f" | {statistics.mean(accuracies):.2f} ({std:.2f}) | {min(accuracies):.2f} – {max(accuracies):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="7,9,17")
    parser.add_argument("--root", default="workdir/default_spread")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = pathlib.Path(args.root)
    rows, tables, walls = {}, {}, {}
    for seed in seeds:
        rows[seed], tables[seed], walls[seed] = run_seed(seed, root)
        print(f"seed {seed}: {walls[seed]:.0f} s", flush=True)
    command = f"python -m experiments.default_spread --seeds={args.seeds} --root={args.root} --out={args.out}"
    header = [f"# `make run` at seeds {args.seeds}", "", *measurement.header_lines(measurement.provenance(), command),
              ""]
    body = [f"## Seed {seed} ({walls[seed]:.0f} s, source pretraining included)\n\n```\n{tables[seed]}\n```\n"
            for seed in seeds]
    text = "\n".join(header + body + ["## Test accuracy (%) over the seeds\n", spread_table(rows), ""])
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
