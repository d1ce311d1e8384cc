"""Training health: the finite flag, keeping the old state on a bad step, and the host's stop/skip check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpns_jax.core import health


def test_all_finite_looks_at_every_float_leaf_and_ignores_integers():
    assert bool(health.all_finite({"a": jnp.ones(3)}, [jnp.zeros((2, 2)), jnp.int32(7)]))
    assert not bool(health.all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert not bool(health.all_finite({"a": jnp.ones(3)}, {"b": {"c": jnp.array([jnp.nan])}}))
    assert bool(health.all_finite({}, {"step": jnp.int32(3)}))  # nothing to check


def test_keep_if_finite_selects_the_new_or_the_old_state_whole():
    old = {"w": jnp.array([1.0, 2.0]), "n": jnp.int32(1)}
    new = {"w": jnp.array([1.5, 2.5]), "n": jnp.int32(2)}
    kept, finite = jax.jit(health.keep_if_finite)(new, old, {"loss": jnp.float32(0.3)}, new["w"])
    assert bool(finite) and np.array_equal(kept["w"], [1.5, 2.5]) and int(kept["n"]) == 2
    kept, finite = jax.jit(health.keep_if_finite)(new, old, {"loss": jnp.float32(jnp.nan)}, new["w"])
    assert not bool(finite) and np.array_equal(kept["w"], [1.0, 2.0]) and int(kept["n"]) == 1
    # A finite loss with an overflowing update is as bad: the inf never reaches the state.
    inf = {"w": jnp.array([1.5, jnp.inf]), "n": jnp.int32(2)}
    kept, finite = jax.jit(health.keep_if_finite)(inf, old, {"loss": jnp.float32(0.3)}, inf["w"])
    assert not bool(finite) and np.array_equal(kept["w"], [1.0, 2.0])


def test_stop_raises_one_step_late_naming_the_bad_step():
    check = health.FiniteCheck("stop", hint="lower this stage's learning rates")
    check.push(jnp.bool_(True), 1, "density 0.1, stage 1, step 1")
    check.push(jnp.bool_(False), 2, "density 0.1, stage 1, step 2")  # checks step 1 only
    with pytest.raises(health.NonFiniteLossError) as error:
        check.push(jnp.bool_(True), 3, "density 0.1, stage 1, step 3")
    message = str(error.value)
    assert "NaN/Inf at density 0.1, stage 1, step 2;" in message and "lower this stage's learning rates" in message
    assert "--config.on_nonfinite=skip" in message and "\n" not in message


def test_flush_checks_the_last_step_and_skip_counts_and_reports_each_bad_one():
    reported = []
    check = health.FiniteCheck("skip", hint="", on_skip=reported.append)
    for step, flag in enumerate([True, False, False, True, False], start=1):
        check.push(jnp.bool_(flag), step, f"step {step}")
    assert reported == [2, 3]  # the bad steps' own numbers, though each is read one step late
    check.flush()
    check.flush()  # nothing left: no double count
    assert reported == [2, 3, 5] and check.skipped == 3


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite 'warn' is unknown"):
        health.FiniteCheck("warn", hint="")
