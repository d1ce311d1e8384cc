"""Every method end to end on a tiny network (a few steps): exact sparsity, LTH's rounds, OMP's rewind, transfer.

Each method runs in-process through ``train.run`` on real Fashion-MNIST with a
width-1/16 ResNet-18 at 16 px, one epoch of two iterations per stage.
"""

import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import DENSITIES, kept_count, tiny_config, unit_masks
from vpns_jax import methods, train
from vpns_jax.context import RunContext
from vpns_jax.core import health, saliency, selection, structured
from vpns_jax.io import array_files, checkpoint, workdir_guard
from vpns_jax.io import workdir as workdir_files
from vpns_jax.models import create_model, functional

pytestmark = pytest.mark.slow  # every method end to end through train.run on real Fashion-MNIST

@pytest.fixture(scope="module")
def runs(fashion_data_dir, source, tmp_path_factory):
    """Runs each method once per module (on first use); records every unit's initial weights and masks."""
    cache, starts = {}, {}
    start_unit = RunContext.start_unit

    def spy(self, index):
        state = start_unit(self, index)
        starts.setdefault(self.config.method, {})[index] = jax.device_get((state.weights, state.masks))
        return state

    def run(method, **overrides):
        key = (method, tuple(sorted(overrides.items())))
        if key not in cache:
            config = tiny_config(fashion_data_dir, source[0], method, **overrides)
            workdir = tmp_path_factory.mktemp(method)
            RunContext.start_unit = spy
            try:
                results = train.run(config, workdir)
            finally:
                RunContext.start_unit = start_unit
            assert json.loads((workdir / workdir_files.RESULTS_JSON).read_text()) == results
            cache[key] = workdir, results
        return cache[key]

    run.starts = starts
    return run


@pytest.mark.parametrize("method", ["vpns", "hydra", "bip", "omp", "snip", "grasp", "synflow", "omp_vp"])
def test_global_methods_keep_exactly_k(runs, method):
    workdir, results = runs(method)
    rows = {r["density"]: r for r in results if r["density"] in DENSITIES}
    assert set(rows) == set(DENSITIES) and all(r["method"] == method for r in results)
    for density in DENSITIES:
        kept, total = kept_count(unit_masks(workdir, density))
        assert kept == total - int((1 - density) * total)
        assert rows[density]["sparsity"] == round(1 - kept / total, 6)
        assert 0.0 <= rows[density]["test_accuracy"] <= 1.0


def test_random_keeps_exactly_d_of_every_layer(runs):
    workdir, _ = runs("random")
    for density in DENSITIES:
        for mask in jax.tree.leaves(unit_masks(workdir, density)):
            assert np.count_nonzero(mask) == mask.size - int((1 - density) * mask.size)


def test_lth_rounds_prune_a_fifth_of_the_rest(runs):
    workdir, results = runs("lth", densities=(0.5,))
    rounds = [r for r in results if r.get("round", 0) > 0]
    nominal = methods.lth_densities(0.5, 0.2)
    assert [r["density"] for r in rounds] == nominal
    np.testing.assert_allclose(nominal, [0.8, 0.64, 0.512, 0.4096])  # 0.8^r down to the first <= 0.5
    total = kept_count(unit_masks(workdir, 1.0))[1]
    expected = selection.lth_schedule(total, len(rounds))
    previous = unit_masks(workdir, 1.0)
    for r, count in zip(rounds, expected):
        masks = unit_masks(workdir, r["density"])
        assert kept_count(masks)[0] == count
        # A pruned entry stays pruned.
        for old, new in zip(jax.tree.leaves(previous), jax.tree.leaves(masks)):
            assert not np.any((old == 0) & (new == 1))
        previous = masks


def test_omp_rewinds_to_the_source_weights(runs, source):
    """The masked finetune starts from the source weights, masked by the dense finetune's magnitudes."""
    workdir, _ = runs("omp")
    starts = runs.starts["omp"]
    finetuned = array_files.load_arrays(workdir_files.unit_folder(workdir, 1.0) / "weights.npz")
    _, source_weights = source
    assert not np.array_equal(finetuned["conv1"]["kernel"], source_weights["conv1"]["kernel"])
    for index, density in enumerate(DENSITIES, start=1):
        weights, masks = starts[index]
        for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(source_weights)):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
        importance = saliency.magnitude_importance(finetuned, functional.leaf_kinds(
            create_model("resnet18", num_classes=10, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0))))
        expected = selection.keep_largest(importance, selection.keep_counts(importance, density))
        for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)


def test_dense_prunes_nothing(runs):
    _, results = runs("dense")
    assert [(r["density"], r["sparsity"], r["speedup"]) for r in results] == [(1.0, 0.0, 1.0)]


