"""python -m vpns_jax.predict on image files, against Subnetwork.predict on the evaluation pipeline's view."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import test_export
from vpns_jax import predict
from vpns_jax.core import masking
from vpns_jax.io import export
from vpns_jax.data import transforms

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["cat", "ship", "truck", "plane"]
# Random deep nets tend to give every input the same class; with this seed the three test images get
# source classes 2, 0 and 6, which this map sends to three different target classes.
SEED, LABEL_MAP = 7, [2, 0, 6, 9]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    _, weights, batch_stats, scores, prompt = test_export.random_model("cifar", seed=SEED)
    masks = masking.masks_from_scores(scores, jnp.asarray(masking.prune_counts(scores, 0.5)))
    path = folder / "subnetwork.npz"
    export.export_subnetwork(
        path, model_name="resnet18", num_classes=10, width=test_export.WIDTH, stem="cifar", weights=weights,
        batch_stats=batch_stats, masks=masks, prompt_spec=test_export.SPEC, prompt=prompt,
        label_map=LABEL_MAP, eval_with_prompt=True, class_names=NAMES,
    )
    rng = np.random.default_rng(7)
    images = [
        ("colour.png", Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))),  # resized to 32x32
        ("photo.jpg", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))),
        ("grey.png", Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L")),  # converted to RGB
    ]
    files = []
    for name, image in images:
        image.save(folder / name)
        files.append(str(folder / name))
    return path, files


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vpns_jax.predict", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300, cwd=ROOT)


def test_cli_prints_the_subnetworks_predictions(exported):
    path, files = exported
    result = _run(f"--subnetwork={path}", *files)
    assert result.returncode == 0, result.stderr
    sub = export.load_subnetwork(path)
    views = np.stack([transforms.clean_view(np.asarray(Image.open(f).convert("RGB")), 32) for f in files])
    classes = sub.predict(views)
    probabilities = sub.probabilities(views)
    assert len(set(classes.tolist())) >= 2  # the comparison below can tell images apart
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line, file, index, row in zip(lines, files, classes, probabilities):
        printed_path, printed_index, printed_name, printed_probability = line.split("\t")
        assert (printed_path, int(printed_index), printed_name) == (file, int(index), NAMES[index])
        assert float(printed_probability) == pytest.approx(row.max(), abs=2e-6)
    # The greyscale and non-square files went through PIL exactly as the evaluation reads images.
    assert views[2].shape == (32, 32, 3) and np.array_equal(views[2][..., 0], views[2][..., 2])


def test_missing_image_is_a_one_line_error(exported, tmp_path):
    path, files = exported
    result = _run(f"--subnetwork={path}", files[0], str(tmp_path / "absent.png"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: image {tmp_path / 'absent.png'} does not exist"]


def test_bad_inputs_are_one_line_errors(exported, tmp_path, capsys):
    path, files = exported
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "broken.npz").write_bytes(path.read_bytes()[:1000])
    cases = [
        ([f"--subnetwork={path}", str(tmp_path / "text.png")], "cannot be read as an image"),
        ([f"--subnetwork={tmp_path / 'absent.npz'}", files[0]], "subnetwork file"),
        ([f"--subnetwork={tmp_path / 'broken.npz'}", files[0]], "not a readable vpns_jax subnetwork export"),
    ]
    for argv, fragment in cases:
        assert predict.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert predict.main([f"--subnetwork={path}", "--verbose", str(tmp_path / "text.png")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_without_class_names_prints_a_dash(exported, tmp_path, capsys):
    path, files = exported
    sub = export.load_subnetwork(path)
    export.export_subnetwork(
        tmp_path / "plain.npz", model_name="resnet18", num_classes=10, width=test_export.WIDTH, stem="cifar",
        weights=sub.weights, batch_stats=sub.batch_stats, masks=sub.masks, prompt_spec=sub.prompt_spec,
        prompt=sub.prompt, label_map=sub.label_map, eval_with_prompt=True,
    )
    assert predict.main([f"--subnetwork={tmp_path / 'plain.npz'}", "--batch_size=2", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == ["-", "-", "-"]
    views = np.stack([transforms.clean_view(np.asarray(Image.open(f).convert("RGB")), 32) for f in files])
    assert [int(line.split("\t")[1]) for line in lines] == sub.predict(views).tolist()
