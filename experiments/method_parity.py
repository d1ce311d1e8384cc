"""A short run of every method through the command line, fingerprinted, to show that a change keeps every result.

    python -m experiments.method_parity --out=before.json [--workdir=workdir/method_parity]
    python -m experiments.method_parity --out=after.json --compare=before.json

Each case runs ``python -m vpns_jax.main`` on the offline default shrunk to one
epoch per stage, 512 training and 500 test images and densities 0.5 and 0.1,
from one shared source model (pretrained once by the first case). The
fingerprint of a case is, per unit, the test accuracy and loss, the sparsity,
the MACs and a SHA-256 of the saved masks, weights, prompt and label map: two
code versions that agree on every fingerprint found the same masks and trained
the same subnetworks bit for bit. Only the command line and the workdir's files
are read, so the script runs unchanged on both sides of a refactor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

from experiments import measurement

SHRINK = ("--config.data.train_limit=512", "--config.data.test_limit=500", "--config.densities=(0.5,0.1)",
          "--config.stage1.epochs=1", "--config.stage2.epochs=1", "--config.hydra.prune_epochs=1",
          "--config.hydra.finetune_epochs=1", "--config.bip.epochs=1", "--config.finetune.epochs=1",
          "--config.finetune.dense_epochs=1", "--config.finetune.lth_fraction=0.7",
          "--config.structured.warmup_epochs=1", "--config.structured.prune_epochs=1",
          "--config.structured.finetune_epochs=1", "--config.slim.epochs=1", "--config.oneshot.batches=2",
          "--config.oneshot.synflow_iterations=5", "--config.compilation_cache_dir=none")
CHANNEL = ("--config.mask.granularity=channel", "--config.densities=(0.8,0.6)")
CASES = {
    **{name: (f"--config.method={name}",) for name in (
        "vpns", "hydra", "bip", "omp", "omp_vp", "lth", "lth_vp", "random", "random_vp", "snip", "grasp", "synflow",
        "dense")},
    "vpns_no_prompt": ("--config.method=vpns", "--config.vpns.prompt_stages=()"),
    "vpns_prompted_stream": ("--config.method=vpns", "--config.vpns.streams=prompted"),
    "vpns_layer_scope": ("--config.method=vpns", "--config.mask.scope=layer"),
    "vpns_channel": ("--config.method=vpns",) + CHANNEL,
    "slim": ("--config.method=slim",) + CHANNEL,
    "hydra_transfer": ("--config.method=hydra", "--config.transfer.masks_from={workdir}/vpns"),
}
SAVED = ("masks", "weights", "prompt", "label_map")


def digest(path: pathlib.Path) -> str:
    """SHA-256 over the arrays of an .npz (names, dtypes, shapes and bytes, in name order)."""
    sha = hashlib.sha256()
    with np.load(path, allow_pickle=False) as arrays:
        for name in sorted(arrays.files):
            array = arrays[name]
            sha.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()[:16]


def fingerprint(workdir: pathlib.Path) -> list[dict]:
    """Per unit of a finished run: its results row (without wall time) and the digests of its saved arrays."""
    rows = json.loads((workdir / "results.json").read_text())
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "wall_time_s"}
        folder = workdir / "subnetworks" / f"density_{row['density']:.6g}"
        row.update({name: digest(folder / f"{name}.npz") for name in SAVED if (folder / f"{name}.npz").is_file()})
        out.append(row)
    return out


def run_case(name: str, extra: tuple[str, ...], root: pathlib.Path, source: pathlib.Path) -> dict:
    """Runs one case (the first pretrains the shared source model) and fingerprints it."""
    workdir = root / name
    if source.is_file():
        start = ("--config.source.enabled=False", f"--config.model.init_from={source}")
    else:
        start = ("--config.source.train_limit=3000", "--config.source.epochs=1")
    args = [a.format(workdir=root) for a in SHRINK + start + extra]
    command = [sys.executable, "-m", "vpns_jax.main", "--config=configs/default.py", f"--workdir={workdir}", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"case {name} failed: {done.stderr.strip()[-2000:]}")
    if not source.is_file():
        source.write_bytes((workdir / "source_model.npz").read_bytes())
    return {"command": command[1:], "seconds": round(time.perf_counter() - started, 1), "units": fingerprint(workdir)}


def compare(before: dict, after: dict) -> list[str]:
    """One line per case: 'same', or what differs."""
    lines = []
    for name, case in before["cases"].items():
        other = after["cases"].get(name)
        if other is None:
            lines.append(f"{name}: missing after")
        elif other["units"] == case["units"]:
            lines.append(f"{name}: same ({len(case['units'])} units: masks, weights, prompt, label map, accuracy)")
        else:
            lines.append(f"{name}: DIFFERS\n  before {case['units']}\n  after  {other['units']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="workdir/method_parity")
    parser.add_argument("--compare", default="")
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases (default: all)")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir).resolve()
    if root.exists():
        raise SystemExit(f"--workdir {root} exists: give a new folder (each case needs a fresh workdir)")
    root.mkdir(parents=True)
    names = args.cases.split(",") if args.cases else list(CASES)
    source = root / "source_model.npz"
    found = measurement.provenance()
    result = {"date": found["date"], "commit": found["git_commit"], "cases": {}}
    for name in names:
        result["cases"][name] = run_case(name, CASES[name], root, source)
        print(f"{name}: {result['cases'][name]['seconds']} s", flush=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        lines = compare(json.loads(pathlib.Path(args.compare).read_text()), result)
        print("\n".join(lines))
        if any("same" not in line for line in lines):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
