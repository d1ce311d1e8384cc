"""Layer collapse: the layer floor ``mask.min_layer_density`` (score-based, one-shot and channel masks, exact
counts derived by hand), detection of a layer a mask empties, its warning and results fields, its config checks.

Tiny pytrees only: the one model here is traced (never compiled) to count MACs.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.helpers import load_config, set_fields

from vpns_jax import config_checks, evaluation, methods
from vpns_jax.config_fields import ConfigError
from vpns_jax.core import masking, saliency, selection, steps, structured
from vpns_jax.io import workdir
from vpns_jax.methods import registry
from vpns_jax.models import create_model, functional
from vpns_jax.models.channels import ChannelGroup


# Leaves in jax.tree order a, b, c (N = 10). Sorted |s|: 0.05 0.1 0.2 0.2 0.3 0.4 0.6 0.7 0.8 0.9.
SCORES = {
    "a": jnp.array([0.9, -0.8, 0.7, 0.6], jnp.float32),
    "b": jnp.array([0.1, -0.2, 0.2, 0.05], jnp.float32),
    "c": jnp.array([0.3, 0.4], jnp.float32),
}


def _kept(masks) -> dict[str, int]:
    return {name: int(np.count_nonzero(np.asarray(m))) for name, m in masks.items()}


def _eager_and_jit(fn, *args):
    """``fn(*args)`` eagerly and under one jax.jit; asserts they agree bit for bit and returns the masks."""
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(j))
    return eager


# -- the default is the authors' rule, bit for bit ------------------------------------------------------------


def _reference_masks(scores, ks, scope):
    """The rule as it stood before the floor: 1[|s| > tau] with the group's threshold."""
    tau = masking.thresholds(scores, ks, scope)
    leaves, treedef = jax.tree.flatten(scores)
    groups = [0] * len(leaves) if scope == "global" else range(len(leaves))
    return jax.tree.unflatten(treedef, [(jnp.abs(s) > tau[g]).astype(jnp.float32) for s, g in zip(leaves, groups)])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_default_floor_gives_the_masks_of_before_bit_for_bit(scope):
    rng = np.random.default_rng(0)
    scores = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
              "fc": {"kernel": jnp.asarray(np.round(rng.normal(size=(16, 5)), 1), jnp.float32)}}  # ties too
    for density in (1.0, 0.5, 0.1, 0.01):
        ks = masking.prune_counts(scores, density, scope)
        expected = _reference_masks(scores, ks, scope)
        for masks in (masking.masks_from_scores(scores, ks, scope),
                      masking.masks_from_scores(scores, ks, scope, 0.0),
                      masking.ste_masks(scores, ks, scope)):
            for got, want in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        importance = jax.tree.map(lambda s: np.abs(np.asarray(s)), scores)
        keep = selection.keep_counts(importance, density, scope)
        plain = selection.keep_largest(importance, keep, scope)
        explicit = selection.keep_largest(importance, keep, scope, min_layer_density=0.0)
        for got, want in zip(jax.tree.leaves(explicit), jax.tree.leaves(plain)):
            np.testing.assert_array_equal(got, want)


def test_a_floor_every_layer_already_meets_changes_nothing():
    ks = masking.prune_counts(SCORES, 0.9)  # k = 0: everything kept
    np.testing.assert_array_equal(
        np.concatenate(jax.tree.leaves(masking.masks_from_scores(SCORES, ks, min_layer_density=0.5))), np.ones(10))
    importance = {"a": np.arange(1.0, 5.0), "b": np.arange(5.0, 9.0)}
    plain = selection.keep_largest(importance, [6])  # keeps b's 4 and a's largest 2 >= ceil(0.5 * 4)
    floored = selection.keep_largest(importance, [6], min_layer_density=0.5)
    assert all(np.array_equal(plain[k], floored[k]) for k in plain)


# -- score-based masks: exact counts by hand ------------------------------------------------------------------


