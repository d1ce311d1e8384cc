"""The jitted training and evaluation steps, as pure functions of an explicit ``TrainState``.

A ``StepSpec`` holds everything static about a run (model, prompt, masks, one
``phases.Phase`` and optimiser per stage). While a stage trains scores the masks
are recomputed from them in every forward pass; otherwise they are the fixed
masks in the state. The stage is a static argument: each stage compiles once,
and densities, label maps and step counts are data, so they never retrace.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct, traverse_util

from vpns_jax.core import health, label_mapping, masking, nm, optim, prompts, structured
from vpns_jax.core.phases import Phase
from vpns_jax.models import functional

Params = dict[Any, Any]
# Fixed fold-in for the evaluation-time key, apart from the training keys (stage, step).
EVAL_SEED = 0x7FFFFFFF
Batch = dict[str, jax.Array]  # {'image': (B, H, W, 3) float in [0, 1], 'label': (B,) int}
GRANULARITIES = ("weight", "channel")  # 'weight': one score per kernel entry; 'channel': one per conv output channel


@dataclasses.dataclass(frozen=True)
class MaskedModel:
    """The static part of a spec that evaluation needs: model, prompt and how masks are made and applied.

    Compared by value, so evaluation compiles once per model and prompt, across runs in one process.
    """

    graphdef: nnx.GraphDef
    prompt: prompts.PromptSpec
    threshold_scope: str = "global"
    granularity: str = "weight"
    channel_groups: tuple = ()
    channel_max: float = 1.0
    min_layer_density: float = 0.0
    nm: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything static about a run's steps: model structure, prompt, masks and per-stage phases and optimisers.

    Hashed by identity, so it can be a static ``jit`` argument; build it once per run.
    """

    graphdef: nnx.GraphDef
    kinds: Params  # functional.leaf_kinds of the model
    prompt: prompts.PromptSpec
    threshold_scope: str = "global"
    optimizers: dict[int, optax.GradientTransformation] = dataclasses.field(default_factory=dict)
    labels: dict[int, Params] = dataclasses.field(default_factory=dict)  # optimiser labels per stage
    phases: dict[int, Phase] = dataclasses.field(default_factory=dict)
    granularity: str = "weight"  # 'weight': one score per kernel entry; 'channel': one per conv output channel
    channel_groups: tuple = ()  # models.channels.ChannelGroup per scored conv ('channel' only)
    channel_max: float = 1.0  # the cap on a capped channel group's pruned fraction ('channel' only)
    min_layer_density: float = 0.0  # the layer floor of masks from scores (masking's module docstring); 0 = none
    nm: tuple[int, int] | None = None  # (N, M): masks from scores keep N of every M (vpns_jax.core.nm); None = off

    @property
    def masked_model(self) -> MaskedModel:
        """The evaluation-relevant part of this spec, compared by value."""
        return MaskedModel(self.graphdef, self.prompt, self.threshold_scope, self.granularity, self.channel_groups,
                           self.channel_max, self.min_layer_density, self.nm)


@struct.dataclass
class TrainState:
    """The whole mutable state of one density's run; every field is a pytree of arrays."""

    step: jax.Array  # iterations done in the current stage
    weights: Params  # dense weights W (conv/dense kernels and biases, BatchNorm affine)
    batch_stats: Params  # BatchNorm running statistics
    scores: Params  # one score per prunable entry (or channel); {} for methods without scores
    prompt: Params  # {'program': (output_size, output_size, 3)}
    prune_k: jax.Array  # (groups,) int32: entries (or channels) to prune per threshold group
    label_map: jax.Array  # (num_target,) int32: source logit index of each target class
    rng: jax.Array  # a raw uint32 PRNG key (jax.random.PRNGKey), so checkpoints hold plain arrays
    opt_state: optax.OptState
    masks: Params | None = None  # fixed masks; None while a stage trains scores (derived from them)


def trainable(state: TrainState, phase: Phase) -> Params:
    """The top-level subtrees that ``phase`` updates."""
    return {name: getattr(state, name) for name in phase.trains}


