"""Time VPNs' stage-1 and stage-2 iterations and the eval step next to a dense training step, and next to PyTorch.

    python benchmarks/step_time.py [--width 1] [--settings 32:cifar:128,64:imagenet:128,224:imagenet:32]
                                   [--repeats 3] [--no_torch] [--data_parallel]
                                   [--dtypes float32,bfloat16] [--conv_impls auto,lax,im2col] [--pool_impls auto,lax]

Prints, per input setting and step kind, the compile time (first call minus a
steady call), the median wall time of ``--repeats`` steady calls on this
machine's default device, images/s, XLA's estimate of the program's peak memory,
and, where torch is installed, the PyTorch reference's median
(benchmarks/torch_reference.py, the authors' semantics) and the ratio PyTorch
time / JAX time. Stage iterations are two optimiser sub-steps (prompted clean
batch, plain augmented batch), so about twice a dense step is the floor. Each
setting runs once per compute dtype, conv kernel and max-pool gradient given (the
precision policy and kernel choices of ``config.model``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vpns_jax.core import dense, label_mapping, masking, optim, parallel, prompts, steps
from vpns_jax.methods.vpns import VPNS_PHASES
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


def peak_bytes(lowered) -> int:
    """XLA's compile-time estimate of a program's peak memory: arguments + outputs + temporaries - aliased."""
    stats = lowered.compile().memory_analysis()
    if stats is None:
        return 0
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)


def dense_step(model_name: str, width: float, stem: str, size: int, batch_size: int, mesh=None, *,
               kernels: dict[str, str] | None = None):
    """(model, a closure running one dense SGD step on a fixed random batch, that batch, a function giving the
    step's peak bytes; call it after timing, as lowering ahead of time would hide the compile time).
    ``kernels``: create_model's dtype, conv_impl and pool_impl."""
    model = create_model(model_name, num_classes=10, width=width, stem=stem, rngs=nnx.Rngs(0), **(kernels or {}))
    graphdef, weights, batch_stats = functional.split_model(model)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(batch_size, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, 10, batch_size).astype(np.int32)}
    # With a mesh the batch is split over its devices and the state replicated (data parallelism).
    batch = parallel.global_batch(batch, mesh) if mesh is not None else jax.tree.map(jnp.asarray, batch)
    tx = optim.group_transform(optim.GroupOptimizer("sgd", 0.01), lambda _: 0.01)
    # Copies: the step donates its state, and callers may keep using the model's arrays.
    state = dense.init_dense_state(jax.tree.map(jnp.copy, weights), jax.tree.map(jnp.copy, batch_stats), tx,
                                   label_map=label_mapping.identity_mapping(10), rng=jax.random.PRNGKey(0))
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    def peak():
        return peak_bytes(dense.dense_train_step.lower(state, batch, graphdef=graphdef, tx=tx))

    def call():
        nonlocal state
        state, metrics = dense.dense_train_step(state, batch, graphdef=graphdef, tx=tx)
        return metrics

    return model, call, batch, peak


