"""Training and evaluation steps on a width-1/8 ResNet-18: frozen subtrees, sub-step semantics, no retrace.

Everything compiles once per stage for the whole module (a module-scoped run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import adam_counts, clone
from vpns_jax.core import label_mapping, masking, optim, prompts, steps
from vpns_jax.methods.vpns import VPNS_PHASES
from vpns_jax.models import create_model, functional

pytestmark = pytest.mark.slow  # both stages' training iterations, compiled: minutes on 2 cores

NUM_TARGET = 4
BATCH = 16
SIZE = 32


def _assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


@pytest.fixture(scope="module")
def setup():
    model = create_model("resnet18", num_classes=10, width=1 / 8, stem="cifar", rngs=nnx.Rngs(0))
    _, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    spec_prompt = prompts.PromptSpec("pad", input_size=SIZE, output_size=SIZE, pad_size=4)
    prompt = prompts.init_prompt(spec_prompt)
    # Learning rates far above the reference so that three iterations visibly lower the loss.
    groups = {1: {"scores": optim.GroupOptimizer("adam", 0.05), "prompt": optim.GroupOptimizer("adam", 0.05)},
              2: {"weights": optim.GroupOptimizer("sgd", 0.05), "bn": optim.GroupOptimizer("sgd", 0.05),
                  "prompt": optim.GroupOptimizer("sgd", 0.05)}}
    spec = steps.make_step_spec(model, spec_prompt, prompt_params=prompt, scores=scores, phases=VPNS_PHASES,
                                stage_groups=groups, epochs={1: 3, 2: 3}, iterations_per_epoch=10)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(BATCH, SIZE, SIZE, 3)), jnp.float32)
    labels = jnp.asarray(np.arange(BATCH) % NUM_TARGET, jnp.int32)
    batch = {"image": images, "label": labels}
    state = steps.init_state(spec, weights=weights, batch_stats=batch_stats, scores=scores, prompt=prompt,
                             density=0.2, label_map=jnp.asarray([3, 1, 7, 0]), rng=jax.random.PRNGKey(0))
    return spec, state, batch


@pytest.fixture(scope="module")
def run(setup):
    """Three stage-1 then three stage-2 iterations on one fixed batch, recording what the tests check."""
    spec, state, batch = setup
    # Other modules' specs share the jit cache: count this module's entries from here.
    record = {"initial": clone(state), "stage1": [], "stage2": [], "cache_before": steps.train_iteration._cache_size()}
    for _ in range(3):
        before = clone(state)
        state, metrics = steps.train_iteration(state, (batch, batch), spec=spec, stage=1)
        record["stage1"].append((before, clone(state), jax.device_get(metrics)))
    record["after_stage1_masks"] = clone(steps.current_masks(spec, state))
    state = steps.start_stage(spec, state, 2)
    record["stage2_start"] = clone(state)
    for _ in range(3):
        before = clone(state)
        state, metrics = steps.train_iteration(state, (batch, batch), spec=spec, stage=2)
        record["stage2"].append((before, clone(state), jax.device_get(metrics)))
    record["final"] = state
    return record


def test_three_iterations_of_each_stage_lower_the_loss(run):
    for stage in ("stage1", "stage2"):
        losses = [float(m["loss_prompted"]) for _, _, m in run[stage]]
        assert losses[-1] < losses[0], (stage, losses)
        losses = [float(m["loss_plain"]) for _, _, m in run[stage]]
        assert losses[-1] < losses[0], (stage, losses)


def test_stage1_freezes_weights_and_bn_affine_but_updates_running_stats(run):
    for before, after, _ in run["stage1"]:
        _assert_bit_identical(before.weights, after.weights)
        assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats)))
        assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before.scores), jax.tree.leaves(after.scores)))
        assert not np.array_equal(before.prompt["program"], after.prompt["program"])


def test_stage2_freezes_scores_and_masks_and_trains_weights(run):
    _assert_bit_identical(run["stage2_start"].masks, run["after_stage1_masks"])
    for before, after, _ in run["stage2"]:
        _assert_bit_identical(before.scores, after.scores)
        _assert_bit_identical(before.masks, after.masks)
        assert not np.array_equal(before.weights["conv1"]["kernel"], after.weights["conv1"]["kernel"])
        assert not np.array_equal(before.weights["bn1"]["scale"], after.weights["bn1"]["scale"])


def test_prompt_steps_once_per_iteration_and_model_side_twice(run):
    # After 3 iterations of stage 1: scores stepped 6 times (both sub-steps), the prompt 3 times (sub-step a only).
    assert adam_counts(run["stage1"][-1][1].opt_state) == {"scores": 6, "prompt": 3}


def test_pad_prompt_learns_only_its_frame(run):
    program = run["final"].prompt["program"]
    inner = np.asarray(program)[4:-4, 4:-4]
    np.testing.assert_array_equal(inner, 0.0)
    assert np.abs(np.asarray(program)[:4]).sum() > 0


def test_kept_count_is_exact_and_constant_through_stage2(run):
    scores = run["initial"].scores
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(scores))
    kept = sum(int(m.sum()) for m in jax.tree.leaves(run["final"].masks))
    assert kept == n - int(0.8 * n)


def test_each_stage_compiles_once(run, setup):
    spec, _, batch = setup
    # 3 iterations of each stage ran in `run`: one cache entry per stage, no retrace.
    assert steps.train_iteration._cache_size() - run["cache_before"] == 2
    state = steps.start_stage(spec, clone(run["final"]), 2)  # copied: the step donates its input
    steps.train_iteration(state, (batch, batch), spec=spec, stage=2)
    assert steps.train_iteration._cache_size() - run["cache_before"] == 2


@pytest.mark.parametrize("stage", [1, 2])
def test_a_nan_batch_leaves_the_state_bit_identical_but_for_its_step(run, setup, stage):
    spec, _, batch = setup
    state = steps.start_stage(spec, clone(run["final"]), 2) if stage == 2 else clone(run["stage1"][-1][1])
    before = clone(state)
    poisoned = {"image": batch["image"].at[3, 5, 5, 0].set(jnp.nan), "label": batch["label"]}
    # The NaN in the plain batch (sub-step b): sub-step a's finite update is dropped with it.
    state, metrics = steps.train_iteration(state, (batch, poisoned), spec=spec, stage=stage)
    # The loss itself may stay finite (XLA's ReLU can map NaN to 0); the NaN gradients are caught all the same.
    assert not bool(metrics["finite"]) and np.isfinite(float(metrics["loss_prompted"]))
    assert int(state.step) == int(before.step) + 1
    _assert_bit_identical(state.replace(step=before.step), before)
    assert bool(run["stage1"][0][2]["finite"]) and bool(run["stage2"][-1][2]["finite"])


def test_eval_step_counts_and_prompt_switch(run, setup):
    spec, _, batch = setup
    state = run["final"]
    plain = jax.device_get(steps.eval_step(state, batch, spec=spec))
    prompted = jax.device_get(steps.eval_step(state, batch, spec=spec, with_prompt=True))
    assert int(plain["count"]) == BATCH and 0 <= int(plain["correct"]) <= BATCH
    # The learned frame changes the inputs, so the loss differs with the prompt.
    assert float(plain["loss_sum"]) != float(prompted["loss_sum"])
    # Eval through the fixed masks equals a hand-assembled forward pass.
    weights = masking.apply_masks(state.weights, state.masks)
    logits, _ = functional.apply_model(spec.graphdef, weights, state.batch_stats, prompts.normalize(batch["image"]), train=False)
    mapped = label_mapping.map_logits(logits, state.label_map)
    assert int(plain["correct"]) == int(jnp.sum(jnp.argmax(mapped, -1) == batch["label"]))


def test_label_mapping_counts_through_the_network(run, setup):
    spec, _, batch = setup
    counts = np.asarray(steps.source_prediction_counts(run["final"], batch, spec=spec, num_target=NUM_TARGET))
    assert counts.shape == (10, NUM_TARGET)
    assert counts.sum() == BATCH and counts.sum(axis=0).tolist() == [BATCH // NUM_TARGET] * NUM_TARGET


def test_eval_step_ignores_padding_rows(run, setup):
    spec, _, batch = setup
    state = run["final"]
    padded = {"image": batch["image"], "label": batch["label"].at[12:].set(-1)}
    full = jax.device_get(steps.eval_step(state, batch, spec=spec))
    part = jax.device_get(steps.eval_step(state, padded, spec=spec))
    first = jax.device_get(steps.eval_step(state, {k: v[:12] for k, v in batch.items()}, spec=spec))
    assert int(part["count"]) == 12 and int(full["count"]) == BATCH
    assert int(part["correct"]) == int(first["correct"])
    assert float(part["loss_sum"]) == pytest.approx(float(first["loss_sum"]), rel=1e-5)
