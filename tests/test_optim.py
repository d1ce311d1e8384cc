"""Optimisers: labels, torch-style SGD/Adam with coupled weight decay, epoch cosine, untouched groups."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpns_jax.core import optim

KINDS = {"conv": {"kernel": "conv_kernel"}, "bn": {"scale": "bn", "bias": "bn"}, "fc": {"kernel": "dense_kernel", "bias": "bias"}}
WEIGHTS = {"conv": {"kernel": jnp.ones((2,))}, "bn": {"scale": jnp.ones((2,)), "bias": jnp.zeros((2,))},
           "fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros((2,))}}


def test_every_leaf_gets_its_label():
    labels = optim.param_labels({"weights": WEIGHTS, "prompt": {"program": jnp.zeros((4, 4, 3))}}, KINDS)
    assert labels == {
        "weights": {"conv": {"kernel": "weights"}, "bn": {"scale": "bn", "bias": "bn"},
                    "fc": {"kernel": "weights", "bias": "weights"}},
        "prompt": {"program": "prompt"},
    }
    assert optim.param_labels({"scores": {"conv": {"kernel": jnp.ones(2)}}}, KINDS) == {"scores": {"conv": {"kernel": "scores"}}}
    with pytest.raises(ValueError, match="no optimiser label"):
        optim.param_labels({"batch_stats": {}}, KINDS)


def test_epoch_cosine_is_constant_within_an_epoch():
    schedule = optim.epoch_cosine_schedule(0.1, epochs=4, steps_per_epoch=3)
    expected = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    got = [float(schedule(step)) for step in range(12)]
    np.testing.assert_allclose(got, np.repeat(expected, 3), rtol=1e-6)


def test_torch_adam_with_coupled_weight_decay_by_hand():
    tx = optim.group_transform(optim.GroupOptimizer("adam", 0.1, weight_decay=0.1), lambda _: 0.1)
    p = jnp.asarray([1.0])
    state = tx.init(p)
    updates, state = tx.update(jnp.asarray([0.5]), state, p)
    p = optax.apply_updates(p, updates)
    # g = 0.5 + 0.1*1 = 0.6; m_hat = 0.6, v_hat = 0.36 -> step = 0.1 * 0.6 / (0.6 + 1e-8).
    assert float(p[0]) == pytest.approx(1 - 0.1 * 0.6 / (0.6 + 1e-8), rel=1e-6)
    updates, state = tx.update(jnp.asarray([0.5]), state, p)
    p2 = optax.apply_updates(p, updates)
    g2 = 0.5 + 0.1 * float(p[0])
    m = 0.9 * 0.1 * 0.6 + 0.1 * g2
    v = 0.999 * 0.001 * 0.36 + 0.001 * g2 ** 2
    m_hat, v_hat = m / (1 - 0.9 ** 2), v / (1 - 0.999 ** 2)
    # float32 arithmetic: agree to 5e-6 (decoupled AdamW would be off by lr*wd*p = 9e-3).
    assert float(p2[0]) == pytest.approx(float(p[0]) - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8), abs=5e-6)


def test_torch_sgd_momentum_buffer_starts_at_first_gradient():
    tx = optim.group_transform(optim.GroupOptimizer("sgd", 0.1, weight_decay=0.01, momentum=0.9), lambda _: 0.1)
    p = jnp.asarray([2.0])
    state = tx.init(p)
    updates, state = tx.update(jnp.asarray([1.0]), state, p)
    p1 = optax.apply_updates(p, updates)
    buf = 1.0 + 0.01 * 2.0  # torch: buf = d_p at the first step
    assert float(p1[0]) == pytest.approx(2.0 - 0.1 * buf)
    updates, state = tx.update(jnp.asarray([1.0]), state, p1)
    p2 = optax.apply_updates(p1, updates)
    buf = 0.9 * buf + (1.0 + 0.01 * float(p1[0]))
    assert float(p2[0]) == pytest.approx(float(p1[0]) - 0.1 * buf)


def test_missing_group_and_bad_settings_are_errors():
    labels = optim.param_labels({"weights": WEIGHTS}, KINDS)
    with pytest.raises(ValueError, match=r"no optimiser configured for parameter groups \['bn'\]"):
        optim.stage_optimizer({"weights": optim.GroupOptimizer("sgd", 0.1)}, labels, epochs=1, iterations_per_epoch=1)
    with pytest.raises(ValueError, match="unknown"):
        optim.GroupOptimizer("rmsprop", 0.1)
    with pytest.raises(ValueError, match="positive"):
        optim.GroupOptimizer("sgd", 0.0)


def test_untouched_group_keeps_params_and_state_exactly():
    params = {"scores": {"a": jnp.asarray([1.0, -2.0])}, "prompt": {"program": jnp.asarray([0.5, 0.25])}}
    labels = optim.param_labels(params, {})
    tx = optim.stage_optimizer(optim.reference_groups(1), labels, epochs=2, iterations_per_epoch=5)
    state = tx.init(params)
    grads = {"scores": {"a": jnp.asarray([0.3, 0.1])}, "prompt": {"program": jnp.asarray([1.0, 1.0])}}
    params_a, state_a = optim.apply_gradients(tx, labels, params, grads, state)
    zero_prompt = {**grads, "prompt": {"program": jnp.zeros(2)}}
    params_b, state_b = optim.apply_gradients(tx, labels, params_a, zero_prompt, state_a, untouched=("prompt",))
    assert params_b["prompt"]["program"] is params_a["prompt"]["program"]
    assert not np.array_equal(params_b["scores"]["a"], params_a["scores"]["a"])
    counts = {label: [int(x) for x in jax.tree.leaves(s) if getattr(x, "dtype", None) == jnp.int32]
              for label, s in state_b.inner_states.items()}
    # Adam's count and the schedule's count: two steps for the scores, one for the prompt.
    assert counts["scores"] == [2, 2] and counts["prompt"] == [1, 1]
