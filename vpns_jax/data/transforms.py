"""Per-image transforms with torchvision's semantics, on uint8 numpy images through PIL.

The authors' pipeline (docs/method.md, section 2.1) resizes the whole image to a
square with PIL's antialiased bilinear filter (``Resize((s, s))``), and for
training first to 9/8 of the size, then ``RandomCrop`` and
``RandomHorizontalFlip``; ``ToTensor`` maps uint8 to [0, 1]. Normalisation is
not done here: it happens at the prompt or the model input. The ``*_pixels``
functions stop before ``ToTensor`` (uint8, a quarter of the bytes to move
between processes); the pipeline scales whole batches. Doing the resize in
PIL on uint8, as torchvision does, keeps CIFAR's 32 -> 252 upsampling
bit-identical to the reference.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 -> (H, W, 3) uint8; grey is replicated like PIL's convert('RGB')."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``Resize((size, size))`` of an RGB uint8 image: PIL bilinear with antialiasing."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def augmented_size(size: int) -> int:
    """The pre-crop size of the training view: 9/8 of ``size`` (252 for 224, 36 for 32)."""
    return int(round(size * 9 / 8))


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision ``RandomCrop(size)``: top-left corner uniform over every valid position."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top : top + size, left : left + size]


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """torchvision ``RandomHorizontalFlip()``: mirror left-right with probability 0.5."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def to_float(image: np.ndarray) -> np.ndarray:
    """``ToTensor``'s scaling: uint8 -> float32 in [0, 1] (layout stays HWC)."""
    return image.astype(np.float32) / 255.0


def clean_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """The test-transform view's uint8 pixels (also the prompted training stream's): RGB, resized."""
    return resize_square(to_rgb(image), size)


def augmented_pixels(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The training-transform view's uint8 pixels: resize to 9/8 of ``size``, random crop, random flip."""
    image = resize_square(to_rgb(image), augmented_size(size))
    return random_horizontal_flip(random_crop(image, size, rng), rng)


def clean_view(image: np.ndarray, size: int) -> np.ndarray:
    """The test-transform view: resize, then scale to [0, 1]."""
    return to_float(clean_pixels(image, size))


def augmented_view(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The training-transform view: resize to 9/8 of ``size``, random crop, random flip, scale to [0, 1]."""
    return to_float(augmented_pixels(image, size, rng))
