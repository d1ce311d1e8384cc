"""Runs learn: the shrunk offline default on real Fashion-MNIST gains a stated margin over its source model's
zero-shot accuracy (experiments/runs_learn.py), and the committed expected output of `make run` (README.md)
and its checker, experiments/expected_output.py: the comparison on the README's own numbers and on perturbed
copies (no training there: the real run is ``python -m experiments.expected_output``, docs/reliability.md)."""

import pathlib

import pytest

from experiments import expected_output, runs_learn


@pytest.mark.slow
def test_the_shrunk_default_learns(fashion_data_dir, tmp_path):
    """Seed 7 of experiments/runs_learn.py: VPNs at density 0.1 must beat the zero-shot label-mapped accuracy
    of the same run's source model by MIN_GAIN_POINTS (seeds 7, 9, 17 gained far more; nothing learnt is ~0)."""
    learned = runs_learn.learning_run(tmp_path / "run", fashion_data_dir, tmp_path / "xla_cache", seed=7)
    assert 0.0 < learned.zero_shot < 0.6, learned  # a 5-way head read through label mapping, before training
    assert learned.gain_points >= runs_learn.MIN_GAIN_POINTS, learned

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
PRINTED = expected_output.readme_block(README)  # the README's seed-7 rows, as `make run` prints them


def test_readme_block_and_spread_agree():
    rows, spread = expected_output.parse_rows(PRINTED), expected_output.readme_spread(README)
    assert [row.density for row in rows] == ["0.5", "0.1", "0.05", "0.02"] == list(spread)
    for row in rows:
        assert row.sparsity == f"{1 - float(row.density):.4f}"
        # The printed seed-7 row is one of the seeds behind the range, so it lies inside the bare range.
        assert spread[row.density].low <= round(100 * row.test_accuracy, 2) <= spread[row.density].high


def test_the_readme_rows_pass():
    assert expected_output.compare(README, PRINTED) == []
    assert expected_output.compare(README, PRINTED, widen=0.0) == []


def _perturbed(old: str, new: str) -> str:
    assert PRINTED.count(old) == 1, old
    return PRINTED.replace(old, new)


@pytest.mark.parametrize("old, new, message", [
    # Density 0.5 at 90.00 %: below 92.34 - 0.84.
    ("0.5000    0.9234", "0.5000    0.9000", "density 0.5: test acc 90.00 % outside 91.50 – 94.74"),
    # Density 0.02 at 95.60 %: above 95.12 + 0.39.
    ("0.9800    0.9434", "0.9800    0.9560", "density 0.02: test acc 95.60 % outside 93.95 – 95.51"),
    # A run that learned nothing: the zero-shot level.
    ("0.9000    0.9462", "0.9000    0.3000", "density 0.1: test acc 30.00 % outside"),
    ("0.9500    0.9508", "0.9499    0.9508", "density 0.05: sparsity 0.9499 != README's 0.9500"),
])
def test_perturbed_rows_fail(old, new, message):
    problems = expected_output.compare(README, _perturbed(old, new))
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_missing_row_and_missing_table_fail():
    dropped = "\n".join(line for line in PRINTED.splitlines() if "0.02 " not in line)
    assert expected_output.compare(README, dropped) == [
        "densities ['0.5', '0.1', '0.05'] != README's ['0.5', '0.1', '0.05', '0.02']"]
    assert expected_output.compare(README, "error: something broke") == [
        "no results table (a line with 'method  density  sparsity  test acc')"]


def test_a_widened_band_is_only_as_wide_as_asked():
    # 92.00 % at density 0.5: inside 92.34 - 0.84 (widen 1), outside the bare range (widen 0).
    printed = _perturbed("0.5000    0.9234", "0.5000    0.9200")
    assert expected_output.compare(README, printed) == []
    assert expected_output.compare(README, printed, widen=0.0)[0].startswith(
        "density 0.5: test acc 92.00 % outside 92.34 – 93.90")


def test_main_reads_a_finished_workdir(tmp_path, capsys):
    import json

    rows = [{"method": "vpns", "density": float(row.density), "sparsity": float(row.sparsity),
             "test_accuracy": row.test_accuracy, "test_loss": 0.2, "speedup": 2.0, "wall_time_s": 1.0}
            for row in expected_output.parse_rows(PRINTED)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    assert expected_output.main([f"--workdir={tmp_path}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("expected output: ok (4 rows")
    rows[1]["test_accuracy"] = 0.5
    (tmp_path / "results.json").write_text(json.dumps(rows))
    assert expected_output.main([f"--workdir={tmp_path}"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("expected output: mismatch: density 0.1: test acc 50.00 % outside"), last
