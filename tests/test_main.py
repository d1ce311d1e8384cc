"""The program users run: the shrunk offline default end to end, resumption after a kill, 1 vs 4 devices,
and one-line errors for bad configs. Runs share one persistent compilation cache."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


def _command(workdir, data_dir, cache, *extra):
    return [sys.executable, "-m", "vpns_jax.main", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.compilation_cache_dir={cache}", *SHRUNK, *extra]


def _env(devices=1):
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def _results(workdir):
    rows = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def uninterrupted(fashion_data_dir, cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(_command(workdir, fashion_data_dir, cache), capture_output=True, text=True,
                            env=_env(), timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_shrunk_default_runs_end_to_end(uninterrupted):
    workdir, result = uninterrupted
    rows = _results(workdir)
    assert [row["density"] for row in rows] == [0.5, 0.1]
    for row in rows:
        # int((1 - d) * N) of the ~44k prunable entries: sparsity 1 - d to within 1/N.
        assert row["sparsity"] == pytest.approx(1 - row["density"], abs=5e-5)
        assert 0.0 <= row["test_accuracy"] <= 1.0 and np.isfinite(row["test_loss"])
    assert "method  density  sparsity  test acc" in result.stdout
    csv_lines = (workdir / "results.csv").read_text().splitlines()
    assert csv_lines[0] == ("method,density,round,sparsity,channel_sparsity,model_sparsity,test_accuracy,test_loss,"
                            "macs,speedup,wall_time_s") and len(csv_lines) == 3
    assert all(row["method"] == "vpns" and row["macs"] > 0 and row["speedup"] > 1 for row in rows)
    for name in ("masks", "weights", "batch_stats", "prompt", "label_map"):
        assert (workdir / "subnetworks" / "density_0.1" / f"{name}.npz").is_file()
    assert (workdir / "source_model.npz").is_file() and (workdir / "config.json").is_file()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    stage_records = [r for r in records if r.get("stage") == 1]
    assert stage_records and {"loss_prompted", "lr_scores", "lr_prompt", "images_per_s"} <= set(stage_records[0])
    assert list((workdir / "tensorboard").iterdir())


def test_killed_run_resumes_to_identical_results(uninterrupted, fashion_data_dir, cache, tmp_path):
    command = _command(tmp_path, fashion_data_dir, cache)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 400
    # Kill in the middle of the first density's stage 1: after the label-mapping save and 3 iterations.
    while time.time() < deadline and process.poll() is None:
        steps = [p for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.is_dir() else []
        if len(steps) >= 2 and max(int(p.name) for p in steps) >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "results.json").exists()
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # Bit-identical on CPU: the same programs see the same batches from the same state.
    assert _results(tmp_path) == _results(uninterrupted[0])


def test_one_and_four_devices_agree(uninterrupted, fashion_data_dir, cache, tmp_path):
    result = subprocess.run(_command(tmp_path, fashion_data_dir, cache), capture_output=True, text=True,
                            env=_env(devices=4), timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for four, one in zip(_results(tmp_path), _results(uninterrupted[0]), strict=True):
        assert four["sparsity"] == one["sparsity"]
        # Reductions over 4 shards sum in another order: equal to float tolerance, not bit for bit.
        assert four["test_loss"] == pytest.approx(one["test_loss"], rel=1e-3)
        assert four["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.02)


@pytest.mark.parametrize("override, message", [
    ("--config.densities=(0.5,1.5)", "config.densities"),
    ("--config.prompt.pad_size=20", "config.prompt.pad_size"),
    ("--config.data.name=imagenet22k", "config.data.name"),
    ("--config.model.name=resnet7", "config.model.name"),
    ("--config.method=magic", "config.method"),
    ("--config.data.batch_size=30", "not divisible by the 4 devices"),
])
def test_bad_configs_are_one_line_errors(override, message, tmp_path):
    result = subprocess.run(_command(tmp_path, tmp_path, "none", override), capture_output=True, text=True,
                            env=_env(devices=4), timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config.") and message in lines[0], result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_two_processes_agree_with_one(uninterrupted, fashion_data_dir, cache, tmp_path):
    """Two local processes (jax.distributed with gloo CPU collectives, 2 devices each) on one workdir."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        subprocess.Popen(
            _command(tmp_path, fashion_data_dir, cache, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={rank}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(devices=2), cwd=ROOT,
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "density  sparsity  test acc" in outputs[0][0] and "density" not in outputs[1][0]
    for two, one in zip(_results(tmp_path), _results(uninterrupted[0]), strict=True):
        assert two["sparsity"] == one["sparsity"]
        assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-3)
        assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.02)


def test_missing_data_fails_at_once_and_leaves_the_workdir_untouched(tmp_path):
    workdir, empty = tmp_path / "run", tmp_path / "no_data"
    result = subprocess.run(_command(workdir, empty, "none", "--config.data.auto_prepare=False"),
                            capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset 'fashion_mnist' is not prepared in" in lines[0] and str(empty) in lines[0]
    assert not workdir.exists()  # no config.json to refuse the corrected command later