def _floored(scores, ks, *, scope="global", floor=0.0, ste=False):
    select = masking.ste_masks if ste else masking.masks_from_scores
    return _eager_and_jit(functools.partial(select, scope=scope, min_layer_density=floor), scores, ks)


def test_floor_refills_a_layer_the_global_threshold_empties():
    ks = masking.prune_counts(SCORES, 0.5)  # k = int(0.5 * 10) = 5: tau = 0.3, the 5th smallest
    plain = _floored(SCORES, ks)
    assert _kept(plain) == {"a": 4, "b": 0, "c": 1} and masking.collapsed_layers(plain) == ["b"]
    # f = 0.5: each leaf may lose int(0.5 * n): a 2, b 2, c 1, so tau_b = 0.1 (b's 2nd smallest |s|) and b
    # keeps its |s| > min(0.3, 0.1): the two 0.2s. a (tau_a 0.7) and c (tau_c 0.3) keep what tau keeps.
    masks = _floored(SCORES, ks, floor=0.5)
    np.testing.assert_array_equal(masks["b"], [0, 1, 1, 0])
    assert _kept(masks) == {"a": 4, "b": 2, "c": 1} and sum(_kept(masks).values()) == 5 + 2
    assert masking.collapsed_layers(masks) == []
    # f = 0.3: int(0.7 * 4) = 2 (2.8 truncated), so b's floor is again n - 2 = 2 = ceil(0.3 * 4).
    assert _kept(_floored(SCORES, ks, floor=0.3)) == {"a": 4, "b": 2, "c": 1}


def test_ties_at_the_floor_threshold_are_pruned_as_at_the_global_one():
    ks = masking.prune_counts(SCORES, 0.5)
    # f = 0.25: b may lose int(0.75 * 4) = 3, so tau_b = 0.2, its 3rd smallest |s|; both 0.2s tie at tau_b and
    # are pruned: b keeps nothing although ceil(0.25 * 4) = 1, and the layer is still reported.
    masks = _floored(SCORES, ks, floor=0.25)
    assert _kept(masks) == {"a": 4, "b": 0, "c": 1} and masking.collapsed_layers(masks) == ["b"]
    # A tie at the global threshold: d = 0.7 prunes k = int(0.30000000000000004 * 10) = 3, tau = 0.2, so the
    # two 0.2s go and 6 < N - k = 7 survive; the floor (tau_b = 0.1) gives b both back: 6 + 2.
    ks = masking.prune_counts(SCORES, 0.7)
    assert ks.tolist() == [3]
    assert _kept(_floored(SCORES, ks)) == {"a": 4, "b": 0, "c": 2}
    assert _kept(_floored(SCORES, ks, floor=0.5)) == {"a": 4, "b": 2, "c": 2}


def test_floor_with_per_layer_thresholds_keeps_the_larger_share():
    ks = masking.prune_counts(SCORES, 0.5, "layer")  # a 2, b 2, c 1
    assert _kept(_floored(SCORES, ks, scope="layer")) == {"a": 2, "b": 2, "c": 1}
    # f = 0.75 may lose int(0.25 * n): a 1 (tau 0.6), b 1 (tau 0.05), c 0 (keep all).
    assert _kept(_floored(SCORES, ks, scope="layer", floor=0.75)) == {"a": 3, "b": 3, "c": 2}


def test_floored_straight_through_masks_are_the_hard_masks_with_the_identity_gradient():
    ks = masking.prune_counts(SCORES, 0.5)
    ste = _floored(SCORES, ks, floor=0.5, ste=True)
    hard = _floored(SCORES, ks, floor=0.5)
    for name in SCORES:
        np.testing.assert_array_equal(ste[name], hard[name])
    weights = {name: jnp.arange(1.0, s.size + 1.0) for name, s in SCORES.items()}

    def loss(scores):
        masks = masking.ste_masks(scores, ks, min_layer_density=0.5)
        return sum(jnp.sum(masks[n] * weights[n]) for n in scores)

    grads = jax.jit(jax.grad(loss))(SCORES)
    for name in SCORES:
        np.testing.assert_array_equal(grads[name], jnp.sign(SCORES[name]) * weights[name])


