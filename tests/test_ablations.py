"""The ablation suite's variants and reports: valid configs, the sweep's commands, tables from fake cells."""

import json

import pytest

from experiments import ablations, sweep
from tests.helpers import assert_provenance
from vpns_jax import config_checks, main, methods

DEFAULT_CONFIG = str(sweep.REPO / "configs" / "default.py")


@pytest.mark.parametrize("name", list(ablations.VARIANTS))
def test_every_variant_is_a_valid_config_of_the_offline_default(name):
    variant = ablations.VARIANTS[name]
    overrides = {**ablations.OVERRIDES, **variant.overrides}
    config = main.parse_flags(["main", f"--config.method={variant.method}",
                               *(f"--config.{k}={v}" for k, v in overrides.items())]).config
    config_checks.validate(config, num_devices=1)
    plan = methods.make_plan(config)
    uses_prompt = any("prompt" in phase.trains for phase in plan.phases.values())
    assert uses_prompt == (name not in ("no_prompt", "plain_stream", "clean_stream", "hydra"))


def test_the_dry_run_plans_one_cell_per_variant_and_seed(tmp_path, capsys):
    argv = [f"--config={DEFAULT_CONFIG}", f"--root={tmp_path}", "--variants=vpns,no_prompt", "--seeds=7,9",
            "--densities=0.5,0.1", "--dry_run"]
    assert ablations.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("would run") == 4 and not list(tmp_path.iterdir())  # a dry run writes nothing
    no_prompt = [line for line in out.splitlines() if "no_prompt/seed_9" in line and "vpns_jax.main" in line]
    assert len(no_prompt) == 1
    command = no_prompt[0]
    assert "--config.method=vpns" in command and "'--config.vpns.prompt_stages=()'" in command
    assert "--config.eval.every_epochs=1" in command and "'--config.densities=(0.5, 0.1)'" in command
    # The first cell pretrains the source model; the others load it.
    assert f"--config.model.init_from={tmp_path / 'vpns' / 'seed_7' / 'source_model.npz'}" in command


def test_unknown_variants_are_a_one_line_error(tmp_path, capsys):
    assert ablations.main([f"--root={tmp_path}", "--variants=vpns,magic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown ['magic']" in err


def _fake_cell(root, variant, seed, accuracy):
    workdir = sweep.cell_workdir(root, variant, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [{"method": "vpns" if variant != "hydra" else "hydra", "density": 0.1, "sparsity": 0.9,
             "test_accuracy": accuracy, "test_loss": 0.3, "wall_time_s": 10.0}]
    (workdir / "results.json").write_text(json.dumps(rows))
    (workdir / "config.json").write_text(json.dumps({"densities": [0.1]}))  # a finished run of density 0.1
    epoch = {"step": 4, "time": 0.0, "density": 0.1, "stage": 1, "phase": "epoch", "epoch": 1, "epoch_seconds": 5.0,
             "train_seconds": 5.0, "optimizer_steps": 8, "peak_memory_mb": 200.0, "test_accuracy": accuracy}
    (workdir / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")


def test_reports_tell_variants_of_one_method_apart_by_folder(tmp_path):
    for seed, accuracy in ((7, 0.90), (9, 0.92), (17, 0.94)):
        _fake_cell(tmp_path, "vpns", seed, accuracy)
        _fake_cell(tmp_path, "no_prompt", seed, accuracy - 0.01)  # 1 point lower at every seed
    ablations.write_reports(tmp_path, ["vpns", "no_prompt"], [0.1], level=0.91)
    markdown = (tmp_path / "table.md").read_text()
    assert "| vpns | 92.00(2.00) [87.03, 96.97] |" in markdown and "| no_prompt | 91.00(2.00)" in markdown
    # A constant paired difference: zero spread, p = 0, significant.
    assert "| no_prompt | -1.00 [-1.00, -1.00] p=0 |" in markdown
    cost_table = (tmp_path / "cost.md").read_text()
    assert "| vpns | 0.1 | 1: 5.00 ± 0.00 | 200 ± 0 | 5.0 ± 0.0 | 8 ± 0 | 2/3 |" in cost_table
    # Equal budgets: 8 steps and 5 s each; 90, 92, 94 -> 92 -+ 4.303 * 2 / 1.732 = 92 -+ 4.97.
    assert "| vpns | 0.1 | 92.00 ± 4.97 (N=8 steps, 3/3 seeds) | 92.00 ± 4.97 (T=5.0 s, 3/3 seeds) |" in cost_table
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert (tmp_path / "differences_vs_sparsity.png").stat().st_size > 1000


def test_the_suite_runs_every_cell_then_writes_reports_and_the_wall_time_of_every_invocation(tmp_path, monkeypatch,
                                                                                          capsys):
    ran = []

    def fake_run(cell):
        ran.append((cell.method, cell.seed))
        _fake_cell(tmp_path, cell.method, cell.seed, {7: 0.90, 9: 0.92}[cell.seed] - 0.01 * (cell.method != "vpns"))
        (cell.workdir / "source_model.npz").write_bytes(b"weights")  # what the first cell shares
        return 0, ""

    monkeypatch.setattr(sweep, "run_cell", fake_run)
    argv = [f"--config={DEFAULT_CONFIG}", f"--root={tmp_path}", "--variants=vpns,no_prompt", "--seeds=7,9",
            "--densities=0.1"]
    assert ablations.main(argv) == 0
    assert ran == [("vpns", 7), ("vpns", 9), ("no_prompt", 7), ("no_prompt", 9)]
    assert "| no_prompt | -1.00 [-1.00, -1.00] p=0 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "cost.md").read_text().startswith("## Cost and time to 90% test accuracy")

    # A rerun skips the finished cells and keeps their wall time (here set by hand) in the total.
    manifest = json.loads((tmp_path / sweep.MANIFEST_FILE).read_text())
    assert_provenance(manifest)  # the suite's manifest is the sweep's, with the commit, packages and machine
    for cell, seconds in zip(manifest["cells"], (100.0, 200.0, 300.0, 400.0)):
        cell["wall_s"] = seconds
    (tmp_path / sweep.MANIFEST_FILE).write_text(json.dumps(manifest))
    ran.clear()
    assert ablations.main(argv) == 0 and ran == []
    wall = (tmp_path / "wall_time.txt").read_text()
    assert wall.startswith("1000 s (0.28 h) of cell runs over every invocation of ") and "(4 cells;" in wall
    assert "experiments.ablations --config=" in wall
