"""python -m vpns_jax.predict on image files, against Subnetwork.predict on the evaluation pipeline's view."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import helpers
from vpns_jax import predict
from vpns_jax.core import masking
from vpns_jax.io import export, subnetwork
from vpns_jax.data import transforms

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["cat", "ship", "truck", "plane"]
# Random deep nets tend to give every input the same class; with this seed the three test images get
# source classes 2, 0 and 6, which this map sends to three different target classes.
SEED, LABEL_MAP = 7, [2, 0, 6, 9]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    _, weights, batch_stats, scores, prompt = helpers.random_model("cifar", seed=SEED)
    masks = masking.masks_from_scores(scores, jnp.asarray(masking.prune_counts(scores, 0.5)))
    path = folder / "subnetwork.npz"
    export.export_subnetwork(
        path, model_name="resnet18", num_classes=10, width=helpers.WIDTH, stem="cifar", weights=weights,
        batch_stats=batch_stats, masks=masks, prompt_spec=helpers.SPEC, prompt=prompt,
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


def test_cli_prints_the_subnetworks_predictions(exported, tmp_path):
    path, files = exported
    # A 16-bit greyscale PNG rides along (same compiles, one more row): it must be predicted on its high bytes.
    wide = np.random.default_rng(3).integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    files = [*files, str(tmp_path / "wide.png")]
    result = _run(f"--subnetwork={path}", *files)
    assert result.returncode == 0, result.stderr
    sub = subnetwork.load_subnetwork(path)
    views = [transforms.clean_view(np.asarray(Image.open(f).convert("RGB")), 32) for f in files[:3]]
    views = np.stack([*views, transforms.clean_view((wide // 256).astype(np.uint8), 32)])
    classes = sub.predict(views)
    probabilities = sub.probabilities(views)
    assert len(set(classes.tolist())) >= 2  # the comparison below can tell images apart
    lines = result.stdout.splitlines()
    assert len(lines) == 4
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
    sub = subnetwork.load_subnetwork(path)
    export.export_subnetwork(
        tmp_path / "plain.npz", model_name="resnet18", num_classes=10, width=helpers.WIDTH, stem="cifar",
        weights=sub.weights, batch_stats=sub.batch_stats, masks=sub.masks, prompt_spec=sub.prompt_spec,
        prompt=sub.prompt, label_map=sub.label_map, eval_with_prompt=True,
    )
    assert predict.main([f"--subnetwork={tmp_path / 'plain.npz'}", "--batch_size=2", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == ["-", "-", "-"]
    views = np.stack([transforms.clean_view(np.asarray(Image.open(f).convert("RGB")), 32) for f in files])
    assert [int(line.split("\t")[1]) for line in lines] == sub.predict(views).tolist()


# Every 16-bit value once; its 8-bit reading is the high byte (value >> 8), written as // 256 here.
GRADIENT = np.arange(65536, dtype=np.uint16).reshape(256, 256)


def _save(folder, name, image):
    image.save(folder / name)
    return str(folder / name)


def _sixteen_bit_files(folder):
    """(file, the mode PIL opens it in) holding GRADIENT, one per 16-bit greyscale mode."""
    little = Image.frombytes("I;16L", GRADIENT.shape[::-1], GRADIENT.astype("<u2").tobytes())
    return [
        # Older Pillow versions open 16-bit greyscale PNGs in mode I.
        (_save(folder, "grey16.png", Image.fromarray(GRADIENT)), ("I;16", "I")),
        (_save(folder, "big16.tif", Image.fromarray(GRADIENT.astype(">u2"))), ("I;16B",)),
        (_save(folder, "little16.im", little), ("I;16L",)),
        (_save(folder, "grey16.pgm", Image.fromarray(GRADIENT)), ("I",)),  # mode I holding 16-bit data
    ]


def test_sixteen_bit_images_keep_their_high_byte(tmp_path):
    expected = np.repeat((GRADIENT // 256).astype(np.uint8)[..., None], 3, axis=-1)
    for file, modes in _sixteen_bit_files(tmp_path):
        assert Image.open(file).mode in modes, file
        # convert("RGB") clipped these at 255: every value from 255 up turned white.
        assert np.array_equal(predict.load_pixels(file), expected), file
    # The loader is what predict reads through: the view at the image's own size is these pixels over 255.
    assert np.array_equal(predict.read_image(file, 256), transforms.clean_view(expected, 256))


def test_float_images_in_0_1_are_scaled_to_255(tmp_path):
    values = np.array([[0, 1, 0.5, 1 / 255, 0.2, 0.7 / 255]], dtype=np.float32)
    file = _save(tmp_path, "unit.tif", Image.fromarray(values))
    assert Image.open(file).mode == "F"
    assert predict.load_pixels(file)[..., 0].tolist() == [[0, 255, 128, 1, 51, 1]]  # round(255 x), halves up
    ramp = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 100)
    file = _save(tmp_path, "ramp.tif", Image.fromarray(ramp))
    assert np.array_equal(predict.load_pixels(file)[..., 1], np.floor(ramp.astype(np.float64) * 255 + 0.5))


def test_other_modes_go_through_pils_convert(tmp_path):
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), mode="RGBA")
    files = [
        _save(tmp_path, "bits.png", rgba.convert("1")), _save(tmp_path, "grey_alpha.png", rgba.convert("LA")),
        _save(tmp_path, "palette.png", rgba.convert("P")), _save(tmp_path, "rgba.png", rgba),
        _save(tmp_path, "cmyk.tif", rgba.convert("CMYK")),
    ]
    for file, mode in zip(files, ["1", "LA", "P", "RGBA", "CMYK"]):
        assert Image.open(file).mode == mode
        assert np.array_equal(predict.load_pixels(file), np.asarray(Image.open(file).convert("RGB"))), file


def _refused_files(folder):
    """(file, the end of its one-line error): float images beyond [0, 1] and 32-bit integer ones."""
    floats = np.arange(12, dtype=np.float32).reshape(3, 4) / 16  # short, exact decimals
    integers = GRADIENT[:3, :4].astype(np.int32)
    over, under, nan, wide, negative = floats.copy(), floats.copy(), floats.copy(), integers.copy(), integers.copy()
    over[1, 1], under[0, 2], nan[2, 3], wide[0, 0], negative[2, 2] = 2, -0.5, np.nan, 70000, -1
    refusal = "not all in [{}]: save it as 8-bit RGB first"
    return [
        (_save(folder, "over.tif", Image.fromarray(over)),
         "has mode F (32-bit float) with values from 0.0 to 2.0, " + refusal.format("0, 1")),
        (_save(folder, "under.tif", Image.fromarray(under)),
         "has mode F (32-bit float) with values from -0.5 to 0.6875, " + refusal.format("0, 1")),
        (_save(folder, "nan.tif", Image.fromarray(nan)),
         "has mode F (32-bit float) with values from 0.0 to 0.625 and NaN, " + refusal.format("0, 1")),
        (_save(folder, "int32.tif", Image.fromarray(wide)),
         "has mode I (32-bit integer) with values from 1 to 70000, " + refusal.format("0, 65535")),
        (_save(folder, "negative.tif", Image.fromarray(negative)),
         "has mode I (32-bit integer) with values from -1 to 515, " + refusal.format("0, 65535")),
    ]


def test_float_and_32_bit_images_are_refused(exported, tmp_path, capsys):
    path, files = exported
    for file, ending in _refused_files(tmp_path):
        with pytest.raises(predict.InputError) as error:
            predict.load_pixels(file)
        assert str(error.value) == f"image {file} {ending}"
        # End to end: a good image first, yet nothing is printed; the refusal is the one line, status 2.
        assert predict.main([f"--subnetwork={path}", files[0], file]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines() == [f"error: image {file} {ending}"]
