"""Checkpoints of real training states, the workdir config guard and .npz array trees."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from vpns_jax.core import optim, steps
from vpns_jax.io import array_files, checkpoint, workdir_guard
from vpns_jax.methods.vpns import VPNS_PHASES

KINDS = {"conv": {"kernel": "conv_kernel"}, "bn": {"scale": "bn", "bias": "bn"},
         "layer1": {0: {"kernel": "conv_kernel"}, 1: {"kernel": "conv_kernel"}}}


def _weights(seed):
    rng = np.random.default_rng(seed)
    return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)},
            "bn": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "layer1": {0: {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)},
                       1: {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)}}}


def _state(stage, seed=0):
    """A TrainState of ``stage`` whose optimiser state holds non-trivial values after one update."""
    weights = _weights(seed)
    scores = {"conv": {"kernel": weights["conv"]["kernel"] * 0.5},
              "layer1": {i: {"kernel": weights["layer1"][i]["kernel"] + 1.0} for i in (0, 1)}}
    prompt = {"program": jnp.asarray(np.random.default_rng(seed + 1).normal(size=(8, 8, 3)), jnp.float32)}
    batch_stats = {"bn": {"mean": jnp.full((4,), 0.25), "var": jnp.full((4,), 2.0)}}
    state = steps.TrainState(step=jnp.asarray(7 + seed, jnp.int32), weights=weights, batch_stats=batch_stats,
                             scores=scores, prompt=prompt, prune_k=jnp.asarray([3], jnp.int32),
                             label_map=jnp.arange(4, dtype=jnp.int32), rng=jax.random.PRNGKey(seed),
                             opt_state=None, masks=None)
    if stage == 2:
        state = state.replace(masks=jax.tree.map(lambda s: (s > 0).astype(jnp.float32), scores))
    trainable = steps.trainable(state, VPNS_PHASES[stage])
    labels = optim.param_labels(trainable, KINDS)
    tx = optim.stage_optimizer(optim.reference_groups(stage), labels, epochs=2, iterations_per_epoch=3)
    opt_state = tx.init(trainable)
    grads = jax.tree.map(lambda x: jnp.sin(x) + 0.1, trainable)
    _, opt_state = optim.apply_gradients(tx, labels, trainable, grads, opt_state)
    return state.replace(opt_state=opt_state)


def _assert_identical_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("stage", [1, 2])
def test_state_round_trips_bit_identically(tmp_path, stage):
    state = _state(stage)
    # The stage's optimiser state really holds masked nodes, and the masks field is as the stage has it.
    treedef = str(jax.tree.structure(state))
    assert "MaskedNode" in treedef and "PartitionState" in treedef
    assert (state.masks is None) == (stage == 1)
    meta = {"stage": stage, "density_index": 1, "position": 123, "results": [{"density": 0.5, "acc": 0.75}],
            "data": {"train": {"epoch": 2, "offset": 64}}}
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        ckpt.save(5, state, meta)
        assert ckpt.latest_step() == 5
        assert ckpt.restore_meta() == meta
        restored, restored_meta = ckpt.restore(jax.eval_shape(lambda: state))
    assert type(restored) is steps.TrainState
    assert (restored.masks is None) == (stage == 1)
    assert isinstance(restored.opt_state, type(state.opt_state))
    assert list(restored.weights["layer1"]) == [0, 1]  # int keys stay ints
    assert restored_meta == meta
    _assert_identical_trees(state, restored)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))


def test_restore_by_step_and_in_a_new_process_view(tmp_path):
    states = {step: _state(1, seed=step) for step in (1, 2)}
    with checkpoint.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"position": step * 10})
    # A fresh Checkpointer (as after a restart) sees both and restores either.
    with checkpoint.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.restore_meta(1) == {"position": 10}
        old, meta = ckpt.restore(jax.eval_shape(lambda: states[1]), step=1)
        assert meta == {"position": 10}
        _assert_identical_trees(states[1], old)
        assert int(old.step) == 8
        with pytest.raises(ValueError, match="not after the latest step 2"):
            ckpt.save(2, states[2], {})


def test_only_the_last_max_to_keep_are_kept(tmp_path):
    state = _state(1)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, state, {"position": step})
        assert ckpt.latest_step() == 40
        assert ckpt.all_steps() == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 40
        assert ckpt.restore_meta() == {"position": 40}


def test_empty_directory_has_no_latest(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "new", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore_meta()


@pytest.mark.parametrize("keep", [1, 3])
def test_a_save_killed_before_finalising_is_not_latest(tmp_path, monkeypatch, keep):
    """A save that dies after writing its data but before orbax's rename leaves the previous step as latest;
    with max_to_keep=1 too, where that step is the only good one (old steps go only after a finalised save)."""
    first, second = _state(1, seed=0), _state(1, seed=3)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=keep) as ckpt:
        ckpt.save(1, first, {"position": 1})

    class Killed(BaseException):
        pass

    def die(self):
        raise Killed

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", die)
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=keep)
    with pytest.raises(Killed):
        ckpt.save(2, second, {"position": 2})
    monkeypatch.undo()
    # What the killed process left: the step's data in an unfinalised temporary folder, no '2'.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("2")]
    assert leftovers == ["2.orbax-checkpoint-tmp"]
    assert any((tmp_path / leftovers[0]).rglob("*"))

    with checkpoint.Checkpointer(tmp_path, max_to_keep=keep) as resumed:
        assert resumed.latest_step() == 1
        assert resumed.all_steps() == [1]
        restored, meta = resumed.restore(jax.eval_shape(lambda: first))
        assert meta == {"position": 1}
        _assert_identical_trees(first, restored)
        # Saving the same step again replaces the leftover.
        resumed.save(2, second, {"position": 2})
        assert resumed.latest_step() == 2
        restored, _ = resumed.restore(jax.eval_shape(lambda: second))
        _assert_identical_trees(second, restored)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("2")) == ["2"]


def test_guard_workdir_writes_then_accepts_the_same_config(tmp_path):
    fingerprint = {"model": {"name": "resnet18", "width": 0.25}, "densities": (0.5, 0.1), "seed": 0}
    workdir = tmp_path / "run"
    workdir_guard.guard_workdir(workdir, fingerprint)
    path = workdir / "config.json"
    text = path.read_text()
    assert json.loads(text) == {"densities": [0.5, 0.1], "model": {"name": "resnet18", "width": 0.25}, "seed": 0}
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert [p.name for p in workdir.iterdir()] == ["config.json"]  # no temporary file left
    workdir_guard.guard_workdir(workdir, dict(fingerprint))  # same config: no error
    assert path.read_text() == text


def test_guard_workdir_refuses_another_config_and_changes_nothing(tmp_path):
    fingerprint = {"model": {"name": "resnet18", "width": 0.25}, "densities": [0.5, 0.1], "seed": 0,
                   "stage1": {"lr": 1e-3, "epochs": 3}}
    workdir_guard.guard_workdir(tmp_path, fingerprint)
    path = tmp_path / "config.json"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    other = {"model": {"name": "resnet18", "width": 0.5}, "densities": [0.5, 0.1], "seed": 0,
             "stage1": {"lr": 1e-3, "epochs": 4}, "extra": True}
    with pytest.raises(workdir_guard.WorkdirConfigError) as info:
        workdir_guard.guard_workdir(tmp_path, other)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"workdir {tmp_path} holds a run of a different config "
                       "(differs in: extra, model.width, stage1.epochs); use another --workdir, or pass "
                       f"--replace_workdir to move that run into {tmp_path / 'replaced'}/ and start afresh")
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_replace_moves_the_other_run_aside_whole_and_starts_afresh(tmp_path):
    workdir_guard.guard_workdir(tmp_path, {"seed": 0})
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    (tmp_path / "checkpoints" / "7" / "state").write_bytes(b"old state")
    (tmp_path / "results.json").write_text("[1]")
    (tmp_path / workdir_guard.LOCK_FILE).write_text("123\n")
    workdir_guard.guard_workdir(tmp_path, {"seed": 0}, replace=True)  # the same config: nothing moves
    assert (tmp_path / "results.json").exists()
    workdir_guard.guard_workdir(tmp_path, {"seed": 1}, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_guard.LOCK_FILE, "config.json", "replaced"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1}
    (moved,) = (tmp_path / "replaced").iterdir()
    assert json.loads((moved / "config.json").read_text()) == {"seed": 0}
    assert (moved / "checkpoints" / "7" / "state").read_bytes() == b"old state"
    assert (moved / "results.json").read_text() == "[1]"
    # A second replacement keeps the first one: each gets its own folder.
    (tmp_path / "config.json").write_text("{not json")
    workdir_guard.guard_workdir(tmp_path, {"seed": 2}, replace=True)
    assert len(list((tmp_path / "replaced").iterdir())) == 2
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 2}


def test_guard_workdir_lists_at_most_five_keys(tmp_path):
    workdir_guard.guard_workdir(tmp_path, {f"k{i}": i for i in range(8)})
    with pytest.raises(workdir_guard.WorkdirConfigError, match=r"\(differs in: k0, k1, k2, k3, k4 and 3 more\)"):
        workdir_guard.guard_workdir(tmp_path, {f"k{i}": i + 1 for i in range(8)})


def test_arrays_round_trip_with_int_keys(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "conv1": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)},
        "layer1": {0: {"conv1": {"kernel": rng.normal(size=(2, 2)).astype(np.float32)}},
                   1: {"conv1": {"kernel": np.array([np.nan, -0.0, np.inf], np.float32)}}},
        "masks": {"fc": jnp.asarray([[1.0, 0.0]], jnp.float32), "count": np.int64(5)},
        "flags": np.array([True, False]),
        "empty": {},
    }
    path = tmp_path / "final" / "density_0.1.npz"
    array_files.save_arrays(path, tree)
    assert [p.name for p in path.parent.iterdir()] == ["density_0.1.npz"]
    loaded = array_files.load_arrays(path)
    assert list(loaded) == ["conv1", "layer1", "masks", "flags", "empty"]
    assert list(loaded["layer1"]) == [0, 1] and all(type(k) is int for k in loaded["layer1"])
    assert loaded["empty"] == {}
    _assert_identical_trees({k: v for k, v in tree.items() if k != "empty"},
                            {k: v for k, v in loaded.items() if k != "empty"})
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(["conv1/kernel", "layer1/#0/conv1/kernel", "layer1/#1/conv1/kernel",
                                             "masks/fc", "masks/count", "flags", "empty/"])
        assert data["masks/count"].dtype == np.int64 and int(data["masks/count"]) == 5


def test_arrays_refuse_ambiguous_keys(tmp_path):
    for bad in ({"a/b": np.zeros(1)}, {"#1": np.zeros(1)}, {"": np.zeros(1)}):
        with pytest.raises(ValueError, match="cannot be stored"):
            array_files.save_arrays(tmp_path / "x.npz", bad)
    with pytest.raises(TypeError):
        array_files.save_arrays(tmp_path / "x.npz", {"o": np.array([object()])})
    assert not list(tmp_path.iterdir())


def test_workdir_lock_refuses_a_second_holder_until_released(tmp_path):
    workdir = tmp_path / "run"
    with workdir_guard.workdir_lock(workdir):
        assert (workdir / workdir_guard.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        # A second open file description conflicts even in this process, as another process's would.
        with pytest.raises(workdir_guard.WorkdirLockedError, match=rf"in use by another run \(process {os.getpid()}"):
            with workdir_guard.workdir_lock(workdir):
                pass
    with workdir_guard.workdir_lock(workdir):  # released on exit: free again
        pass
    assert [p.name for p in workdir.iterdir()] == [workdir_guard.LOCK_FILE]


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    # flock is released by the kernel when its holder dies (SIGKILL included): only the file stays.
    (tmp_path / workdir_guard.LOCK_FILE).write_text("999999\n")
    with workdir_guard.workdir_lock(tmp_path):
        assert (tmp_path / workdir_guard.LOCK_FILE).read_text() == f"{os.getpid()}\n"


def _corrupt(folder):
    """Overwrites every file under ``folder`` with half its length of garbage (a truncated, scrambled write)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        path.write_bytes(b"\x13" * (path.stat().st_size // 2))


@pytest.mark.parametrize("item", ["state", "meta"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, item, caplog):
    older, newer = _state(1), _state(2)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        ckpt.save(10, older, {"position": 10})
        ckpt.save(20, newer, {"position": 20})
    _corrupt(tmp_path / "20" / item)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), older)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        step, state, meta = ckpt.newest_readable(lambda s: (s, *ckpt.restore(abstract, s)))
        assert (step, meta) == (10, {"position": 10})
        _assert_identical_trees(state, older)
        assert ckpt.all_steps() == [10, 20]  # the unreadable one is reported, not deleted
    assert "checkpoint step 20" in caplog.text and "unreadable" in caplog.text


def test_saving_past_an_unreadable_newest_keeps_a_readable_one_at_every_moment(tmp_path):
    states = {step: _state(1, seed=step) for step in (1, 2, 3, 4)}
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(1, states[1], {"position": 1})
        ckpt.save(2, states[2], {"position": 2})
    _corrupt(tmp_path / "2" / "state")
    abstract = jax.eval_shape(lambda: states[1])
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        read = lambda s: (s, *ckpt.restore(abstract, s))  # noqa: E731
        assert ckpt.newest_readable(read)[0] == 1
        # The run goes on from step 1 and saves after the unreadable step 2: orbax drops step 1 only once
        # step 3 is complete, and step 3 reads back.
        for step in (3, 4):
            ckpt.save(step, states[step], {"position": step})
            found, state, _ = ckpt.newest_readable(read)
            assert found == step
            _assert_identical_trees(state, states[step])
        assert ckpt.all_steps() == [3, 4]


def test_no_readable_checkpoint_is_a_one_line_error_and_none_is_no_checkpoint(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.newest_readable(ckpt.restore_meta) is None
        ckpt.save(5, _state(1), {"position": 5})
    _corrupt(tmp_path / "5" / "meta")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"no checkpoint in .* reads back whole \(step 5: .*move .* away") as info:
            ckpt.newest_readable(ckpt.restore_meta)
    assert "\n" not in str(info.value)