def test_the_step_spec_carries_the_floor_under_jit():
    ks = jnp.asarray(masking.prune_counts(SCORES, 0.5))
    model = steps.MaskedModel(graphdef=None, prompt=None, min_layer_density=0.5)
    select = jax.jit(steps.masks_from_scores, static_argnums=0, static_argnames="ste")
    assert _kept(select(model, SCORES, ks, ste=False)) == {"a": 4, "b": 2, "c": 1}
    assert _kept(select(steps.MaskedModel(None, None), SCORES, ks, ste=False)) == {"a": 4, "b": 0, "c": 1}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_a_floor_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"min_layer_density .* \[0, 1\)"):
        masking.masks_from_scores(SCORES, masking.prune_counts(SCORES, 0.5), min_layer_density=bad)


# -- one-shot masks -------------------------------------------------------------------------------------------

IMPORTANCE = {"a": np.array([4.0, 3.0, 2.0, 1.0]), "b": np.array([0.5, 0.5, 0.1, 0.5]),
              "c": np.array([[1.5, 0.2]])}


def test_one_shot_floor_exact_counts_with_ties_by_position():
    # The global top 5: a's four and c's 1.5; b keeps nothing.
    assert _kept(selection.keep_largest(IMPORTANCE, [5])) == {"a": 4, "b": 0, "c": 1}
    # f = 0.5: b keeps its own top 4 - int(2.0) = 2, ties to the first in C order; c's floor (1) is met.
    masks = selection.keep_largest(IMPORTANCE, [5], min_layer_density=0.5)
    np.testing.assert_array_equal(masks["b"], [1, 1, 0, 0])
    assert _kept(masks) == {"a": 4, "b": 2, "c": 1}
    # f = 0.25: 4 - int(3.0) = 1 of b, the first of its three tied 0.5s; position breaks the tie, so the
    # one-shot floor is exact where a threshold would prune all three.
    np.testing.assert_array_equal(selection.keep_largest(IMPORTANCE, [5], min_layer_density=0.25)["b"], [1, 0, 0, 0])
    # Per-layer groups: one each, then the floor lifts a and b to 2 and leaves c at its 1.
    layer = selection.keep_largest(IMPORTANCE, [1, 1, 1], "layer", min_layer_density=0.5)
    np.testing.assert_array_equal(layer["a"], [1, 1, 0, 0])
    assert _kept(layer) == {"a": 2, "b": 2, "c": 1}


def test_a_one_shot_floor_outside_zero_to_one_is_refused():
    for fn in (lambda: selection.keep_largest(IMPORTANCE, [5], min_layer_density=1.0),
               lambda: saliency.lth_round(WEIGHTS, None, KINDS, 0.5, min_layer_density=-0.1)):
        with pytest.raises(ValueError, match="min_layer_density"):
            fn()


KINDS = {"a": {"kernel": functional.CONV_KERNEL}, "b": {"kernel": functional.CONV_KERNEL}}
WEIGHTS = {"a": {"kernel": np.array([4.0, -3.0, 2.0, 1.0]).reshape(1, 1, 1, 4)},
           "b": {"kernel": np.array([0.5, -0.5, 0.1, 0.5]).reshape(1, 1, 1, 4)}}


def _kernels_kept(masks) -> dict[str, int]:
    return {k: int(np.count_nonzero(v["kernel"])) for k, v in masks.items()}


