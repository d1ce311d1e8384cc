"""The visual prompt's extra compute and memory: VPNs' iterations with each prompt design next to no prompt.

    python benchmarks/prompt_cost.py [--width 0.25] [--size 32] [--batch 128] [--repeats 3] [--density 0.1]

For each design (``none``: VPNs' no-prompt ablation, the same two streams with the
clean batch unprompted; ``pad`` at three frame widths; ``fix`` and ``random`` with a
square of half the image side; ``expand`` with the image at 3/4 of the side), times a
VPNs stage-1 and stage-2 iteration (two sub-steps each) on a fixed random batch,
and prints the compile time, the median of ``--repeats`` steady calls, the
overhead against ``none`` and XLA's estimate of the program's peak memory. The
same model, scores and optimisers throughout; only the prompt changes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step_time import peak_bytes, time_call
from vpns_jax.core import label_mapping, masking, optim, prompts, steps
from vpns_jax.core.phases import Phase
from vpns_jax.methods.iterations import TwoStreams
from vpns_jax.models import create_model, functional


def designs(size: int) -> dict[str, prompts.PromptSpec | None]:
    """The prompt designs compared at image side ``size``; None is no prompt."""
    return {
        "none": None,
        **{f"pad {p}": prompts.PromptSpec("pad", size, size, pad_size=p) for p in (size // 8, size // 4, size // 2)},
        f"fix {size // 2}": prompts.PromptSpec("fix", size, size, mask_size=size // 2),
        f"random {size // 2}": prompts.PromptSpec("random", size, size, mask_size=size // 2),
        f"expand {size * 3 // 4}->{size}": prompts.PromptSpec("expand", size * 3 // 4, size),
    }


def design_rows(spec_prompt: prompts.PromptSpec | None, *, size: int, width: float, batch_size: int,
                repeats: int, density: float) -> list[tuple[int, float, float, int]]:
    """(stage, compile s, median s, peak bytes) of a stage-1 and a stage-2 iteration with ``spec_prompt``."""
    model = create_model("resnet18", num_classes=10, width=width, stem="cifar", rngs=nnx.Rngs(0))
    _, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    with_prompt = spec_prompt is not None
    # No prompt: a pad spec only shapes the (untrained, unused) zero frame the state carries.
    spec_prompt = spec_prompt or prompts.PromptSpec("pad", size, size, pad_size=1)
    prompt = prompts.init_prompt(spec_prompt)
    extra = ("prompt",) if with_prompt else ()
    phases = {1: Phase(("scores",) + extra, TwoStreams()), 2: Phase(("weights",) + extra, TwoStreams())}
    groups = {stage: {k: v for k, v in optim.reference_groups(stage).items() if with_prompt or k != "prompt"}
              for stage in (1, 2)}
    spec = steps.make_step_spec(model, spec_prompt, prompt_params=prompt, scores=scores, stage_groups=groups,
                                epochs={1: 30, 2: 30}, iterations_per_epoch=100, phases=phases)
    state = steps.init_state(spec, weights=jax.tree.map(jnp.copy, weights),
                             batch_stats=jax.tree.map(jnp.copy, batch_stats), scores=scores, prompt=prompt,
                             density=density, label_map=label_mapping.identity_mapping(10), rng=jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    side = spec_prompt.input_size
    batch = {"image": jnp.asarray(rng.uniform(size=(batch_size, side, side, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    rows = []
    for stage in (1, 2):
        if stage == 2:
            state = steps.start_stage(spec, state, 2)

        def call(stage=stage):
            nonlocal state
            state, out = steps.train_iteration(state, (batch, batch), spec=spec, stage=stage)
            return out

        compile_s, median = time_call(call, repeats)
        rows.append((stage, compile_s, median,
                     peak_bytes(steps.train_iteration.lower(state, (batch, batch), spec=spec, stage=stage))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    print(f"resnet18 width {args.width}, {args.size} px, batch {args.batch}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print(f"{'design':<16}{'stage':>6}{'compile s':>10}{'median s':>10}{'vs none':>9}{'peak MiB':>10}")
    baseline = {}
    for name, spec_prompt in designs(args.size).items():
        for stage, compile_s, median, peak in design_rows(spec_prompt, size=args.size, width=args.width,
                                                          batch_size=args.batch, repeats=args.repeats,
                                                          density=args.density):
            baseline.setdefault(stage, median)
            print(f"{name:<16}{stage:>6}{compile_s:>10.2f}{median:>10.3f}{median / baseline[stage] - 1:>+9.1%}"
                  f"{peak / 2**20:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
