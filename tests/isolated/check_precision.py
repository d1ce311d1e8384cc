"""The precision policy and kernel choices, compiled: bfloat16 iterations next to float32, every conv and pool
kernel's gradients, and float64 end to end under ``jax.enable_x64`` (threshold search, BatchNorm).

Run in a process of their own with the gradient checks (tests/test_isolated_gradient_checks.py): they switch
x64 on and compile many variants of the models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vpns_jax.core import masking, optim, prompts, steps
from vpns_jax.methods.vpns import VPNS_PHASES
from vpns_jax.models import create_model, functional, layers

SIZE = 16
BATCH = 8
DENSITY = 0.2
# bf16 keeps 8 bits of mantissa: one iteration's losses agree with float32's to within a few percent.
BF16_LOSS_RTOL = 0.05


@pytest.mark.parametrize("kind", ["random", "ties", "beyond_float32"])
def test_float64_threshold_is_the_kth_value_of_a_float64_sort(kind) -> None:
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        if kind == "random":
            leaves = [rng.standard_normal((40, 30)), rng.standard_normal((7,)), rng.standard_normal((300_000,))]
        elif kind == "ties":
            leaves = [np.round(rng.standard_normal((50, 20)), 1), np.zeros((64,)), np.round(rng.standard_normal(999), 1)]
        else:  # values that float32 would merge: they differ below float32's resolution
            leaves = [1.0 + np.arange(2000) * 1e-12, 1.0 + np.arange(500)[::-1] * 3e-13]
        scores = {f"leaf{i}": {"kernel": jnp.asarray(leaf, jnp.float64)} for i, leaf in enumerate(leaves)}
        flat = np.sort(np.abs(np.concatenate([leaf.reshape(-1) for leaf in leaves])))
        for density in (0.9, 0.5, 0.1, 0.003):
            ks = masking.prune_counts(scores, density)
            tau = masking.thresholds(scores, ks)
            assert tau.dtype == jnp.float64 and float(tau[0]) == flat[ks[0] - 1]
            masks = masking.masks_from_scores(scores, ks)
            kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
            # Kept: |s| > tau, so entries tied at tau are pruned with it.
            assert kept == int(np.sum(flat > flat[ks[0] - 1]))
        per_layer = masking.thresholds(scores, masking.prune_counts(scores, 0.5, "layer"), "layer")
        for i, leaf in enumerate(leaves):
            k = int(0.5 * leaf.size)
            assert float(per_layer[i]) == np.sort(np.abs(leaf.reshape(-1)))[k - 1]


def test_float64_batchnorm_and_its_running_statistics_match_numpy() -> None:
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        bn = layers.BatchNorm2d(5, momentum=0.1, eps=1e-5)
        graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
        params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        stats = jax.tree.map(lambda s: jnp.asarray(s, jnp.float64), stats)
        bn = nnx.merge(graphdef, params, stats)
        x = rng.standard_normal((4, 3, 3, 5)) * 3.0 + 1.0
        y = bn(jnp.asarray(x), train=True)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
        expected = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        assert bn.mean[...].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * var * n / (n - 1), rtol=0, atol=1e-12)


def test_a_float64_model_computes_in_float64_and_float32_statistics_keep_their_dtype() -> None:
    with jax.enable_x64(True):
        model = create_model("resnet18", num_classes=4, width=1 / 16, stem="imagenet", rngs=nnx.Rngs(0))
        graphdef, weights, batch_stats = functional.split_model(model)
        x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 32, 32, 3)))
        weights64 = jax.tree.map(lambda w: w.astype(jnp.float64), weights)
        stats64 = jax.tree.map(lambda s: s.astype(jnp.float64), batch_stats)
        logits, new_stats = functional.apply_model(graphdef, weights64, stats64, x, train=True)
        assert logits.dtype == jnp.float64
        assert all(s.dtype == jnp.float64 for s in jax.tree.leaves(new_stats))
        # float32 parameters under float64 inputs: the statistics stay float32, so a state keeps its dtypes.
        _, kept = functional.apply_model(graphdef, weights, batch_stats, x, train=True)
        assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(kept))
        logits32, _ = functional.apply_model(graphdef, weights, batch_stats, x.astype(jnp.float32), train=True)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(logits32), rtol=1e-3, atol=1e-4)


def _spec_and_state(dtype):
    model = create_model("resnet18", num_classes=6, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0), dtype=dtype)
    _, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    prompt_spec = prompts.PromptSpec("pad", input_size=SIZE, output_size=SIZE, pad_size=2)
    prompt = prompts.init_prompt(prompt_spec)
    groups = {1: {"scores": optim.GroupOptimizer("adam", 0.01), "prompt": optim.GroupOptimizer("adam", 0.01)},
              2: {"weights": optim.GroupOptimizer("sgd", 0.01), "bn": optim.GroupOptimizer("sgd", 0.01),
                  "prompt": optim.GroupOptimizer("sgd", 0.01)}}
    spec = steps.make_step_spec(model, prompt_spec, prompt_params=prompt, scores=scores, phases=VPNS_PHASES,
                                stage_groups=groups, epochs={1: 1, 2: 1}, iterations_per_epoch=4)
    state = steps.init_state(spec, weights=weights, batch_stats=batch_stats, scores=scores, prompt=prompt,
                             density=DENSITY, label_map=jnp.arange(4), rng=jax.random.PRNGKey(0))
    return spec, state


@pytest.fixture(scope="module")
def iterations():
    """One stage-1 iteration in float32 and in bfloat16 from the same state and batches, then one stage-2
    iteration in each from float32's stage-1 state. Not from its own: stage 1's Adam step moves scores by about
    the learning rate whatever the gradient's size, so bfloat16's gradients reorder scores near the threshold and
    stage 2 would start from other masks (its losses then differed by up to 7.8 % on a CPU with AMX-BF16, where
    bfloat16 matmuls run natively); from the same state the losses measure the compute precision alone."""
    rng = np.random.default_rng(0)
    batches = tuple({"image": jnp.asarray(rng.uniform(size=(BATCH, SIZE, SIZE, 3)), jnp.float32),
                     "label": jnp.asarray(np.arange(BATCH) % 4, jnp.int32)} for _ in range(2))
    out, after_stage1 = {}, None
    for dtype in ("float32", "bfloat16"):
        spec, state = _spec_and_state(dtype)
        state, m1 = steps.train_iteration(state, batches, spec=spec, stage=1)
        masks = jax.device_get(steps.current_masks(spec, state))
        after_stage1 = jax.device_get(state) if after_stage1 is None else after_stage1  # a copy: steps donate
        state = steps.start_stage(spec, jax.tree.map(jnp.asarray, after_stage1), 2)
        state, m2 = steps.train_iteration(state, batches, spec=spec, stage=2)
        out[dtype] = (jax.device_get(state), jax.device_get((m1, m2)), masks)
    return out


def test_bfloat16_iterations_stay_near_float32_and_keep_exact_counts(iterations):
    (_, (m1_32, m2_32), masks32), (state16, (m1_16, m2_16), masks16) = (iterations["float32"],
                                                                        iterations["bfloat16"])
    for a, b in ((m1_32, m1_16), (m2_32, m2_16)):
        for key in ("loss_prompted", "loss_plain"):
            np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=BF16_LOSS_RTOL)
        assert bool(b["finite"])
    total = sum(m.size for m in jax.tree.leaves(masks16))
    kept = total - int((1 - DENSITY) * total)
    for masks in (masks32, masks16):
        assert sum(int(m.sum()) for m in jax.tree.leaves(masks)) == kept  # the threshold runs on float32 scores
    # Parameters, scores, prompt, statistics and optimiser state stay float32 under bfloat16 compute.
    for leaf in jax.tree.leaves((state16.weights, state16.scores, state16.prompt, state16.batch_stats,
                                 state16.opt_state)):
        assert leaf.dtype in (np.float32, np.int32), leaf.dtype
    assert np.abs(state16.prompt["program"]).max() > 0  # the prompt trained through the bfloat16 network


def test_bfloat16_convs_run_in_bfloat16_and_logits_come_back_in_float32():
    model = create_model("resnet18", num_classes=6, width=1 / 16, stem="imagenet", rngs=nnx.Rngs(0),
                         dtype="bfloat16")
    graphdef, weights, batch_stats = functional.split_model(model)
    x = jnp.ones((2, SIZE, SIZE, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda w: functional.apply_model(graphdef, w, batch_stats, x, train=False)[0])(weights))
    assert "conv_general_dilated" in jaxpr and "bf16[2,8,8," in jaxpr  # the stem conv's output is bfloat16
    logits, _ = functional.apply_model(graphdef, weights, batch_stats, x, train=False)
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(weights))


@pytest.mark.parametrize("name, stem, size", [("resnet18", "imagenet", 32), ("resnet18", "cifar", 16),
                                              ("vgg16_bn", "imagenet", 32)])
def test_every_kernel_choice_gives_the_same_outputs_and_gradients(name, stem, size):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=(4, size, size, 3)), jnp.float32)
    results = {}
    for conv_impl in layers.CONV_IMPLS:
        for pool_impl in layers.POOL_IMPLS:
            model = create_model(name, num_classes=5, width=1 / 16, stem=stem, rngs=nnx.Rngs(0),
                                 conv_impl=conv_impl, pool_impl=pool_impl)
            graphdef, weights, batch_stats = functional.split_model(model)

            def loss(w):
                logits, _ = functional.apply_model(graphdef, w, batch_stats, x, train=True,
                                                   dropout_key=jax.random.PRNGKey(0))
                return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

            results[(conv_impl, pool_impl)] = jax.jit(jax.value_and_grad(loss))(weights)
    ref_value, ref_grads = results[("lax", "lax")]
    for key, (value, grads) in results.items():
        np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, err_msg=str(key))
        # float32 summation order differs between the kernels: held to 1e-4 of the largest gradient entry (a
        # conv bias before BatchNorm has a gradient of exactly 0 in exact arithmetic, i.e. rounding noise here).
        scale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(ref_grads))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * scale, err_msg=str(key))
