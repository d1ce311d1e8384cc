"""Method plans: stages, phases, epochs and units of every method, from the offline default config."""

import numpy as np
import pytest

from vpns_jax.config import offline
from vpns_jax import config_checks, methods
from vpns_jax.core.phases import Phase
from vpns_jax.methods import bip, vpns
from vpns_jax.methods.iterations import CleanStream, OneStream, TwoStreams


def _plan(method, **fields):
    config = offline.resnet()
    config.method = method
    for key, value in fields.items():
        section, field = key.split(".")
        config[section][field] = value
    return methods.make_plan(config)


def test_vpns_is_two_stream_scores_then_weights_per_density():
    plan = _plan("vpns")
    assert plan.phases == vpns.VPNS_PHASES
    assert [u.stages for u in plan.units] == [(1, 2)] * 4
    assert [u.density for u in plan.units] == [0.5, 0.1, 0.05, 0.02]
    assert plan.epochs == {1: 3, 2: 3} and set(plan.groups[1]) == {"scores", "prompt"}


@pytest.mark.parametrize("prompt_stages, streams, phases", [
    # No prompt: the same two streams, optimisers and schedules; the clean batch goes in unprompted.
    ((), "two", {1: Phase(("scores",), TwoStreams()), 2: Phase(("weights",), TwoStreams())}),
    ((1,), "two", {1: Phase(("scores", "prompt"), TwoStreams()), 2: Phase(("weights",), TwoStreams())}),
    ((2,), "two", {1: Phase(("scores",), TwoStreams()), 2: Phase(("weights", "prompt"), TwoStreams())}),
    ((1, 2), "prompted", {1: Phase(("scores", "prompt"), CleanStream()),
                          2: Phase(("weights", "prompt"), CleanStream())}),
    ((), "plain", {1: Phase(("scores",), OneStream()), 2: Phase(("weights",), OneStream())}),
])
def test_vpns_ablations_change_only_the_prompt_stages_and_streams(prompt_stages, streams, phases):
    plan = _plan("vpns", **{"vpns.prompt_stages": prompt_stages, "vpns.streams": streams})
    assert plan.phases == phases and plan.epochs == {1: 3, 2: 3}
    assert set(plan.groups[1]) == {"scores"} | ({"prompt"} if 1 in prompt_stages else set())
    assert set(plan.groups[2]) == {"weights", "bn"} | ({"prompt"} if 2 in prompt_stages else set())
    assert plan.groups[1]["scores"] == _plan("vpns").groups[1]["scores"]  # the same optimiser as VPNs'


@pytest.mark.parametrize("fields, message", [
    ({"vpns.streams": "three"}, "config.vpns.streams='three' is unknown"),
    ({"vpns.prompt_stages": (1, 3)}, "config.vpns.prompt_stages=(1, 3) must list stages 1 and/or 2"),
    ({"vpns.streams": "plain"}, "never shows the prompt to the network"),
])
def test_bad_vpns_ablations_are_config_errors(fields, message):
    with pytest.raises(config_checks.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _plan("vpns", **fields)


def test_vpns_ablations_are_refused_for_other_methods():
    config = offline.resnet()
    config.method, config.vpns.prompt_stages = "hydra", ()
    with pytest.raises(config_checks.ConfigError, match="ablates unstructured VPNs' mask search only"):
        config_checks.validate(config, num_devices=1)


def test_hydra_trains_scores_then_weights_on_one_stream_without_prompt():
    plan = _plan("hydra")
    assert plan.phases == {1: Phase(("scores",), OneStream()), 2: Phase(("weights",), OneStream())}
    assert plan.epochs == {1: 6, 2: 6} and set(plan.groups[2]) == {"weights", "bn"}


def test_bip_is_one_bilevel_stage():
    plan = _plan("bip")
    assert plan.phases == {1: Phase(("weights", "scores"), bip.Bilevel(1e-4))}
    assert [u.stages for u in plan.units] == [(1,)] * 4 and set(plan.groups[1]) == {"weights", "bn", "scores"}


@pytest.mark.parametrize("method, round_", [("omp", None), ("lth", 0)])
def test_omp_and_lth_start_with_one_dense_unit(method, round_):
    plan = _plan(method)
    assert plan.units[0] == methods.Unit(1.0, (0,), round=round_, dense=True)
    assert plan.epochs == {0: 12, 2: 12} and plan.phases[0] == plan.phases[2] == Phase(("weights",), OneStream())


def test_lth_units_are_rounds_down_past_the_smallest_density():
    plan = _plan("lth")
    rounds = plan.units[1:]
    assert [u.round for u in rounds] == list(range(1, 19))  # 0.8^18 = 0.018 is the first <= 0.02
    np.testing.assert_allclose([u.density for u in rounds], [0.8 ** r for r in range(1, 19)])


def test_x_plus_vp_finetunes_with_the_prompt_on_two_streams():
    for method in ("omp_vp", "lth_vp", "random_vp"):
        plan = _plan(method)
        assert plan.phases[2] == Phase(("weights", "prompt"), TwoStreams())
        assert "prompt" in plan.groups[2]


def test_one_shot_methods_only_finetune():
    for method in ("random", "snip", "grasp", "synflow"):
        plan = _plan(method)
        assert list(plan.phases) == [2] and [u.stages for u in plan.units] == [(2,)] * 4
    assert [(u.density, u.dense) for u in _plan("dense").units] == [(1.0, True)]


def test_structured_plans():
    plan = _plan("vpns", **{"mask.granularity": "channel"})
    assert [u.stages for u in plan.units] == [(0, 1, 2)] * 4 and plan.epochs == {0: 1, 1: 1, 2: 6}
    assert plan.groups[1]["scores"].clip_value == 0.25 and plan.groups[1]["scores"].learning_rate == 1.0
    slim = _plan("slim", **{"mask.granularity": "channel"})
    assert slim.phases[0].bn_l1 == 1e-4 and slim.units[0].dense and len(slim.units) == 5


def test_transfer_plans_only_the_finetune():
    plan = _plan("vpns", **{"transfer.masks_from": "workdir/a"})
    assert plan.phases == {2: Phase(("weights", "prompt"), TwoStreams())}
    assert [u.stages for u in plan.units] == [(2,)] * 4
    assert _plan("hydra", **{"transfer.masks_from": "workdir/a"}).phases == {2: Phase(("weights",), OneStream())}


@pytest.mark.parametrize("method, fields, message", [
    ("hydra", {"mask.granularity": "channel"}, "not available for method 'hydra'"),
    ("slim", {}, "not available for method 'slim'"),
    ("random", {"transfer.masks_from": "workdir/a"}, "does not find a mask to transfer"),
    ("magic", {}, "config.method='magic' is unknown"),
])
def test_bad_combinations_are_one_line_config_errors(method, fields, message):
    with pytest.raises(config_checks.ConfigError, match=message):
        _plan(method, **fields)
