"""The ViT and N:M suites: their cells' commands (per-variant densities), valid configs, reports from fake cells."""

import json

import pytest

from experiments import nm_suite, sweep, vit_suite
from vpns_jax import config_checks, main, methods

DEFAULT_CONFIG = str(sweep.REPO / "configs" / "default.py")
VIT_CONFIG = str(sweep.REPO / "configs" / "default_vit.py")


def _config(config_file, variant):
    flags = ["main", f"--config={config_file}", f"--config.method={variant.method}",
             f"--config.densities={sweep.format_densities(variant.densities or (0.5, 0.25))}",
             *(f"--config.{k}={v}" for k, v in variant.overrides.items())]
    return main.parse_flags(flags).config


@pytest.mark.parametrize("name", list(nm_suite.variants(nm_suite.METHODS)))
def test_every_nm_variant_is_a_valid_config_of_the_offline_default(name):
    config = _config(DEFAULT_CONFIG, nm_suite.variants(nm_suite.METHODS)[name])
    config_checks.validate(config, num_devices=1)
    methods.make_plan(config)


@pytest.mark.parametrize("name", list(vit_suite.VARIANTS))
def test_every_vit_variant_is_a_valid_config_of_the_vit_default(name):
    config = _config(VIT_CONFIG, vit_suite.VARIANTS[name])
    config_checks.validate(config, num_devices=1)
    plan = methods.make_plan(config)
    uses_prompt = any("prompt" in phase.trains for phase in plan.phases.values())
    assert uses_prompt == (name == "vpns")


def test_nm_cells_run_only_their_patterns_density(tmp_path, capsys):
    assert nm_suite.main([f"--root={tmp_path}", "--methods=vpns,omp", "--seeds=7", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would run") == 6 and not list(tmp_path.iterdir())
    commands = {line.split("--workdir=")[1].split()[0]: line for line in out.splitlines() if "vpns_jax.main" in line}
    assert "'--config.densities=(0.5, 0.25)'" in commands[f"{tmp_path}/vpns/seed_7"]
    two_four = commands[f"{tmp_path}/omp_2_4/seed_7"]
    assert "--config.method=omp" in two_four and "--config.mask.granularity=2:4" in two_four
    assert "'--config.densities=(0.5,)'" in two_four
    assert "'--config.densities=(0.25,)'" in commands[f"{tmp_path}/vpns_1_4/seed_7"]


def _fake_cell(root, variant, seed, density, accuracy):
    workdir = sweep.cell_workdir(root, variant, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append({"method": variant.split("_")[0], "density": density, "sparsity": 1 - density,
                 "test_accuracy": accuracy, "test_loss": 0.3, "wall_time_s": 10.0})
    path.write_text(json.dumps(rows))


def test_nm_report_pairs_each_pattern_with_its_methods_unstructured_masks(tmp_path):
    for seed, accuracy in ((7, 0.90), (9, 0.92), (17, 0.94)):
        for density in nm_suite.DENSITIES:
            _fake_cell(tmp_path, "hydra", seed, density, accuracy)
        _fake_cell(tmp_path, "hydra_2_4", seed, 0.5, accuracy - 0.02)  # 2 points lower at every seed
        _fake_cell(tmp_path, "hydra_1_4", seed, 0.25, accuracy - 0.01 * (seed % 3))  # seeds: -1, 0, -2
    text = nm_suite.report(tmp_path, ["hydra"])
    # One value per pattern, in its own density's column.
    assert "| hydra_2_4 | 90.00(2.00) [85.03, 94.97] | n/a |" in text
    assert "| hydra_1_4 | n/a | 91.00(1.73) [86.70, 95.30] |" in text
    assert "| Minus hydra | 50 | 75 |" in text
    assert "| hydra_2_4 | -2.00 [-2.00, -2.00] p=0 | n/a |" in text
    # Differences -1, 0, -2: mean -1, sample std 1, t(2) interval -1 -+ 4.303 / 1.732 = -1 -+ 2.48.
    assert "| hydra_1_4 | n/a | -1.00 [-3.48, +1.48] p=0.23 n.s. |" in text
