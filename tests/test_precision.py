"""Precision policy and kernel choices: bfloat16 compute next to float32, and every conv/pool implementation.

float64 end to end (threshold search, BatchNorm) runs under x64 in tests/isolated/check_precision.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vpns_jax.core import masking, optim, prompts, steps
from vpns_jax.models import create_model, functional, layers

SIZE = 16
BATCH = 8
DENSITY = 0.2
# bf16 keeps 8 bits of mantissa: one iteration's losses agree with float32's to within a few percent.
BF16_LOSS_RTOL = 0.05


def _spec_and_state(dtype):
    model = create_model("resnet18", num_classes=6, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0), dtype=dtype)
    _, weights, batch_stats = functional.split_model(model)
    scores = masking.init_scores(weights, functional.leaf_kinds(model))
    prompt_spec = prompts.PromptSpec("pad", input_size=SIZE, output_size=SIZE, pad_size=2)
    prompt = prompts.init_prompt(prompt_spec)
    groups = {1: {"scores": optim.GroupOptimizer("adam", 0.01), "prompt": optim.GroupOptimizer("adam", 0.01)},
              2: {"weights": optim.GroupOptimizer("sgd", 0.01), "bn": optim.GroupOptimizer("sgd", 0.01),
                  "prompt": optim.GroupOptimizer("sgd", 0.01)}}
    spec = steps.make_step_spec(model, prompt_spec, prompt_params=prompt, scores=scores, stage_groups=groups,
                                epochs={1: 1, 2: 1}, iterations_per_epoch=4)
    state = steps.init_state(spec, weights=weights, batch_stats=batch_stats, scores=scores, prompt=prompt,
                             density=DENSITY, label_map=jnp.arange(4), rng=jax.random.PRNGKey(0))
    return spec, state


@pytest.fixture(scope="module")
def iterations():
    """One stage-1 and one stage-2 iteration in float32 and in bfloat16 from the same state and batches."""
    rng = np.random.default_rng(0)
    batches = tuple({"image": jnp.asarray(rng.uniform(size=(BATCH, SIZE, SIZE, 3)), jnp.float32),
                     "label": jnp.asarray(np.arange(BATCH) % 4, jnp.int32)} for _ in range(2))
    out = {}
    for dtype in ("float32", "bfloat16"):
        spec, state = _spec_and_state(dtype)
        state, m1 = steps.train_iteration(state, batches, spec=spec, stage=1)
        masks = jax.device_get(steps.current_masks(spec, state))
        state = steps.start_stage(spec, state, 2)
        state, m2 = steps.train_iteration(state, batches, spec=spec, stage=2)
        out[dtype] = (jax.device_get(state), jax.device_get((m1, m2)), masks)
    return out


def test_bfloat16_iterations_stay_near_float32_and_keep_exact_counts(iterations):
    (state32, (m1_32, m2_32), masks32), (state16, (m1_16, m2_16), masks16) = iterations["float32"], iterations["bfloat16"]
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


@pytest.mark.parametrize("backend, cpu_kernels", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_auto_takes_the_cpu_kernels_on_cpu_only(monkeypatch, backend, cpu_kernels):
    monkeypatch.setattr(layers, "backend", lambda: backend)
    x = jnp.ones((2, 4, 4, 8), jnp.float32)  # a 4 px map: im2col territory on CPU
    kernel = jnp.ones((3, 3, 8, 8), jnp.float32)
    conv = str(jax.make_jaxpr(lambda a: layers.conv2d(a, kernel, 1, 1))(x))
    assert ("conv_general_dilated" not in conv) == cpu_kernels
    pool = str(jax.make_jaxpr(lambda a: layers.max_pool2d(a, 3, 2, 1))(x))
    pool_grad = str(jax.make_jaxpr(jax.grad(lambda a: layers.max_pool2d(a, 3, 2, 1).sum()))(x))
    assert ("custom_vjp_call" in pool) == cpu_kernels and ("select_and_scatter" in pool_grad) == (not cpu_kernels)
    # Named choices ignore the backend.
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda a: layers.conv2d(a, kernel, 1, 1, "lax"))(x))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda a: layers.conv2d(a, kernel, 1, 1, "im2col"))(x))


def test_unknown_kernel_or_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown conv_impl 'winograd'"):
        create_model("resnet18", num_classes=5, rngs=nnx.Rngs(0), conv_impl="winograd")
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        create_model("resnet18", num_classes=5, rngs=nnx.Rngs(0), dtype="float16")
    with pytest.raises(ValueError, match="implementation 'fast' is unknown"):
        layers.max_pool2d(jnp.ones((1, 4, 4, 1)), impl="fast")
