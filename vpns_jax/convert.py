"""Converts torchvision weights to a vpns_jax .npz.

    python -m vpns_jax.convert --model=resnet18 --input=resnet18-f37072fd.pth --output=resnet18.npz \\
        [--num_classes=1000] [--width=1.0] [--stem=imagenet] [--overwrite] [--verbose]
    python -m vpns_jax.convert --model=vit_b_16 --input=vit_b_16-c867db91.pth --output=vit_b_16_384.npz \
        [--image_size=384] [--vit=patch_size=16,num_layers=12,num_heads=12,hidden_dim=768,mlp_dim=3072]

The input is a torchvision state dict (``.pth``/``.pt`` with torch, ``weights_only=True``; ``.safetensors``; ``.npz``);
the output is what ``--config.model.init_from`` reads, checked against the model up front. Formats, checks and ViT
options: docs/data.md, "Pretrained weights in". Errors are one line naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

from vpns_jax import cli
from vpns_jax.io import pretrained


def _parser() -> argparse.ArgumentParser:
    parser = cli.OneLineParser(prog="python -m vpns_jax.convert", description="Converts torchvision weights to a vpns_jax .npz.")
    parser.add_argument("--model", required=True,
                        help="resnet18, resnet50, vgg16, vgg16_bn, vit_b_16, vit_b_32 or vit_l_16")
    parser.add_argument("--input", required=True, help="torchvision state dict: .pth, .pt, .safetensors or .npz")
    parser.add_argument("--output", required=True, help="the .npz to write")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes of the checkpoint's classifier")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the checkpoint's model")
    parser.add_argument("--stem", default="imagenet", help="'imagenet' (torchvision) or 'cifar' (ResNets only)")
    parser.add_argument("--image_size", type=int, default=0, help="ViTs: input side of the converted model (0: 224)")
    parser.add_argument("--vit", default="", help="ViTs: KEY=N,... overriding patch_size, num_layers, num_heads, "
                                                 "hidden_dim, mlp_dim (0 or missing: the named model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def convert(
    model: str,
    input_path: str | pathlib.Path,
    output_path: str | pathlib.Path,
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    stem: str = "imagenet",
    overwrite: bool = False,
    image_size: int | None = None,
    vit: dict[str, int] | None = None,
) -> str:
    """Writes ``output_path`` from the torchvision file ``input_path``; returns a one-line summary. ``image_size``
    and ``vit`` (ViTs only) are ``create_model``'s."""
    from flax import nnx, traverse_util

    from vpns_jax.io import array_files
    from vpns_jax.models import create_model, functional

    output_path = pathlib.Path(output_path).expanduser()
    if output_path.suffix.lower() != ".npz":
        raise ValueError(f"--output {output_path} must end in .npz")
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path} exists; pass --overwrite to replace it")
    if num_classes < 1 or not width > 0:
        raise ValueError(f"--num_classes must be >= 1 and --width > 0, got {num_classes} and {width}")
    # Shapes only: nothing is initialised.
    abstract = nnx.eval_shape(lambda: create_model(model, num_classes=num_classes, width=width, stem=stem,
                                                   image_size=image_size, vit=vit, rngs=nnx.Rngs(0)))
    _, weights_template, stats_template = functional.split_model(abstract)
    state_dict = pretrained.read_state_dict(input_path)
    try:
        weights, batch_stats = pretrained.from_torchvision(state_dict, weights_template, stats_template)
    except ValueError as error:
        settings = f"width {width:g}, stem {stem}, {num_classes} classes" + _vit_settings(image_size, vit)
        raise ValueError(f"{input_path} as {model} ({settings}): {error}") from None
    array_files.save_arrays(output_path, {"weights": weights, "batch_stats": batch_stats})
    flat_weights = traverse_util.flatten_dict(weights)
    flat_stats = traverse_util.flatten_dict(batch_stats) if batch_stats else {}
    params = sum(math.prod(a.shape) for a in flat_weights.values())
    return (
        f"wrote {output_path}: {len(flat_weights) + len(flat_stats)} tensors "
        f"({len(flat_weights)} weights with {params:,} parameters, {len(flat_stats)} BatchNorm statistics) "
        f"from {len(state_dict)} state-dict tensors of {input_path}, for {model} "
        f"(width {width:g}, stem {stem}, {num_classes} classes{_vit_settings(image_size, vit)})"
    )


def _vit_settings(image_size: int | None, vit: dict[str, int] | None) -> str:
    """The ViT options of a summary or error, or '' where none were given."""
    given = {key: value for key, value in (vit or {}).items() if value}
    text = f", image size {image_size}" if image_size else ""
    return text + "".join(f", {key} {value}" for key, value in given.items())


def parse_vit(text: str) -> dict[str, int]:
    """``--vit``'s 'KEY=N,KEY=N' as a dict of ints ('' is {}); a one-line ValueError when malformed."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--vit {text!r}: {item!r} is not KEY=N (e.g. patch_size=16,num_layers=12)")
        options[key.strip()] = int(value)
    return options


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(convert(args.model, args.input, args.output, num_classes=args.num_classes, width=args.width,
                      stem=args.stem, overwrite=args.overwrite, image_size=args.image_size or None,
                      vit=parse_vit(args.vit) or None))
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line unless --verbose
        return cli.report_error(error, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