def vpns_state(model, size: int, density: float, mesh=None) -> tuple[steps.StepSpec, steps.TrainState, dict]:
    """(spec, stage-1 state, scores) of VPNs on ``model`` (the reference's optimisers, a pad prompt whose frame is
    the authors' 16 px at 224 px, scaled), replicated over ``mesh`` when given."""
    graphdef, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    # The authors' 16 px frame at 224 px, scaled (as benchmarks/torch_reference.prompt_pad).
    prompt_spec = prompts.PromptSpec("pad", input_size=size, output_size=size, pad_size=max(1, size * 16 // 224))
    prompt = prompts.init_prompt(prompt_spec)
    spec = steps.make_step_spec(model, prompt_spec, prompt_params=prompt, scores=scores, phases=VPNS_PHASES,
                                stage_groups={1: optim.reference_groups(1), 2: optim.reference_groups(2)},
                                epochs={1: 30, 2: 30}, iterations_per_epoch=100)
    # Copies: the steps donate their state; the model keeps its own arrays.
    state = steps.init_state(spec, weights=jax.tree.map(jnp.copy, weights),
                             batch_stats=jax.tree.map(jnp.copy, batch_stats), scores=scores, prompt=prompt,
                             density=density, label_map=label_mapping.identity_mapping(10), rng=jax.random.PRNGKey(1))
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    return spec, state, scores


def jax_rows(model_name: str, width: float, stem: str, size: int, batch_size: int, repeats: int,
             density: float, mesh=None, *, kernels: dict[str, str] | None = None
             ) -> list[tuple[str, float, float, float, int]]:
    """(name, compile s, median s, images/s, peak bytes) of the dense step, threshold, stage iterations, eval.

    With ``mesh``, batches are split over its devices and the states replicated; ``kernels`` as dense_step's."""
    model, dense_call, batch, dense_peak = dense_step(model_name, width, stem, size, batch_size, mesh,
                                                      kernels=kernels)
    spec, state, scores = vpns_state(model, size, density, mesh)

    def stage_call(stage):
        def call():
            nonlocal state
            state, metrics = steps.train_iteration(state, (batch, batch), spec=spec, stage=stage)
            return metrics
        return call

    def stage_peak(stage):
        return peak_bytes(steps.train_iteration.lower(state, (batch, batch), spec=spec, stage=stage))

    n_scores = sum(s.size for s in jax.tree.leaves(scores))
    mask_fn = jax.jit(lambda s: masking.thresholds(s, masking.prune_counts(scores, density)))
    # Each row is timed first (its compile included), then its program's peak memory is read.
    rows = [("dense train step", *time_call(dense_call, repeats), batch_size, dense_peak())]
    rows.append((f"threshold ({n_scores:,} scores)", *time_call(lambda: mask_fn(scores), repeats), 0,
                 peak_bytes(mask_fn.lower(scores))))
    rows.append(("VPNs stage-1 iteration", *time_call(stage_call(1), repeats), 2 * batch_size, stage_peak(1)))
    state = steps.start_stage(spec, state, 2)
    if mesh is not None:
        state = parallel.replicate(state, mesh)  # the new optimiser state starts on one device
    rows.append(("VPNs stage-2 iteration", *time_call(stage_call(2), repeats), 2 * batch_size, stage_peak(2)))
    rows.append(("eval step", *time_call(lambda: steps.eval_step(state, batch, spec=spec), repeats), batch_size,
                 peak_bytes(steps._eval_step.lower(state, batch, model=spec.masked_model, with_prompt=False))))
    return [(name, compile_s, median, images / median if images else float("nan"), peak)
            for name, compile_s, median, images, peak in rows]


def torch_medians(width: float, stem: str, size: int, batch_size: int, repeats: int, density: float) -> dict:
    """Median seconds of the PyTorch reference's rows (benchmarks/torch_reference.py), or {} without torch."""
    try:
        import torch  # noqa: PLC0415 - optional: torch is a benchmark-only dependency

        import torch_reference  # noqa: PLC0415 - needs torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)  # the same cores XLA:CPU uses
    return torch_reference.medians(width=width, stem=stem, size=size, batch=batch_size, repeats=repeats,
                                   density=density)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--settings", default="32:cifar:128,64:imagenet:128,224:imagenet:32",
                        help="comma-separated size:stem:batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--dtypes", default="float32", help="comma-separated compute dtypes: float32, bfloat16")
    parser.add_argument("--conv_impls", default="auto", help="comma-separated conv kernels: auto, lax, im2col")
    parser.add_argument("--pool_impls", default="auto", help="comma-separated max-pool gradients: auto, lax, argmax")
    parser.add_argument("--data_parallel", action="store_true",
                        help="split batches over all devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    args = parser.parse_args()
    mesh = parallel.make_mesh() if args.data_parallel else None
    devices = len(jax.devices()) if args.data_parallel else 1
    print(f"{args.model} width {args.width}, {devices} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    combos = [{"dtype": d, "conv_impl": c, "pool_impl": p} for d in args.dtypes.split(",")
              for c in args.conv_impls.split(",") for p in args.pool_impls.split(",")]
    for setting, kernels in ((s, k) for s in args.settings.split(",") for k in combos):
        size, stem, batch_size = setting.split(":")
        size, batch_size = int(size), int(batch_size)
        rows = jax_rows(args.model, args.width, stem, size, batch_size, args.repeats, args.density, mesh,
                        kernels=kernels)
        torch_rows = {} if args.no_torch else torch_medians(args.width, stem, size, batch_size, args.repeats,
                                                            args.density)
        print(f"\n{stem} stem {size}x{size} batch {batch_size}, {kernels['dtype']}, conv {kernels['conv_impl']}, "
              f"pool {kernels['pool_impl']}")
        print(f"{'step':<34}{'compile s':>10}{'median s':>10}{'images/s':>10}{'peak MiB':>10}"
              f"{'torch s':>10}{'torch/jax':>10}")
        for name, compile_s, median, images, peak in rows:
            key = name.split(" (")[0]
            torch_s = torch_rows.get(key, float("nan"))
            print(f"{name:<34}{compile_s:>10.2f}{median:>10.3f}{images:>10.1f}{peak / 2**20:>10.1f}"
                  f"{torch_s:>10.3f}{torch_s / median:>10.2f}")


if __name__ == "__main__":
    main()
