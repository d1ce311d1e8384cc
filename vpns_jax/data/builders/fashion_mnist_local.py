"""TFDS builder ``fashion_mnist_local``: the real Fashion-MNIST, prepared offline from IDX files.

The four gzipped IDX files of Debian's ``dataset-fashion-mnist`` are read from the TFDS manual dir when it holds any
of them, else from ``DEFAULT_SOURCE_DIR``. Features, supervised keys and splits are TFDS ``fashion_mnist``'s (train
60,000, test 10,000); images are stored as lossless PNG.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vpns_jax.data.idx import read_idx

DEFAULT_SOURCE_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# split -> (images file, labels file)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FIX = "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --manual_dir=FOLDER"


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) array, or of a PIL image."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"encode_png needs uint8 pixels, got {image.dtype}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def has_source_files(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds at least one of the four Fashion-MNIST IDX files."""
    return any((folder / name).is_file() for pair in FILES.values() for name in pair)


def find_source_dir(manual_dir: pathlib.Path | None) -> pathlib.Path:
    """The folder to read: ``manual_dir`` if it holds any of the files, else :data:`DEFAULT_SOURCE_DIR`."""
    if manual_dir is not None and has_source_files(manual_dir):
        return manual_dir
    if DEFAULT_SOURCE_DIR.is_dir():
        return DEFAULT_SOURCE_DIR
    where = f"{manual_dir} nor in {DEFAULT_SOURCE_DIR}" if manual_dir is not None else str(DEFAULT_SOURCE_DIR)
    raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {where}: {_FIX}")


def load_split(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 28, 28) uint8 images and (N,) labels of ``split`` ('train' or 'test'), validated."""
    images_name, labels_name = FILES[split]
    for name in (images_name, labels_name):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {folder / name} is missing: {_FIX}")
    images = read_idx(folder / images_name)
    labels = read_idx(folder / labels_name)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder / images_name}: expected uint8 images of shape (N, 28, 28), "
                         f"got {images.dtype} {images.shape}; re-download or reinstall the file")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{folder / labels_name}: expected {len(images)} labels (one per image), "
                         f"got shape {labels.shape}; re-download or reinstall the file")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{folder / labels_name}: labels outside 0..{len(CLASS_NAMES) - 1}; "
                         "re-download or reinstall the file")
    return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files (Debian's dataset-fashion-mnist or a manual folder)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: TFDS fashion_mnist features, from local IDX files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        f"t10k-labels-idx1-ubyte.gz in the manual dir; without them the files are read from {DEFAULT_SOURCE_DIR} "
        "(apt-get install dataset-fashion-mnist)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        """The features of TFDS's fashion_mnist."""
        return self.dataset_info_from_configs(
            description="Fashion-MNIST (Zalando), prepared from local IDX files.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """Finds and validates all four files before any example is written."""
        try:
            manual_dir = pathlib.Path(dl_manager.manual_dir)
        except AssertionError:  # the manual dir does not exist or is empty
            manual_dir = None
        folder = find_source_dir(manual_dir)
        data = {split: load_split(folder, split) for split in FILES}
        return {split: self._generate_examples(*data[split]) for split in FILES}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
        """(index in the IDX file, {image: PNG bytes, label}) pairs."""
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": encode_png(image), "label": int(label)}
