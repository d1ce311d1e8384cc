"""VPNs with the functional API in a hand-written loop: a starting point to fork.

    python experiments/functional_loop.py [--density 0.1] [--pretrain_steps 200] [--iterations 60]

Source task: Fashion-MNIST classes 0-4 (a dense ResNet-18 at width 1/4 is
pretrained on them here). Target task: classes 5-9, read through the 5-way
source head by frequency label mapping. Then stage 1 (scores + prompt, weights
frozen) and stage 2 (weights + prompt, masks fixed), and a test evaluation.
Needs Debian's dataset-fashion-mnist (``make data``), which it prepares as a TFDS
dataset on first use; nothing is downloaded.
Every piece of state is an explicit pytree; VPNs' two-stream iteration comes from
``vpns_jax.methods.iterations`` (a few lines over ``steps.sub_step``): swap any step for your own.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vpns_jax.core import dense, label_mapping, masking, optim, phases, prompts, steps
from vpns_jax.data import pipeline, prepare
from vpns_jax.methods.iterations import TwoStreams
from vpns_jax.models import create_model, functional

SIZE = 32


def as_jax(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A pipeline batch on the default device, its uint8 pixels scaled to [0, 1] as the trainer does."""
    arrays = {key: jnp.asarray(value) for key, value in batch.items()}
    return {**arrays, "image": pipeline.unit_pixels(arrays["image"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-18 channel width multiplier")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=60, help="iterations per stage")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--train_images", type=int, default=2000)
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    args = parser.parse_args()
    prepare.prepare("fashion_mnist", data_dir=args.data_dir)  # once, from Debian's files; a no-op afterwards

    # 1. A dense source model, pretrained on classes 0-4.
    model = create_model("resnet18", num_classes=5, width=args.width, stem="imagenet", rngs=nnx.Rngs(0))
    graphdef, weights, batch_stats = functional.split_model(model)
    source = pipeline.BatchStream(pipeline.open_subset("fashion_mnist", "train", args.data_dir, classes=range(0, 5)),
                                  view="augmented", global_batch_size=args.batch_size, image_size=SIZE, seed=0)
    tx = optax.sgd(0.05, momentum=0.9)
    state = dense.init_dense_state(weights, batch_stats, tx, label_map=label_mapping.identity_mapping(5),
                                   rng=jax.random.PRNGKey(0))
    for _ in range(args.pretrain_steps):
        state, metrics = dense.dense_train_step(state, as_jax(next(source)), graphdef=graphdef, tx=tx)
    print(f"source pretraining: loss {float(metrics['loss']):.3f}")

    # 2. Scores, a zero pad prompt, and the static spec of both stages.
    train = pipeline.open_subset("fashion_mnist", "train", args.data_dir, classes=range(5, 10),
                                  limit=args.train_images)
    clean, augmented = pipeline.training_streams(train, global_batch_size=args.batch_size, image_size=SIZE, seed=1)
    test = pipeline.eval_stream(pipeline.open_subset("fashion_mnist", "test", args.data_dir, classes=range(5, 10),
                                                     limit=args.test_images),
                                global_batch_size=args.batch_size, image_size=SIZE)
    scores = masking.init_scores(state.weights, functional.leaf_kinds(model))
    prompt_spec = prompts.PromptSpec("pad", input_size=SIZE, output_size=SIZE, pad_size=4)
    prompt = prompts.init_prompt(prompt_spec)
    groups = {1: {"scores": optim.GroupOptimizer("adam", 3e-3), "prompt": optim.GroupOptimizer("adam", 3e-3)},
              2: optim.reference_groups(2)}
    per_epoch = args.train_images // args.batch_size
    epochs = max(1, args.iterations // per_epoch)
    # VPNs' two stages: scores and prompt with the weights frozen, then weights and prompt through fixed masks.
    vpns_phases = {1: phases.Phase(("scores", "prompt"), TwoStreams()),
                   2: phases.Phase(("weights", "prompt"), TwoStreams())}
    spec = steps.make_step_spec(model, prompt_spec, prompt_params=prompt, scores=scores, phases=vpns_phases,
                                stage_groups=groups, epochs={1: epochs, 2: epochs}, iterations_per_epoch=per_epoch)
    vpns = steps.init_state(spec, weights=state.weights, batch_stats=state.batch_stats, scores=scores,
                            prompt=prompt, density=args.density, label_map=label_mapping.identity_mapping(5),
                            rng=jax.random.PRNGKey(1))

    # 3. Frequency label mapping through the initial mask and the zero prompt.
    counts = sum(steps.source_prediction_counts(vpns, as_jax(b), spec=spec, num_target=5)
                 for b in augmented.epoch_batches())
    vpns = vpns.replace(label_map=jnp.asarray(label_mapping.frequency_label_mapping(counts)))
    print("label map (target -> source):", np.asarray(vpns.label_map).tolist())

    # 4. Stage 1, the stage switch, stage 2: two data streams, one jitted iteration each.
    for stage in (1, 2):
        if stage == 2:
            vpns = steps.start_stage(spec, vpns, 2)
        for _ in range(args.iterations):
            vpns, metrics = steps.train_iteration(vpns, (as_jax(next(clean)), as_jax(next(augmented))),
                                                  spec=spec, stage=stage)
        print(f"stage {stage}: loss {float(metrics['loss_prompted']):.3f} (prompted), "
              f"{float(metrics['loss_plain']):.3f} (plain)")

    # 5. Test accuracy without the prompt (the authors' protocol), and the sparsity report.
    totals = [steps.eval_step(vpns, as_jax(b), spec=spec) for b in test.epoch_batches()]
    correct = sum(int(t["correct"]) for t in totals)
    count = sum(int(t["count"]) for t in totals)
    print(masking.sparsity_report(vpns.weights, vpns.masks).format())
    print(f"test accuracy at density {args.density}: {correct / count:.4f} ({count} images)")


if __name__ == "__main__":
    main()
