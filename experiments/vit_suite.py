"""VPNs on a Vision Transformer: does the visual prompt upgrade a transformer's sparsification?

    python -m experiments.vit_suite [--root=workdir/vit] [--seeds=7,9,17] [--densities=0.5,0.2,0.1,0.05] \\
        [--variants=vpns,no_prompt,hydra,omp,random] [--dry_run]

The offline default with a small ViT (``configs/default_vit.py``) in place of the ResNet-18: pretrained
dense on Fashion-MNIST classes 0-4 by the first cell, shared by every other, then each variant prunes it
for classes 5-9 at every density and seed through ``experiments.sweep``. ``no_prompt`` is VPNs with the
same two streams and no prompt in either stage (the ablation suite's). Writes under ROOT ``table.md`` /
``table.csv`` (accuracy per variant and sparsity over seeds, each variant minus ``vpns`` paired by seed),
``accuracy_vs_sparsity.png``, ``differences_vs_sparsity.png``, ``manifest.json``, ``command.txt`` and
``wall_time.txt``. A rerun skips finished cells.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from experiments import ablations, sweep
from vpns_jax import cli

V = sweep.Variant
VARIANTS = {
    "vpns": V("vpns"),
    "no_prompt": ablations.VARIANTS["no_prompt"],
    "hydra": V("hydra"),
    "omp": V("omp"),
    "random": V("random"),
}


def _parser() -> cli.OneLineParser:
    return ablations.suite_parser("experiments.vit_suite", __doc__, config="configs/default_vit.py",
                                  root="workdir/vit", variants=list(VARIANTS))


def main(argv: Sequence[str] | None = None) -> int:
    """The suite's command line; returns 0 when every cell finished and the reports are written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        variants, seeds, densities = ablations.parse_grid(args.variants, VARIANTS, args.seeds, args.densities)
    except ValueError as error:
        return cli.report_error(error, verbose=False)
    root = pathlib.Path(args.root)
    return ablations.run_suite(args.config, VARIANTS, variants, seeds, densities, root, {},
                               command=[sys.executable, "-m", "experiments.vit_suite", *argv],
                               dry_run=args.dry_run,
                               write=lambda: ablations.write_reports(root, variants, densities, level=0.9))


if __name__ == "__main__":
    sys.exit(main())
