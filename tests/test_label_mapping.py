"""Tests for vpns_jax.core.label_mapping: FLM counts, greedy assignment, mapped logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpns_jax.core import label_mapping as lm


def test_greedy_mapping_differs_from_per_column_argmax():
    counts = np.array(
        [
            # t0 t1 t2
            [5, 9, 1],  # s0: the argmax of both t0 and t1
            [1, 8, 0],  # s1
            [4, 2, 3],  # s2: the argmax of t2
            [0, 0, 2],  # s3
        ]
    )
    # Per-column argmax would give [0, 0, 2]. Greedy, by hand:
    #   max 9 at (s0, t1) -> t1 = s0; clear row s0 and column t1.
    #   left: s1 [1, -, 0], s2 [4, -, 3], s3 [0, -, 2]; max 4 at (s2, t0) -> t0 = s2.
    #   left: s1 [-, -, 0], s3 [-, -, 2]; max 2 at (s3, t2) -> t2 = s3.
    before = counts.copy()
    mapping = lm.frequency_label_mapping(counts)
    assert mapping.dtype == np.int32
    np.testing.assert_array_equal(mapping, [2, 0, 3])
    np.testing.assert_array_equal(counts, before)  # the caller's matrix is not modified
    np.testing.assert_array_equal(lm.frequency_label_mapping(jnp.asarray(counts)), [2, 0, 3])


def test_ties_go_to_the_first_maximum_in_row_major_order():
    # Tie within a row: (s0, t0) precedes (s0, t1) -> t0 = s0, then t1 = s1 (count 0).
    # Taking (s0, t1) instead would give [1, 0].
    np.testing.assert_array_equal(lm.frequency_label_mapping([[3, 3], [2, 0]]), [0, 1])
    # Tie within a column: (s0, t0) precedes (s1, t0) -> t0 = s0, then t1 = s1.
    # Taking (s1, t0) instead would give t1 = s0 (count 0): [1, 0].
    np.testing.assert_array_equal(lm.frequency_label_mapping([[3, 0], [3, 2]]), [0, 1])
    # All zeros: each step takes the first free entry, (0, 0), (1, 1), (2, 2).
    np.testing.assert_array_equal(lm.frequency_label_mapping(np.zeros((5, 3), int)), [0, 1, 2])


def test_mapping_rejects_more_targets_than_sources():
    with pytest.raises(ValueError, match="source head has fewer classes than the target"):
        lm.frequency_label_mapping(np.ones((2, 3), int))
    with pytest.raises(ValueError, match="matrix"):
        lm.frequency_label_mapping(np.ones(3, int))


def test_prediction_counts_by_hand():
    logits = jnp.array(
        [
            [0.1, 2.0, 0.3],  # argmax 1, label 0
            [5.0, 1.0, 1.0],  # argmax 0, label 0
            [0.0, 0.0, 9.0],  # argmax 2, label 1
            [1.0, 1.0, 0.0],  # tie -> first maximum 0, label 1
            [0.0, 3.0, 1.0],  # argmax 1, label 0
            [0.0, 0.0, 1.0],  # label -1 (padding): not counted
        ]
    )
    labels = jnp.array([0, 0, 1, 1, 0, -1])
    # Target 0 has sources 1, 0, 1; target 1 has sources 2, 0.
    expected = np.array([[1, 1], [2, 0], [0, 1]])
    counts = lm.prediction_counts(logits, labels, 2)
    assert counts.dtype == jnp.int32 and counts.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(counts), expected)
    jitted = jax.jit(lm.prediction_counts, static_argnums=2)(logits, labels, 2)
    np.testing.assert_array_equal(np.asarray(jitted), expected)
    # Summed over two batches, then mapped: t0 -> s1 (count 2), then t1 -> s0 (row-major
    # first of the remaining 1s at (s0, t1) and (s2, t1)).
    total = lm.prediction_counts(logits[:3], labels[:3], 2) + lm.prediction_counts(logits[3:], labels[3:], 2)
    np.testing.assert_array_equal(np.asarray(total), expected)
    np.testing.assert_array_equal(lm.frequency_label_mapping(total), [1, 0])


def test_map_logits_and_identity():
    logits = jnp.array([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]])
    mapped = lm.map_logits(logits, np.array([3, 0, 2], np.int32))
    np.testing.assert_array_equal(np.asarray(mapped), [[13.0, 10.0, 12.0], [23.0, 20.0, 22.0]])
    identity = lm.identity_mapping(4)
    assert identity.dtype == np.int32
    np.testing.assert_array_equal(identity, [0, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(lm.map_logits(logits, identity)), np.asarray(logits))

