"""Training metrics: one JSON line per record in ``workdir/metrics.jsonl``, TensorBoard scalars, progress bars.

Only process 0 writes by default. A resumed run appends to the same files, so
the steps between the last checkpoint and a kill appear twice in the JSONL
(each line carries its own ``time``).
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    """A JSON-ready Python scalar (int for integer/bool arrays, float otherwise); strings pass through."""
    if isinstance(value, str):
        return value
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric value of shape {array.shape} is not a scalar")
    item = array.reshape(()).item()
    if array.dtype.kind in "biu":
        return int(item)
    if array.dtype.kind == "f":
        return float(item)
    raise TypeError(f"metric value {value!r} of dtype {array.dtype} is not a number")


def _drop_partial_last_line(path: pathlib.Path) -> None:
    """Removes an unterminated last line (a write cut by a kill), so appended lines start on their own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        data = file.read()
        file.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
    """Appends metric records to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``.

    ``write(step, {'loss': 0.3}, density=0.1, stage=1)`` adds the line
    ``{"step": ..., "time": ..., "density": 0.1, "stage": 1, "loss": 0.3}`` and the
    TensorBoard scalar ``density_0.1/stage_1/loss``. A disabled writer (the
    default on processes other than 0) creates no file.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.workdir = pathlib.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._file = None
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / METRICS_FILE
            _drop_partial_last_line(path)
            self._file = path.open("a", encoding="utf-8")
            # tensorboardX writes events from a background thread and flushes them
            # every flush_secs; close() writes everything still queued.
            self._tensorboard = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR), flush_secs=10)

    def write(self, step: int, metrics: Mapping[str, Any], **tags: Any) -> None:
        """Records ``metrics`` (scalars) at ``step`` under ``tags``.

        The JSON line is flushed before this returns; the TensorBoard scalars
        reach their file within ~10 s (tensorboardX's writer thread) or on close().
        """
        if not self.enabled:
            return
        clash = {"step", "time"} & (set(tags) | set(metrics)) or set(tags) & set(metrics)
        if clash:
            raise ValueError(f"metric and tag names must differ from each other and from step/time: {sorted(clash)}")
        step, now = int(step), time.time()
        tags = {name: _plain(value) for name, value in tags.items()}
        values = {name: _plain(value) for name, value in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": now, **tags, **values}) + "\n")
        self._file.flush()
        prefix = "".join(f"{name}_{value}/" for name, value in tags.items())
        for name, value in values.items():
            self._tensorboard.add_scalar(prefix + name, value, global_step=step, walltime=now)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tensorboard.close()
            self._file = self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress(total: int, desc: str, *, initial: int = 0) -> tqdm.tqdm:
    """A tqdm bar with rate and ETA; silent on processes other than 0 and when there is nothing to do."""
    return tqdm.tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=jax.process_index() != 0 or total == 0,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def close_progress_bars() -> None:
    """Closes every open progress bar (a stopped run's), so none is redrawn at exit after the last message."""
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        bar.close()


def peak_memory_mb() -> float:
    """Peak memory so far in MiB: the first local device's peak allocation where the backend reports one (GPU,
    TPU), else this process's peak resident set (CPU, where arrays live in host memory)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Every record in ``workdir/metrics.jsonl``, in order ([] when there is none).

    An unterminated last line (a write in progress or cut by a kill) is skipped.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1] if line]