def make_step_spec(
    model: nnx.Module,
    prompt: prompts.PromptSpec,
    *,
    prompt_params: Params,
    scores: Params,
    phases: dict[int, Phase],
    stage_groups: dict[int, dict[str, optim.GroupOptimizer]],
    epochs: dict[int, int],
    iterations_per_epoch: int,
    threshold_scope: str = "global",
    granularity: str = "weight",
    channel_groups: tuple = (),
    channel_max: float = 1.0,
    min_layer_density: float = 0.0,
    nm_pattern: tuple[int, int] | None = None,
) -> StepSpec:
    """Builds the spec: labels and one partitioned optimiser per stage of ``phases``.

    ``min_layer_density``: every layer (channel group) of a mask from scores keeps at least this share.
    ``nm_pattern`` (N, M): masks from scores keep the N largest |s| of every M along each kernel's input
    dimension instead of a threshold (weight granularity; no scope or floor then).
    """
    min_layer_density = masking.validate_min_layer_density(min_layer_density)
    if nm_pattern is not None:
        nm_pattern = nm.check_nm(*nm_pattern)
        if granularity != "weight" or min_layer_density:
            raise ValueError(f"N:M masks {nm_pattern} are per weight and have no layer floor: use granularity "
                             "'weight' and min_layer_density 0 with them")
    if threshold_scope not in masking.THRESHOLD_SCOPES:
        raise ValueError(f"threshold scope {threshold_scope!r} is unknown: use one of {masking.THRESHOLD_SCOPES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"mask granularity {granularity!r} is unknown: use one of {GRANULARITIES}")
    phases = dict(phases)
    graphdef, weights, _ = functional.split_model(model)
    kinds = functional.leaf_kinds(model)
    subtrees = {"weights": weights, "scores": scores, "prompt": prompt_params}
    labels, optimizers = {}, {}
    for stage, phase in phases.items():
        labels[stage] = optim.param_labels({k: subtrees[k] for k in phase.trains}, kinds)
        optimizers[stage] = optim.stage_optimizer(
            stage_groups[stage], labels[stage], epochs=epochs[stage], iterations_per_epoch=iterations_per_epoch,
            updates_per_iteration=phase.updates_per_iteration,
        )
    return StepSpec(graphdef, kinds, prompt, threshold_scope, optimizers, labels, phases, granularity,
                    tuple(channel_groups), float(channel_max), min_layer_density, nm_pattern)


Spec = StepSpec | MaskedModel  # the helpers below only read MaskedModel's fields


def prune_counts(spec: Spec, scores: Params, density: float) -> np.ndarray:
    """Entries (weight granularity) or channels to prune per threshold group at ``density``.

    N:M masks have no threshold: one zero count, which ``masks_from_scores`` never reads.
    """
    if spec.nm is not None:
        return np.zeros(1, np.int32)
    if spec.granularity == "channel":
        return np.asarray([structured.channel_prune_counts(spec.channel_groups, density, spec.channel_max)], np.int32)
    return masking.prune_counts(scores, density, spec.threshold_scope)


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
    masks: Params | None = None,
    stage: int | None = None,
) -> TrainState:
    """A state ready for ``stage`` (default: the spec's first) at one density, with a fresh optimiser.

    ``masks`` fixes the masks (one-shot methods); without them a stage that does
    not train scores takes them from ``scores`` at ``density``.
    """
    prune_k = jnp.asarray(prune_counts(spec, scores, density) if scores else np.zeros(1, np.int32))
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
        masks=masks,
    )
    return start_stage(spec, state, min(spec.phases) if stage is None else stage)


def start_stage(spec: StepSpec, state: TrainState, stage: int) -> TrainState:
    """The stage switch: a fresh optimiser for ``stage``'s subtrees and a reset step count.

    A stage that trains scores derives its masks from them; entering a stage
    that does not fixes the masks at the scores' current threshold (VPNs'
    stage 2) unless masks are already fixed.
    """
    if stage not in spec.phases:
        raise ValueError(f"stage {stage!r} is not one of this method's stages {sorted(spec.phases)}")
    phase = spec.phases[stage]
    if "scores" in phase.trains:
        masks = None
    else:
        masks = state.masks if state.masks is not None else current_masks(spec, state)
    state = state.replace(masks=masks, step=jnp.zeros((), jnp.int32))
    return state.replace(opt_state=_init_optimizer(spec, stage, trainable(state, phase)))


# Jitted: run eagerly, optax's init compiles one zeros_like per parameter shape.
_init_optimizer = jax.jit(lambda spec, stage, params: spec.optimizers[stage].init(params), static_argnums=(0, 1))


def masks_from_scores(spec: Spec, scores: Params, prune_k: jax.Array, *, ste: bool) -> Params:
    """The masks ``scores`` give; with ``ste`` their gradient w.r.t. |s| is the identity.

    N:M (``spec.nm``): the N largest |s| of every group of M, ``prune_k`` unused.
    """
    if spec.nm is not None:
        return (nm.ste_nm_masks if ste else nm.nm_masks)(scores, *spec.nm)
    if spec.granularity == "channel":
        select = structured.ste_channel_masks if ste else structured.channel_masks
        return select(scores, spec.channel_groups, prune_k[0], spec.channel_max,
                      min_layer_density=spec.min_layer_density)
    select = masking.ste_masks if ste else masking.masks_from_scores
    return select(scores, prune_k, spec.threshold_scope, spec.min_layer_density)


