"""The experiment tools on hand-written cell workdirs: no training; the only subprocesses are git and the
manifest's jax device probe (measurement.provenance)."""

import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import measurement, plots, sweep, table
from tests.helpers import assert_provenance
from vpns_jax.io import array_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.py")
LTH_ROUNDS = [0.8**r for r in range(1, 15)]  # 0.8 ... 0.044


def _cell(root, method, seed, rows, masks_at=(), ran=None):
    """A fake workdir of a finished run of the densities ``ran`` (default: the rows'): results.json from
    (density, accuracy) pairs, config.json, and a masks.npz per density in ``masks_at``."""
    workdir = sweep.cell_workdir(root, method, seed)
    workdir.mkdir(parents=True)
    ran = [d for d, _ in rows] if ran is None else ran
    (workdir / "config.json").write_text(json.dumps({"method": method, "densities": list(ran)}))
    results = [{"density": d, "sparsity": 1 - d, "model_sparsity": 1 - d, "test_accuracy": acc,
                "test_loss": 0.3, "wall_time_s": 1.0, "method": method} for d, acc in rows]
    (workdir / "results.json").write_text(json.dumps(results))
    for density in masks_at:
        kept = (np.arange(36) % 10 < 10 * density).reshape(3, 3, 2, 2).astype(np.float32)
        masks = {"conv1": {"kernel": np.ones((3, 3, 3, 4))}, "layer1": {0: {"conv1": {"kernel": kept}}},
                 "fc": {"kernel": np.zeros((4, 5))}}
        array_files.save_arrays(workdir / "subnetworks" / f"density_{density}" / "masks.npz", masks)
    return workdir


@pytest.fixture
def small_sweep(tmp_path):
    """vpns at seeds 7 and 9, one LTH run (seed 7, rounds 0.8^r) and one dense model."""
    _cell(tmp_path, "vpns", 7, [(0.5, 0.93), (0.1, 0.90)], masks_at=(0.5, 0.1))
    _cell(tmp_path, "vpns", 9, [(0.5, 0.95), (0.1, 0.92)])
    _cell(tmp_path, "lth", 7, [(d, 0.90 - 0.005 * r) for r, d in enumerate(LTH_ROUNDS[:11], 1)],
          masks_at=LTH_ROUNDS[8:11])
    _cell(tmp_path, "dense", 7, [(1.0, 0.96)])
    return tmp_path


def test_mean_and_sample_std_over_seeds(tmp_path):
    for seed, accuracy in ((7, 0.90), (9, 0.92), (17, 0.94)):
        _cell(tmp_path, "hydra", seed, [(0.5, 0.95), (0.1, accuracy)])
    rows = table.collect(tmp_path)
    assert [(r["method"], r["seed"], r["density"]) for r in rows][:2] == [("hydra", 7, 0.5), ("hydra", 7, 0.1)]
    assert rows[0]["workdir"] == str(tmp_path / "hydra" / "seed_7")
    summary = table.summarize(rows, [0.5, 0.1])
    cell = summary.cells[("hydra", 0.1)]
    assert cell.mean == pytest.approx(92.0) and cell.std == pytest.approx(2.0)
    assert cell.n == 3 and cell.seeds == (7, 9, 17) and not cell.nearest
    # 95 % interval: 92 -+ t(0.975, df=2) * 2 / sqrt(3) = 92 -+ 4.3026527 * 1.1547005 = 92 -+ 4.9683.
    assert table.format_cell(cell, 3) == "92.00(2.00) [87.03, 96.97]"
    assert table.format_cell(summary.cells[("hydra", 0.5)], 3) == "95.00(0.00) [95.00, 95.00]"


def test_lth_takes_its_nearest_round_within_a_factor_1_25(small_sweep):
    summary = table.summarize(table.collect(small_sweep), [0.5, 0.1, 0.05])
    at_half, at_tenth, at_twentieth = (summary.cells[("lth", d)] for d in (0.5, 0.1, 0.05))
    assert at_half.used_densities == pytest.approx([0.512]) and at_half.nearest
    assert at_tenth.used_densities == pytest.approx([0.8**10]) and at_tenth.mean == pytest.approx(85.0)
    # Its last round is 0.8^11 = 0.086, a factor 1.72 from 0.05: no value rather than a wrong one.
    assert at_twentieth.mean is None and at_twentieth.n == 0
    assert table.format_cell(at_tenth, 1) == "85.00(-)†"
    assert table.format_cell(at_twentieth, 1) == "n/a"
    # A row at the exact density is never marked, and the dense model serves every column.
    assert not summary.cells[("vpns", 0.1)].nearest
    assert summary.cells[("dense", 0.05)].mean == pytest.approx(96.0)


