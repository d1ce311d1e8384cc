"""Selection of one-shot masks (``core.selection``): exact counts and ties, LTH's torch round arithmetic."""

import jax
import numpy as np
import pytest

from vpns_jax.core import selection


def _kept(masks) -> int:
    return int(sum(np.asarray(m).sum() for m in jax.tree.leaves(masks)))


# --- counts and selection -------------------------------------------------------------------


def test_keep_counts_global_and_layer():
    importance = {"a": np.zeros(10), "b": np.zeros((5, 6))}
    # N = 40: prune int(0.5 * 40) = 20 globally, int(0.5 * 10) = 5 and int(0.5 * 30) = 15 per layer.
    np.testing.assert_array_equal(selection.keep_counts(importance, 0.5), [20])
    np.testing.assert_array_equal(selection.keep_counts(importance, 0.5, "layer"), [5, 15])
    # prune int(0.7 * 40) = 28, int(0.7 * 10) = 7, int(0.7 * 30) = 21.
    np.testing.assert_array_equal(selection.keep_counts(importance, 0.3), [12])
    np.testing.assert_array_equal(selection.keep_counts(importance, 0.3, "layer"), [3, 9])
    # torch's float arithmetic: (1 - 0.9) * 10 = 0.9999999999999998 and (1 - 0.9) * 30 = 2.9999999999999996,
    # so int() prunes nothing from the 10-entry layer and 2 entries from the 30-entry one.
    np.testing.assert_array_equal(selection.keep_counts(importance, 0.9, "layer"), [10, 28])
    np.testing.assert_array_equal(selection.keep_counts(importance, 1.0), [40])
    with pytest.raises(ValueError, match="keep ratio"):
        selection.keep_counts(importance, 0.0)


def test_keep_largest_exact_counts_and_deterministic_ties():
    importance = {"a": np.array([3.0, 1.0, 1.0, 1.0]), "b": np.array([[1.0, 5.0], [1.0, 0.0]])}
    # Global order a[0..3], b[0,0], b[0,1], b[1,0], b[1,1]: 5 and 3, then the first two of the five 1s.
    masks = selection.keep_largest(importance, [4])
    np.testing.assert_array_equal(masks["a"], [1, 1, 1, 0])
    np.testing.assert_array_equal(masks["b"], [[0, 1], [0, 0]])
    assert masks["a"].dtype == np.float32 and masks["b"].shape == (2, 2)
    layer = selection.keep_largest(importance, [2, 2], "layer")
    np.testing.assert_array_equal(layer["a"], [1, 1, 0, 0])
    np.testing.assert_array_equal(layer["b"], [[1, 1], [0, 0]])
    assert _kept(selection.keep_largest(importance, [0])) == 0
    assert _kept(selection.keep_largest(importance, [8])) == 8
    # All equal: exactly k kept, the first k in flattened order, every time.
    flat = {"w": np.ones((3, 4), np.float32)}
    for k in range(13):
        mask = selection.keep_largest(flat, [k])["w"].ravel()
        np.testing.assert_array_equal(mask, np.arange(12) < k)


def test_keep_largest_handles_negative_importance():
    masks = selection.keep_largest({"w": np.array([-3.0, -1.0, -2.0, -0.5, -1.0])}, [2])
    np.testing.assert_array_equal(masks["w"], [0, 1, 0, 1, 0])
    mixed = selection.keep_largest({"w": np.array([-1e-9, 2.0, -7.0, 0.0])}, [3])
    np.testing.assert_array_equal(mixed["w"], [1, 1, 0, 1])


def test_keep_largest_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        selection.keep_largest({"w": np.array([1.0, np.nan])}, [1])
    with pytest.raises(ValueError, match="non-finite"):
        selection.keep_largest({"w": np.array([1.0, np.inf])}, [1])
    with pytest.raises(ValueError, match="groups"):
        selection.keep_largest({"a": np.ones(2), "b": np.ones(2)}, [1], "layer")
    with pytest.raises(ValueError, match="cannot keep"):
        selection.keep_largest({"w": np.ones(2)}, [3])
    with pytest.raises(ValueError, match="scope"):
        selection.keep_largest({"w": np.ones(2)}, [1], "channel")


# --- LTH -----------------------------------------------------------------------------------


def test_lth_schedule_follows_torch_rounding():
    # 1000 -> prune round(200.0), round(160.0), round(128.0), round(102.4) = 102, round(82.0), round(65.6) = 66.
    assert selection.lth_schedule(1000, 6) == [800, 640, 512, 410, 328, 262]
    # Python round is half to even: round(2.5) = 2, round(3.5) = 4.
    assert selection.lth_schedule(5, 1, fraction=0.5) == [3]
    assert selection.lth_schedule(7, 1, fraction=0.5) == [3]
    assert selection.lth_schedule(10, 0) == []


def test_lth_rounds_for():
    assert selection.lth_rounds_for(1.0) == 0
    assert selection.lth_rounds_for(0.8) == 1
    assert selection.lth_rounds_for(0.64) == 2  # 0.8 * 0.8 = 0.6400000000000001 still counts
    assert selection.lth_rounds_for(0.5) == 4  # 0.512 > 0.5 >= 0.4096
    assert selection.lth_rounds_for(0.1) == 11
    assert selection.lth_rounds_for(0.8**10) == 10
    assert selection.lth_rounds_for(0.25, fraction=0.5) == 2