def masked_weights(spec: Spec, weights: Params, masks: Params) -> Params:
    """The effective weights: kernels (and, per channel, BatchNorm outputs) times the masks."""
    if spec.granularity == "channel":
        return structured.apply_channel_masks(weights, spec.channel_groups, masks)
    return masking.apply_masks(weights, masks)


def masks_in_force(spec: Spec, state: TrainState) -> Params:
    """The binary masks in force: the fixed masks, or those the scores give now."""
    if state.masks is not None:
        return state.masks
    return masks_from_scores(spec, state.scores, state.prune_k, ste=False)


_current_masks = jax.jit(masks_in_force, static_argnums=0)


def current_masks(spec: StepSpec, state: TrainState) -> Params:
    """``masks_in_force``, jitted (once per masked model)."""
    return _current_masks(spec.masked_model, state)


@functools.partial(jax.jit, static_argnums=0)
def _effective_weights(model: MaskedModel, state: TrainState) -> tuple[Params, Params]:
    masks = masks_in_force(model, state)
    weights = masked_weights(model, state.weights, masks)
    pattern = masked_weights(model, jax.tree.map(jnp.ones_like, state.weights), masks)
    return weights, jax.tree.map(lambda x: (x != 0).astype(jnp.float32), pattern)


def effective_weights(spec: StepSpec, state: TrainState) -> tuple[Params, Params]:
    """(weights the network computes with, their 0/1 pattern) through the masks in force; jitted.

    For channel masks the pattern spreads each channel's mask over every kernel
    entry and BatchNorm parameter it gates.
    """
    return _effective_weights(spec.masked_model, state)


def _forward(spec: StepSpec, state: TrainState, params: Params, images: jax.Array, *, prompted: bool,
             masks: Params | None, key: jax.Array):
    """Training-mode forward pass; ``params`` holds the differentiated subtrees.

    ``masks`` None means: straight-through masks from the differentiated scores.
    """
    prompt_key, dropout_key = jax.random.split(key)
    if masks is None:
        masks = masks_from_scores(spec, params["scores"], state.prune_k, ste=True)
    weights = masked_weights(spec, params.get("weights", state.weights), masks)
    x = prompts.model_inputs(spec.prompt, params.get("prompt"), images, prompted=prompted, key=prompt_key)
    return functional.apply_model(spec.graphdef, weights, state.batch_stats, x, train=True, dropout_key=dropout_key)


def _bn_scales(spec: StepSpec, weights: Params) -> list[jax.Array]:
    flat, kinds = traverse_util.flatten_dict(weights), traverse_util.flatten_dict(spec.kinds)
    return [leaf for path, leaf in flat.items() if kinds[path] == functional.BN and path[-1] == "scale"]


