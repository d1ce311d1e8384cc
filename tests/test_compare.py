import json
import pathlib

from experiments import compare


def _cell(root: pathlib.Path, method: str, seed: int, accuracies: dict[float, float]) -> None:
    folder = root / method / f"seed_{seed}"
    folder.mkdir(parents=True)
    rows = [{"method": method, "density": d, "test_accuracy": a} for d, a in accuracies.items()]
    (folder / "results.json").write_text(json.dumps(rows))


def test_changes_are_paired_by_seed_and_the_largest_are_named(tmp_path, capsys) -> None:
    before, after = tmp_path / "before", tmp_path / "after"
    _cell(before, "vpns", 7, {0.5: 0.90, 0.1: 0.95})
    _cell(before, "vpns", 9, {0.5: 0.92, 0.1: 0.95})
    _cell(before, "hydra", 7, {0.5: 0.80, 0.1: 0.85})
    _cell(after, "vpns", 7, {0.5: 0.91, 0.1: 0.95})
    _cell(after, "vpns", 9, {0.5: 0.925, 0.1: 0.95})
    _cell(after, "hydra", 7, {0.5: 0.78, 0.1: 0.85})
    _cell(after, "omp", 7, {0.5: 0.70, 0.1: 0.70})  # not in before: left out
    out = tmp_path / "changes.md"
    assert compare.main([f"--before={before}", f"--after={after}", "--densities=0.5,0.1", f"--out={out}"]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    lines = text.splitlines()
    # vpns at 50 %: seeds 7 and 9 moved +1.0 and +0.5 -> mean +0.75; the largest seed change is +1.00.
    vpns_50 = next(line for line in lines if line.startswith("| vpns | 50 |"))
    assert vpns_50.startswith("| vpns | 50 | 91.00 | 91.75 | +0.75 [")
    assert vpns_50.endswith("| +1.00 |")
    assert "| vpns | 90 | 95.00 | 95.00 | +0.00 [+0.00, +0.00] p=1 n.s. | +0.00 |" in lines
    assert "| hydra | 50 | 80.00 | 78.00 | -2.00 n.s. | -2.00 |" in lines
    assert not any(line.startswith("| omp") for line in lines)
    assert lines[-1] == ("Largest change of a cell's mean: -2.00 points (hydra at 50 % sparsity); of one seed: -2.00 "
                         "(hydra at 50 %). Significant at 5 %: 0 of 4 cells.")


def test_an_empty_root_is_a_one_line_error(tmp_path, capsys) -> None:
    _cell(tmp_path / "after", "vpns", 7, {0.5: 0.9})
    (tmp_path / "before").mkdir()
    assert compare.main([f"--before={tmp_path / 'before'}", f"--after={tmp_path / 'after'}"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--before=" in err
