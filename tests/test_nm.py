"""N:M masks (``mask.granularity='N:M'``): exact per-group selection, the cut-group rule, ties and zeros, the
straight-through gradient, the one-line config errors, and tiny VPNs and OMP runs whose every group keeps N.

float64 selection and the gradient at XLA's default optimisation level are in
tests/isolated/check_custom_gradients.py (x64 is switched on only in that process).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from tests.helpers import load_config, set_fields, tiny_config, write_source
from vpns_jax import config_checks, train
from vpns_jax.config_checks import ConfigError
from vpns_jax.core import nm, saliency, selection, steps
from vpns_jax.io import array_files, subnetwork
from vpns_jax.io import workdir as workdir_files
from vpns_jax.models import create_model, functional


def reference_keep(magnitudes: np.ndarray, n: int, m: int) -> np.ndarray:
    """The rule written out by loops: per group of m along axis -2, the n largest, ties to the lower index."""
    keep = np.zeros(magnitudes.shape, bool)
    size = magnitudes.shape[-2]
    for index in np.ndindex(*magnitudes.shape[:-2], magnitudes.shape[-1]):
        lead, column = index[:-1], index[-1]
        for start in range(0, size, m):
            group = [magnitudes[lead + (i, column)] for i in range(start, min(start + m, size))]
            for j in sorted(range(len(group)), key=lambda j: (-group[j], j))[:n]:
                keep[lead + (start + j, column)] = True
    return keep


_nm_masks = jax.jit(nm.nm_masks, static_argnums=(1, 2))
_ste_nm_masks = jax.jit(nm.ste_nm_masks, static_argnums=(1, 2))


def _scores_with_ties_and_zeros(shape, seed):
    """A coarse grid: many ties (also of |s| between s and -s) and exact zeros."""
    return np.round(np.random.default_rng(seed).standard_normal(shape) * 2).astype(np.float32) / 4


# -- the pattern string -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, parsed", [("2:4", (2, 4)), ("1:4", (1, 4)), ("4:8", (4, 8)), ("1:2", (1, 2)),
                                             ("15:16", (15, 16)), ("3:8", (3, 8))])
def test_valid_patterns_parse(pattern, parsed):
    assert nm.parse_nm(pattern) == parsed and nm.pattern_problem(pattern) == ""


@pytest.mark.parametrize("pattern, problem", [
    ("2:5", "has M = 5, but M must be a power of two in 2..16"),
    ("1:3", "has M = 3"), ("1:32", "has M = 32"), ("0:1", "has M = 1"),
    ("0:4", "has N = 0, but 1 <= N < M"), ("4:4", "has N = 4"), ("5:4", "has N = 5"),
    ("abc", "is not 'N:M' with integers N and M"), ("2:4:8", "is not 'N:M'"), (" 2:4", "is not 'N:M'"),
    ("-1:4", "is not 'N:M'"), ("2.0:4", "is not 'N:M'"), ("", "is not 'N:M'"),
])
def test_invalid_patterns_say_which_rule_they_break(pattern, problem):
    assert nm.pattern_problem(pattern).startswith(problem)
    with pytest.raises(ValueError) as info:
        nm.parse_nm(pattern)
    assert "\n" not in str(info.value) and problem in str(info.value)


# -- selection ----------------------------------------------------------------------------------------------


# (shape, N, M, kept by hand: runs P = size / I, each N per full group + min(N, r) for a cut group of r)
KEPT = [
    ((3, 3, 3, 8), 2, 4, 72 * 2),  # the first conv: I = 3 < M, one cut group of 3 keeps 2
    ((3, 3, 3, 8), 4, 8, 72 * 3),  # ... at 4:8 it keeps all 3
    ((3, 3, 3, 8), 1, 4, 72 * 1),
    ((1, 1, 10, 6), 2, 4, 6 * (2 * 2 + 2)),  # two full groups and a cut group of 2
    ((1, 1, 10, 6), 1, 4, 6 * (2 + 1)),
    ((3, 3, 16, 32), 2, 4, 288 * 8),  # exactly half
    ((2, 2, 16, 3), 3, 8, 12 * 6),
    ((10, 4), 2, 4, 4 * (2 * 2 + 2)),  # a dense head, (in, out): groups down each output column
    ((16, 5), 4, 8, 5 * 8),
    ((7, 3), 1, 2, 3 * (3 + 1)),
]


@pytest.mark.parametrize("shape, n, m, kept", KEPT)
def test_every_group_keeps_exactly_its_n_largest(shape, n, m, kept):
    scores = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    mask = np.asarray(_nm_masks({"k": scores}, n, m)["k"])
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert int(mask.sum()) == kept == nm.kept_count(shape, n, m)
    np.testing.assert_array_equal(mask.astype(bool), reference_keep(np.abs(scores), n, m))
    counts = nm.group_kept(mask, m)
    sizes = nm.group_sizes(shape[-2], m)
    full = sizes == m
    assert np.all(counts[..., full, :] == n)  # every full group: exactly N
    assert np.all(counts[..., ~full, :] == min(n, shape[-2] % m))  # a cut group of r: min(N, r)
    assert nm.is_nm(mask, n, m) and nm.is_nm(np.ones(shape), n, m) == (kept == np.prod(shape))  # 4:8 of I = 3


def test_kept_counts_of_a_tree_are_per_leaf():
    tree = {"conv1": {"kernel": np.zeros((3, 3, 3, 8))}, "fc": {"kernel": np.zeros((10, 4))}}
    assert nm.kept_counts(tree, 2, 4) == {"conv1": {"kernel": 144}, "fc": {"kernel": 24}}


def test_ties_keep_the_first_n_positions_and_zeros_count_as_scores():
    equal = {"k": np.full((10, 3), -0.5, np.float32)}  # every |s| equal: each group keeps its first N
    np.testing.assert_array_equal(np.asarray(_nm_masks(equal, 2, 4)["k"])[:, 0], [1, 1, 0, 0, 1, 1, 0, 0, 1, 1])
    # |s| ties between signs, exact zeros, an all-zero group: one column per case, the groups down the rows.
    scores = np.array([[-1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 3, 0], [-1, 5, 0, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(_nm_masks({"k": scores}, 2, 4)["k"]).T,
                                  [[1, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(_nm_masks({"k": scores}, 1, 2)["k"]).T,
                                  [[1, 0, 1, 0], [1, 0, 0, 1], [1, 0, 1, 0], [1, 0, 1, 0]])


@pytest.mark.parametrize("shape, n, m", [((3, 3, 3, 8), 2, 4), ((1, 1, 10, 6), 1, 4), ((10, 4), 2, 4),
                                         ((2, 2, 16, 3), 3, 8)])
def test_ste_gradient_is_the_identity_wrt_abs_s_under_jit_and_eager(shape, n, m):
    """d/ds sum(ste(s) * w) = sign(s) * w (sign(0) = +1, JAX's |s|' at 0), pruned entries too; the forward value
    is the hard mask exactly. Ties and zeros come from a coarse grid."""
    scores = {"k": jnp.asarray(_scores_with_ties_and_zeros(shape, 1))}
    assert np.count_nonzero(np.asarray(scores["k"]) == 0) > 0
    weights = {"k": jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)}

    def loss(select, s):
        return jnp.sum(select(s)["k"] * weights["k"])

    ste = lambda s: nm.ste_nm_masks(s, n, m)  # noqa: E731
    want = np.where(np.asarray(scores["k"]) >= 0, 1.0, -1.0).astype(np.float32) * np.asarray(weights["k"])
    plain = np.asarray(jax.grad(lambda s: loss(lambda t: jax.tree.map(jnp.abs, t), s))(scores)["k"])
    np.testing.assert_array_equal(plain, want)
    for mode in (jax.jit, lambda f: f):
        got = mode(jax.grad(lambda s: loss(ste, s)))(scores)["k"]
        np.testing.assert_array_equal(np.asarray(got), want)
    hard = np.asarray(_nm_masks(scores, n, m)["k"])
    np.testing.assert_array_equal(np.asarray(_ste_nm_masks(scores, n, m)["k"]), hard)
    with jax.disable_jit():
        np.testing.assert_array_equal(np.asarray(nm.ste_nm_masks(scores, n, m)["k"]), hard)
    np.testing.assert_array_equal(hard.astype(bool), reference_keep(np.abs(np.asarray(scores["k"])), n, m))


def test_group_indices_round_trip_and_refuse_what_is_not_n_m():
    # Dense (5, 1) at 2:4: group [1, 0, 1, 0] -> positions (0, 2); the cut group [1] -> (0, unused 0).
    mask = np.array([[1], [0], [1], [0], [1]], np.float32)
    np.testing.assert_array_equal(nm.group_indices(mask, 2, 4), [[0, 2], [0, 0]])
    np.testing.assert_array_equal(nm.from_group_indices(np.array([[0, 2], [0, 0]]), (5, 1), 2, 4), mask.astype(bool))
    for shape, n, m, _ in KEPT:
        keep = reference_keep(np.random.default_rng(len(shape) + n).random(shape), n, m)
        np.testing.assert_array_equal(nm.from_group_indices(nm.group_indices(keep, n, m), shape, n, m), keep)
    with pytest.raises(ValueError, match="is not 2:4"):
        nm.group_indices(np.ones((5, 1)), 2, 4)
    for bad in ([[2, 0], [0, 0]], [[0, 4], [0, 0]], [[0, 2], [1, 0]], [[0, 2], [0, 1]]):
        with pytest.raises(ValueError, match="not ascending positions"):
            nm.from_group_indices(np.array(bad), (5, 1), 2, 4)


def test_steps_dispatch_n_m_masks_and_keep_no_threshold():
    model = steps.MaskedModel(graphdef=None, prompt=None, nm=(2, 4))
    scores = {"a": jnp.asarray(_scores_with_ties_and_zeros((3, 3, 3, 8), 4)),
              "b": jnp.asarray(_scores_with_ties_and_zeros((10, 4), 5))}
    np.testing.assert_array_equal(steps.prune_counts(model, scores, 0.5), [0])
    want = _nm_masks(scores, 2, 4)
    for ste in (False, True):
        got = jax.jit(lambda s, k, ste=ste: steps.masks_from_scores(model, s, k, ste=ste))(scores, jnp.zeros(1))
        for name in scores:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


def test_one_shot_keep_nm_is_the_per_group_top_n_of_the_magnitudes():
    weights = {"conv": {"kernel": np.random.default_rng(6).standard_normal((3, 3, 3, 8)).astype(np.float32)}}
    masks = selection.keep_nm(jax.tree.map(np.abs, weights), 2, 4)
    assert isinstance(masks["conv"]["kernel"], np.ndarray) and masks["conv"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(masks["conv"]["kernel"].astype(bool),
                                  reference_keep(np.abs(weights["conv"]["kernel"]), 2, 4))


# -- config -------------------------------------------------------------------------------------------------


def _config(**updates):
    return set_fields(load_config("default.py"), {path.replace("__", "."): value for path, value in updates.items()})


NM = {"mask__granularity": "2:4", "densities": (0.5,)}


@pytest.mark.parametrize("updates, message", [
    ({"mask__granularity": "2:5"}, "config.mask.granularity='2:5' has M = 5, but M must be a power of two in 2..16 "
                                   "(the hardware formats are 2:4, 1:4 and 4:8): use 'weight', 'channel', or an N:M"),
    ({"mask__granularity": "0:4"}, "config.mask.granularity='0:4' has N = 0, but 1 <= N < M"),
    ({"mask__granularity": "4:4"}, "config.mask.granularity='4:4' has N = 4, but 1 <= N < M"),
    ({"mask__granularity": "abc"}, "config.mask.granularity='abc' is not 'N:M' with integers N and M: use 'weight', "
                                   "'channel', or an N:M pattern such as '2:4' or '1:4'"),
    ({**NM, "method": "bip"}, "config.mask.granularity='2:4' is not available for method 'bip': use one of vpns, "
                              "hydra, omp, omp_vp, or granularity 'weight'"),
    ({**NM, "method": "lth"}, "config.mask.granularity='2:4' is not available for method 'lth'"),
    ({"mask__granularity": "2:4"}, "config.mask.granularity='2:4' keeps N/M = 0.5 of every group, but "
                                   "config.densities=(0.5, 0.1, 0.05, 0.02): set config.densities=(0.5,)"),
    ({"mask__granularity": "1:4", "densities": (0.5,)}, "config.mask.granularity='1:4' keeps N/M = 0.25 of every "
                                                        "group, but config.densities=(0.5,): set "
                                                        "config.densities=(0.25,)"),
    ({**NM, "mask__min_layer_density": 0.05}, "config.mask.min_layer_density=0.05 does not apply to N:M masks"),
    ({**NM, "mask__scope": "layer"}, "config.mask.scope='layer' does not apply to N:M masks"),
    ({**NM, "transfer__masks_from": "workdir/a"}, "config.mask.granularity='2:4' has no effect with "
                                                  "config.transfer.masks_from"),
    ({"mask__granularity": "channel", "method": "hydra"}, "config.mask.granularity='channel' is not available for "
                                                          "method 'hydra': use one of 'weight'"),
    # The field that N:M masks had before they became a granularity, as a config file would still set it.
    ({"mask__pattern": "2:4"}, "config.mask.pattern was folded into config.mask.granularity: use "
                               "--config.mask.granularity=2:4 (in a config file, config.mask.granularity = '2:4')"),
    ({"mask__pattern": "unstructured"}, "config.mask.pattern was folded into config.mask.granularity: use "
                                        "--config.mask.granularity=weight"),
])
def test_bad_patterns_are_one_line_errors(updates, message):
    with pytest.raises(ConfigError) as info:
        config_checks.validate(_config(**updates), num_devices=1)
    assert "\n" not in str(info.value) and str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("updates", [NM, {**NM, "method": "hydra"}, {**NM, "method": "omp"}, {**NM, "method": "omp_vp"},
                                     {"mask__granularity": "1:4", "densities": (0.25,)},
                                     {"mask__granularity": "4:8", "densities": (0.5,), "method": "hydra"}])
def test_n_m_configs_validate_for_the_methods_that_make_n_m_masks(updates):
    config_checks.validate(_config(**updates), num_devices=1)
    assert config_checks.mask_pattern(_config(**updates)) == ("weight", nm.parse_nm(updates["mask__granularity"]))


def test_one_field_says_what_a_mask_unit_is():
    assert config_checks.mask_pattern(_config()) == ("weight", None)
    assert config_checks.mask_pattern(_config(mask__granularity="channel")) == ("channel", None)
    assert config_checks.mask_pattern(_config(mask__granularity="4:8")) == ("weight", (4, 8))


def test_fingerprints_keep_the_layout_existing_workdirs_hold():
    default = config_checks.fingerprint(_config())
    channel = config_checks.fingerprint(_config(mask__granularity="channel"))
    assert "pattern" not in default["mask"] and "pattern" not in channel["mask"] and channel != default
    # Workdirs of N:M runs hold granularity 'weight' and the pattern in a field of its own: they still resume.
    n_m = config_checks.fingerprint(_config(**NM))
    assert (n_m["mask"]["granularity"], n_m["mask"]["pattern"]) == ("weight", "2:4")
    assert n_m != config_checks.fingerprint(_config(densities=(0.5,)))


def test_the_command_line_flags_reach_the_config():
    config = load_config("default.py", "--config.mask.granularity=2:4", "--config.densities=(0.5,)",
                         "--config.method=omp")
    assert (config.mask.granularity, tuple(config.densities), config.method) == ("2:4", (0.5,), "omp")
    config_checks.validate(config, num_devices=1)


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = create_model("resnet18", num_classes=10, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0))
    return write_source(tmp_path_factory, model)[0], functional.leaf_kinds(model)


def _check_every_group_keeps_two(masks):
    flat = traverse_util.flatten_dict(masks)
    for path, mask in flat.items():
        counts, sizes = nm.group_kept(mask, 4), nm.group_sizes(mask.shape[-2], 4)
        assert np.all(counts[..., sizes == 4, :] == 2), path  # every full group of every layer: exactly 2
        assert np.all(counts == np.minimum(2, sizes).reshape(-1, 1)), path  # a cut group of r: min(2, r)
    assert flat["conv1", "kernel"].shape == (3, 3, 3, 4)  # its one group per run is cut to 3, and keeps 2
    assert np.all(nm.group_kept(flat["conv1", "kernel"], 4) == 2)


@pytest.mark.slow  # end to end through train.run
@pytest.mark.parametrize("method", ["vpns", "omp"])
def test_tiny_n_m_run_keeps_two_of_every_four_and_exports_them(fashion_data_dir, source, tmp_path, method):
    config = tiny_config(fashion_data_dir, source[0], method, **{"mask.granularity": "2:4", "densities": (0.5,)})
    results = train.run(config, tmp_path)
    assert json.loads((tmp_path / workdir_files.RESULTS_JSON).read_text()) == results
    row = [r for r in results if r["density"] == 0.5][0]
    folder = workdir_files.unit_folder(tmp_path, 0.5)
    masks = array_files.load_arrays(folder / "masks.npz")
    _check_every_group_keeps_two(masks)
    kept, total = (sum(jax.tree.leaves(t)) for t in (nm.kept_counts(masks, 2, 4),
                                                      jax.tree.map(np.size, masks)))
    assert sum(int(m.sum()) for m in jax.tree.leaves(masks)) == kept
    assert row["sparsity"] == round(1 - kept / total, 6) and 0.49 < row["sparsity"] <= 0.5
    exported = subnetwork.load_subnetwork(folder / "subnetwork.npz")
    assert exported.nm_pattern == (2, 4) and exported.meta["mask_pattern"] == "2:4"
    for a, b in zip(jax.tree.leaves(exported.masks), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(a), b)
    if method == "omp":  # the N largest |W| per group of the dense finetune's weights
        dense = array_files.load_arrays(workdir_files.unit_folder(tmp_path, 1.0) / "weights.npz")
        expected = selection.keep_nm(saliency.magnitude_importance(dense, source[1]), 2, 4)
        for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)
        dense_export = workdir_files.unit_folder(tmp_path, 1.0) / "subnetwork.npz"
        assert subnetwork.load_subnetwork(dense_export).nm_pattern is None
