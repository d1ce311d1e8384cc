"""Test accuracy of a source model on its own task: how well the network a suite prunes was pretrained.

    python -m experiments.source_accuracy --config=configs/default_vit.py --source=WORKDIR/source_model.npz \\
        [--data_dir=DIR] [--out=FILE.md]

Builds the config's model, loads ``--source`` (a ``source_model.npz`` that a run pretrained, or any file
``model.init_from`` takes), and classifies the test split of the config's source task (``source.dataset``,
``source.classes``) with the source head and no prompt, at the config's input size. Prints, and with
``--out`` writes, the accuracy with the command, date, commit and machine.
"""

from __future__ import annotations

import pathlib
import shlex
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import measurement, sweep
from vpns_jax import cli, config_checks, source_model
from vpns_jax.core import prompts
from vpns_jax.data import pipeline, registry, run_data
from vpns_jax.models import create_model, functional


def source_accuracy(config, source: str, data_dir: str = "") -> tuple[float, int]:
    """(accuracy, number of test images) of the model in ``source`` on ``config``'s source test split."""
    model = create_model(config.model.name, rngs=nnx.Rngs(0), **config_checks.model_arguments(config))
    graphdef, weights, batch_stats = functional.split_model(model)
    weights, batch_stats = source_model.load_weights(source, weights, batch_stats)
    name, data_dir = config.source.dataset, data_dir or config.data.data_dir or None
    run_data.ensure_prepared(name, data_dir, config.data.auto_prepare)
    subset = pipeline.open_subset(name, registry.get_dataset_spec(name).test_split, data_dir,
                                  classes=tuple(config.source.classes))
    spec = config_checks.prompt_spec(config)
    stream = pipeline.eval_stream(subset, global_batch_size=200, image_size=spec.input_size)

    @jax.jit
    def predict(pixels):
        x = prompts.model_inputs(spec, {}, pipeline.unit_pixels(pixels), prompted=False)
        return jnp.argmax(functional.apply_model(graphdef, weights, batch_stats, x, train=False)[0], axis=-1)

    correct = total = 0
    for batch in stream.epoch_batches():
        keep = batch["label"] >= 0  # the padded tail
        correct += int(np.sum((np.asarray(predict(batch["image"])) == batch["label"]) & keep))
        total += int(np.sum(keep))
    return correct / total, total


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; 0 once the accuracy is printed (and written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.OneLineParser(prog="python -m experiments.source_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Config file (path.py or path.py:arg).")
    parser.add_argument("--source", required=True, help="The source model file.")
    parser.add_argument("--data_dir", default="", help="Prepared TFDS data (default: the config's).")
    parser.add_argument("--out", default="", help="Markdown file to write.")
    args = parser.parse_args(argv)
    try:
        config = sweep.load_config(args.config)
        accuracy, count = source_accuracy(config, args.source, args.data_dir)
    except (OSError, ValueError) as error:
        return cli.report_error(error, verbose=False)
    line = (f"{config.model.name} from {args.source}: {accuracy:.4f} test accuracy on {count} images of "
            f"{config.source.dataset} classes {tuple(config.source.classes)}")
    print(line)
    if args.out:
        command = shlex.join([sys.executable, "-m", "experiments.source_accuracy", *argv])
        pathlib.Path(args.out).write_text(measurement.header("Source model accuracy", command, jax.default_backend())
                                          + "\n" + line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
