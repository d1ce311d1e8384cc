"""Input pipeline throughput per loader setting, and the training loop's speed on real data against synthetic batches.

    python benchmarks/input_pipeline.py [--dataset fashion_mnist] [--data_dir DIR] [--sizes 32 224]
                                        [--workers 0 1 2] [--threads 2] [--batch 128] [--batches 40]
                                        [--loop_workers 0 2] [--iterations 30] [--out FILE.md]

1. Augmented training-view images/s (decode + PIL resize + crop/flip, uint8 batches as the trainer receives
   them) at each size, for in-process threads (``--workers 0``, ``--threads`` threads) and for each worker
   count, after the workers have started. From the one-worker rate at the largest size: how many workers a
   target rate (``--target``, 5,000 images/s by default) needs. Next to it, this machine's own 2-process
   scaling (a pure-Python loop in 1 and in 2 processes), the ceiling for the worker scaling.
2. The training loop: VPNs stage-1 iterations of the offline default's model (ResNet-18 at width 1/4, CIFAR
   stem, 32 px, batch 64, two batches per iteration), fed as the trainer feeds them (two streams,
   ``parallel.prefetch_to_device``), against the same iterations on synthetic batches already on the device;
   per ``--loop_workers`` setting, images/s of each and the ratio real / synthetic.
Prepares the dataset into --data_dir first if it is not there (offline datasets only: fashion_mnist, digits).
Writes the tables, with the command, date, commit and machine, to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import pathlib
import sys
import time

import jax
from flax import nnx

from step_time import vpns_state
from vpns_jax.core import parallel, steps
from vpns_jax.data import pipeline, prepare, registry, run_data
from vpns_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/input_pipeline.py`: the repository's experiments
    sys.path.append(str(ROOT))
from experiments import measurement  # noqa: E402


def _streams(source, setting: int, size: int, batch: int, threads: int, views=("augmented",)):
    """Training streams of ``views`` over ``source``, loaded per ``setting`` (0 = threads here, else that many
    workers, started before returning), and the pool to close."""
    readable, pool = run_data.stream_sources({"train": source}, setting)
    if pool is not None:
        pool.wait_ready()
    streams = [pipeline.BatchStream(readable["train"], global_batch_size=batch, image_size=size, view=view, seed=0,
                                    stream=number, num_threads=threads) for number, view in enumerate(views)]
    return streams, pool


def view_rate(source, setting: int, size: int, batch: int, batches: int, threads: int) -> float:
    """Steady augmented images/s of one stream (after a warm-up batch), prefetching as the trainer does."""
    (stream,), pool = _streams(source, setting, size, batch, threads)
    try:
        next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return batches * batch / (time.perf_counter() - start)
    finally:
        if pool is not None:
            pool.close()


def loop_rates(source, setting: int, iterations: int, threads: int) -> tuple[float, float]:
    """(real, synthetic) images/s of the offline default's stage-1 iterations (two batches of 64 at 32 px)."""
    mesh = parallel.make_mesh()
    model = create_model("resnet18", num_classes=10, width=0.25, stem="cifar", rngs=nnx.Rngs(0))
    spec, state, _ = vpns_state(model, 32, 0.1, mesh)
    streams, pool = _streams(source, setting, 32, 64, threads, views=("clean", "augmented"))
    real = parallel.prefetch_to_device(((next(streams[0]), next(streams[1])) for _ in itertools.count()), mesh,
                                       scale_pixels=pipeline.unit_pixels)
    fixed = next(real)
    synthetic = itertools.repeat(fixed)
    rates = []
    try:
        for batches in (synthetic, real):
            for _ in range(2):  # compile, and settle the prefetch
                state, metrics = steps.train_iteration(state, next(batches), spec=spec, stage=1)
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(iterations):
                state, metrics = steps.train_iteration(state, next(batches), spec=spec, stage=1)
            jax.block_until_ready(metrics)
            rates.append(iterations * 2 * 64 / (time.perf_counter() - start))
    finally:
        if pool is not None:
            pool.close()
    return rates[1], rates[0]