def test_lth_rounds_with_a_floor_never_revive_a_pruned_entry():
    # Round 1: 8 kept, prune round(0.5 * 8) = 4 -> a's four; the floor adds b's first two 0.5s: 4 + 2.
    first = saliency.lth_round(WEIGHTS, None, KINDS, 0.5, min_layer_density=0.5)
    assert _kernels_kept(first) == {"a": 4, "b": 2}
    # Round 2: 6 kept, prune 3 -> a's top 3; b's floor (2) takes its two kept entries, never the pruned.
    second = saliency.lth_round(WEIGHTS, first, KINDS, 0.5, min_layer_density=0.5)
    assert _kernels_kept(second) == {"a": 3, "b": 2}
    assert np.all(second["b"]["kernel"] <= first["b"]["kernel"])


@pytest.mark.parametrize("name, density, without, with_floor", [
    ("omp", 0.5, {"a": 4, "b": 0}, {"a": 4, "b": 2}),  # the global top 4 is a's; b's floor is 2
    ("lth", 0.8, {"a": 4, "b": 0}, {"a": 4, "b": 2}),  # round 1 at lth_fraction 0.5: as OMP at 0.5
    ("random", 0.25, {"a": 1, "b": 1}, {"a": 2, "b": 2}),  # 4 - int(0.75 * 4) = 1 per layer; the floor 2
])
def test_one_shot_methods_pass_the_config_floor(name, density, without, with_floor):
    method = registry.get_method(name)
    config = ml_collections.ConfigDict({"mask": {"min_layer_density": 0.0}, "finetune": {"lth_fraction": 0.5},
                                        "seed": 0})
    run = types.SimpleNamespace(config=config, kinds=KINDS, source=(WEIGHTS, {}), spec=types.SimpleNamespace(nm=None),
                                finished_unit=lambda index: (WEIGHTS, None))
    unit = methods.Unit(density, (2,))
    assert _kernels_kept(method.unit_masks(run, unit, 1)) == without
    config.mask.min_layer_density = 0.5
    assert _kernels_kept(method.unit_masks(run, unit, 1)) == with_floor


def test_synflow_applies_the_floor():
    kinds = {"l1": {"kernel": functional.DENSE_KERNEL}, "l2": {"kernel": functional.DENSE_KERNEL}}
    rng = np.random.default_rng(0)
    weights = {"l1": {"kernel": rng.normal(size=(4, 8)).astype(np.float32)},
               "l2": {"kernel": rng.normal(size=(8, 2)).astype(np.float32)}}
    apply_fn = lambda w, stats, x: x @ w["l1"]["kernel"] @ w["l2"]["kernel"]  # noqa: E731
    synflow = functools.partial(saliency.synflow_masks, apply_fn, weights, {}, kinds, (4,), 0.1, iterations=3)
    # 48 entries at density 0.1 keep 48 - int(0.9 * 48) = 5 in all, fewer than either layer's floor at 0.5.
    assert sum(_kernels_kept(synflow()).values()) == 5
    assert _kernels_kept(synflow(min_layer_density=0.5)) == {"l1": 16, "l2": 8}


# -- channel masks --------------------------------------------------------------------------------------------


def _groups(spec):
    return tuple(ChannelGroup(name, (), (), (), size, capped) for name, size, capped in spec)


def _channel(scores, groups, k, floor):
    """Channel masks eagerly (concrete count) and under jit (traced count), which must agree."""
    eager = structured.channel_masks(scores, groups, k, min_layer_density=floor)
    jitted = jax.jit(lambda s, n: structured.channel_masks(s, groups, n, min_layer_density=floor))(scores, k)
    for name in eager:
        np.testing.assert_array_equal(eager[name], jitted[name])
    return eager


