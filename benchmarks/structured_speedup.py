"""MACs and measured eval-mode speed of a channel-pruned ResNet-18, masked and shrunk, next to dense.

    python benchmarks/structured_speedup.py [--input_size 224] [--batch 32] [--channel_sparsity 0.1 0.3 0.5]

ResNet-18 (width 1, ImageNet stem, 1000 classes, random init) with random
U(-1, 1) channel scores, masked at each channel sparsity with the reference's
first-stage cap (channel_max 0.25). For each: MACs per image (and the speedup
over dense that MACs predict), then the median wall time of one eval-mode
batch for the masked network (zeros in place, dense shapes), the shrunk
network (channels removed, BN folded), the shrunk network with its channel
counts padded to multiples of 8 ("/8", shrink(align=8)) and the dense
network, taking turns in each repeat, and the measured speedups dense /
shrunk. The 0.0 row is the dense network shrunk with nothing pruned: what BN
folding alone buys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vpns_jax.core import structured
from vpns_jax.models import macs, shrink
from vpns_jax.models import create_model, functional


def interleaved_medians(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median steady wall time (s) of each call, after one warm-up call each.

    Unlike step_time.time_call, the calls take turns within every repeat, so a
    shared machine's load drifts over all of them alike and their ratios hold.
    """
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channel_sparsity", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = create_model("resnet18", num_classes=1000, width=1.0, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    graphdef, weights, batch_stats = functional.split_model(model)
    groups = structured.channel_groups("resnet18", weights)
    scores = structured.init_channel_scores(groups, jax.random.key(1))
    shape = (args.batch, args.input_size, args.input_size, 3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)

    # Weights are an argument, so the dense and every masked network share one compiled program.
    forward = jax.jit(lambda w, x: functional.apply_model(graphdef, w, batch_stats, x, train=False)[0])
    shrunk_forward = jax.jit(shrink.apply_shrunk)
    dense_macs = macs.count_macs(graphdef, weights, batch_stats, args.input_size).total

    rows = []
    for sparsity in [0.0, *args.channel_sparsity]:
        k = structured.channel_prune_counts(groups, 1.0 - sparsity)
        masks = structured.channel_masks(scores, groups, k)
        masked = structured.apply_channel_masks(weights, groups, masks)
        report = macs.count_macs(graphdef, masked, batch_stats, args.input_size)
        net = shrink.shrink("resnet18", weights, batch_stats, groups, masks)
        aligned = shrink.shrink("resnet18", weights, batch_stats, groups, masks, align=8)
        # Dense is timed again in every row, so each speedup compares runs made side by side.
        t = interleaved_medians({"dense": lambda: forward(weights, x), "masked": lambda: forward(masked, x),
                                 "shrunk": lambda: shrunk_forward(net, x),
                                 "aligned": lambda: shrunk_forward(aligned, x)}, args.repeats)
        rows.append((structured.channel_sparsity(masks), report.total / 1e6, dense_macs / report.total,
                     t["masked"] * 1e3, t["shrunk"] * 1e3, t["aligned"] * 1e3, t["dense"] * 1e3,
                     t["dense"] / t["shrunk"], t["dense"] / t["aligned"], shrink.parameter_count(net)))

    print(f"resnet18 width 1, {args.input_size}x{args.input_size}, batch {args.batch}, eval mode, "
          f"median of {args.repeats}; device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"dense: {dense_macs / 1e6:,.1f} MMACs per image")
    header = ("channel sp.", "MMACs", "MACs x", "masked ms", "shrunk ms", "shrunk/8 ms", "dense ms", "real x",
              "real x /8", "shrunk params")
    widths = [max(12, len(h) + 2) for h in header]
    print("".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    formats = (".4f", ",.1f", ".3f", ",.1f", ",.1f", ",.1f", ",.1f", ".3f", ".3f", ",")
    for row in rows:
        print("".join(f"{value:>{w}{spec}}" for value, spec, w in zip(row, formats, widths)))


if __name__ == "__main__":
    main()
