"""The TFDS builders: Tiny-ImageNet (folder, zip), Fashion-MNIST (IDX files), scikit-learn digits.

Every dataset is generated in tmp_path, prepared through the real builder with
array_record files and read back without TensorFlow.
"""

from __future__ import annotations

import gzip
import io
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.helpers import (TINY_GRAY, TINY_NAMES, TINY_VAL, TRUNCATED, jpeg_bytes, make_fashion, make_tiny_imagenet,
                           truncate, zip_tree)
from vpns_jax.data import registry
from vpns_jax.data.builders import FashionMnistLocal, SklearnDigits, TinyImagenet
from vpns_jax.data.builders import fashion_mnist_local, sklearn_digits, tiny_imagenet
from vpns_jax.data.idx import read_idx

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
REAL_FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")

def _prepare(builder_cls, data_dir: pathlib.Path, manual_dir: pathlib.Path | None = None):
    builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
    return builder


def _read_split(name: str, data_dir: pathlib.Path, split: str) -> list[dict]:
    version_dir = registry.prepared_dir(registry.get_dataset_spec(name), str(data_dir))
    source = tfds.builder_from_directory(str(version_dir)).as_data_source(split)
    return [source[i] for i in range(len(source))]


def _decode(data: bytes, mode: str | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode) if mode else image)


@pytest.mark.parametrize("layout", ["folder", "zip", "manual_dir_is_the_folder"])
def test_tiny_imagenet_round_trip(tmp_path, layout):
    source_root = tmp_path / "source"
    originals = make_tiny_imagenet(source_root)
    manual = source_root
    if layout == "zip":
        manual = tmp_path / "zipped"
        manual.mkdir()
        zip_tree(source_root / "tiny-imagenet-200", manual / "tiny-imagenet-200.zip")
    elif layout == "manual_dir_is_the_folder":
        manual = source_root / "tiny-imagenet-200"
    data_dir = tmp_path / "data"
    builder = _prepare(TinyImagenet, data_dir, manual)
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {"train": 7, "validation": 3}

    spec = registry.get_dataset_spec("tiny_imagenet")
    read_back = tfds.builder_from_directory(str(registry.prepared_dir(spec, str(data_dir))))
    assert read_back.info.features["label"].names == TINY_NAMES  # from words.txt, in the sorted wnids' order
    assert read_back.info.features["label"].num_classes == 3
    assert str(read_back.info.version) == "1.1.0"
    seen = {}
    for split, expected_names in (("train", {n for n in originals if not n.startswith("val_")}),
                                  ("validation", set(TINY_VAL))):
        examples = _read_split("tiny_imagenet", data_dir, split)
        assert sorted(e["file_name"].decode() for e in examples) == sorted(expected_names)  # Text reads as bytes
        for example in examples:
            name = example["file_name"].decode()
            data, wnid = originals[name]
            assert example["label"] == ["n01", "n02", "n03"].index(wnid), name
            image = example["image"]
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8, name
            expected = _decode(data, "RGB") if name == TINY_GRAY else _decode(data)
            assert expected.shape == (64, 64, 3)
            np.testing.assert_array_equal(image, expected, err_msg=name)
            seen[name] = image
    assert len(seen) == 10
    # Stored bytes: the original JPEG for RGB images, a PNG only for the grayscale one (TFDS's own
    # decoder would also widen a grayscale JPEG, but other decoders need not).
    raw = tfds.builder_from_directory(str(builder.data_dir)).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})
    stored = {e["file_name"].decode(): e["image"] for e in (raw[i] for i in range(len(raw)))}
    for name, data in stored.items():
        if name == TINY_GRAY:
            assert data.startswith(b"\x89PNG") and _decode(data).shape == (64, 64, 3)
        else:
            assert data == originals[name][0], name
    gray = seen[TINY_GRAY]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert gray.std() > 10  # a real image, not a constant


