"""Results pinned to the code: a few cases of ``experiments/method_parity.py`` rerun against the committed
fingerprints (``docs/measurements/fingerprints.json``), so that a change nobody meant to move a result fails here.

A change meant to move results regenerates the file in the same commit and says why in its message:
``python -m experiments.method_parity --out=docs/measurements/fingerprints.json``. The fingerprints are bit-level
(SHA-256 of masks, weights, prompt, label map), so they hold on the CPU, jaxlib and core count that wrote them
(the file's ``machine`` and ``packages``).
"""

import json
import pathlib

import pytest

from experiments import measurement, method_parity

pytestmark = pytest.mark.slow

PINNED = pathlib.Path(__file__).resolve().parents[1] / "docs" / "measurements" / "fingerprints.json"
# The first pretrains the source model the others start from, as in the committed run; between them they take the
# score-learning stages with the prompt, a one-shot method with its dense finetune, and channel masks.
CASES = ("vpns", "omp", "vpns_channel")


@pytest.fixture(scope="module")
def reruns(fashion_data_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fingerprints")
    return {name: method_parity.run_case(name, root, fashion_data_dir) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_a_short_run_reproduces_its_pinned_fingerprint(reruns, name):
    pinned = json.loads(PINNED.read_text())
    recorded, here = pinned["machine"].get("cpu"), measurement.cpu_model()
    where = "" if recorded == here else f"; they were recorded on another CPU ({recorded}; this is {here}), and " \
        "results can move in the last bits from one CPU to another, so regenerate them on this machine and say so"
    assert reruns[name]["units"] == pinned["cases"][name]["units"], (
        f"case {name!r} no longer gives its pinned results (commit {pinned['commit'][:10]}){where}: if this change "
        "is meant to move them, regenerate docs/measurements/fingerprints.json and say why in the commit")