def loss_and_grads(spec: StepSpec, state: TrainState, differentiated: Params, batch: Batch, *, phase: Phase,
                   prompted: bool, masks: Params | None, key: jax.Array):
    """(loss, accuracy, new batch stats, gradients w.r.t. ``differentiated``) of one training-mode batch.

    ``masks`` None: straight-through masks from the differentiated scores.
    """
    def loss_fn(diff):
        logits, batch_stats = _forward(spec, state, diff, batch["image"], prompted=prompted, masks=masks, key=key)
        loss, accuracy = label_mapping.mapped_loss(logits, batch["label"], state.label_map)
        objective = loss
        if phase.bn_l1 and "weights" in diff:
            objective = loss + phase.bn_l1 * sum(jnp.sum(jnp.abs(g)) for g in _bn_scales(spec, diff["weights"]))
        return objective, (loss, accuracy, batch_stats)

    (_, (loss, accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(differentiated)
    return loss, accuracy, batch_stats, grads


def apply_grads(spec: StepSpec, state: TrainState, stage: int, grads: Params, batch_stats: Params,
          untouched: tuple[str, ...]) -> TrainState:
    """Applies ``grads`` (missing subtrees count as zero) to the stage's trainable subtrees; labels in
    ``untouched`` skip this step entirely."""
    params = trainable(state, spec.phases[stage])
    grads = {name: grads[name] if name in grads else jax.tree.map(jnp.zeros_like, params[name]) for name in params}
    new_params, opt_state = optim.apply_gradients(
        spec.optimizers[stage], spec.labels[stage], params, grads, state.opt_state, untouched=untouched
    )
    return state.replace(**new_params, opt_state=opt_state, batch_stats=batch_stats)


def sub_step(spec: StepSpec, state: TrainState, batch: Batch, *, stage: int, prompted: bool, key: jax.Array):
    """One optimiser step on one batch; differentiates only what this sub-step updates."""
    phase = spec.phases[stage]
    params = trainable(state, phase)
    differentiated = params if prompted else {k: v for k, v in params.items() if k != "prompt"}
    masks = None if "scores" in phase.trains else state.masks
    loss, accuracy, batch_stats, grads = loss_and_grads(spec, state, differentiated, batch, phase=phase,
                                                        prompted=prompted, masks=masks, key=key)
    untouched = ("prompt",) if "prompt" in params and not prompted else ()
    return apply_grads(spec, state, stage, grads, batch_stats, untouched), loss, accuracy


@functools.partial(jax.jit, static_argnames=("spec", "stage"), donate_argnums=0)
def train_iteration(
    state: TrainState, batches: tuple[Batch, ...], *, spec: StepSpec, stage: int
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration of ``stage``: its phase's ``Iteration`` on one batch of each of the streams it reads.

    ``state`` is donated: its buffers are reused for the result, so keep no
    other reference to them.
    An iteration whose losses or updated parameters are not all finite leaves
    the state as it was but for ``step`` (``health.keep_if_finite``); the
    metrics' ``finite`` flag says which happened.
    """
    phase = spec.phases[stage]
    if len(batches) != phase.num_batches:
        raise ValueError(f"stage {stage} (streams {phase.iteration.streams}) takes {phase.num_batches} batches, "
                         f"got {len(batches)}")
    before = state
    key = jax.random.fold_in(jax.random.fold_in(state.rng, stage), state.step)
    state, metrics = phase.iteration(spec, state, tuple(batches), stage=stage, key=key)
    losses = {name: value for name, value in metrics.items() if name.startswith("loss")}
    state, metrics[health.FINITE] = health.keep_if_finite(state, before, losses, trainable(state, phase))
    return state.replace(step=state.step + 1), metrics


def eval_prompt_key(rng: jax.Array) -> jax.Array:
    """The key of evaluation-time prompts (the 'random' kind's square), fixed per run."""
    return jax.random.fold_in(rng, EVAL_SEED)


def eval_logits(spec: Spec, state: TrainState, images: jax.Array, *, with_prompt: bool) -> jax.Array:
    """Eval-mode source logits (BatchNorm running statistics) through the masks in force."""
    weights = masked_weights(spec, state.weights, masks_in_force(spec, state))
    x = prompts.model_inputs(spec.prompt, state.prompt, images, prompted=with_prompt,
                             key=eval_prompt_key(state.rng))
    logits, _ = functional.apply_model(spec.graphdef, weights, state.batch_stats, x, train=False)
    return logits


@functools.partial(jax.jit, static_argnames=("model", "with_prompt"))
def _eval_step(state: TrainState, batch: Batch, *, model: MaskedModel, with_prompt: bool) -> dict[str, jax.Array]:
    mapped = label_mapping.map_logits(eval_logits(model, state, batch["image"], with_prompt=with_prompt),
                                      state.label_map)
    labels = batch["label"]
    valid = labels >= 0  # padding rows of the last batch carry label -1
    losses = optax.softmax_cross_entropy_with_integer_labels(mapped, jnp.maximum(labels, 0))
    correct = jnp.sum((jnp.argmax(mapped, axis=-1) == labels) & valid)
    return {"loss_sum": jnp.sum(jnp.where(valid, losses, 0.0)), "correct": correct, "count": jnp.sum(valid)}


def eval_step(state: TrainState, batch: Batch, *, spec: StepSpec, with_prompt: bool = False) -> dict[str, jax.Array]:
    """Summed loss, correct count and count of a batch's real rows (label >= 0), label-mapped.

    Without the prompt by default, as the authors evaluate; ``with_prompt=True``
    evaluates prompted inputs instead. Compiled once per masked model.
    """
    return _eval_step(state, batch, model=spec.masked_model, with_prompt=with_prompt)


@functools.partial(jax.jit, static_argnames=("model", "num_target", "with_prompt"))
def _prediction_counts(state: TrainState, batch: Batch, *, model: MaskedModel, num_target: int,
                       with_prompt: bool) -> jax.Array:
    logits = eval_logits(model, state, batch["image"], with_prompt=with_prompt)
    return label_mapping.prediction_counts(logits, batch["label"], num_target)


def source_prediction_counts(state: TrainState, batch: Batch, *, spec: StepSpec, num_target: int,
                             with_prompt: bool = True) -> jax.Array:
    """Label-mapping counts D[src, tgt] of one batch, through the masks in force (and the prompt, for VPNs)."""
    return _prediction_counts(state, batch, model=spec.masked_model, num_target=num_target, with_prompt=with_prompt)
