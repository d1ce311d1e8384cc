"""The baselines' phases on a width-1/16 ResNet-18: one-stream and bilevel iterations, the BatchNorm L1 term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import adam_counts, clone
from vpns_jax import methods
from vpns_jax.core import label_mapping, masking, optim, prompts, steps
from vpns_jax.core.phases import Phase
from vpns_jax.methods import bip
from vpns_jax.methods.iterations import CleanStream, OneStream, TwoStreams
from vpns_jax.models import create_model, functional

pytestmark = pytest.mark.slow  # every baseline phase's training iterations, compiled: minutes on 2 cores

SIZE, BATCH = 16, 8


def _identical(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                            strict=True))


@pytest.fixture(scope="module")
def parts():
    model = create_model("resnet18", num_classes=6, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0))
    _, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    spec_prompt = prompts.PromptSpec("pad", input_size=SIZE, output_size=SIZE, pad_size=2)
    rng = np.random.default_rng(0)
    batches = tuple({"image": jnp.asarray(rng.uniform(size=(BATCH, SIZE, SIZE, 3)), jnp.float32),
                     "label": jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32)} for _ in range(2))
    return model, weights, batch_stats, scores, spec_prompt, batches


def _spec_and_state(parts, phases, groups, *, masks=None):
    model, weights, batch_stats, scores, spec_prompt, _ = parts
    prompt = prompts.init_prompt(spec_prompt)
    spec = steps.make_step_spec(model, spec_prompt, prompt_params=prompt, scores=scores, stage_groups=groups,
                                epochs={s: 2 for s in phases}, iterations_per_epoch=4, phases=phases)
    state = steps.init_state(spec, weights=clone(weights), batch_stats=clone(batch_stats), scores=clone(scores),
                             prompt=prompt, density=0.3, label_map=jnp.asarray([2, 0, 5]),
                             rng=jax.random.PRNGKey(0), masks=masks)
    return spec, state


def test_a_phase_takes_an_iteration_and_a_plan_only_the_streams_a_run_offers():
    with pytest.raises(TypeError, match="must be an Iteration"):
        Phase(("weights",), "one")
    with pytest.raises(ValueError, match="trains some of weights, scores, prompt"):
        Phase(("bn",), OneStream())

    class Elsewhere(OneStream):
        streams = ("elsewhere",)

    with pytest.raises(ValueError, match="offers the streams"):
        methods.Plan(methods.get_method("hydra"), {1: Phase(("weights",), Elsewhere())}, {}, {}, ())


def test_one_stream_score_phase_steps_once_per_iteration_and_freezes_the_rest(parts):
    batches = parts[-1]
    phases = {1: Phase(("scores",), OneStream()), 2: Phase(("weights",), OneStream())}
    groups = {1: {"scores": optim.GroupOptimizer("adam", 0.01)},
              2: {"weights": optim.GroupOptimizer("sgd", 0.01), "bn": optim.GroupOptimizer("sgd", 0.01)}}
    spec, state = _spec_and_state(parts, phases, groups)
    before = clone(state)
    for _ in range(3):
        state, metrics = steps.train_iteration(state, batches[:1], spec=spec, stage=1)
    assert set(metrics) == {"loss_plain", "accuracy_plain", "finite"} and bool(metrics["finite"])
    assert adam_counts(state.opt_state) == {"scores": 3}
    assert _identical(before.weights, state.weights) and _identical(before.prompt, state.prompt)
    assert not _identical(before.scores, state.scores)
    with pytest.raises(ValueError, match="takes 1 batches"):
        steps.train_iteration(clone(state), batches, spec=spec, stage=1)


def test_bilevel_iteration_steps_weights_then_scores_with_the_implicit_correction(parts):
    batches = parts[-1]
    groups = {1: {"weights": optim.GroupOptimizer("sgd", 0.01), "bn": optim.GroupOptimizer("sgd", 0.01),
                  "scores": optim.GroupOptimizer("sgd", 0.1, weight_decay=0.0, momentum=0.0)}}
    results = {}
    for lr_b in (0.0, 0.5):
        phases = {1: Phase(("weights", "scores"), bip.Bilevel(lr_b))}
        spec, state = _spec_and_state(parts, phases, groups)
        initial = clone(state)
        state, metrics = steps.train_iteration(state, batches, spec=spec, stage=1)
        results[lr_b] = (initial, state)
    initial, plain = results[0.0]
    assert not _identical(initial.weights, plain.weights) and not _identical(initial.scores, plain.scores)
    # Same weight step; with plain SGD on the scores the two score steps differ by lr * lr_b * g_s * g_w.
    _, corrected = results[0.5]
    assert _identical(plain.weights, corrected.weights)
    step_plain = np.asarray(plain.scores["conv1"]["kernel"] - initial.scores["conv1"]["kernel"])
    step_corrected = np.asarray(corrected.scores["conv1"]["kernel"] - initial.scores["conv1"]["kernel"])
    g_s = -step_plain / 0.1
    # g_w: the weight gradient on the score batch, at the weights after the weight step and the initial scores.
    graphdef = functional.split_model(parts[0])[0]

    def loss(w):
        masks = masking.masks_from_scores(initial.scores, initial.prune_k)
        logits, _ = functional.apply_model(graphdef, masking.apply_masks(w, masks), initial.batch_stats,
                                           prompts.normalize(batches[1]["image"]), train=True)
        return label_mapping.mapped_loss(logits, batches[1]["label"], initial.label_map)[0]

    g_w = np.asarray(jax.jit(jax.grad(loss))(plain.weights)["conv1"]["kernel"])  # jitted: eager is op by op
    assert np.abs(g_s * g_w).max() > 0
    np.testing.assert_allclose(step_corrected - step_plain, 0.1 * 0.5 * g_s * g_w, rtol=1e-3, atol=1e-7)  # float32 ulps of the scores


def test_bn_l1_adds_lambda_sign_gamma_to_the_scale_gradient(parts):
    batches = parts[-1]
    groups = {0: {"weights": optim.GroupOptimizer("sgd", 0.1, weight_decay=0.0, momentum=0.0),
                  "bn": optim.GroupOptimizer("sgd", 0.1, weight_decay=0.0, momentum=0.0)}}
    out = {}
    for l1 in (0.0, 0.01):
        spec, state = _spec_and_state(parts, {0: Phase(("weights",), OneStream(), bn_l1=l1)}, groups,
                                      masks=jax.tree.map(jnp.ones_like, parts[3]))  # fresh: the step donates them
        gamma = np.asarray(state.weights["bn1"]["scale"]).copy()
        state, _ = steps.train_iteration(state, batches[:1], spec=spec, stage=0)
        out[l1] = np.asarray(state.weights["bn1"]["scale"])
    np.testing.assert_allclose(out[0.01] - out[0.0], -0.1 * 0.01 * np.sign(gamma), atol=1e-6)


def test_the_clean_stream_alone_steps_scores_and_prompt_once_per_iteration(parts):
    batches = parts[-1]
    phases = {1: Phase(("scores", "prompt"), CleanStream())}
    groups = {1: {"scores": optim.GroupOptimizer("adam", 0.01), "prompt": optim.GroupOptimizer("adam", 0.01)}}
    spec, state = _spec_and_state(parts, phases, groups)
    before = clone(state)
    for _ in range(3):
        state, metrics = steps.train_iteration(state, batches[:1], spec=spec, stage=1)
    assert set(metrics) == {"loss_prompted", "accuracy_prompted", "finite"}
    assert adam_counts(state.opt_state) == {"scores": 3, "prompt": 3}
    assert _identical(before.weights, state.weights) and not _identical(before.prompt, state.prompt)


def test_vpns_without_prompt_matches_vpns_with_a_zero_frozen_prompt_step_for_step(parts):
    batches = parts[-1]
    adam = {"scores": optim.GroupOptimizer("adam", 0.01), "prompt": optim.GroupOptimizer("adam", 0.01)}
    vpns_spec, vpns = _spec_and_state(parts, {1: Phase(("scores", "prompt"), TwoStreams())}, {1: adam})
    bare_spec, bare = _spec_and_state(parts, {1: Phase(("scores",), TwoStreams())}, {1: {"scores": adam["scores"]}})
    zero = clone(vpns.prompt)
    assert set(bare.opt_state.inner_states) == {"scores"}  # no prompt optimiser state at all
    for _ in range(3):
        vpns, vpns_metrics = steps.train_iteration(vpns.replace(prompt=clone(zero)), batches, spec=vpns_spec, stage=1)
        bare, bare_metrics = steps.train_iteration(bare, batches, spec=bare_spec, stage=1)
        # A zero pad prompt adds exactly 0 to every pixel in [0, 1]: the same inputs, losses and score steps.
        assert float(bare_metrics["loss_prompted"]) == float(vpns_metrics["loss_prompted"])
        assert float(bare_metrics["loss_plain"]) == float(vpns_metrics["loss_plain"])
        assert _identical(bare.scores, vpns.scores) and _identical(bare.batch_stats, vpns.batch_stats)
        assert _identical(bare.opt_state.inner_states["scores"], vpns.opt_state.inner_states["scores"])
    assert _identical(bare.prompt, zero)  # never updated