def test_markdown_is_laid_out_like_the_paper(small_sweep):
    summary = table.summarize(table.collect(small_sweep), [0.5, 0.1])
    assert table.format_markdown(summary) == (
        "| Sparsity (%) | 50 | 90 |\n"
        "| :-- | --: | --: |\n"
        "| dense | 96.00(-) [n=1] | 96.00(-) [n=1] |\n"
        "| lth | 88.50(-)† [n=1] | 85.00(-)† [n=1] |\n"
        # Two seeds: 94 -+ t(0.975, df=1) * sqrt(2) / sqrt(2) = 94 -+ 12.7062.
        "| vpns | 94.00(1.41) [81.29, 106.71] | 91.00(1.41) [78.29, 103.71] |\n"
        "\n"
        "Test accuracy (%), mean(sample std) [95 % t interval] over 2 seeds (7, 9); '-': one seed.\n"
        "† LTH at its round density 0.8^r nearest the column (any method: the nearest density it ran, "
        "within a factor 1.25): lth at 0.512 for 50; lth at 0.1074 for 90.\n"
    )
    assert table.ranking(summary, 0.1) == [("vpns", pytest.approx(91.0)), ("lth", pytest.approx(85.0))]
    assert table.ranking(summary, 0.1, include_dense=True)[0][0] == "dense"
    with pytest.raises(ValueError, match="not a column"):
        table.ranking(summary, 0.2)


def test_csv_has_one_row_per_method_and_density(small_sweep):
    summary = table.summarize(table.collect(small_sweep), [0.5, 0.1], methods=["vpns", "lth"])
    assert table.format_csv(summary) == (
        "method,density,sparsity_pct,mean_accuracy_pct,std_accuracy_pct,ci_low_pct,ci_high_pct,n,seeds,"
        "used_density,nearest,minus_vpns_pct,minus_vpns_low,minus_vpns_high,minus_vpns_p\n"
        "vpns,0.5,50,94.0000,1.4142,81.2938,106.7062,2,7 9,0.5,false,,,,\n"
        "vpns,0.1,90,91.0000,1.4142,78.2938,103.7062,2,7 9,0.1,false,,,,\n"
        # LTH ran seed 7 only: its differences from vpns's seed 7 (93 and 90) have no interval.
        "lth,0.5,50,88.5000,,,,1,7,0.512,true,-4.5000,,,\n"
        "lth,0.1,90,85.0000,,,,1,7,0.1074,true,-5.0000,,,\n"
    )


def test_table_cli_writes_markdown_and_csv(small_sweep, capsys):
    assert table.main([f"--root={small_sweep}", "--densities=0.5,0.1", f"--out={small_sweep / 'table'}"]) == 0
    printed = capsys.readouterr().out
    markdown = (small_sweep / "table.md").read_text()
    assert markdown.startswith(table.format_markdown(table.summarize(table.collect(small_sweep), [0.5, 0.1])))
    assert "- sparsity 90 %: vpns 91.00 > lth 85.00" in markdown and "| vpns | 94.00(1.41)" in printed
    assert "| Minus vpns | 50 | 90 |" in markdown and "| lth | -4.50 n.s. | -5.00 n.s. |" in markdown
    assert (small_sweep / "table.csv").read_text().count("\n") == 7


