"""Multi-process runs in every layout: lose a peer, restart, and compare with one process of as many devices.

    python -m experiments.multi_process [--layouts=1,2,4] [--data_dir=DIR] [--workdir=DIR]
                                        [--heartbeat_timeout_s=10] [--out=FILE.md]

For each number d of CPU devices per process (``--layouts``), on the shrunk offline default
(:data:`experiments.kill_resume.SHRUNK`, density 0.1 only; gloo collectives between local processes):

1. one process with 2d devices runs to the end: the reference;
2. two processes with d devices each start on a new workdir; once stage 1 has saved two iterations, rank 1's
   training process is SIGKILLed, as by a lost host. Rank 0 must end by itself within the heartbeat timeout
   (plus a margin for its last step), with exit status 75 and, as its last line, ``error: process 0 of 2 lost a
   peer process (...) ... restart all 2 processes with the same command to resume from the last checkpoint``,
   with no traceback and no stack trace;
3. both processes are restarted with the same command and resume from the last checkpoint to the end;
4. results.json (without wall times) and every array of the subnetworks and of the source model are compared
   with the reference's. With one device a process they must be equal bit for bit
   (:func:`experiments.kill_resume.compare`): both runs add the same two shards. With more, a sum over 2d shards
   that crosses processes is not added in the order one process adds it (measured: last-bit differences), so
   every sparsity must be equal, test accuracy within :data:`ACCURACY_TOLERANCE` and test loss within
   :data:`LOSS_TOLERANCE` (relative), and the table states the largest float difference (:func:`gap`).

Prints (and with ``--out`` writes, with the command, date, commit and machine) a table: per layout the seconds
rank 0 took to end after the kill, its exit status, and whether the restarted run equals the reference.
Exit status 1 when any layout fails. ``tests/test_main.py`` runs the same functions for d = 1.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import psutil

from experiments import measurement
from experiments.kill_resume import ROOT, command, compare, env, prepare_data, results
from vpns_jax import distributed

DENSITIES = "--config.densities=(0.1,)"
STAGE1_CHECKPOINT = 3  # checkpoint 1 is the label mapping; 3 is two stage-1 iterations in
LOST_PEER_END = "restart all 2 processes with the same command to resume from the last checkpoint"
# Rank 0 may be inside a step or a compile when its peer dies; it notices at its next collective.
EXIT_MARGIN_S = 30


def start_ranks(workdir: str | os.PathLike, data_dir: str | os.PathLike, cache: str | os.PathLike, *,
                devices: int, heartbeat_timeout_s: int, extra: Sequence[str] = ()) -> list[subprocess.Popen]:
    """Starts ranks 0 and 1 of the shrunk default (density 0.1) on ``workdir``, ``devices`` CPU devices each,
    talking through a free local port; their stdout and stderr are pipes (text)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        subprocess.Popen(
            command(workdir, data_dir, cache, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={rank}", DENSITIES, f"--heartbeat_timeout_s={heartbeat_timeout_s}", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(devices=devices, fast_compile=True),
            cwd=ROOT,
        )
        for rank in range(2)
    ]


def training_process(supervisor: subprocess.Popen, timeout: float = 60) -> psutil.Process:
    """The training process that a multi-process rank's supervising parent started."""
    deadline = time.monotonic() + timeout
    while not (children := psutil.Process(supervisor.pid).children()):
        if time.monotonic() > deadline or supervisor.poll() is not None:
            raise RuntimeError(f"rank {supervisor.args} started no training process")
        time.sleep(0.1)
    return children[0]


def messages(stderr: str) -> list[str]:
    """stderr's lines without progress-bar redraws and absl's warnings: what a person reads."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line and "it/s]" not in line and "s/it]" not in line
            and not line.startswith(("W1", "WARNING: Logging before flag parsing"))]


@dataclasses.dataclass
class LostPeer:
    """How rank 0 ended after rank 1's training process was killed."""
    returncode: int
    seconds: float  # from the kill to rank 0's exit
    last_line: str
    stderr: str

    def problems(self, heartbeat_timeout_s: int) -> list[str]:
        """What is wrong with this ending; empty when it is the one-line exit 75 in time."""
        found = []
        if self.returncode != distributed.EXIT_PEER_LOST:
            found.append(f"rank 0 exited {self.returncode}, not {distributed.EXIT_PEER_LOST}")
        if not (self.last_line.startswith("error: process 0 of 2 lost a peer process (")
                and self.last_line.endswith(LOST_PEER_END)):
            found.append(f"rank 0's last line is {self.last_line!r}")
        if any(sign in self.stderr for sign in ("Traceback", "stack trace", "Check failure")):
            found.append("rank 0 printed a traceback or stack trace")
        if self.seconds >= heartbeat_timeout_s + EXIT_MARGIN_S:
            found.append(f"rank 0 took {self.seconds:.0f} s to end")
        return found


