"""Every committed results table equals the one rebuilt from the committed per-cell results."""

import json
import pathlib

import pytest

from experiments import ablations, table

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "results"


def _manifest(root: pathlib.Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_the_sweep_tables_are_rebuilt_from_its_cells() -> None:
    root = RESULTS / "sweep"
    summary = table.summarize(table.collect(root), _manifest(root)["densities"])
    markdown, csv_text = table.table_files(summary)
    assert (root / "table.md").read_text() == markdown
    assert (root / "table.csv").read_text() == csv_text


def test_the_ablation_reports_are_rebuilt_from_its_cells() -> None:
    root = RESULTS / "ablations"
    manifest = _manifest(root)
    assert manifest["methods"] == list(ablations.VARIANTS)
    rebuilt = ablations.reports(root, manifest["methods"], manifest["densities"], level=0.9)
    for name, text in rebuilt.items():
        assert (root / name).read_text() == text, f"{name} differs from the one its cells give"


@pytest.mark.parametrize("root", ["sweep", "ablations", "structured"])
def test_every_cell_of_a_manifest_is_committed_with_its_results(root) -> None:
    cells = _manifest(RESULTS / root)["cells"]
    assert cells
    for cell in cells:
        assert cell["status"] in ("done", "skipped"), cell  # skipped: finished by an earlier invocation
        folder = RESULTS / root / cell["method"] / f"seed_{cell['seed']}"
        assert json.loads((folder / "results.json").read_text()), folder