def test_differences_from_vpns_are_paired_by_seed(tmp_path):
    # vpns at seeds 7, 9, 17; hydra at the same seeds 1, 2 and 3 points lower, plus a seed vpns lacks.
    for seed, accuracy in ((7, 0.90), (9, 0.92), (17, 0.94)):
        _cell(tmp_path, "vpns", seed, [(0.1, accuracy)])
    for seed, accuracy in ((7, 0.89), (9, 0.90), (17, 0.91), (21, 0.50)):
        _cell(tmp_path, "hydra", seed, [(0.1, accuracy)])
    summary = table.summarize(table.collect(tmp_path), [0.1])
    (difference,) = table.differences(summary).values()
    # Differences -1, -2, -3: mean -2, std 1, t = -2 sqrt(3) on 2 degrees of freedom: p = 1 - sqrt(12/14).
    assert difference.seeds == (7, 9, 17) and difference.difference.mean == pytest.approx(-2.0)
    assert difference.p_value == pytest.approx(1 - (12 / 14) ** 0.5, rel=1e-6)
    assert table.format_differences(summary).splitlines()[2] == "| hydra | -2.00 [-4.48, +0.48] p=0.074 n.s. |"


def test_plots_write_png_files(small_sweep, tmp_path):
    summary = table.summarize(table.collect(small_sweep), [0.5, 0.1])
    path = tmp_path / "figures" / "accuracy.png"
    plots.plot_accuracy_vs_sparsity(summary, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Differences from vpns, paired by seed; every line keeps its own colour and marker even past ten.
    points = plots.difference_points(summary)
    assert "vpns" not in points and set(points) == set(summary.methods) - {"vpns"}
    assert [sparsity for sparsity, _ in points["lth"]] == [50.0, 90.0]
    # lth seed 7 at 90 %: its round 0.8^10 at 85 % minus vpns seed 7's 90 %; one pair, so no interval.
    at_90 = points["lth"][1][1]
    assert at_90.mean == pytest.approx(-5.0) and at_90.n == 1 and at_90.low is None
    differences_path = tmp_path / "differences.png"
    plots.plot_differences(summary, differences_path)
    assert differences_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    styles = [plots._style(i) for i in range(20)]
    assert len({(s["color"], s["marker"]) for s in styles}) == 20  # apart even where no line is drawn

    masks = array_files.load_arrays(small_sweep / "vpns" / "seed_7" / "subnetworks" / "density_0.1" / "masks.npz")
    densities = plots.layer_densities(masks)
    assert densities == {"conv1": 1.0, "layer1/0/conv1": pytest.approx(4 / 36), "fc": 0.0}
    assert list(densities) == ["conv1", "layer1/0/conv1", "fc"]  # the dense head after the convs
    layer_path = tmp_path / "layers.png"
    plots.plot_layer_densities(masks, layer_path, "vpns at density 0.1")
    assert layer_path.stat().st_size > 1000

    out = tmp_path / "cli"
    assert plots.main([f"--root={small_sweep}", f"--out={out}", "--densities=0.5,0.1"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["accuracy_vs_sparsity.png", "layer_density_lth.png", "layer_density_vpns.png"]
    assert all(p.stat().st_size > 1000 for p in out.iterdir())
    assert plots.nearest_subnetwork(small_sweep / "lth" / "seed_7", 0.1)[0] == pytest.approx(0.8**10)


def _expected_command(root, method, seed, *extra):
    return [sys.executable, "-m", "vpns_jax.main", f"--config={DEFAULT_CONFIG}",
            f"--workdir={root}/{method}/seed_{seed}", f"--config.method={method}", f"--config.seed={seed}",
            "--config.densities=(0.5, 0.1)", "--config.source.epochs=1", *extra]


def test_sweep_dry_run_prints_commands_that_share_the_source_model(tmp_path, capsys):
    argv = [f"--config={DEFAULT_CONFIG}", "--methods=vpns,hydra", "--densities=0.5,0.1", "--seeds=7,9",
            f"--root={tmp_path}", "--set", "source.epochs=1", "--dry_run"]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    shared = ["--config.source.enabled=False", f"--config.model.init_from={tmp_path}/vpns/seed_7/source_model.npz"]
    expected = [
        _expected_command(tmp_path, "vpns", 7),
        _expected_command(tmp_path, "vpns", 9, *shared),
        _expected_command(tmp_path, "hydra", 7, *shared),
        _expected_command(tmp_path, "hydra", 9, *shared),
    ]
    commands = [shlex.split(line) for line in printed.splitlines() if line.startswith("  ")]
    assert commands == expected
    assert "source model: pretrained by vpns seed 7" in printed
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing

    # An existing source model: no pretraining, so no cell is rewritten to share one.
    cells = sweep.plan(DEFAULT_CONFIG, ["vpns"], [7, 9], [0.5, 0.1], tmp_path, {"source.epochs": "1"},
                       share_source=sweep.pretrains_source(
                           sweep.load_config(DEFAULT_CONFIG),
                           {"source.enabled": "False", "model.init_from": "/models/resnet18.npz"}))
    assert [list(c.command) for c in cells] == [_expected_command(tmp_path, "vpns", s) for s in (7, 9)]


def test_sweep_skips_complete_cells_and_goes_on_after_a_failure(tmp_path, capsys, monkeypatch):
    first = _cell(tmp_path, "vpns", 7, [(0.5, 0.93), (0.1, 0.90)])
    (first / "source_model.npz").write_bytes(b"weights")
    _cell(tmp_path, "vpns", 9, [(0.5, 0.93)])  # 0.1 missing: rerun (the trainer resumes)
    ran = []

    def fake_run(cell):
        ran.append((cell.method, cell.seed))
        return (1, "Traceback ...\nValueError: boom") if cell.method == "hydra" and cell.seed == 7 else (0, "")

    monkeypatch.setattr(sweep, "run_cell", fake_run)
    argv = [f"--config={DEFAULT_CONFIG}", "--methods=vpns,hydra", "--densities=0.5,0.1", "--seeds=7,9",
            f"--root={tmp_path}", "--set", "source.epochs=1"]
    assert sweep.main(argv) == 1
    printed = capsys.readouterr().out
    assert ran == [("vpns", 9), ("hydra", 7), ("hydra", 9)]
    assert "vpns seed 7: complete, skipped" in printed and "ValueError: boom" in printed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [c["status"] for c in manifest["cells"]] == ["skipped", "done", "failed", "done"]
    assert manifest["cells"][1]["command"] == _expected_command(
        tmp_path, "vpns", 9, "--config.source.enabled=False",
        f"--config.model.init_from={tmp_path}/vpns/seed_7/source_model.npz")
    assert manifest["source_cell"] == {"method": "vpns", "seed": 7} and manifest["densities"] == [0.5, 0.1]
    assert "experiments.sweep" in (tmp_path / "command.txt").read_text()
    assert_provenance(manifest)

    # The source cell stays the same when a rerun lists the methods in another order, and each cell's
    # wall seconds add up over the invocations (a skipped cell keeps its earlier ones).
    manifest["cells"][0]["wall_s"] = 12.5
    manifest["cells"][2]["wall_s"] = 3.0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ran.clear()
    assert sweep.main([*argv[:1], "--methods=hydra,vpns", *argv[2:]]) == 1
    rerun = json.loads((tmp_path / "manifest.json").read_text())
    assert rerun["source_cell"] == {"method": "vpns", "seed": 7}
    walls = {(c["method"], c["seed"]): (c["status"], c["wall_s"]) for c in rerun["cells"]}
    assert walls[("vpns", 7)] == ("skipped", 12.5)
    assert walls[("hydra", 7)][0] == "failed" and 3.0 <= walls[("hydra", 7)][1] < 4.0


def test_cells_without_the_shared_source_model_are_blocked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "run_cell", lambda cell: (1, "pretraining failed"))
    assert sweep.main([f"--config={DEFAULT_CONFIG}", "--methods=vpns", "--densities=0.5", "--seeds=7,9",
                       f"--root={tmp_path}"]) == 1
    assert [c["status"] for c in json.loads((tmp_path / "manifest.json").read_text())["cells"]] == [
        "failed", "blocked"]
    assert "BLOCKED" in capsys.readouterr().out


def test_a_dry_run_asks_for_no_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(measurement, "provenance", lambda: pytest.fail("a dry run writes no manifest"))
    assert sweep.main([f"--config={DEFAULT_CONFIG}", "--methods=vpns", "--densities=0.5", "--seeds=7",
                       f"--root={tmp_path}", "--dry_run"]) == 0


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_is_the_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    repo = (tmp_path / "repo").resolve()
    repo.mkdir()
    monkeypatch.setattr(measurement, "REPO", repo)
    assert measurement.git_state() == {"git_commit": None, "git_dirty": None}  # not a git checkout
    _git(repo, "init", "-q")
    assert measurement.git_state() == {"git_commit": None, "git_dirty": None}  # no commit yet
    (repo / "tracked.txt").write_text("a\n")
    _git(repo, "add", "tracked.txt")
    _git(repo, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert measurement.git_state() == {"git_commit": head, "git_dirty": False}
    (repo / "untracked.txt").write_text("new\n")  # untracked files do not count
    assert measurement.git_state() == {"git_commit": head, "git_dirty": False}
    (repo / "tracked.txt").write_text("b\n")
    assert measurement.git_state() == {"git_commit": head, "git_dirty": True}
    # A tree inside another repository is no checkout of its own: its commit would be the other one's.
    inner = repo / "exported"
    inner.mkdir()
    monkeypatch.setattr(measurement, "REPO", inner)
    assert measurement.git_state() == {"git_commit": None, "git_dirty": None}


def test_provenance_is_null_where_it_cannot_be_found(monkeypatch):
    monkeypatch.setattr(measurement, "_git", lambda *args: None)  # no git
    monkeypatch.setattr(measurement, "RECORDED_PACKAGES", ("numpy", "no-such-distribution-vpns"))
    monkeypatch.setattr(measurement, "_JAX_DEVICE_PROBE", "raise SystemExit(3)")
    measurement._jax_devices.cache_clear()
    try:
        found = measurement.provenance()
    finally:
        measurement._jax_devices.cache_clear()  # the failed probe is not kept for the other tests
    assert found["git_commit"] is None and found["git_dirty"] is None
    assert found["packages"] == {"python": platform.python_version(), "numpy": importlib.metadata.version("numpy"),
                                 "no-such-distribution-vpns": None}
    assert found["machine"] == {"platform": platform.platform(), "cpu": measurement.cpu_model(),
                                "cpu_count": os.cpu_count(), "jax_backend": None, "device_kind": None,
                                "device_count": None}
    json.dumps(found)  # a manifest is JSON
    lines = measurement.header_lines(found, "python x.py")  # a header renders what is missing, too
    assert lines[:1] + lines[2:3] == ["- command: `python x.py`", "- commit: unknown (not a git checkout)"]
    assert "(devices unknown)" in lines[3] and lines[4].endswith("no-such-distribution-vpns missing")


def test_completeness_rules(tmp_path):
    # Complete = results.json of a finished run whose config.json holds exactly the requested densities,
    # whatever units the method made of them (LTH's rounds, the dense finetune's one row).
    vpns = _cell(tmp_path, "vpns", 7, [(0.5, 0.9), (0.1, 0.9)])
    assert sweep.is_complete(vpns, [0.5, 0.1])
    assert not sweep.is_complete(vpns, [0.5, 0.1, 0.05]) and not sweep.is_complete(vpns, [0.1, 0.5])
    assert not sweep.is_complete(tmp_path / "missing", [0.5])
    (_cell(tmp_path, "hydra", 7, [(0.5, 0.9)]) / "config.json").unlink()
    assert not sweep.is_complete(sweep.cell_workdir(tmp_path, "hydra", 7), [0.5])  # no config.json
    assert not sweep.is_complete(_cell(tmp_path, "omp", 7, [], ran=[0.5]), [0.5])  # no rows
    lth = _cell(tmp_path, "lth", 7, [(d, 0.9) for d in LTH_ROUNDS], ran=[0.5, 0.05])
    assert sweep.is_complete(lth, [0.5, 0.05]) and not sweep.is_complete(lth, [0.5, 0.02])
    assert sweep.is_complete(_cell(tmp_path, "dense", 7, [(1.0, 0.96)], ran=[0.5, 0.1]), [0.5, 0.1])


def test_overrides_refuse_the_sweeps_own_keys():
    assert sweep.parse_overrides(["config.source.epochs=1", "data.classes=(5,6)"]) == {
        "source.epochs": "1", "data.classes": "(5,6)"}
    with pytest.raises(ValueError, match="--seeds"):
        sweep.parse_overrides(["seed=3"])
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_overrides(["source.epochs"])
    assert sweep.format_densities([0.5]) == "(0.5,)"


def test_source_file_name_matches_the_trainer():
    from vpns_jax import source_model

    assert sweep.SOURCE_FILE == source_model.SOURCE_FILE
