"""The program users run: the shrunk offline default end to end, resumption after kills, a lost peer of two
one-device processes and their restart to a 2-device run's results, one-line errors for bad configs, and
``--config=FILE.py:ARG`` (its split, the default workdir ``workdir/<stem>_<ARG>``, one-line errors for bad
ARGs). Runs share one persistent compilation cache."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import multi_process
from experiments.kill_resume import KillPlan, command, compare, env, killed_run, results
from vpns_jax import distributed, main

HEARTBEAT_S = 10  # --heartbeat_timeout_s of the multi-process runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def uninterrupted(fashion_data_dir, cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(command(workdir, fashion_data_dir, cache), capture_output=True, text=True,
                            env=env(devices=2, fast_compile=True), timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.mark.slow
def test_shrunk_default_runs_end_to_end(uninterrupted):
    workdir, result = uninterrupted
    rows = results(workdir)
    assert [row["density"] for row in rows] == [0.5, 0.1]
    for row in rows:
        # int((1 - d) * N) of the ~44k prunable entries: sparsity 1 - d to within 1/N.
        assert row["sparsity"] == pytest.approx(1 - row["density"], abs=5e-5)
        assert 0.0 <= row["test_accuracy"] <= 1.0 and np.isfinite(row["test_loss"])
    assert "method  density  sparsity  test acc" in result.stdout
    csv_lines = (workdir / "results.csv").read_text().splitlines()
    assert csv_lines[0] == ("method,density,round,sparsity,channel_sparsity,model_sparsity,test_accuracy,test_loss,"
                            "macs,speedup,collapsed_layers,collapsed_layer_names,wall_time_s") and len(csv_lines) == 3
    assert all(row["method"] == "vpns" and row["macs"] > 0 and row["speedup"] > 1 for row in rows)
    for name in ("masks", "weights", "batch_stats", "prompt", "label_map"):
        assert (workdir / "subnetworks" / "density_0.1" / f"{name}.npz").is_file()
    assert (workdir / "source_model.npz").is_file() and (workdir / "config.json").is_file()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    stage_records = [r for r in records if r.get("stage") == 1 and "phase" not in r]
    epoch_records = [r for r in records if r.get("phase") == "epoch"]
    # Stage 1 has 2 epochs and stage 2 one, per density; optimiser steps: 2 per two-stream iteration, 4 per epoch.
    assert [(r["density"], r["stage"], r["epoch"], r["optimizer_steps"]) for r in epoch_records] == [
        (0.5, 1, 1, 8), (0.5, 1, 2, 16), (0.5, 2, 1, 24), (0.1, 1, 1, 8), (0.1, 1, 2, 16), (0.1, 2, 1, 24)]
    assert all(r["epoch_seconds"] > 0 and "test_accuracy" not in r for r in epoch_records)
    assert stage_records and {"loss_prompted", "lr_scores", "lr_prompt", "images_per_s"} <= set(stage_records[0])
    assert list((workdir / "tensorboard").iterdir())


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(uninterrupted, fashion_data_dir, cache, tmp_path):
    """SIGKILLed in the middle of a checkpoint save (density 0.5, stage 1), then sent SIGTERM at a random moment
    later (density 0.1: it stops cleanly, exit 143 and one line, checked by killed_run), the same command reruns to
    the uninterrupted run's results and subnetworks, bit for bit."""
    seed = 0
    rng = np.random.default_rng(seed)
    # Checkpoints 1-13 are density 0.5's (label mapping, stage 1 x7, stage 2 x4, done), 14-26 density 0.1's.
    plans = [KillPlan("save", after=(1, int(rng.integers(1, 8)))),
             KillPlan("random", after=(1, int(rng.integers(14, 25))), delay=float(rng.uniform(0.0, 0.5)),
                      signal="TERM")]
    workdir = tmp_path / "run"
    records = killed_run(command(workdir, fashion_data_dir, cache), env(devices=2, fast_compile=True), workdir, plans,
                         log_dir=tmp_path / "logs")
    context = f"seed {seed}, {plans}, {records}"
    assert [r.killed for r in records] == [True, True], f"a kill came after the run finished: {context}"
    assert records[0].during_save and records[0].saving.startswith("checkpoints/"), context
    same, details = compare(uninterrupted[0], workdir)
    # Bit-identical on CPU: the same programs see the same batches from the same state.
    assert same, f"{details} ({context})"
    assert details.rows == 2 and details.arrays > 100, details


