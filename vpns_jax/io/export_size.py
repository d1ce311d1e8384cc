"""The export size of a model at some densities, from random weights and the masks of its init scores.

Size of a full-width ResNet-18 (1000 classes, 224 px pad prompt) at some densities (no training)::

    python -m vpns_jax.io.export_size --size_report --model=resnet18 --densities 0.5 0.1 0.01
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vpns_jax.core import masking, nm, prompts
from vpns_jax.io import export
from vpns_jax.io import subnetwork_format as fmt
from vpns_jax.models import create_model, functional


def random_subnetwork_size(model_name: str, density: float, *, num_classes: int = 1000, width: float = 1.0,
                           stem: str = "imagenet", prompt_spec: prompts.PromptSpec | None = None,
                           directory: str | os.PathLike | None = None, seed: int = 0,
                           nm_pattern: tuple[int, int] | None = None) -> fmt.ExportSize:
    """The export size of ``model_name`` at ``density``, with random weights and the masks of its init scores.

    No training: the sizes depend only on the shapes and the kept count (the
    random values stand in for every leaf, BatchNorm statistics included). With
    ``directory`` the export is also written there (and its file size reported).
    ``nm_pattern`` (N, M): N:M masks of the init scores instead (``density`` is then ignored).
    """
    spec = prompt_spec or prompts.PromptSpec()
    # Random values on the model's shapes: initialising the model itself compiles one op per leaf shape (slow).
    model = nnx.eval_shape(
        lambda: create_model(model_name, num_classes=num_classes, width=width, stem=stem, rngs=nnx.Rngs(seed))
    )
    _, weights, batch_stats = functional.split_model(model)
    rng = np.random.default_rng(seed)
    weights, batch_stats = (jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, np.float32)), tree)
                            for tree in (weights, batch_stats))
    kinds = functional.leaf_kinds(model)
    scores = jax.jit(lambda w: masking.init_scores(w, kinds))(weights)
    if nm_pattern is None:
        masks = jax.jit(masking.masks_from_scores)(scores, jnp.asarray(masking.prune_counts(scores, density)))
    else:
        masks = jax.jit(nm.nm_masks, static_argnums=(1, 2))(scores, *nm_pattern)
    prompt = prompts.init_prompt(spec)
    if directory is None:
        return fmt.compute_size(weights, batch_stats, masks, prompt, nm_pattern=nm_pattern)
    return export.export_subnetwork(
        pathlib.Path(directory) / f"{model_name}_density_{density}.npz", model_name=model_name,
        num_classes=num_classes, width=width, stem=stem, weights=weights, batch_stats=batch_stats, masks=masks,
        prompt_spec=spec, prompt=prompt, label_map=np.arange(min(10, num_classes)), overwrite=True,
        nm_pattern=nm_pattern,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpns_jax.io.export_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_report", action="store_true", help="print dense vs compressed export sizes")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1, 0.01])
    parser.add_argument("--prompt_size", type=int, default=224, help="input and output size of the pad prompt")
    parser.add_argument("--pad_size", type=int, default=16)
    parser.add_argument("--no_write", action="store_true", help="skip writing the files (no on-disk size)")
    parser.add_argument("--pattern", default="", help="an N:M pattern such as 2:4 (density N/M) instead of densities")
    args = parser.parse_args(argv)
    if not args.size_report:
        parser.error("nothing to do: pass --size_report")
    try:
        pattern = nm.parse_nm(args.pattern) if args.pattern else None
    except ValueError as error:
        parser.error(str(error))
    spec = prompts.PromptSpec("pad", input_size=args.prompt_size, output_size=args.prompt_size, pad_size=args.pad_size)
    print(f"{args.model} width {args.width:g}, {args.num_classes} classes, {args.stem} stem, {spec.kind} prompt "
          f"{spec.output_size} px (random weights, masks from the init scores)")
    densities = [pattern[0] / pattern[1]] if pattern else args.densities
    with tempfile.TemporaryDirectory() as directory:
        for density in densities:
            size = random_subnetwork_size(
                args.model, masking.validate_density(density), num_classes=args.num_classes, width=args.width,
                stem=args.stem, prompt_spec=spec, directory=None if args.no_write else directory, nm_pattern=pattern,
            )
            print(f"{args.pattern + ' ' if pattern else ''}density {density:g}: {size.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