@pytest.mark.parametrize("method", ["vpns", "slim"])
def test_channel_methods_prune_exactly_k_channels(runs, source, method):
    workdir, results = runs(method, **{"mask.granularity": "channel"})
    groups = structured.channel_groups("resnet18", source[1])
    for row in results:
        if row["density"] not in DENSITIES:
            continue
        masks = unit_masks(workdir, row["density"])
        pruned = sum(int((m == 0).sum()) for m in masks.values())
        assert pruned == structured.channel_prune_counts(groups, row["density"], 0.25)
        assert row["speedup"] > 1.0 and row["channel_sparsity"] == round(pruned / sum(g.num_channels for g in groups), 6)


def test_transfer_finetunes_the_found_masks_on_another_task(runs, fashion_data_dir, source, tmp_path):
    found, _ = runs("vpns")
    config = tiny_config(fashion_data_dir, source[0], "vpns")
    config.data.classes = (0, 1, 2, 3, 4)  # the other half of Fashion-MNIST
    config.transfer.masks_from = str(found)
    results = train.run(config, tmp_path / "transfer")
    for row in results:
        transferred = unit_masks(tmp_path / "transfer", row["density"])
        for a, b in zip(jax.tree.leaves(transferred), jax.tree.leaves(unit_masks(found, row["density"]))):
            np.testing.assert_array_equal(a, b)


def test_a_run_on_a_locked_workdir_is_refused_before_touching_it(fashion_data_dir, source, tmp_path):
    with workdir_guard.workdir_lock(tmp_path):
        with pytest.raises(workdir_guard.WorkdirLockedError, match="wait for it to finish or use another --workdir"):
            train.run(tiny_config(fashion_data_dir, source[0], "vpns"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [workdir_guard.LOCK_FILE]


def test_a_nan_step_stops_the_run_and_skip_resumes_past_it(fashion_data_dir, source, tmp_path, monkeypatch):
    config = tiny_config(fashion_data_dir, source[0], "vpns", **{"checkpoint.every_steps": 1})
    # SGD at lr 1e38: step 1 moves the prompt by 1e38 * grad (finite, |grad| << 1); at step 2 the weight decay
    # term alone, 1e38 * 1e-4 * prompt, overflows to inf.
    config.stage1.prompt.update(optimizer="sgd", lr=1e38)
    with pytest.raises(health.NonFiniteLossError, match=r"NaN/Inf at density 0\.5, stage 1, step 2 \(epoch 0, "
                                                        r"batch 1\); the run stopped"):
        train.run(config, tmp_path)
    with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
        meta = ckpt.restore_meta()
        assert (meta["unit"], meta["stage"], meta["global_step"]) == (0, 1, 1)  # from before the bad step
    assert not (tmp_path / workdir_files.RESULTS_JSON).exists()

    config.on_nonfinite = "skip"  # not part of the fingerprint: the same workdir resumes
    config.eval.every_epochs = 1  # nor is this
    # Every checkpoint save (one per step here) looks 1000 s long on the trainer's clock: epoch seconds must
    # leave them out.
    clock, saved_seconds = time.perf_counter, [0.0]
    save = train.Run._save

    def slow_save(self, *args):
        save(self, *args)
        saved_seconds[0] += 1000.0

    monkeypatch.setattr(train.time, "perf_counter", lambda: clock() + saved_seconds[0])
    monkeypatch.setattr(train.Run, "_save", slow_save)
    rows = train.run(config, tmp_path)
    monkeypatch.undo()
    assert saved_seconds[0] > 0
    assert [row["density"] for row in rows] == list(DENSITIES) and all(np.isfinite(r["test_loss"]) for r in rows)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Step 2 of each density's stage 1 (global steps 2 and 6) went NaN and was skipped.
    assert [(r["density"], r["step"]) for r in records if "skipped_batches" in r] == [(0.5, 2), (0.2, 6)]
    # Every epoch that ended in the resumed run was tested (density 0.5's stage 1 resumed after its step 1):
    # one epoch of 2 two-stream iterations per stage, the optimiser steps counted over the unit.
    epochs = [r for r in records if r.get("phase") == "epoch"]
    tested = [(r["density"], r["stage"], r["optimizer_steps"]) for r in epochs if "test_accuracy" in r]
    assert tested == [(0.5, 1, 4), (0.5, 2, 8), (0.2, 1, 4), (0.2, 2, 8)]
    final = {row["density"]: row["test_accuracy"] for row in rows}
    last = [r for r in epochs if "test_accuracy" in r and r["stage"] == 2]
    assert [r["test_accuracy"] for r in last] == [final[0.5], final[0.2]]  # the end of stage 2 is the final model
    assert all(0 < r["epoch_seconds"] < 1000 for r in epochs)
