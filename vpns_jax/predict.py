"""Classify image files with an exported subnetwork:

    python -m vpns_jax.predict --subnetwork=WORKDIR/subnetworks/density_0.1/subnetwork.npz IMAGE [IMAGE ...]

Each image is read with PIL, converted to RGB and made into model input exactly
as the evaluation pipeline does (``transforms.clean_view`` at the prompt's input
size). Prints one tab-separated line per file: path, predicted class index,
class name ('-' when the export has none) and the probability of that class.
Errors (a missing or unreadable image or subnetwork file) are one line on
stderr with exit status 2; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from vpns_jax import cli
from vpns_jax.io import export
from vpns_jax.data import transforms


class InputError(ValueError):
    """An input file that cannot be used; the message says which and why."""


def read_image(path: str, size: int) -> np.ndarray:
    """The (size, size, 3) float32 clean view of the image file at ``path``."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"image {path} cannot be read as an image ({reason})") from None
    return transforms.clean_view(pixels, size)


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
        subnetwork = export.load_subnetwork(args.subnetwork)
        # Every image is read (and checked) before anything is printed.
        results = predict_files(subnetwork, args.images, args.batch_size)
    except Exception as error:  # noqa: BLE001 - every failure is one line unless --verbose
        return cli.report_error(error, verbose=args.verbose)
    names = subnetwork.class_names
    for path, (index, probability) in zip(args.images, results):
        print(f"{path}\t{index}\t{names[index] if names else '-'}\t{probability:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
