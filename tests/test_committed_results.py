"""Every committed results table equals the one rebuilt from the committed per-cell results.

Covered: ``sweep/table.md`` and ``table.csv``; ``ablations/table.md``, ``table.csv``, ``cost.md`` and the total of
``wall_time.txt``; ``maxpool_fix/{sweep,structured,ablations}.md``, whose "after" side is checked against the
cells in the tree and which are rebuilt whole where the git history holds their "before" cells (the runs they
replaced); ``vit/table.md``, ``table.csv``, ``cost.md`` and ``nm/table.md``, ``table.csv``, with both totals of
``wall_time.txt``. ``structured/`` has no table file of its own.
"""

import io
import json
import pathlib
import re
import shutil
import subprocess
import tarfile

import pytest

from experiments import ablations, compare, nm_suite, table, vit_suite

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
# The commits whose experiments/results/<root> cells maxpool_fix/<root>.md compares the tree's against (the
# runs before the max-pool fix): the first sweep and structured runs, and the ablation suite's first run.
BEFORE_FIX = {"sweep": "809d5c47b44940076b233f3a256f8bd16cbfcf34",
              "structured": "809d5c47b44940076b233f3a256f8bd16cbfcf34",
              "ablations": "78f317da6351db0bcfa785aa03ce750636a58719"}
PROVENANCE_KEYS = ("git_commit", "git_dirty", "packages", "machine")


def _manifest(root: pathlib.Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_the_sweep_tables_are_rebuilt_from_its_cells() -> None:
    root = RESULTS / "sweep"
    summary = table.summarize(table.collect(root), _manifest(root)["densities"])
    markdown, csv_text = table.table_files(summary)
    assert (root / "table.md").read_text() == markdown
    assert (root / "table.csv").read_text() == csv_text


@pytest.mark.parametrize("root, variants", [("ablations", ablations.VARIANTS), ("vit", vit_suite.VARIANTS)])
def test_a_suite_report_is_rebuilt_from_its_cells(root, variants) -> None:
    root = RESULTS / root
    manifest = _manifest(root)
    assert manifest["methods"] == list(variants)
    rebuilt = ablations.reports(root, manifest["methods"], manifest["densities"], level=0.9)
    for name, text in rebuilt.items():
        assert (root / name).read_text() == text, f"{name} differs from the one its cells give"


def test_the_nm_tables_are_rebuilt_from_its_cells() -> None:
    root = RESULTS / "nm"
    methods = [name for name in _manifest(root)["methods"] if "_" not in name]
    assert list(nm_suite.variants(methods)) == _manifest(root)["methods"]
    assert (root / "table.md").read_text() == nm_suite.report(root, methods)
    summary = table.summarize(table.collect(root, by_folder=True), nm_suite.DENSITIES,
                              methods=list(nm_suite.variants(methods)))
    assert (root / "table.csv").read_text() == table.format_csv(summary)


@pytest.mark.parametrize("root", ["ablations", "vit", "nm"])
def test_a_suite_wall_time_is_the_sum_of_its_cells(root) -> None:
    root = RESULTS / root
    total = sum(cell["wall_s"] for cell in _manifest(root)["cells"])
    assert (root / "wall_time.txt").read_text().startswith(f"{total:.0f} s ({total / 3600:.2f} h) of cell runs")


def _summary(root: str) -> table.Summary:
    """The summary of the committed cells of ``root`` as ``experiments.compare`` makes it (the ablation
    variants by folder)."""
    folder = RESULTS / root
    return table.summarize(table.collect(folder, by_folder=root == "ablations"), _manifest(folder)["densities"])


@pytest.mark.parametrize("root", ["sweep", "structured", "ablations"])
def test_the_maxpool_fix_tables_compare_against_the_committed_cells(root) -> None:
    """Every row's "after" mean is the committed cell's, in the committed cells' order (the "before" side
    needs the history: the next test)."""
    after = _summary(root)
    expected = [(method, table.sparsity_label(density), f"{after.cells[(method, density)].mean:.2f}")
                for method in after.methods for density in after.densities
                if after.cells.get((method, density)) and after.cells[(method, density)].n]
    rows = [line.split(" | ") for line in (RESULTS / "maxpool_fix" / f"{root}.md").read_text().splitlines()
            if re.match(r"\| [a-z]", line) and not line.startswith("| method ")]
    assert [(row[0].removeprefix("| "), row[1], row[3]) for row in rows] == expected


def _cells_at(commit: str, root: str, into: pathlib.Path) -> pathlib.Path:
    """The manifest and the cells' results.json of experiments/results/<root> at ``commit``, under ``into``;
    skips the test where the git history is not at hand."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    prefix = f"experiments/results/{root}"
    done = subprocess.run(["git", "-C", str(REPO), "archive", commit, "--", f"{prefix}/manifest.json",
                           f"{prefix}/*/seed_*/results.json"], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"commit {commit[:7]} is not in this clone's history")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        # The "data" filter (Python >= 3.11.4): plain files under ``into`` only.
        archive.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return into / prefix


@pytest.mark.parametrize("root", ["sweep", "structured", "ablations"])
def test_the_maxpool_fix_tables_are_rebuilt_from_the_cells_before_and_after(root, tmp_path) -> None:
    before = _cells_at(BEFORE_FIX[root], root, tmp_path)
    old = table.summarize(table.collect(before, by_folder=root == "ablations"), _manifest(before)["densities"])
    rebuilt = compare.format_changes(compare.changes(old, _summary(root)))
    assert (RESULTS / "maxpool_fix" / f"{root}.md").read_text() == rebuilt


@pytest.mark.parametrize("root", ["sweep", "ablations", "structured", "vit", "nm"])
def test_a_manifest_records_what_it_ran_on_or_predates_that(root) -> None:
    """Manifests written before ``measurement.provenance`` lack its keys; a newer one has all of them, well formed."""
    manifest = _manifest(RESULTS / root)
    present = [key for key in PROVENANCE_KEYS if key in manifest]
    if not present:
        return  # an older manifest
    assert present == list(PROVENANCE_KEYS)
    commit = manifest["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert manifest["git_dirty"] in (None, True, False) and (commit is None) == (manifest["git_dirty"] is None)
    assert isinstance(manifest["packages"], dict) and "jax" in manifest["packages"]
    assert {"platform", "cpu_count", "jax_backend", "device_kind"} <= set(manifest["machine"])


@pytest.mark.parametrize("root", ["sweep", "ablations", "structured", "vit", "nm"])
def test_every_cell_of_a_manifest_is_committed_with_its_results(root) -> None:
    cells = _manifest(RESULTS / root)["cells"]
    assert cells
    for cell in cells:
        assert cell["status"] in ("done", "skipped"), cell  # skipped: finished by an earlier invocation
        folder = RESULTS / root / cell["method"] / f"seed_{cell['seed']}"
        assert json.loads((folder / "results.json").read_text()), folder
