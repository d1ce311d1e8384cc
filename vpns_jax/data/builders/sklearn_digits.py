"""TFDS builder ``sklearn_digits``: scikit-learn's bundled 8x8 handwritten digits, offline.

Each of the 1,797 images (values 0..16) is stored as a uint8 (8, 8, 1) PNG of ``round(v * 255 / 16)``. The data
has no official split: the first 360 indices of ``default_rng(0).permutation(1797)`` are ``test``, the other 1,437
``train``; example keys index ``load_digits()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from vpns_jax.data.builders.fashion_mnist_local import encode_png

NUM_EXAMPLES = 1797
NUM_TEST = 360
SEED = 0


def split_indices() -> dict[str, np.ndarray]:
    """The indices into ``load_digits()`` of each split: {'train': 1,437, 'test': 360}."""
    permutation = np.random.default_rng(SEED).permutation(NUM_EXAMPLES)
    return {"train": permutation[NUM_TEST:], "test": permutation[:NUM_TEST]}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Digits values 0..16 -> uint8 0..255 as round(v * 255 / 16), with a trailing channel axis."""
    return np.round(np.asarray(images, np.float64) * 255.0 / 16.0).astype(np.uint8)[..., None]


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits (8x8 grayscale, 10 classes) with a fixed 1,437 / 360 train/test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: load_digits, rng(0) split of 1,437 train / 360 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        """(8, 8, 1) uint8 PNG images, 10 classes."""
        return self.dataset_info_from_configs(
            description="scikit-learn's load_digits (UCI optical digits, 8x8), scaled to 0..255.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """Loads the bundled data once (no download) and splits it."""
        from sklearn.datasets import load_digits  # heavy import, only when preparing

        digits = load_digits()
        images, labels = to_uint8(digits.images), np.asarray(digits.target)
        if images.shape != (NUM_EXAMPLES, 8, 8, 1):
            raise ValueError(f"load_digits returned images of shape {digits.images.shape}, "
                             f"expected ({NUM_EXAMPLES}, 8, 8): incompatible scikit-learn")
        return {split: self._generate_examples(images, labels, indices)
                for split, indices in split_indices().items()}

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        """(index into load_digits, {image: PNG bytes, label}) pairs."""
        for index in indices:
            yield int(index), {"image": encode_png(images[index]), "label": int(labels[index])}
