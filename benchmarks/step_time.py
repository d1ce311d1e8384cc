"""Time one VPNs stage-1 and stage-2 iteration next to one dense training step.

    python benchmarks/step_time.py [--width 1] [--stem cifar] [--size 32] [--batch 128] [--repeats 3]

Prints, per step kind, the compile time (first call minus a steady call) and the
median wall time of ``--repeats`` steady calls on this machine's default device.
Stage iterations are two optimiser sub-steps (prompted clean batch, plain
augmented batch), so about twice a dense step is the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vpns_jax import dense, label_mapping, masking, optim, prompts, steps
from vpns_jax.models import create_model, functional


def time_call(fn, repeats: int) -> tuple[float, float]:
    """(compile-and-first-call overhead, median steady wall time) of ``fn`` in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return first - median, median


def dense_step(model_name: str, width: float, stem: str, size: int, batch_size: int):
    """(model, a closure running one dense SGD step on a fixed random batch, that batch)."""
    model = create_model(model_name, num_classes=10, width=width, stem=stem, rngs=nnx.Rngs(0))
    graphdef, weights, batch_stats = functional.split_model(model)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(size=(batch_size, size, size, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    tx = optim.group_transform(optim.GroupOptimizer("sgd", 0.01), lambda _: 0.01)
    # Copies: the step donates its state, and callers may keep using the model's arrays.
    state = dense.init_dense_state(jax.tree.map(jnp.copy, weights), jax.tree.map(jnp.copy, batch_stats), tx,
                                   label_map=label_mapping.identity_mapping(10), rng=jax.random.PRNGKey(0))

    def call():
        nonlocal state
        state, metrics = dense.dense_train_step(state, batch, graphdef=graphdef, tx=tx)
        return metrics

    return model, call, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()

    model, dense_call, batch = dense_step(args.model, args.width, args.stem, args.size, args.batch)
    graphdef, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    label_map = label_mapping.identity_mapping(10)

    prompt_spec = prompts.PromptSpec("pad", input_size=args.size, output_size=args.size, pad_size=max(1, args.size // 8))
    prompt = prompts.init_prompt(prompt_spec)
    spec = steps.make_step_spec(model, prompt_spec, prompt_params=prompt, scores=scores,
                                stage_groups={1: optim.reference_groups(1), 2: optim.reference_groups(2)},
                                epochs={1: 30, 2: 30}, iterations_per_epoch=100)
    # Copies: the steps donate their state; the model keeps its own arrays.
    state = steps.init_state(spec, weights=jax.tree.map(jnp.copy, weights), batch_stats=jax.tree.map(jnp.copy, batch_stats), scores=scores,
                             prompt=prompt, density=args.density, label_map=label_map, rng=jax.random.PRNGKey(1))

    def stage_call(stage):
        def call():
            nonlocal state
            state, metrics = steps.train_iteration(state, (batch, batch), spec=spec, stage=stage)
            return metrics
        return call

    n_scores = sum(s.size for s in jax.tree.leaves(scores))
    mask_fn = jax.jit(lambda s: masking.thresholds(s, masking.prune_counts(scores, args.density)))
    rows = [("dense train step", *time_call(dense_call, args.repeats))]
    rows.append((f"threshold ({n_scores:,} scores)", *time_call(lambda: mask_fn(scores), args.repeats)))
    rows.append(("VPNs stage-1 iteration", *time_call(stage_call(1), args.repeats)))
    state = steps.start_stage(spec, state, 2)
    rows.append(("VPNs stage-2 iteration", *time_call(stage_call(2), args.repeats)))
    print(f"{args.model} width {args.width} {args.stem} stem {args.size}x{args.size} batch {args.batch}, "
          f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'step':<34}{'compile s':>10}{'median s':>10}{'images/s':>10}")
    for name, compile_s, median in rows:
        images = args.batch * (2 if name.startswith("VPNs") else 1) / median if "threshold" not in name else float("nan")
        print(f"{name:<34}{compile_s:>10.2f}{median:>10.3f}{images:>10.1f}")


if __name__ == "__main__":
    main()