def test_tiny_imagenet_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"Tiny-ImageNet not found.*empty.*--manual_dir"):
        _prepare(TinyImagenet, tmp_path / "d1", empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"Tiny-ImageNet not found in .*empty.*tiny-imagenet-200.zip"):
        _prepare(TinyImagenet, tmp_path / "d2", empty)

    make_tiny_imagenet(tmp_path / "src")
    tree = tmp_path / "src" / "tiny-imagenet-200"
    (tree / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/images/val_1.JPEG is missing"):
        _prepare(TinyImagenet, tmp_path / "d3", tmp_path / "src")
    (tree / "val" / "images" / "val_1.JPEG").write_bytes(jpeg_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"val_1.JPEG: image of size \(32, 32\)"):
        _prepare(TinyImagenet, tmp_path / "d4", tmp_path / "src")
    for d in ("d1", "d2", "d3", "d4"):  # nothing half-prepared is left to be mistaken for a dataset
        assert not list((tmp_path / d).glob("tiny_imagenet/*/dataset_info.json"))


def _assert_same_examples(examples: list[dict], images: np.ndarray, labels: np.ndarray) -> None:
    """The decoded examples are exactly (image, label) of the source, each once, in any order."""
    index = {image.tobytes(): i for i, image in enumerate(images)}
    assert len(index) == len(images) == len(examples)
    found = []
    for example in examples:
        assert example["image"].shape == (*images.shape[1:], 1) and example["image"].dtype == np.uint8
        i = index[example["image"][..., 0].tobytes()]
        assert example["label"] == labels[i]
        found.append(i)
    assert sorted(found) == list(range(len(images)))


def test_fashion_round_trip_and_features(tmp_path):
    data = make_fashion(tmp_path / "idx")
    builder = _prepare(FashionMnistLocal, tmp_path / "data", tmp_path / "idx")
    info = tfds.builder_from_directory(str(builder.data_dir)).info
    assert info.features["label"].names == FASHION_NAMES
    assert info.features["image"].shape == (28, 28, 1)
    assert tuple(info.supervised_keys) == ("image", "label")
    assert {s: info.splits[s].num_examples for s in info.splits} == {"train": 12, "test": 5}
    for split in ("train", "test"):
        _assert_same_examples(_read_split("fashion_mnist", tmp_path / "data", split), *data[split])


def test_fashion_default_source_dir_is_used_without_manual_files(tmp_path, monkeypatch):
    data = make_fashion(tmp_path / "default", n_train=3, n_test=2)
    monkeypatch.setattr(fashion_mnist_local, "DEFAULT_SOURCE_DIR", tmp_path / "default")
    manual = tmp_path / "data" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "tiny-imagenet-200.zip").write_bytes(b"not fashion")  # another dataset's files: ignored
    _prepare(FashionMnistLocal, tmp_path / "data")  # TFDS's default manual dir, no Fashion files there
    _assert_same_examples(_read_split("fashion_mnist", tmp_path / "data", "test"), *data["test"])
    assert fashion_mnist_local.find_source_dir(manual) == tmp_path / "default"
    assert fashion_mnist_local.find_source_dir(tmp_path / "default") == tmp_path / "default"
    monkeypatch.setattr(fashion_mnist_local, "DEFAULT_SOURCE_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"not found in .*manual nor in .*nowhere.*dataset-fashion-mnist"):
        fashion_mnist_local.find_source_dir(manual)


def test_fashion_truncated_or_missing_file_is_a_clear_error(tmp_path):
    make_fashion(tmp_path / "idx")
    path = tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(raw[:-2])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: IDX payload has 3 bytes.*truncated"):
        _prepare(FashionMnistLocal, tmp_path / "data", tmp_path / "idx")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.gz is missing.*--manual_dir"):
        _prepare(FashionMnistLocal, tmp_path / "data", tmp_path / "idx")
    assert not list((tmp_path / "data").glob("fashion_mnist_local/*/dataset_info.json"))


@pytest.mark.slow  # prepares the real Fashion-MNIST (the session fixture)
@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(fashion_data_dir):
    """The session's full preparation from Debian's files (tests/conftest.py), checked example by example."""
    version_dir = registry.prepared_dir(registry.get_dataset_spec("fashion_mnist"), fashion_data_dir)
    builder = tfds.builder_from_directory(str(version_dir))
    assert builder.info.splits["train"].num_examples == 60000
    assert builder.info.splits["test"].num_examples == 10000
    images = read_idx(REAL_FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(REAL_FASHION / "train-labels-idx1-ubyte.gz")
    source = builder.as_data_source("train")
    decoded = {}
    for example in source.__getitems__(range(len(source))):
        decoded.setdefault(example["image"].tobytes(), []).append(int(example["label"]))
    assert int(labels[0]) == 9  # the first Fashion-MNIST image is an ankle boot
    assert decoded[images[0][..., None].tobytes()].count(9) >= 1
    expected = {}
    for image, label in zip(images, labels):
        expected.setdefault(image[..., None].tobytes(), []).append(int(label))
    assert {k: sorted(v) for k, v in decoded.items()} == {k: sorted(v) for k, v in expected.items()}


def test_digits_split_and_scaling(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    builder = _prepare(SklearnDigits, tmp_path / "data")
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {"train": 1437, "test": 360}
    index = {np.round(image * 255 / 16).astype(np.uint8).tobytes(): i for i, image in enumerate(digits.images)}
    assert len(index) == 1797
    found = {}
    for split in ("train", "test"):
        found[split] = []
        for example in _read_split("digits", tmp_path / "data", split):
            assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
            i = index[example["image"][..., 0].tobytes()]
            assert example["label"] == digits.target[i]
            found[split].append(i)
    assert not set(found["train"]) & set(found["test"])
    assert sorted(found["train"] + found["test"]) == list(range(1797))
    permutation = np.random.default_rng(0).permutation(1797)
    assert sorted(found["test"]) == sorted(permutation[:360].tolist())
    # digits.images[0] is a zero whose first row is 0 0 5 13 9 1 0 0 (of 16).
    zero = [e for e in _read_split("digits", tmp_path / "data", "train" if 0 in found["train"] else "test")
            if e["image"][0, :, 0].tolist() == [0, 0, 80, 207, 143, 16, 0, 0]]
    assert len(zero) == 1 and zero[0]["label"] == 0
    np.testing.assert_array_equal(zero[0]["image"][..., 0], [[round(v * 255 / 16) for v in row]
                                                            for row in digits.images[0]])
    assert sklearn_digits.to_uint8(np.array([0.0, 1.0, 8.0, 15.0, 16.0]))[..., 0].tolist() == [0, 16, 128, 239, 255]


@pytest.mark.parametrize("zipped", [False, True])
def test_tiny_imagenet_truncated_jpeg_names_the_file(tmp_path, zipped):
    make_tiny_imagenet(tmp_path / "src")
    truncate(tmp_path / "src" / "tiny-imagenet-200" / TRUNCATED)
    manual = tmp_path / "src"
    if zipped:
        manual = tmp_path / "zipped"
        manual.mkdir()
        zip_tree(tmp_path / "src" / "tiny-imagenet-200", manual / "tiny-imagenet-200.zip")
    where = (f"{manual / 'tiny-imagenet-200.zip'}:tiny-imagenet-200/{TRUNCATED}" if zipped
             else str(tmp_path / "src" / "tiny-imagenet-200" / TRUNCATED))
    with pytest.raises(ValueError) as error:
        _prepare(TinyImagenet, tmp_path / "data", manual)
    message = str(error.value)
    assert message.startswith(f"{where}: not a readable image (image file is truncated"), message
    assert message.endswith("); replace it with an intact copy or delete it, then run the same prepare command again")
    assert "\n" not in message
    assert not list((tmp_path / "data").glob("tiny_imagenet/*/dataset_info.json"))


def test_broken_val_image_fix_names_its_annotation_line():
    data = jpeg_bytes(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError) as error:
        tiny_imagenet.image_for_storage(data[: len(data) // 2], "copy/val/images/val_7.JPEG")
    message = str(error.value)
    assert message.startswith("copy/val/images/val_7.JPEG: not a readable image (image file is truncated ("), message
    assert message.endswith("); replace it with an intact copy or delete it and its line in val/val_annotations.txt, "
                            "then run the same prepare command again")
    with pytest.raises(ValueError, match=r"^x.JPEG: not a readable image \(cannot identify image file"):
        tiny_imagenet.image_for_storage(b"not an image", "x.JPEG")
    assert tiny_imagenet.image_for_storage(data, "ok.JPEG") == data  # an intact RGB JPEG is stored as it is


def test_tiny_imagenet_class_names_need_words_txt(tmp_path):
    make_tiny_imagenet(tmp_path / "src")
    words = tmp_path / "src" / "tiny-imagenet-200" / "words.txt"
    words.write_text("n01\tgoldfish\nn03\tcrane\n")  # no line for n02
    with pytest.raises(ValueError, match=r"words.txt: no name for 1 wnid\(s\) of wnids.txt, e.g. n02; re-download"):
        _prepare(TinyImagenet, tmp_path / "d1", tmp_path / "src")
    words.unlink()
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200/words.txt is missing: the copy is incomplete"):
        _prepare(TinyImagenet, tmp_path / "d2", tmp_path / "src")
