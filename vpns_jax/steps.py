"""Jitted training and evaluation steps of VPNs, as pure functions of an explicit state.

One training iteration follows the authors' ``train()`` (vpns-method.md sections 1 and 12):
  (a) the prompted clean batch: loss through the prompt, then one step of the
      stage's model-side group (scores in stage 1, weights in stage 2) and of
      the prompt;
  (b) the un-prompted augmented batch: loss on normalised images, then one step
      of the model-side group only; the prompt and its optimiser state are left
      exactly as they were.
In stage 1 the mask is recomputed from the current scores in every forward
pass (the global threshold after every score step); in stage 2 it is the fixed
mask taken from the final scores by ``start_stage``. The stage is a static
argument: each stage compiles once, and densities, label maps and step counts
are data, so they never retrace.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vpns_jax import label_mapping, masking, optim, prompts
from vpns_jax.models import functional

Params = dict[Any, Any]
# Fixed fold-in for the evaluation-time key, apart from the training keys (stage, step).
EVAL_SEED = 0x7FFFFFFF
Batch = dict[str, jax.Array]  # {'image': (B, H, W, 3) float in [0, 1], 'label': (B,) int}


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything static about a run's steps: model structure, prompt, mask scope and per-stage optimisers.

    Hashed by identity, so it can be a static ``jit`` argument; build it once per run.
    """

    graphdef: nnx.GraphDef
    kinds: Params  # functional.leaf_kinds of the model
    prompt: prompts.PromptSpec
    threshold_scope: str = "global"
    optimizers: dict[int, optax.GradientTransformation] = dataclasses.field(default_factory=dict)
    labels: dict[int, Params] = dataclasses.field(default_factory=dict)  # optimiser labels per stage


@struct.dataclass
class TrainState:
    """The whole mutable state of one density's run; every field is a pytree of arrays."""

    step: jax.Array  # iterations done in the current stage
    weights: Params  # dense weights W (conv/dense kernels and biases, BatchNorm affine)
    batch_stats: Params  # BatchNorm running statistics
    scores: Params  # one score per prunable kernel entry
    prompt: Params  # {'program': (output_size, output_size, 3)}
    prune_k: jax.Array  # (groups,) int32: entries to prune per threshold group
    label_map: jax.Array  # (num_target,) int32: source logit index of each target class
    rng: jax.Array  # a raw uint32 PRNG key (jax.random.PRNGKey), so checkpoints hold plain arrays
    opt_state: optax.OptState
    masks: Params | None = None  # fixed masks in stage 2; None in stage 1 (derived from the scores)


def trainable(state: TrainState, stage: int) -> Params:
    """The top-level subtrees that ``stage`` updates."""
    return {name: getattr(state, name) for name in optim.STAGE_SUBTREES[stage]}


def make_step_spec(
    model: nnx.Module,
    prompt: prompts.PromptSpec,
    *,
    prompt_params: Params,
    scores: Params,
    stage_groups: dict[int, dict[str, optim.GroupOptimizer]],
    epochs: dict[int, int],
    iterations_per_epoch: int,
    threshold_scope: str = "global",
) -> StepSpec:
    """Builds the spec: labels and one partitioned optimiser per stage from their group settings."""
    if threshold_scope not in masking.THRESHOLD_SCOPES:
        raise ValueError(f"threshold scope {threshold_scope!r} is unknown: use one of {masking.THRESHOLD_SCOPES}")
    graphdef, weights, _ = functional.split_model(model)
    kinds = functional.leaf_kinds(model)
    subtrees = {"weights": weights, "scores": scores, "prompt": prompt_params}
    labels, optimizers = {}, {}
    for stage in (1, 2):
        labels[stage] = optim.param_labels({k: subtrees[k] for k in optim.STAGE_SUBTREES[stage]}, kinds)
        optimizers[stage] = optim.stage_optimizer(
            stage_groups[stage], labels[stage], epochs=epochs[stage], iterations_per_epoch=iterations_per_epoch
        )
    return StepSpec(graphdef, kinds, prompt, threshold_scope, optimizers, labels)


def init_state(
    spec: StepSpec,
    *,
    weights: Params,
    batch_stats: Params,
    scores: Params,
    prompt: Params,
    density: float,
    label_map: jax.Array,
    rng: jax.Array,
) -> TrainState:
    """A stage-1-ready state for one density (fresh stage-1 optimiser)."""
    prune_k = jnp.asarray(masking.prune_counts(scores, density, spec.threshold_scope))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        weights=weights,
        batch_stats=batch_stats,
        scores=scores,
        prompt=prompt,
        prune_k=prune_k,
        label_map=jnp.asarray(label_map, jnp.int32),
        rng=rng,
        opt_state=None,
    )
    return start_stage(spec, state, 1)


def start_stage(spec: StepSpec, state: TrainState, stage: int) -> TrainState:
    """The stage switch: a fresh optimiser for ``stage``'s subtrees and a reset step count.

    Entering stage 2 fixes the masks at the final stage-1 threshold.
    """
    if stage not in optim.STAGE_SUBTREES:
        raise ValueError(f"stage {stage!r} is unknown: use 1 or 2")
    masks = current_masks(spec, state) if stage == 2 else None
    state = state.replace(masks=masks, step=jnp.zeros((), jnp.int32))
    return state.replace(opt_state=spec.optimizers[stage].init(trainable(state, stage)))


