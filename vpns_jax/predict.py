"""Classify image files with an exported subnetwork:

    python -m vpns_jax.predict --subnetwork=WORKDIR/subnetworks/density_0.1/subnetwork.npz IMAGE [IMAGE ...]

Each image is read with PIL, converted to 8-bit RGB and made into model input
exactly as the evaluation pipeline does (``transforms.clean_view`` at the
prompt's input size). Prints one tab-separated line per file: path, predicted
class index, class name ('-' when the export has none) and the probability of
that class. Errors (a missing, unreadable or refused image, a bad subnetwork
file) are one line on stderr with exit status 2; ``--verbose`` adds the
traceback.

Images wider than 8 bits per channel (PIL's own convert('RGB') clips them at
255, which turns them almost white) are converted here instead:

* 16-bit greyscale (modes I;16, I;16B, I;16L, and mode I holding values in
  0..65535, as 16-bit PGM files open): value >> 8, i.e. the high byte, as PIL
  itself reads 16-bit colour PNGs.
* 32-bit float (mode F): values in [0, 1] become round(255 * value), halves up;
  any value outside [0, 1] (or NaN) refuses the image.
* 32-bit integer (mode I with a value outside 0..65535): refused.

A refused image is an error naming the file, its mode and its value range,
never a prediction. Every other mode (1, L, LA, P, RGB, RGBA, CMYK, ...) goes
through PIL's convert('RGB').
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from vpns_jax import cli
from vpns_jax.io import subnetwork
from vpns_jax.data import transforms


class InputError(ValueError):
    """An input file that cannot be used; the message says which and why."""


# PIL modes whose pixels are wider than 8 bits; convert("RGB") would clip them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
WIDE_MODES = (*SIXTEEN_BIT_MODES, "I", "F")


def _value_range(pixels: np.ndarray) -> str:
    """'values from LOW to HIGH' of a non-empty ``pixels``, NaN named apart (numpy's min with a NaN is NaN)."""
    numbers = pixels[~np.isnan(pixels)] if pixels.dtype.kind == "f" else pixels
    if numbers.size == 0:
        return "only NaN values"
    return f"values from {numbers.min()!s} to {numbers.max()!s}" + (" and NaN" if numbers.size < pixels.size else "")


def to_8_bit(pixels: np.ndarray, mode: str, path: str) -> np.ndarray:
    """(H, W) pixels of a wide greyscale ``mode`` -> uint8, by the module docstring's rule; else InputError."""
    low, high, kind = (0, 1, "32-bit float") if mode == "F" else (0, 65535, "32-bit integer")
    # Written so that NaN fails the check: a NaN pixel refuses the image too.
    if mode not in SIXTEEN_BIT_MODES and not np.all((pixels >= low) & (pixels <= high)):
        raise InputError(
            f"image {path} has mode {mode} ({kind}) with {_value_range(pixels)}, "
            f"not all in [{low}, {high}]: save it as 8-bit RGB first"
        )
    if mode == "F":
        return np.floor(pixels.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    return (pixels >> 8).astype(np.uint8)


def load_pixels(path: str) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of the image file at ``path``, converted as the module docstring says."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            pixels = np.asarray(image if mode in WIDE_MODES else image.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"image {path} cannot be read as an image ({reason})") from None
    # Wide modes are single-channel; to_rgb replicates grey as convert("RGB") does.
    return transforms.to_rgb(to_8_bit(pixels, mode, path) if mode in WIDE_MODES else pixels)


def read_image(path: str, size: int) -> np.ndarray:
    """The (size, size, 3) float32 clean view of the image file at ``path``."""
    return transforms.clean_view(load_pixels(path), size)


def predict_files(subnetwork, paths: Sequence[str], batch_size: int = 32) -> list[tuple[int, float]]:
    """(class index, its probability) of each image file, in order."""
    size = subnetwork.prompt_spec.input_size
    results = []
    for start in range(0, len(paths), batch_size):
        images = np.stack([read_image(path, size) for path in paths[start : start + batch_size]])
        probabilities = subnetwork.probabilities(images)
        classes = np.argmax(probabilities, axis=-1)
        results += [(int(c), float(p[c])) for c, p in zip(classes, probabilities)]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.OneLineParser(prog="python -m vpns_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subnetwork", required=True, help="an export's subnetwork.npz")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    try:
        loaded = subnetwork.load_subnetwork(args.subnetwork)
        # Every image is read (and checked) before anything is printed.
        results = predict_files(loaded, args.images, args.batch_size)
    except Exception as error:  # noqa: BLE001 - every failure is one line unless --verbose
        return cli.report_error(error, verbose=args.verbose)
    names = loaded.class_names
    for path, (index, probability) in zip(args.images, results):
        print(f"{path}\t{index}\t{names[index] if names else '-'}\t{probability:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
