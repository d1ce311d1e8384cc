"""A short run of every method through the command line, fingerprinted, so that a change that moves a result shows.

    python -m experiments.method_parity --out=docs/measurements/fingerprints.json   # regenerate the pinned ones
    python -m experiments.method_parity --out=after.json --compare=docs/measurements/fingerprints.json

Each case runs ``python -m vpns_jax.main`` on an offline default shrunk to one epoch per stage, 512 training and
500 test images, from one source model per config file (pretrained by that file's first case). A case's
fingerprint is, per unit, its results row (without wall time) and SHA-256s of the saved masks, weights, prompt
and label map. Only the command line and the workdir's files are read, so the script runs unchanged on both sides
of a refactor; ``tests/test_fingerprints.py`` reruns a few cases against the committed file. Cases compile with
``FAST_COMPILE`` (as the test suite does): fusion can move last bits, so both sides must compile alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from experiments import measurement

REPO = pathlib.Path(__file__).resolve().parents[1]

SHRINK = ("--config.data.train_limit=512", "--config.data.test_limit=500", "--config.densities=(0.5,0.1)",
          "--config.stage1.epochs=1", "--config.stage2.epochs=1", "--config.hydra.prune_epochs=1",
          "--config.hydra.finetune_epochs=1", "--config.bip.epochs=1", "--config.finetune.epochs=1",
          "--config.finetune.dense_epochs=1", "--config.finetune.lth_fraction=0.7",
          "--config.structured.warmup_epochs=1", "--config.structured.prune_epochs=1",
          "--config.structured.finetune_epochs=1", "--config.slim.epochs=1", "--config.oneshot.batches=2",
          "--config.oneshot.synflow_iterations=5", "--config.compilation_cache_dir=none")
CHANNEL = ("--config.mask.granularity=channel", "--config.densities=(0.8,0.6)")
DEFAULT_CONFIG = "configs/default.py"
FAST_COMPILE = "--xla_backend_optimization_level=0"
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
    "vpns_nm_2_4": ("--config.method=vpns", "--config.mask.granularity=2:4", "--config.densities=(0.5,)"),
    "omp_nm_1_4": ("--config.method=omp", "--config.mask.granularity=1:4", "--config.densities=(0.25,)"),
    "vit_vpns": ("--config=configs/default_vit.py", "--config.method=vpns"),
    "vit_vpns_channel": ("--config=configs/default_vit.py", "--config.method=vpns") + CHANNEL,
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


def _config_file(extra: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(config file, the other arguments) of a case: its own ``--config=FILE`` or the offline default."""
    files = [a.split("=", 1)[1] for a in extra if a.startswith("--config=")]
    return (files[0] if files else DEFAULT_CONFIG), tuple(a for a in extra if not a.startswith("--config="))


def run_case(name: str, root: pathlib.Path, data_dir: str = "") -> dict:
    """Runs one case (the first of its config file pretrains that file's source model) and fingerprints it."""
    config_file, extra = _config_file(CASES[name])
    workdir = root / name
    source = root / f"source_{pathlib.Path(config_file).stem}.npz"
    if source.is_file():
        start = ("--config.source.enabled=False", f"--config.model.init_from={source}")
    else:
        start = ("--config.source.train_limit=3000", "--config.source.epochs=1")
    data = (f"--config.data.data_dir={data_dir}",) if data_dir else ()
    args = [a.format(workdir=root) for a in SHRINK + start + extra + data]
    command = [sys.executable, "-m", "vpns_jax.main", f"--config={config_file}", f"--workdir={workdir}", *args]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"case {name} failed: {done.stderr.strip()[-2000:]}")
    if not source.is_file():
        source.write_bytes((workdir / "source_model.npz").read_bytes())
    shown = [a for a in command[1:] if not a.startswith("--config.data.data_dir=")]
    return {"command": shown, "seconds": round(time.perf_counter() - started, 1), "units": fingerprint(workdir)}


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
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default: the config's)")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir).resolve()
    if root.exists():
        raise SystemExit(f"--workdir {root} exists: give a new folder (each case needs a fresh workdir)")
    root.mkdir(parents=True)
    names = args.cases.split(",") if args.cases else list(CASES)
    found = measurement.provenance()
    result = {"date": found["date"], "commit": found["git_commit"], "dirty": found["git_dirty"],
              "machine": found["machine"], "packages": found["packages"], "xla_flags": FAST_COMPILE, "cases": {}}
    for name in names:
        result["cases"][name] = run_case(name, root, args.data_dir)
        print(f"{name}: {result['cases'][name]['seconds']} s", flush=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        lines = compare(json.loads(pathlib.Path(args.compare).read_text()), result)
        print("\n".join(lines))
        if any("same" not in line for line in lines):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