def test_channel_floor_gives_back_a_group_the_count_empties():
    groups = _groups([("x", 5, False), ("y", 5, False)])
    tied = {"x": jnp.full(5, 0.5), "y": -jnp.full(5, 0.5)}
    # Without the floor, ties go by position: x all, y's first two (test_structured).
    plain = _channel(tied, groups, 7, 0.0)
    assert masking.collapsed_layers(plain) == ["x"]
    # f = 0.4: a group may lose int(0.6 * 5) = 3, so x gets back its last two (the reverse of the pruning
    # order); y lost only 2. Pruned: 7 - 2 = 5.
    masks = _channel(tied, groups, 7, 0.4)
    np.testing.assert_array_equal(masks["x"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(masks["y"], [0, 0, 1, 1, 1])
    ste = structured.ste_channel_masks(tied, groups, 7, min_layer_density=0.4)
    np.testing.assert_array_equal(ste["x"], masks["x"])


def test_channel_floor_applies_after_the_caps():
    groups = _groups([("a", 8, True), ("u", 4, False)])
    scores = {"a": jnp.arange(1, 9) * 0.1, "u": jnp.array([0.01, 0.02, 0.03, 0.04])}
    # k = 5: the global threshold takes u's four and a's 0.1 (under a's cap of 2): u is emptied.
    assert _kept(_channel(scores, groups, 5, 0.0)) == {"a": 7, "u": 0}
    # f = 0.5: u may lose int(0.5 * 4) = 2, so it keeps its two largest; a (lost 1 <= 4) is unchanged.
    masks = _channel(scores, groups, 5, 0.5)
    np.testing.assert_array_equal(masks["u"], [0, 0, 1, 1])
    assert _kept(masks) == {"a": 7, "u": 2}


def test_the_step_spec_carries_the_channel_floor():
    groups = _groups([("x", 5, False), ("y", 5, False)])
    tied = {"x": jnp.full(5, 0.5), "y": -jnp.full(5, 0.5)}
    model = steps.MaskedModel(None, None, granularity="channel", channel_groups=groups, channel_max=1.0,
                              min_layer_density=0.4)
    masks = jax.jit(steps.masks_from_scores, static_argnums=0, static_argnames="ste")(
        model, tied, jnp.asarray([7], jnp.int32), ste=True)
    assert _kept(masks) == {"x": 2, "y": 3}


# -- detection, warning, results row --------------------------------------------------------------------------


def test_collapsed_layers_names_every_emptied_kernel_or_group():
    masks = {"conv1": {"kernel": np.ones((3, 3, 3, 4))}, "layer1": {0: {"conv2": {"kernel": np.zeros((3, 3, 4, 4))}}},
             "fc": {"kernel": np.array([[0.0, 1.0]])}}
    assert masking.collapsed_layers(masks) == ["layer1.0.conv2.kernel"]
    assert masking.collapsed_layers({"conv1": np.ones(4), "layer1.0.conv1": np.zeros(4)}) == ["layer1.0.conv1"]
    assert masking.collapsed_layers({}) == [] and masking.collapsed_layers({"a": np.ones(2)}) == []


def test_collapse_fields_warn_naming_the_layers(caplog):
    masks = {"a": {"kernel": np.zeros(3)}, "b": {"kernel": np.ones(3)}, "c": {"kernel": np.zeros(2)}}
    with caplog.at_level(logging.WARNING):
        fields = evaluation.collapse_fields(masks, sparsity=0.5)
    assert fields == {"collapsed_layers": 2, "collapsed_layer_names": "a.kernel;c.kernel"}
    assert "keep nothing of 2 layer(s): a.kernel, c.kernel" in caplog.text
    assert "min_layer_density" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert evaluation.collapse_fields({"b": np.ones(3)}) == {"collapsed_layers": 0, "collapsed_layer_names": ""}
    assert caplog.text == ""


def test_sparsity_and_cost_of_a_tiny_network_reports_its_collapsed_layer():
    abstract = nnx.eval_shape(lambda: create_model("resnet18", num_classes=4, width=1 / 16, stem="cifar",
                                                   rngs=nnx.Rngs(0)))
    graphdef, weights, batch_stats = functional.split_model(abstract)
    weights, batch_stats = (jax.tree.map(lambda x: np.ones(x.shape, np.float32), t) for t in (weights, batch_stats))
    kinds = functional.leaf_kinds(abstract)
    masks = jax.tree.map(np.ones_like, saliency.magnitude_importance(weights, kinds))
    masks["fc"]["kernel"] = np.zeros_like(masks["fc"]["kernel"])
    found = {"masks": masks, "effective": masking.apply_masks(weights, masks), "kernel_masks": masks}
    cost = evaluation.sparsity_and_cost(steps.MaskedModel(graphdef, None), types.SimpleNamespace(
        batch_stats=batch_stats), found, input_size=8)
    assert cost["collapsed_layers"] == 1 and cost["collapsed_layer_names"] == "fc.kernel"


def test_results_files_carry_the_collapse_fields_and_the_table_still_prints(tmp_path):
    base = {"method": "omp", "density": 0.01, "sparsity": 0.99, "model_sparsity": 0.98, "test_accuracy": 0.1,
            "test_loss": 2.3, "macs": 10, "speedup": 9.0, "wall_time_s": 1.0}
    rows = [{**base, "collapsed_layers": 2, "collapsed_layer_names": "fc.kernel;layer4.1.conv2.kernel"},
            {**base, "density": 0.5, "collapsed_layers": 0, "collapsed_layer_names": ""},
            dict(base, density=0.3)]  # a row from before the fields
    workdir.write_results(tmp_path, rows)
    assert json.loads((tmp_path / workdir.RESULTS_JSON).read_text())[0]["collapsed_layer_names"] == \
        "fc.kernel;layer4.1.conv2.kernel"
    with open(tmp_path / workdir.RESULTS_CSV, newline="") as file:
        read = list(csv.DictReader(file))
    assert [(r["collapsed_layers"], r["collapsed_layer_names"]) for r in read] == [
        ("2", "fc.kernel;layer4.1.conv2.kernel"), ("0", ""), ("", "")]
    table = workdir.format_results(rows).splitlines()
    assert len(table) == 4 and "collapsed" not in table[0]


# -- config ---------------------------------------------------------------------------------------------------


def _config(**updates):
    """The offline default with ``updates`` (``section__field=value``), as tests/test_configs.py sets fields."""
    return set_fields(load_config("default.py"), {path.replace("__", "."): value for path, value in updates.items()})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])  # ConfigDict refuses other types itself