def lose_a_peer(ranks: Sequence[subprocess.Popen], workdir: pathlib.Path, *, heartbeat_timeout_s: int,
                timeout: float = 400) -> LostPeer:
    """Waits for the stage-1 checkpoint :data:`STAGE1_CHECKPOINT`, SIGKILLs rank 1's training process and
    waits for both ranks to end; how rank 0 ended."""
    deadline = time.monotonic() + timeout
    while not (workdir / "checkpoints" / str(STAGE1_CHECKPOINT)).is_dir():
        if time.monotonic() > deadline or any(rank.poll() is not None for rank in ranks):
            outputs = [rank.communicate(timeout=60)[1][-2000:] if rank.poll() is not None else "" for rank in ranks]
            raise RuntimeError(f"no stage-1 checkpoint {STAGE1_CHECKPOINT} in {workdir}: {outputs}")
        time.sleep(0.2)
    training_process(ranks[1]).kill()
    lost_at = time.monotonic()
    _, stderr = ranks[0].communicate(timeout=heartbeat_timeout_s + 120)
    seconds = time.monotonic() - lost_at
    ranks[1].communicate(timeout=60)
    lines = messages(stderr)
    return LostPeer(ranks[0].returncode, seconds, lines[-1] if lines else "", stderr)


def finish(ranks: Sequence[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Waits for ``ranks`` to end; their stdouts. Raises when one fails."""
    outputs = [rank.communicate(timeout=timeout) for rank in ranks]
    for index, (rank, (_, stderr)) in enumerate(zip(ranks, outputs)):
        if rank.returncode != 0:
            raise RuntimeError(f"rank {index} exited {rank.returncode}: {stderr[-3000:]}")
    return [stdout for stdout, _ in outputs]


@dataclasses.dataclass(frozen=True)
class Gap:
    """How far two finished runs of the same config are apart, where they are not bit for bit equal."""
    float_rel: float  # the largest ||a - b|| / ||b|| over the float arrays of the subnetworks and source model
    mask_entries: int  # mask entries that differ
    accuracy: float  # the largest |test accuracy difference| of a density
    loss_rel: float  # the largest relative test-loss difference of a density
    sparsity_equal: bool

    def within(self) -> bool:
        """Within what float reduction order allows: every sparsity equal, test accuracy within
        :data:`ACCURACY_TOLERANCE` and test loss within :data:`LOSS_TOLERANCE` (relative)."""
        return self.sparsity_equal and self.accuracy <= ACCURACY_TOLERANCE and self.loss_rel <= LOSS_TOLERANCE

    def __str__(self) -> str:
        return (f"largest float difference {self.float_rel:.1e} (relative), {self.mask_entries} mask entries "
                f"differ, test accuracy {self.accuracy:.4f} apart, test loss {self.loss_rel:.1e} (relative)")


# A cross-process sum over more than two shards adds in another order than one process does; the shrunk
# default's small learning rates keep that to last bits (experiments/kill_resume.py, SHRUNK).
ACCURACY_TOLERANCE = 0.02
LOSS_TOLERANCE = 1e-3


def gap(workdir_a: pathlib.Path, workdir_b: pathlib.Path, density: float = 0.1) -> Gap:
    """How far ``workdir_a``'s density-``density`` results, subnetwork and source model are from ``workdir_b``'s."""
    (row_a,), (row_b,) = ([row for row in results(w) if row["density"] == density] for w in (workdir_a, workdir_b))
    float_rel, mask_entries = 0.0, 0
    names = [f"subnetworks/density_{density}/{p.name}" for p in (workdir_b / f"subnetworks/density_{density}").glob("*.npz")]
    for name in [*names, "source_model.npz"]:
        with np.load(workdir_a / name) as a, np.load(workdir_b / name) as b:
            for key in b.files:
                x, y = a[key], b[key]
                if name.endswith("masks.npz") or not np.issubdtype(y.dtype, np.floating):
                    mask_entries += int(np.count_nonzero(x != y))
                else:
                    scale = float(np.linalg.norm(y)) or 1.0
                    float_rel = max(float_rel, float(np.linalg.norm(x.astype(np.float64) - y)) / scale)
    return Gap(float_rel, mask_entries, abs(row_a["test_accuracy"] - row_b["test_accuracy"]),
               abs(row_a["test_loss"] - row_b["test_loss"]) / abs(row_b["test_loss"]),
               row_a["sparsity"] == row_b["sparsity"])


@dataclasses.dataclass
class Layout:
    """One layout's outcome."""
    devices_per_process: int
    lost: LostPeer | None = None
    identical: bool = False
    arrays: int = 0
    gap: Gap | None = None  # where not identical
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def check_layout(devices: int, root: pathlib.Path, data_dir: str, cache: pathlib.Path,
                 heartbeat_timeout_s: int) -> Layout:
    """Steps 1-4 of the module docstring for ``devices`` devices per process."""
    started = time.perf_counter()
    outcome = Layout(devices)
    reference, workdir = root / f"one_process_{2 * devices}_devices", root / f"two_processes_{devices}_devices"
    done = subprocess.run(command(reference, data_dir, cache, DENSITIES), capture_output=True, text=True,
                          env=env(devices=2 * devices, fast_compile=True), timeout=600, cwd=ROOT)
    if done.returncode:
        outcome.problems.append(f"the one-process reference exited {done.returncode}: {done.stderr[-2000:]}")
        return outcome
    try:
        ranks = start_ranks(workdir, data_dir, cache, devices=devices, heartbeat_timeout_s=heartbeat_timeout_s)
        outcome.lost = lose_a_peer(ranks, workdir, heartbeat_timeout_s=heartbeat_timeout_s)
        outcome.problems += outcome.lost.problems(heartbeat_timeout_s)
        finish(start_ranks(workdir, data_dir, cache, devices=devices, heartbeat_timeout_s=heartbeat_timeout_s))
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        outcome.problems.append(str(error))
        return outcome
    same, details = compare(reference, workdir, densities=(0.1,))
    outcome.identical, outcome.arrays = same, details.arrays
    if not same:
        outcome.gap = gap(workdir, reference)
        if devices == 1 or not outcome.gap.within():  # one device a process runs the very same sums
            outcome.problems.append(f"the restarted run differs from one process on {2 * devices} devices: "
                                    f"{outcome.gap}; {details}")
    outcome.seconds = time.perf_counter() - started
    return outcome


def format_layouts(layouts: Sequence[Layout]) -> str:
    """The outcomes as a markdown table."""
    lines = ["| devices per process | processes | one-process reference | rank 0 ended after the kill | exit | "
             "restarted run against the reference | arrays compared | wall s |",
             "| --: | --: | :-- | --: | --: | :-- | --: | --: |"]
    for layout in layouts:
        lost = layout.lost
        ended = f"{lost.seconds:.1f} s" if lost else "-"
        against = "equal bit for bit" if layout.identical else (
            f"{'within' if layout.gap.within() else 'outside'} tolerance: {layout.gap}" if layout.gap else "not run")
        lines.append(f"| {layout.devices_per_process} | 2 | 1 x {2 * layout.devices_per_process} devices | {ended} | "
                     f"{lost.returncode if lost else '-'} | {against} | {layout.arrays} | {layout.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The check's command line: 0 when every layout passes, else 1."""
    from vpns_jax import cli

    parser = cli.OneLineParser(prog="python -m experiments.multi_process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="1,2,4", help="Devices per process, comma-separated (default 1,2,4).")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default WORKDIR/tfds); prepared if needed.")
    parser.add_argument("--workdir", default=None, help="A new or empty folder (default: a new temporary one).")
    parser.add_argument("--heartbeat_timeout_s", type=int, default=10, help="The runs' --heartbeat_timeout_s.")
    parser.add_argument("--out", default=None, help="Also write the table, with how it was made, to this file.")
    args = parser.parse_args(argv)
    try:
        layouts = [int(d) for d in args.layouts.split(",")]
    except ValueError:
        parser.error(f"--layouts={args.layouts} is not a comma-separated list of device counts, e.g. 1,2,4")
    if not layouts or min(layouts) < 1:
        parser.error(f"--layouts={args.layouts}: every count must be at least 1")
    if args.heartbeat_timeout_s < 1:
        parser.error("--heartbeat_timeout_s must be at least 1")
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="multi_process_")).absolute()
    if any(root.glob("*_processes_*")) or any(root.glob("one_process_*")):
        parser.error(f"{root} holds an earlier check: give a new --workdir")
    try:
        data_dir = prepare_data(args.data_dir or root / "tfds")
    except FileNotFoundError as error:
        return cli.report_error(error, verbose=False)
    print(f"workdir {root}")
    outcomes = []
    for devices in layouts:
        outcome = check_layout(devices, root, data_dir, root / "xla_cache", args.heartbeat_timeout_s)
        outcomes.append(outcome)
        print(f"{devices} device(s) per process: " + ("ok" if not outcome.problems else "; ".join(outcome.problems)),
              flush=True)
    table = format_layouts(outcomes)
    print(table)
    if args.out:
        header = measurement.header(
            "Multi-process layouts, a lost peer and the restart",
            f"python -m experiments.multi_process --layouts={args.layouts} "
            f"--heartbeat_timeout_s={args.heartbeat_timeout_s} --out={args.out}", backend="CPU (gloo collectives)")
        pathlib.Path(args.out).write_text(header + table + "\n")
    return 1 if any(outcome.problems for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
