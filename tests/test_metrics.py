"""Metric records: the JSONL file, TensorBoard event files, disabled writers and progress bars."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from vpns_jax.io import metrics


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
    """Every Event of a TFRecord event file, checking the record framing and checksums."""
    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert header_crc == _masked_crc(header)
        body = data[offset + 12:offset + 12 + length]
        (body_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert body_crc == _masked_crc(body)
        events.append(event_pb2.Event.FromString(body))
        offset += 16 + length
    assert offset == len(data)
    return events


def _scalars(workdir):
    files = sorted((workdir / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    assert files[0].stat().st_size > 0
    return [(event.step, value.tag, value.simple_value)
            for event in _read_events(files[0]) for value in event.summary.value]


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(10, {"loss": jnp.asarray(0.25, jnp.float32), "correct": np.int32(12)}, density=0.1, stage=1)
        writer.write(np.int64(20), {"accuracy": 0.75}, density=0.1, stage=2)
        # The JSON lines are flushed at once: readable before close.
        assert len(metrics.read_metrics(tmp_path)) == 2
    records = metrics.read_metrics(tmp_path)
    times = [record.pop("time") for record in records]
    assert records == [{"step": 10, "density": 0.1, "stage": 1, "loss": 0.25, "correct": 12},
                       {"step": 20, "density": 0.1, "stage": 2, "accuracy": 0.75}]
    assert all(isinstance(t, float) and t > 1.6e9 for t in times) and times[0] <= times[1]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and type(json.loads(lines[0])["correct"]) is int
    assert _scalars(tmp_path) == [(10, "density_0.1/stage_1/loss", 0.25),
                                  (10, "density_0.1/stage_1/correct", 12.0),
                                  (20, "density_0.1/stage_2/accuracy", 0.75)]


def test_a_resumed_writer_appends_after_a_cut_line(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": 1.5})
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 2, "lo')  # a write cut by a kill
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1]
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(2, {"loss": 0.5}, stage=1)
    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.5), (2, 0.5)]
    assert records[1]["stage"] == 1


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with metrics.MetricsWriter(workdir, enabled=False) as writer:
        writer.write(1, {"loss": 0.5}, stage=1)
    assert not workdir.exists()
    assert metrics.read_metrics(workdir) == []


def test_bad_records_are_refused(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        with pytest.raises(ValueError, match="must differ"):
            writer.write(1, {"stage": 0.5}, stage=1)
        with pytest.raises(ValueError, match="not a scalar"):
            writer.write(1, {"loss": np.ones(3)})
    assert metrics.read_metrics(tmp_path) == []


def test_progress_bar(capsys):
    with metrics.progress(4, "stage 1", initial=1) as bar:
        assert not bar.disable and bar.n == 1 and bar.total == 4
        bar.update(3)
        assert bar.n == 4
    assert "stage 1" in capsys.readouterr().err
    with metrics.progress(0, "nothing") as bar:
        assert bar.disable


def test_peak_memory_is_this_process_peak_and_never_falls():
    # On CPU: the process's peak resident set, which with jax and numpy loaded is tens of MiB at least.
    first = metrics.peak_memory_mb()
    assert 20 < first < 64 * 1024 and first <= metrics.peak_memory_mb()