def test_config_floor_outside_zero_to_one_is_one_line(bad):
    with pytest.raises(ConfigError) as info:
        config_checks.validate(_config(mask__min_layer_density=bad), num_devices=1)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config.mask.min_layer_density={bad!r} ")
    assert "use 0" in message


@pytest.mark.parametrize("updates,phrase", [
    ({"transfer__masks_from": "workdir/a"}, "config.transfer.masks_from"),
    ({"method": "slim", "mask__granularity": "channel"}, "method 'slim'"),
])
def test_config_floor_where_it_would_not_apply_is_one_line(updates, phrase):
    with pytest.raises(ConfigError) as info:
        config_checks.validate(_config(mask__min_layer_density=0.05, **updates), num_devices=1)
    message = str(info.value)
    assert message.startswith("config.mask.min_layer_density=0.05 ") and phrase in message and "use 0" in message


@pytest.mark.parametrize("updates", [{}, {"method": "omp"}, {"method": "snip"}, {"mask__granularity": "channel"},
                                     {"method": "hydra", "mask__scope": "layer"}])
def test_config_floor_is_valid_where_masks_are_chosen(updates):
    config_checks.validate(_config(mask__min_layer_density=0.05, **updates), num_devices=1)


def test_floor_is_in_the_fingerprint_except_at_its_default():
    default = config_checks.fingerprint(_config())
    assert "min_layer_density" not in default["mask"]  # workdirs from before the field still resume
    assert config_checks.fingerprint(_config(mask__min_layer_density=0)) == default
    floored = config_checks.fingerprint(_config(mask__min_layer_density=0.05))
    assert floored != default and floored["mask"]["min_layer_density"] == 0.05
    assert math.isclose(_config().mask.min_layer_density, 0.0)