def masks_in_force(spec: StepSpec, state: TrainState) -> Params:
    """The binary masks in force: the fixed stage-2 masks, or those the scores give now."""
    if state.masks is not None:
        return state.masks
    return masking.masks_from_scores(state.scores, state.prune_k, spec.threshold_scope)


current_masks = jax.jit(masks_in_force, static_argnums=0)


def _forward(spec: StepSpec, state: TrainState, params: Params, images: jax.Array, *, stage: int,
             prompted: bool, key: jax.Array):
    """Training-mode forward pass; ``params`` holds the differentiated subtrees."""
    prompt_key, dropout_key = jax.random.split(key)
    if stage == 1:
        masks = masking.ste_masks(params["scores"], state.prune_k, spec.threshold_scope)
        weights = masking.apply_masks(state.weights, masks)
    else:
        weights = masking.apply_masks(params["weights"], state.masks)
    # The un-prompted sub-step does not differentiate the prompt, so it is absent from params there.
    x = prompts.model_inputs(spec.prompt, params.get("prompt"), images, prompted=prompted, key=prompt_key)
    return functional.apply_model(spec.graphdef, weights, state.batch_stats, x, train=True, dropout_key=dropout_key)


def _sub_step(spec: StepSpec, state: TrainState, batch: Batch, *, stage: int, prompted: bool, key: jax.Array):
    """One optimiser step on one batch; differentiates only what this sub-step updates."""
    params = trainable(state, stage)
    model_side = optim.STAGE_SUBTREES[stage][0]
    differentiated = params if prompted else {model_side: params[model_side]}

    def loss_fn(diff):
        logits, batch_stats = _forward(spec, state, diff, batch["image"], stage=stage, prompted=prompted, key=key)
        loss, accuracy = label_mapping.mapped_loss(logits, batch["label"], state.label_map)
        return loss, (accuracy, batch_stats)

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(differentiated)
    untouched: tuple[str, ...] = ()
    if not prompted:
        grads = {**grads, "prompt": jax.tree.map(jnp.zeros_like, params["prompt"])}
        untouched = ("prompt",)
    new_params, opt_state = optim.apply_gradients(
        spec.optimizers[stage], spec.labels[stage], params, grads, state.opt_state, untouched=untouched
    )
    state = state.replace(**new_params, opt_state=opt_state, batch_stats=batch_stats)
    return state, loss, accuracy


@functools.partial(jax.jit, static_argnames=("spec", "stage"), donate_argnums=0)
def train_iteration(
    state: TrainState, prompted_batch: Batch, plain_batch: Batch, *, spec: StepSpec, stage: int
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration of ``stage``: sub-step (a) on ``prompted_batch``, then (b) on ``plain_batch``.

    ``state`` is donated: its buffers are reused for the result, so keep no other reference to them.
    """
    key = jax.random.fold_in(jax.random.fold_in(state.rng, stage), state.step)
    key_a, key_b = jax.random.split(key)
    state, loss_a, acc_a = _sub_step(spec, state, prompted_batch, stage=stage, prompted=True, key=key_a)
    state, loss_b, acc_b = _sub_step(spec, state, plain_batch, stage=stage, prompted=False, key=key_b)
    metrics = {"loss_prompted": loss_a, "accuracy_prompted": acc_a, "loss_plain": loss_b, "accuracy_plain": acc_b}
    return state.replace(step=state.step + 1), metrics


def eval_prompt_key(rng: jax.Array) -> jax.Array:
    """The key of evaluation-time prompts (the 'random' kind's square), fixed per run."""
    return jax.random.fold_in(rng, EVAL_SEED)


def eval_logits(spec: StepSpec, state: TrainState, images: jax.Array, *, with_prompt: bool) -> jax.Array:
    """Eval-mode source logits (BatchNorm running statistics) through the masks in force."""
    weights = masking.apply_masks(state.weights, masks_in_force(spec, state))
    x = prompts.model_inputs(spec.prompt, state.prompt, images, prompted=with_prompt,
                             key=eval_prompt_key(state.rng))
    logits, _ = functional.apply_model(spec.graphdef, weights, state.batch_stats, x, train=False)
    return logits


@functools.partial(jax.jit, static_argnames=("spec", "with_prompt"))
def eval_step(
    state: TrainState, batch: Batch, *, spec: StepSpec, with_prompt: bool = False
) -> dict[str, jax.Array]:
    """Summed loss, correct count and count of a batch's real rows (label >= 0), label-mapped.

    Without the prompt by default, as the authors evaluate; ``with_prompt=True``
    evaluates prompted inputs instead.
    """
    mapped = label_mapping.map_logits(eval_logits(spec, state, batch["image"], with_prompt=with_prompt), state.label_map)
    labels = batch["label"]
    valid = labels >= 0  # padding rows of the last batch carry label -1
    losses = optax.softmax_cross_entropy_with_integer_labels(mapped, jnp.maximum(labels, 0))
    correct = jnp.sum((jnp.argmax(mapped, axis=-1) == labels) & valid)
    return {"loss_sum": jnp.sum(jnp.where(valid, losses, 0.0)), "correct": correct, "count": jnp.sum(valid)}


@functools.partial(jax.jit, static_argnames=("spec", "num_target"))
def source_prediction_counts(state: TrainState, batch: Batch, *, spec: StepSpec, num_target: int) -> jax.Array:
    """Label-mapping counts D[src, tgt] of one batch, through the masks in force and the prompt."""
    logits = eval_logits(spec, state, batch["image"], with_prompt=True)
    return label_mapping.prediction_counts(logits, batch["label"], num_target)
