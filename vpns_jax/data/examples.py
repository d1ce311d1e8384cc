"""Pixels of one view of a source's examples: the unit of work of the loader threads and worker processes.

A view is torchvision's test or training transform (``transforms.py``) up to, not including, ``ToTensor``'s scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vpns_jax.data import transforms

PAD_LABEL = -1  # the label of the padding rows of an evaluation stream's last batch


def load_pixels(source: Sequence[dict[str, Any]], indices: np.ndarray, *, view: str, image_size: int, seed: int,
                stream: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels (n, S, S, 3) and int32 labels of one view of the examples at ``indices`` (-1: a padding row,
    black with label -1). Augmentation draws are seeded by (seed, stream, epoch, example index), so the pixels do
    not depend on which thread or process builds them."""
    images = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
    labels = np.full(len(indices), PAD_LABEL, np.int32)
    rows = [row for row, index in enumerate(indices) if index >= 0]
    for row, record in zip(rows, read_examples(source, [int(indices[row]) for row in rows])):
        index = int(indices[row])
        if view == "clean":
            images[row] = transforms.clean_pixels(record["image"], image_size)
        else:
            rng = np.random.default_rng((seed, stream, epoch, index))
            images[row] = transforms.augmented_pixels(record["image"], image_size, rng)
        labels[row] = int(record["label"])
    return images, labels


def read_examples(source: Sequence[dict[str, Any]], indices: list[int]) -> Sequence[dict[str, Any]]:
    """The examples at ``indices``, in one batched read where the source has ``__getitems__`` (TFDS's array_record
    sources read a batch several times faster than one example at a time)."""
    if hasattr(source, "__getitems__"):
        try:
            return source.__getitems__(indices)
        except TypeError:  # tfds.testing.mock_data patches in an unbound __getitems__; a real error recurs below
            pass
    return [source[index] for index in indices]
