"""Kill/resume reliability: kill the shrunk offline default run again and again, rerun it, compare bit for bit.

    python -m experiments.kill_resume [--kills=10] [--seed=0] [--data_dir=DIR] [--workdir=DIR] [--fast_compile]
                                      [--signals=KILL,INT,TERM]

1. Prepares Fashion-MNIST (Debian's /usr/share/datasets/fashion-mnist) into DATA_DIR if it is not there yet
   (default WORKDIR/tfds).
2. Runs the shrunk offline default (:data:`SHRUNK`: width 1/16, 128 training images, densities 0.5 and 0.1, a
   checkpoint every iteration) once uninterrupted in WORKDIR/uninterrupted, timing when each checkpoint appears.
3. Runs the same command in WORKDIR/killed, kills it with SIGKILL, reruns the same command, ... KILLS times,
   then lets it finish. The moments are spread over the run (one per equal slice of its checkpoints: startup,
   source pretraining, stages 1 and 2 of both densities, evaluation and export). A third of the kills (the 1st,
   4th, 7th, ...) aim at a checkpoint save in progress: the checkpoint folders are polled every 2 ms for an
   orbax ``<step>.orbax-checkpoint-tmp`` folder and the run is killed as soon as one appears; a save that
   completes before the kill lands is a miss, and the next kill aims at a save instead. The others kill at a
   random moment between one checkpoint and the next. ``--signals`` cycles the kills through SIGKILL, SIGINT
   (Ctrl-C) and SIGTERM; a run sent SIGINT or SIGTERM must stop cleanly: exit 130 / 143 and, as its last line,
   ``interrupted at density d, stage s, step n; rerun the same command to resume``, with no traceback. Only
   SIGKILLs aim at saves: the others stop at the next step, after any save in flight.
4. Compares the two workdirs: results.json without wall times, and every array of every
   ``subnetworks/density_*/*.npz`` and of ``source_model.npz``, bit for bit.

Prints a table of the kills (seconds into the attempt, the save it interrupted, the newest complete checkpoint
then and where the run was) and ``kills survived: 10/10 (4 during a save); results identical: yes (N arrays
compared)``. Exit status 1 on a mismatch, a kill that missed (the run finished first) or a save kill that
missed its save; 2 on a bad command line. Both runs share the compilation cache WORKDIR/xla_cache; the attempts'
output goes to WORKDIR/logs. ``tests/test_main.py`` runs the same functions with two kills.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
# XLA's backend optimisations off: tiny networks compile about twice as fast; no change of semantics.
FAST_COMPILE = "--xla_backend_optimization_level=0"
SHRUNK = [
    "--config.model.width=0.0625", "--config.densities=(0.5,0.1)",
    "--config.data.train_limit=128", "--config.data.test_limit=100",
    "--config.data.batch_size=32", "--config.data.eval_batch_size=64",
    "--config.source.train_limit=256", "--config.source.epochs=1", "--config.source.batch_size=32",
    "--config.stage1.epochs=2", "--config.stage2.epochs=1", "--config.checkpoint.every_steps=1",
    # Small steps: a width-1/16 net at the default rates is chaotic (a 1e-7 change of the initial weights
    # moves the loss by 10 % within 5 steps), which would hide what the 1-vs-4-device test checks.
    "--config.source.optimizer.lr=1e-4", "--config.stage1.scores.lr=1e-5", "--config.stage1.prompt.lr=1e-5",
    "--config.stage2.weights.lr=1e-4", "--config.stage2.bn.lr=1e-4", "--config.stage2.prompt.lr=1e-4",
]
# The run's checkpoint folders in the order it writes them: source pretraining first, then the units.
FOLDERS = ("checkpoints_source", "checkpoints")
TMP_MARK = ".orbax-checkpoint-tmp"
_TMP_STEP = re.compile(r"^(\d+)" + re.escape(TMP_MARK))

# How far a run has got: (index into FOLDERS, newest complete step there); START before any checkpoint.
Progress = tuple[int, int]
START: Progress = (-1, 0)


def command(workdir: str | os.PathLike, data_dir: str | os.PathLike, cache: str | os.PathLike,
            *extra: str) -> list[str]:
    """The shrunk offline default's command line on ``workdir`` (plus ``extra`` flags)."""
    return [sys.executable, "-m", "vpns_jax.main", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.compilation_cache_dir={cache}", *SHRUNK, *extra]


def env(devices: int = 1, fast_compile: bool = False) -> dict[str, str]:
    """This process's environment for a run on ``devices`` CPU devices (with :data:`FAST_COMPILE` if asked)."""
    flags = f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast_compile else "")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def results(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``workdir/results.json`` without their wall times."""
    rows = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


def prepare_data(data_dir: str | os.PathLike) -> str:
    """Prepares Fashion-MNIST from Debian's files into ``data_dir`` unless it is there already; the dir."""
    if not FASHION_MNIST.is_dir():
        raise FileNotFoundError(f"{FASHION_MNIST} is missing: install Debian's dataset-fashion-mnist (make data)")
    from vpns_jax.data import prepare

    prepare.prepare("fashion_mnist", data_dir=str(data_dir))
    return str(data_dir)


# ---------------------------------------------------------------- watching a run's checkpoint folders


def _scan(workdir: pathlib.Path) -> tuple[Progress, dict[str, tuple[int, int, int, int]]]:
    """(progress, {'<folder>/<tmp name>': (folder index, step, inode, ctime)}) of the checkpoint folders now."""
    progress, saving = START, {}
    for index, folder in enumerate(FOLDERS):
        try:
            entries = list(os.scandir(workdir / folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.isdigit():
                progress = max(progress, (index, int(entry.name)))
                continue
            match = _TMP_STEP.match(entry.name)
            if match:
                try:
                    ctime = entry.stat(follow_symlinks=False).st_ctime_ns
                except FileNotFoundError:  # renamed into place since the listing
                    continue
                saving[f"{folder}/{entry.name}"] = (index, int(match.group(1)), entry.inode(), ctime)
    return progress, saving


def _complete(workdir: pathlib.Path, folder: int, step: int) -> bool:
    return (workdir / FOLDERS[folder] / str(step)).is_dir()


def _describe(workdir: pathlib.Path, progress: Progress, densities: Sequence[float] | None) -> str:
    """Where the run stood at its newest complete checkpoint (read from that checkpoint's metadata)."""
    folder, step = progress
    if progress == START:
        return "startup (no checkpoint yet)"
    if FOLDERS[folder] == "checkpoints_source":
        return f"source pretraining after step {step}"
    try:
        meta = json.loads((workdir / FOLDERS[folder] / str(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return "?"
    unit = meta["unit"]
    if densities and unit >= len(densities):
        return "every density done"
    name = f"d={densities[unit]:g}" if densities else f"unit {unit}"
    if not meta["label_mapped"]:
        return f"{name} start (before its label mapping)"
    return f"{name} stage {meta['stage']} epoch {meta['epoch']} batch {meta['batch']}"


def _densities(cmd: Sequence[str]) -> list[float] | None:
    """The densities a command line sets with --config.densities=(...), or None."""
    for arg in reversed(cmd):
        if arg.startswith("--config.densities="):
            value = ast.literal_eval(arg.split("=", 1)[1])
            return [float(d) for d in (value if isinstance(value, (tuple, list)) else (value,))]
    return None


@dataclasses.dataclass(frozen=True)
class Timeline:
    """When an uninterrupted run's checkpoints appeared: ``milestones`` = [(seconds, progress, phase)], in order;
    ``phase`` is the training stage that goes on after that checkpoint ('unit 0 stage 1'), None outside one
    (source pretraining, a unit's label mapping, after the last unit)."""

    seconds: float
    milestones: list[tuple[float, Progress, str | None]]


def _phase(workdir: pathlib.Path, progress: Progress) -> str | None:
    """The training stage that goes on after checkpoint ``progress`` (from its metadata), else None."""
    if progress == START or FOLDERS[progress[0]] != "checkpoints":
        return None
    try:
        meta = json.loads((workdir / FOLDERS[progress[0]] / str(progress[1]) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return None
    return f"unit {meta['unit']} stage {meta['stage']}" if meta.get("label_mapped") else None


def timed_run(cmd: Sequence[str], run_env: Mapping[str, str], workdir: str | os.PathLike,
              log_dir: str | os.PathLike, *, timeout: float = 1200, poll: float = 0.005) -> Timeline:
    """Runs ``cmd`` to completion, noting when each checkpoint appears in ``workdir``; raises if it fails."""
    workdir, log_dir = pathlib.Path(workdir), pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "uninterrupted.log"
    milestones: list[tuple[float, Progress, str | None]] = []
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(run_env), cwd=ROOT)
        last = START
        while process.poll() is None:
            if time.perf_counter() - started > timeout:
                process.kill()
                process.wait()
                raise TimeoutError(f"the uninterrupted run took over {timeout:.0f} s (log: {log_path})")
            progress, _ = _scan(workdir)
            if progress > last:
                milestones.append((time.perf_counter() - started, progress, _phase(workdir, progress)))
                last = progress
            time.sleep(poll)
        seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {process.returncode}): {_tail(log_path)}")
    progress, _ = _scan(workdir)
    if progress > last:
        milestones.append((seconds, progress, _phase(workdir, progress)))
    return Timeline(seconds, milestones)


def _check_clean_stop(log_path: pathlib.Path, name: str, returncode: int) -> None:
    """A run stopped by SIGINT / SIGTERM must exit 130 / 143 with one line saying where, and no traceback."""
    text = log_path.read_text(errors="replace")
    last = text.replace("\r", "\n").strip().splitlines()[-1] if text.strip() else ""
    expected = 128 + getattr(signal, f"SIG{name}")
    if returncode != expected or "Traceback" in text or not (
            last.startswith("interrupted ") and last.endswith("; rerun the same command to resume")):
        raise RuntimeError(f"SIG{name} did not stop the run cleanly (exit {returncode}, expected {expected}; last "
                           f"line {last!r}): {_tail(log_path)}")


def _tail(path: pathlib.Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


# ---------------------------------------------------------------- the killed run


@dataclasses.dataclass(frozen=True)
class KillPlan:
    """One kill: once the run has passed checkpoint ``after`` (in this attempt), either at the next save that
    starts (``kind='save'``) or ``delay`` seconds later, at the latest when the next checkpoint appears
    (``kind='random'``)."""

    kind: Literal["save", "random"]
    after: Progress = START
    delay: float = 0.0
    signal: Literal["KILL", "INT", "TERM"] = "KILL"  # INT / TERM: the run must stop cleanly (one line, 130 / 143)


@dataclasses.dataclass
class KillRecord:
    """What one kill hit."""

    aimed: str  # 'save' or 'random' (a save kill that follows a missed one is 'save')
    attempt_seconds: float  # seconds after its attempt (process) started
    run_seconds: float  # seconds after the killed run's first start
    killed: bool  # False: the run ended by itself before the kill (a miss)
    during_save: bool  # a checkpoint save was in progress: its temporary folder was left unfinished
    saving: str | None  # that temporary folder ('checkpoints/5.orbax-checkpoint-tmp')
    newest: str | None  # the newest complete checkpoint then ('checkpoints/4'), None before the first
    where: str  # where the run stood at that checkpoint


def plan_kills(timeline: Timeline, kills: int, rng: np.random.Generator,
               signals: Sequence[str] = ("KILL",)) -> list[KillPlan]:
    """``kills`` kills spread over a run like ``timeline``.

    The k-th kill comes after a random checkpoint (or the start) in the k-th of ``kills`` equal slices of them,
    drawn again until the kills cover as many training stages (every unit's stage 1 and 2) as they can. The 1st,
    4th, 7th, ... kill the next save; the others a random moment before the next checkpoint (none after the
    next-to-last one: the run could be exiting by then).
    """
    points = [(0.0, START, None)] + timeline.milestones
    # Each candidate: (checkpoint, the training stage after it, the seconds to the next checkpoint).
    candidates = [(points[i][1], points[i][2], points[i + 1][0] - points[i][0]) for i in range(len(points) - 1)]
    if not 0 < kills <= len(candidates):
        raise ValueError(f"{kills} kills do not fit a run of {len(candidates)} checkpoints: 1 to {len(candidates)}")
    phases = {phase for _, phase, _ in candidates if phase is not None}
    plans: list[KillPlan] = []
    for _ in range(1000):
        plans, covered = [], set()
        for k, chunk in enumerate(np.array_split(np.arange(len(candidates)), kills)):
            name = signals[k % len(signals)]
            # SIGINT / SIGTERM stop at the next step, after any save in flight: only SIGKILL can cut a save.
            kind = "save" if k % 3 == 0 and name == "KILL" else "random"
            allowed = [i for i in chunk if kind == "save" or i < len(candidates) - 1]
            if not allowed:
                kind, allowed = "save", list(chunk)
            after, phase, gap = candidates[int(rng.choice(allowed))]
            covered.add(phase)
            plans.append(KillPlan(kind, after, 0.0 if kind == "save" else float(rng.uniform(0.0, gap)), name))
        if len(covered & phases) >= min(kills, len(phases)):
            break
    return plans


def killed_run(cmd: Sequence[str], run_env: Mapping[str, str], workdir: str | os.PathLike,
               plans: Sequence[KillPlan], *, log_dir: str | os.PathLike | None = None, timeout: float = 600,
               poll: float = 0.002) -> list[KillRecord]:
    """Runs ``cmd`` on ``workdir``, SIGKILLs it as each plan says, reruns the same command after each kill, and
    finally lets it finish; one record per kill. Stops early (the last record ``killed=False``) when the run
    finishes before a kill; raises when an attempt fails by itself or a rerun does not complete.

    A save kill that misses (the save completes before the signal lands) makes the next kill a save kill.
    Each attempt's output goes to ``log_dir`` (default: ``<workdir>.logs``) as attempt_<k>.log.
    """
    workdir = pathlib.Path(workdir)
    log_dir = pathlib.Path(log_dir) if log_dir is not None else workdir.with_name(workdir.name + ".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    densities = _densities(cmd)
    records: list[KillRecord] = []
    first = time.perf_counter()
    owed_save = False
    for k, plan in enumerate(plans):
        kind = "save" if owed_save else plan.kind
        log_path = log_dir / f"attempt_{k}.log"
        resumed_at, stale = _scan(workdir)  # temporary folders of earlier kills do not count until replaced
        with open(log_path, "w") as log:
            started = time.perf_counter()
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(run_env), cwd=ROOT)
            target, passed_at, hit, hit_inode = None, None, None, None
            while process.poll() is None:
                now = time.perf_counter()
                if now - started > timeout:
                    process.kill()
                    process.wait()
                    raise TimeoutError(f"attempt {k} reached no kill in {timeout:.0f} s (log: {log_path})")
                progress, saving = _scan(workdir)
                new = {name: info for name, info in saving.items() if stale.get(name) != info}
                stale = {name: info for name, info in stale.items() if saving.get(name) == info}
                past = progress >= plan.after and (progress > resumed_at or resumed_at == START == plan.after)
                if kind == "save":
                    # The first save that starts past the plan's checkpoint (and past where this attempt resumed).
                    floor = max(plan.after, resumed_at)
                    hit = next((name for name, (f, s, _, _) in new.items() if (f, s) > floor), None)
                    if hit is not None:
                        hit_inode = new[hit][2]  # (its ctime changes as the save fills it)
                        break
                elif past:
                    if passed_at is None:
                        passed_at, target = now, progress
                    if now - passed_at >= plan.delay or progress > target:
                        break
                time.sleep(poll)
            if process.poll() is None:
                signum = getattr(signal, f"SIG{plan.signal}")
                os.kill(process.pid, signum)
                killed_at = time.perf_counter()
                process.wait(timeout=timeout)
                killed = process.returncode in (-signal.SIGKILL, 128 + signum)
            else:
                killed_at, killed = time.perf_counter(), False
        if not killed and process.returncode != 0:
            raise RuntimeError(f"attempt {k} failed by itself (exit {process.returncode}): {_tail(log_path)}")
        if killed and plan.signal != "KILL":
            _check_clean_stop(log_path, plan.signal, process.returncode)
        progress, saving = _scan(workdir)
        unfinished = {name: info for name, info in saving.items()
                      if stale.get(name) != info and not _complete(workdir, info[0], info[1])}
        if kind == "save":
            during = killed and hit in unfinished and unfinished[hit][2] == hit_inode
            interrupted = hit if during else None
        else:
            interrupted = next(iter(unfinished), None) if killed else None
            during = interrupted is not None
        records.append(KillRecord(
            aimed=kind, attempt_seconds=round(killed_at - started, 3), run_seconds=round(killed_at - first, 3),
            killed=killed, during_save=during, saving=interrupted,
            newest=None if progress == START else f"{FOLDERS[progress[0]]}/{progress[1]}",
            where=_describe(workdir, progress, densities),
        ))
        if not killed:
            return records  # the run finished: no later kill can land
        owed_save = kind == "save" and not during
    log_path = log_dir / "final.log"
    with open(log_path, "w") as log:
        process = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(run_env), cwd=ROOT,
                                 timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"the final rerun failed (exit {process.returncode}): {_tail(log_path)}")
    return records


# ---------------------------------------------------------------- comparing two finished runs


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` looked at and every difference it found."""

    rows: int = 0
    files: int = 0
    arrays: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.rows} result rows, {self.files} files, {self.arrays} arrays compared"
        return "; ".join([head, *self.mismatches[:20]]) + (
            f"; and {len(self.mismatches) - 20} more" if len(self.mismatches) > 20 else "")


def _arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of an .npz as stored (``save_arrays`` files and subnetwork exports are plain .npz)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(array.tobytes(), np.uint8)


def compare(workdir_a: str | os.PathLike, workdir_b: str | os.PathLike,
            densities: Sequence[float] | None = None) -> tuple[bool, Comparison]:
    """(identical?, details) of two finished runs: their results.json rows without wall times, and every array
    of every ``subnetworks/density_*/*.npz`` and of ``source_model.npz``, bit for bit (dtype, shape, bytes).
    With ``densities``, only those densities' rows and subnetworks (each density is trained from the same
    state, so a run of some of them equals that part of a run of all)."""
    a, b = pathlib.Path(workdir_a), pathlib.Path(workdir_b)
    details = Comparison()
    wanted = None if densities is None else {f"density_{d}" for d in densities}
    try:
        rows_a, rows_b = results(a), results(b)
        if densities is not None:
            rows_a, rows_b = ([row for row in rows if row["density"] in densities] for rows in (rows_a, rows_b))
    except FileNotFoundError as error:
        details.mismatches.append(f"no results: {error}")
    else:
        details.rows = len(rows_a)
        if rows_a != rows_b:
            details.mismatches.append(f"results.json differs: {rows_a} vs {rows_b}")

    def files(root: pathlib.Path) -> set[str]:
        found = {str(p.relative_to(root)) for p in root.glob("subnetworks/density_*/*.npz")
                 if wanted is None or p.parent.name in wanted}
        return found | ({"source_model.npz"} if (root / "source_model.npz").is_file() else set())

    names_a, names_b = files(a), files(b)
    for name in sorted(names_a ^ names_b):
        details.mismatches.append(f"{name} is only in {a if name in names_a else b}")
    if not any(name.startswith("subnetworks/") for name in names_a):
        details.mismatches.append(f"no subnetwork files in {a}")
    for name in sorted(names_a & names_b):
        details.files += 1
        arrays_a, arrays_b = _arrays(a / name), _arrays(b / name)
        for key in sorted(arrays_a.keys() ^ arrays_b.keys()):
            details.mismatches.append(f"{name}: array {key} is only in one run")
        for key in sorted(arrays_a.keys() & arrays_b.keys()):
            details.arrays += 1
            x, y = arrays_a[key], arrays_b[key]
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                differ = "" if x.shape != y.shape or x.dtype != y.dtype else (
                    f", {int(np.count_nonzero(_bytes(x) != _bytes(y)))} bytes differ")
                details.mismatches.append(f"{name}: {key} {x.dtype}{x.shape} vs {y.dtype}{y.shape}{differ}")
    return not details.mismatches, details


# ---------------------------------------------------------------- the command line


def format_kills(records: Sequence[KillRecord]) -> str:
    """The kills as an aligned table."""
    lines = [f"{'#':>2} {'aimed':<6} {'attempt s':>9} {'run s':>7}  {'save interrupted':<42} "
             f"{'newest complete':<22} where"]
    for k, r in enumerate(records):
        saving = r.saving or ("-" if r.killed else "(run finished first: missed)")
        lines.append(f"{k:>2} {r.aimed:<6} {r.attempt_seconds:>9.2f} {r.run_seconds:>7.2f}  {saving:<42} "
                     f"{r.newest or '-':<22} {r.where}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The check's command line: 0 when every kill landed and the runs are identical, else 1."""
    from vpns_jax import cli

    parser = cli.OneLineParser(prog="python -m experiments.kill_resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="Kills before the run may finish (default 10).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default WORKDIR/tfds); prepared if needed.")
    parser.add_argument("--workdir", default=None, help="A new or empty folder (default: a new temporary one).")
    parser.add_argument("--fast_compile", action="store_true", help=f"Run with XLA_FLAGS {FAST_COMPILE}.")
    parser.add_argument("--signals", default="KILL",
                        help="Comma-separated signals the kills cycle through: KILL, INT, TERM (default KILL).")
    args = parser.parse_args(argv)
    signals = tuple(args.signals.upper().split(","))
    if not set(signals) <= {"KILL", "INT", "TERM"}:
        parser.error(f"--signals={args.signals} has an unknown signal: use KILL, INT and TERM")
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_")).absolute()
    if (root / "uninterrupted").exists() or (root / "killed").exists():
        parser.error(f"{root} holds an earlier check (uninterrupted/ or killed/): give a new --workdir")
    try:
        data_dir = prepare_data(args.data_dir or root / "tfds")
    except FileNotFoundError as error:
        return cli.report_error(error, verbose=False)
    cache, logs = root / "xla_cache", root / "logs"
    run_env = env(fast_compile=args.fast_compile)
    print(f"workdir {root}")

    uninterrupted = root / "uninterrupted"
    timeline = timed_run(command(uninterrupted, data_dir, cache), run_env, uninterrupted, logs)
    print(f"uninterrupted run: {timeline.seconds:.1f} s, {len(timeline.milestones)} checkpoints")
    try:
        plans = plan_kills(timeline, args.kills, np.random.default_rng(args.seed), signals)
    except ValueError as error:
        parser.error(str(error))

    killed = root / "killed"
    started = time.perf_counter()
    try:
        records = killed_run(command(killed, data_dir, cache), run_env, killed, plans, log_dir=logs)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
        print(f"the killed run did not survive: {error}")
        return 1
    attempts = len(records) + all(r.killed for r in records)
    print(f"killed run: {time.perf_counter() - started:.1f} s in {attempts} attempts")
    print(format_kills(records))

    landed = sum(r.killed for r in records)
    during = sum(r.during_save for r in records)
    wanted = sum(p.kind == "save" for p in plans)
    same, details = compare(uninterrupted, killed)
    print(f"kills survived: {landed}/{args.kills} ({during} during a save); results identical: "
          f"{'yes' if same else 'no'} ({details.arrays} arrays compared)")
    if not same:
        print(f"differences: {details}")
    if during < wanted:
        print(f"only {during} of the {wanted} save kills interrupted a save")
    return 0 if same and landed == args.kills and during >= wanted else 1


if __name__ == "__main__":
    sys.exit(main())
