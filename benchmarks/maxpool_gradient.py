"""The ImageNet stem's gradients under ``jax.jit`` against eager, and one training step's time and memory.

    python benchmarks/maxpool_gradient.py [--size 224] [--batch 4] [--width 1] [--dtype float32] [--repeats 3] \
        [--out FILE.md]

Builds a ResNet-18 (ImageNet stem, 10 classes) and computes the cross-entropy
gradient of every weight in training mode on a fixed random batch three ways:
eagerly (``jax.disable_jit``), under ``jax.jit``, and under ``jax.jit`` with the
max-pool replaced by ``layers.max_pool2d_reference`` (JAX's own autodiff of
``reduce_window``). Prints, for the stem's leaves (``conv1.kernel``,
``bn1.scale``, ``bn1.bias``) and for the worst other leaf, the relative error
``||g - g_eager|| / ||g_eager||`` of each; then the median wall time of a
jitted dense float32 SGD step and XLA's estimate of its peak memory, with the
package's max-pool and with the reference one. Runs on this machine's default backend;
``--dtype float64`` turns on x64. ``--out`` also writes the tables to a file,
headed by the command, date, git commit and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step_time import dense_step, time_call
from vpns_jax.models import create_model, functional, layers, resnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/maxpool_gradient.py`: the repository's experiments
    sys.path.append(str(ROOT))
from experiments import measurement  # noqa: E402

STEM_LEAVES = (("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias"))


@contextlib.contextmanager
def reference_pool():
    """ResNet's stem pools with JAX's own ``reduce_window`` gradient while inside."""
    original = resnet.max_pool2d
    resnet.max_pool2d = getattr(layers, "max_pool2d_reference", _reduce_window_pool)
    try:
        yield
    finally:
        resnet.max_pool2d = original


def _reduce_window_pool(x, window=3, stride=2, padding=1):
    # For running this script on commits older than layers.max_pool2d_reference.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
                                 ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``||got - want|| / ||want||`` (absolute where ``want`` is all zero)."""
    scale = float(np.linalg.norm(want))
    return float(np.linalg.norm(got - want)) / (scale if scale > 0 else 1.0)


def header() -> str:
    """Command, date, git commit, machine and package versions of this run, as a markdown preamble."""
    lines = measurement.header_lines(measurement.provenance(jax_in_process=True), f"python {' '.join(sys.argv)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="Also write the tables to this markdown file.")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.dtype == "float64")
    lines = [header(), f"ResNet-18 width {args.width}, ImageNet stem, {args.size} px, batch {args.batch}, "
             f"{args.dtype}, train mode, random normal images\n"]

    model = create_model("resnet18", num_classes=10, width=args.width, stem="imagenet", rngs=nnx.Rngs(0))
    graphdef, weights, batch_stats = functional.split_model(model)
    weights, batch_stats = jax.tree.map(lambda w: jnp.asarray(w, args.dtype), (weights, batch_stats))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), args.dtype)
    labels = jnp.asarray(rng.integers(0, 10, args.batch))

    def loss(w):
        logits, _ = functional.apply_model(graphdef, w, batch_stats, images, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    with jax.disable_jit():
        eager = jax.grad(loss)(weights)
    jitted = jax.jit(jax.grad(loss))(weights)
    with reference_pool():
        reference = jax.jit(jax.grad(loss))(weights)

    flat_eager = dict(functional.traverse_util.flatten_dict(eager))
    stem = " | ".join(".".join(k) for k in STEM_LEAVES)
    lines.append(f"| gradient, relative error | {stem} | worst other leaf |")
    lines.append("|---|" + "---:|" * (len(STEM_LEAVES) + 1))
    for name, grads in (("jit, package max-pool vs eager", jitted), ("jit, reference max-pool vs eager", reference)):
        flat = dict(functional.traverse_util.flatten_dict(grads))
        errors = {k: relative_error(np.asarray(flat[k]), np.asarray(flat_eager[k])) for k in flat_eager}
        others = {k: e for k, e in errors.items() if k not in STEM_LEAVES}
        worst = max(others, key=others.get)
        cells = [f"{errors[k]:.2e}" for k in STEM_LEAVES] + [f"{others[worst]:.2e} ({'.'.join(map(str, worst))})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    # The step is step_time's dense float32 SGD step: timed in float32 runs only.
    if args.dtype == "float32":
        lines.append("\n| dense SGD step, float32 | median s | peak memory MiB |\n|---|---:|---:|")
    for name, context in (("package max-pool", contextlib.nullcontext), ("reference max-pool", reference_pool)):
        if args.dtype != "float32":
            break
        with context():
            _, call, _, peak = dense_step("resnet18", args.width, "imagenet", args.size, args.batch)
            _, median = time_call(call, args.repeats)
            lines.append(f"| {name} | {median:.3f} | {peak() / 2**20:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