# The whole catalogue runs in-process in test_bad_inputs.py; these two check the real process and 4 devices.
@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.method=magic", "config.method"),
    ("--config.data.batch_size=30", "not divisible by the 4 devices"),
])
def test_bad_configs_are_one_line_errors(override, message, tmp_path):
    result = subprocess.run(command(tmp_path, tmp_path, "none", override), capture_output=True, text=True,
                            env=env(devices=4, fast_compile=True), timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config.") and message in lines[0], result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_lost_peer_ends_the_other_process_and_both_resume(uninterrupted, fashion_data_dir, cache, tmp_path):
    """Two processes with one device each, the usual layout of a GPU cluster (it failed at its first checkpoint
    save before parallel.replicate built replicated arrays from host values). Rank 1's training process is
    SIGKILLed in stage 1, as by a lost host: rank 0 ends within the heartbeat timeout with one line saying
    so (exit 75), never a hang or a stack trace. Restarting both resumes and ends where a one-process run on
    2 devices (the uninterrupted fixture) does, bit for bit: the same sharded programs, and a 2-shard sum
    is the same whichever side adds. experiments/multi_process.py does the same for 2 and 4 devices a process."""
    workdir = tmp_path / "run"
    ranks = multi_process.start_ranks(workdir, fashion_data_dir, cache, devices=1, heartbeat_timeout_s=HEARTBEAT_S)
    lost = multi_process.lose_a_peer(ranks, workdir, heartbeat_timeout_s=HEARTBEAT_S)
    assert lost.problems(HEARTBEAT_S) == [], lost.stderr[-3000:]
    assert lost.returncode == distributed.EXIT_PEER_LOST and lost.seconds < HEARTBEAT_S + 30
    restarted = multi_process.start_ranks(workdir, fashion_data_dir, cache, devices=1,
                                          heartbeat_timeout_s=HEARTBEAT_S)
    stdouts = multi_process.finish(restarted)
    assert "density  sparsity  test acc" in stdouts[0] and "density" not in stdouts[1]
    same, details = compare(uninterrupted[0], workdir, densities=(0.1,))
    assert same, details


@pytest.mark.slow
def test_missing_data_fails_at_once_and_leaves_the_workdir_untouched(tmp_path):
    workdir, empty = tmp_path / "run", tmp_path / "no_data"
    result = subprocess.run(command(workdir, empty, "none", "--config.data.auto_prepare=False"),
                            capture_output=True, text=True, env=env(fast_compile=True), timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset 'fashion_mnist' is not prepared in" in lines[0] and str(empty) in lines[0]
    assert not workdir.exists()  # no config.json to refuse the corrected command later


# --config=FILE.py:ARG (ml_collections' parameterised configs): parsing, the default workdir, one-line errors.
# Parse only: no data, no training.


@pytest.mark.parametrize("config, split", [
    ("configs/default.py", ("configs/default.py", None)),
    ("configs/default.py:hydra", ("configs/default.py", "hydra")),
    ("configs/default.py:", ("configs/default.py", "")),
    ("configs/x.py:a:b", ("configs/x.py", "a:b")),  # as ml_collections splits: the first ':' after the file
    ("/data:2024/configs/x.py", ("/data:2024/configs/x.py", None)),  # a ':' that is not after '.py'
])
def test_split_config_arg(config, split):
    assert main.split_config_arg(config) == split


@pytest.mark.parametrize("config, workdir", [
    ("configs/default.py", "workdir/default"),
    (str(ROOT / "configs" / "default.py"), "workdir/default"),
    ("configs/default.py:hydra", "workdir/default_hydra"),
    ("configs/default.py:vpns_channel", "workdir/default_vpns_channel"),
    ("configs/cifar100.py:resnet50", "workdir/cifar100_resnet50"),
    ("configs/default.py:", "workdir/default"),
])
def test_default_workdir_names_the_config_and_its_arg(config, workdir):
    assert main.default_workdir(config) == workdir


def test_command_runs_in_the_default_workdir_of_its_arg(monkeypatch, tmp_path, capsys):
    from vpns_jax import train

    seen = []
    monkeypatch.setattr(train, "run", lambda config, workdir, **_: seen.append((config.method, workdir)) or [])
    monkeypatch.chdir(tmp_path)  # a relative --config as users give it, from another folder
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.py").write_text((ROOT / "configs" / "default.py").read_text())
    for config, expected in [("configs/mine.py:hydra", ("hydra", "workdir/mine_hydra")),
                             ("configs/mine.py", ("vpns", "workdir/mine")),
                             (f"{ROOT / 'configs' / 'default.py'}:slim", ("slim", "workdir/default_slim"))]:
        assert main.command(["vpns_jax.main", f"--config={config}"]) == 0, capsys.readouterr().err
        assert seen.pop() == expected
    assert main.command(["vpns_jax.main", "--config=configs/mine.py:omp", "--workdir=here"]) == 0
    assert seen.pop() == ("omp", "here")


def _one_line_error(argv, capsys):
    assert main.command(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_config_args_are_one_line_errors(tmp_path, capsys):
    cifar100 = ROOT / "configs" / "cifar100.py"
    assert _one_line_error(["vpns_jax.main", f"--config={cifar100}:resnet34"], capsys) == (
        f"error: --config={cifar100}:resnet34: unknown model 'resnet34': use one of resnet18, resnet50, vgg16, "
        "vgg16_bn, vit_b_16, vit_b_32, vit_l_16 after the ':' (none for resnet18)")
    # A config file whose get_config takes no ARG.
    plain = tmp_path / "plain.py"
    plain.write_text("from vpns_jax.config import offline\n\n\ndef get_config():\n    return offline.resnet()\n")
    assert _one_line_error(["vpns_jax.main", f"--config={plain}:hydra"], capsys) == (
        f"error: --config={plain}:hydra: config file {plain} takes no ':ARG' (its get_config() has no parameter): "
        f"give --config={plain}")
    # ml_collections' own pattern, a dict of configs, on an unknown ARG.
    table = tmp_path / "table.py"
    table.write_text("from vpns_jax.config import offline\n\n\ndef get_config(arg):\n"
                     "    return {'a': offline.resnet()}[arg]\n")
    assert "does not load: KeyError: b" in _one_line_error(["vpns_jax.main", f"--config={table}:b"], capsys)
    # A missing file is named without its ARG.
    assert _one_line_error(["vpns_jax.main", f"--config={tmp_path / 'nope.py'}:hydra"], capsys) == (
        f"error: config file {tmp_path / 'nope.py'} does not exist: give --config=configs/<name>.py[:ARG] "
        "(the files in configs/) or a path to your own")
    # Overrides of fields the config lacks are still named as such, with or without an ARG.
    assert "does not have: 'epochz'" in _one_line_error(
        ["vpns_jax.main", f"--config={cifar100}:resnet50", "--config.stage1.epochz=3"], capsys)


# The real process: an unknown ARG is one line on stderr, exit status 2, nothing written.
@pytest.mark.slow
@pytest.mark.parametrize("config, message", [
    ("configs/default.py:magic", "error: config.method='magic' is unknown: use one of 'vpns', "),
    ("configs/cifar100.py:resnet34", "error: --config=configs/cifar100.py:resnet34: unknown model 'resnet34': "),
])
def test_unknown_config_arg_is_one_line_exit_2(config, message, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "vpns_jax.main", f"--config={config}", f"--workdir={workdir}",
                             f"--config.data.data_dir={tmp_path}", "--config.compilation_cache_dir=none"],
                            capture_output=True, text=True, env=env(fast_compile=True), timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not workdir.exists()