def _busy(_: int = 0) -> float:
    """Seconds of a fixed pure-Python loop (no I/O, no shared state)."""
    started, total = time.perf_counter(), 0
    for i in range(12_000_000):
        total += i
    return time.perf_counter() - started


def machine_scaling() -> float:
    """What two processes get from this machine: 2 x one loop's time / the slower of two at once. On a shared
    VM, a vCPU's sibling or neighbour can make it well below 2x; the pipeline cannot scale better than this."""
    one = _busy()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        two = pool.map(_busy, [0, 1])
    return 2 * one / max(two)


def view_table(source, args) -> list[str]:
    """Markdown rows of the augmented view's images/s per size and loader setting, and the workers a target needs."""
    names = {w: (f"{args.threads} threads" if w == 0 else f"{w} worker{'s' * (w > 1)}") for w in args.workers}
    lines = ["| size | " + " | ".join(names.values()) + " | 2 / 1 workers |", "| --: |" + " --: |" * (len(names) + 1)]
    one_worker = {}
    for size in args.sizes:
        rates = {w: view_rate(source, w, size, args.batch, args.batches, args.threads) for w in args.workers}
        one_worker[size] = rates.get(1, float("nan"))
        scaling = rates[2] / rates[1] if 1 in rates and 2 in rates else float("nan")
        lines.append(f"| {size} px | " + " | ".join(f"{rates[w]:.0f}" for w in args.workers) + f" | {scaling:.2f}x |")
    size = max(args.sizes)
    need = math.ceil(args.target / one_worker[size]) if one_worker[size] == one_worker[size] else "?"
    lines += ["", f"- {args.target:,} augmented images/s at {size} px needs {need} workers at the one-worker rate "
                  f"measured here ({one_worker[size]:.0f} images/s per worker), with a core for each."]
    return lines


def loop_table(source, args) -> list[str]:
    """Markdown rows of the training loop's images/s on real and synthetic batches per loader setting."""
    lines = ["| loader | real data img/s | synthetic img/s | real / synthetic |", "| :-- | --: | --: | --: |"]
    for setting in args.loop_workers:
        real, synthetic = loop_rates(source, setting, args.iterations, args.threads)
        name = f"{args.threads} threads" if setting == 0 else f"{setting} workers"
        lines.append(f"| {name} | {real:.0f} | {synthetic:.0f} | {real / synthetic:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = in-process threads")
    parser.add_argument("--threads", type=int, default=2, help="loader threads when there are no workers")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--target", type=int, default=5000, help="images/s to size the worker count for")
    parser.add_argument("--loop_workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--iterations", type=int, default=30, help="timed stage-1 iterations per loop setting")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = parser.parse_args()

    try:
        registry.prepared_dir(registry.get_dataset_spec(args.dataset), args.data_dir)
    except registry.DataNotFoundError:
        prepare.prepare(args.dataset, data_dir=args.data_dir)
    source = pipeline.open_split(args.dataset, registry.get_dataset_spec(args.dataset).train_split, args.data_dir)
    command = f"python benchmarks/input_pipeline.py {' '.join(sys.argv[1:])}"
    lines = ["# Input pipeline", "", *measurement.header_lines(measurement.provenance(jax_in_process=True), command),
             f"- {args.dataset}: {len(source):,} training images, batch {args.batch}", "",
             f"- this machine's own 2-process scaling (a pure-Python loop, 1 process against 2 at once, measured "
             f"just before the table): {machine_scaling():.2f}x", "",
             "Augmented training view, images/s:", "", *view_table(source, args)]
    if args.loop_workers:
        lines += ["", "Training loop, VPNs stage-1 iterations of the offline default's model (32 px, batch 64):", "",
                  *loop_table(source, args)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)


if __name__ == "__main__":
    main()
