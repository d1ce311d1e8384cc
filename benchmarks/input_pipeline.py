"""Input pipeline throughput next to the training step's, so the pipeline is known not to be the bottleneck.

    python benchmarks/input_pipeline.py [--dataset fashion_mnist] [--data_dir DIR] [--sizes 32 224]

For each image size: images/s of the clean and the augmented training view
(decode + PIL resize + crop/flip + float conversion, with --threads loader
threads) and of one dense ResNet-18 training step at that size (CIFAR stem at
32 px, ImageNet stem otherwise). A stage-1 or stage-2 VPNs iteration consumes
two batches per step at about the dense step's rate per batch, so the pipeline
keeps up when each view alone is faster than the step.
Prepares the dataset into --data_dir first if it is not there (offline
datasets only: fashion_mnist, digits).
"""

from __future__ import annotations

import argparse
import time

import jax

from step_time import dense_step, time_call
from vpns_jax.data import pipeline, prepare, registry


def views_rate(source, size: int, batch: int, batches: int, threads: int) -> dict[str, float]:
    """Steady images/s of each training view (after one warm-up batch)."""
    rates = {}
    clean, augmented = pipeline.training_streams(source, global_batch_size=batch, image_size=size, seed=0,
                                                 num_threads=threads, prefetch=0)
    for name, stream in (("clean", clean), ("augmented", augmented)):
        next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        rates[name] = batches * batch / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step_batch", type=int, default=32, help="batch of the timed training step")
    parser.add_argument("--no_step", action="store_true", help="skip timing the training step")
    args = parser.parse_args()

    try:
        registry.prepared_dir(registry.get_dataset_spec(args.dataset), args.data_dir)
    except registry.DataNotFoundError:
        prepare.prepare(args.dataset, data_dir=args.data_dir)
    source = pipeline.open_split(args.dataset, registry.get_dataset_spec(args.dataset).train_split, args.data_dir)
    print(f"{args.dataset}: {len(source):,} training images, {args.threads} loader threads, batch {args.batch}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"{'size':>6}{'clean view img/s':>18}{'augmented img/s':>17}{'train step img/s':>18}")
    for size in args.sizes:
        rates = views_rate(source, size, args.batch, args.batches, args.threads)
        step = float("nan")
        if not args.no_step:
            stem = "cifar" if size <= 32 else "imagenet"
            _, call, _, _ = dense_step("resnet18", 1.0, stem, size, args.step_batch)
            _, seconds = time_call(call, repeats=2)
            step = args.step_batch / seconds
        print(f"{size:>6}{rates['clean']:>18.0f}{rates['augmented']:>17.0f}{step:>18.1f}")


if __name__ == "__main__":
    main()
