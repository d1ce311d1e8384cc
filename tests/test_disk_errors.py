"""Disk trouble (issue 19, item 6): a write the disk refuses (full, over quota, read-only, a file too large) is one
line naming the path and the fix; the previous file or checkpoint stays whole and is the one used or resumed
from; nothing temporary is left behind.

Failures are patched in where the process meets the disk (``np.savez`` mid-file, ``os.fsync``, ``os.replace``,
orbax's JSON writer thread), or made real with a file size limit (tensorstore's own writer). Tests run as root,
where a read-only folder does not stop writes, so none relies on permissions. Tiny trees, no model compiles.
"""

import errno
import json
import logging
import os
import pathlib
import resource
import signal
import types

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from vpns_jax import cli
from vpns_jax.core import masking, prompts, steps
from vpns_jax.io import array_files, checkpoint, disk, export, subnetwork_format, workdir
from vpns_jax.models import create_model, functional

RESUME = "then rerun the same command to resume"
FIXES = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space on that disk",
         errno.EROFS: "make that folder writable", errno.EFBIG: "raise the file size limit"}
WIDTH = 1 / 16
SPEC = prompts.PromptSpec("pad", input_size=32, output_size=32, pad_size=4)


def _refused(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _assert_one_line(error: BaseException, path: pathlib.Path, code: int, *fragments: str) -> None:
    """``error`` is a DiskError of ``code`` whose one-line message names ``path``, the errno and the fix."""
    assert isinstance(error, disk.DiskError) and isinstance(error, OSError)
    message = str(error)
    assert "\n" not in message and message == " ".join(message.split()), message
    assert str(path) in message and f"[{errno.errorcode[code]}]" in message and FIXES[code] in message, message
    assert error.errno == code
    for fragment in fragments:
        assert fragment in message, message


def _fail_at(monkeypatch, where: str, code: int, name: str | None = None) -> None:
    """Makes the next atomic write fail ``where`` ('write': after half the bytes, 'fsync' or 'rename') with
    ``code``; for 'rename', only the rename onto a file called ``name`` (default: any)."""
    if where == "write":
        def savez(file, **arrays):
            file.write(b"PK\x03\x04 the first half of a zip")
            raise _refused(code)
        monkeypatch.setattr(np, "savez", savez)
    elif where == "fsync":
        def fsync(fd):
            raise _refused(code)
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_replace = os.replace

        def replace(source, target):
            if name is None or pathlib.Path(target).name == name:
                raise _refused(code)
            return real_replace(source, target)
        monkeypatch.setattr(os, "replace", replace)


# ------------------------------------------------------------------ .npz files, exports, results


@pytest.mark.parametrize("where, code", [("write", errno.ENOSPC), ("fsync", errno.EDQUOT), ("rename", errno.EROFS)])
def test_a_refused_array_file_keeps_the_previous_one(tmp_path, monkeypatch, capsys, where, code):
    path = tmp_path / "weights.npz"
    array_files.save_arrays(path, {"conv": {"kernel": np.arange(6, dtype=np.float32)}, 3: {"b": np.int32(7)}})
    before = path.read_bytes()
    _fail_at(monkeypatch, where, code)
    with pytest.raises(disk.DiskError) as raised:
        array_files.save_arrays(path, {"conv": {"kernel": np.full(6, -1.0, np.float32)}, 3: {"b": np.int32(8)}})
    monkeypatch.undo()
    _assert_one_line(raised.value, path, code, f"cannot write {path}: ", RESUME)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.npz"]  # no temporary file left
    loaded = array_files.load_arrays(path)
    np.testing.assert_array_equal(loaded["conv"]["kernel"], np.arange(6, dtype=np.float32))
    assert loaded[3]["b"] == 7
    # What the command line prints: the one line, exit status 2.
    assert cli.report_error(raised.value, verbose=False) == cli.EXIT_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {raised.value}"]


def test_a_refused_new_file_leaves_nothing(tmp_path, monkeypatch):
    _fail_at(monkeypatch, "write", errno.ENOSPC)
    with pytest.raises(disk.DiskError) as raised:
        array_files.save_arrays(tmp_path / "new" / "masks.npz", {"m": np.ones(3, np.float32)})
    _assert_one_line(raised.value, tmp_path / "new" / "masks.npz", errno.ENOSPC)
    assert list((tmp_path / "new").iterdir()) == []


def test_other_errors_of_the_writer_pass_unchanged_and_leave_nothing(tmp_path, monkeypatch):
    def savez(file, **arrays):
        file.write(b"half")
        raise TypeError("not a disk problem")

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(TypeError, match="^not a disk problem$"):
        array_files.save_arrays(tmp_path / "a.npz", {"m": np.ones(3, np.float32)})
    assert list(tmp_path.iterdir()) == []


def _subnetwork(seed: int) -> dict:
    """A tiny ResNet-18's trees (numpy values on the model's abstract shapes: nothing compiles), half-masked."""
    model = nnx.eval_shape(lambda: create_model("resnet18", num_classes=10, width=WIDTH, stem="cifar",
                                                rngs=nnx.Rngs(0)))
    _, weights, batch_stats = functional.split_model(model)
    rng = np.random.default_rng(seed)
    weights, batch_stats = (jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), tree)
                            for tree in (weights, batch_stats))
    batch_stats = jax.tree.map(np.abs, batch_stats)  # variances are positive
    flat = traverse_util.flatten_dict(weights)
    masks = traverse_util.unflatten_dict({path: (rng.uniform(size=flat[path].shape) < 0.5).astype(np.float32)
                                          for path in masking.prunable_paths(functional.leaf_kinds(model))})
    prompt = {"program": rng.standard_normal((32, 32, 3)).astype(np.float32)}
    return dict(weights=weights, batch_stats=batch_stats, masks=masks, prompt=prompt,
                label_map=np.array([7, 2, 9, 0], np.int32), rng=np.array([0, seed], np.uint32))


def _export(path: pathlib.Path, trees: dict) -> subnetwork_format.ExportSize:
    return export.export_subnetwork(path, model_name="resnet18", num_classes=10, width=WIDTH, stem="cifar",
                                    prompt_spec=SPEC, overwrite=True, **trees)


def test_a_refused_export_keeps_the_previous_export(tmp_path, monkeypatch):
    path = tmp_path / "subnetwork.npz"
    good = _subnetwork(0)
    _export(path, good)
    before = path.read_bytes()
    _fail_at(monkeypatch, "write", errno.ENOSPC)
    with pytest.raises(disk.DiskError) as raised:
        _export(path, _subnetwork(1))
    monkeypatch.undo()
    _assert_one_line(raised.value, path, errno.ENOSPC, f"cannot write {path}: No space left on device [ENOSPC]")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["subnetwork.npz"]
    with np.load(path) as data:  # the good export's values, read as stored
        assert json.loads(data["meta"].tobytes())["label_map"] == [7, 2, 9, 0]
        np.testing.assert_array_equal(data["rng"], [0, 0])
        np.testing.assert_array_equal(data["prompt/program"], good["prompt"]["program"])


def test_a_refused_unit_save_keeps_that_units_previous_export(tmp_path, monkeypatch):
    """``save_unit`` redone after a resume (a run killed between it and its checkpoint): the export it cannot
    write leaves the previous one whole, and the error names it."""
    folder = workdir.unit_folder(tmp_path, 0.5)
    model = types.SimpleNamespace(name="resnet18", num_classes=10, width=WIDTH, stem="cifar", vit={})

    def save(seed):
        trees = _subnetwork(seed)
        state = steps.TrainState(step=np.int32(3), weights=trees["weights"], batch_stats=trees["batch_stats"],
                                 scores={}, prompt=trees["prompt"], prune_k=np.zeros(1, np.int32),
                                 label_map=trees["label_map"], rng=trees["rng"], opt_state=None)
        flat_masks = traverse_util.flatten_dict(trees["masks"])
        effective = traverse_util.unflatten_dict({path: leaf * flat_masks[path] if path in flat_masks else leaf for
                                                  path, leaf in traverse_util.flatten_dict(trees["weights"]).items()})
        found = {"masks": trees["masks"], "effective": effective, "kernel_masks": trees["masks"]}
        workdir.save_unit(folder, state, found, model=model, prompt_spec=SPEC, eval_with_prompt=True,
                          class_names=None)

    save(0)
    before = (folder / "subnetwork.npz").read_bytes()
    _fail_at(monkeypatch, "rename", errno.ENOSPC, name="subnetwork.npz")
    with pytest.raises(disk.DiskError) as raised:
        save(1)
    monkeypatch.undo()
    _assert_one_line(raised.value, folder / "subnetwork.npz", errno.ENOSPC, RESUME)
    assert (folder / "subnetwork.npz").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "batch_stats.npz", "label_map.npz", "masks.npz", "prompt.npz", "subnetwork.npz", "weights.npz"]
    with np.load(folder / "subnetwork.npz") as data:
        np.testing.assert_array_equal(data["rng"], [0, 0])  # seed 0's, not seed 1's


def test_a_refused_results_file_keeps_the_previous_one(tmp_path, monkeypatch):
    rows = [{"method": "vpns", "density": 0.5, "sparsity": 0.5, "test_accuracy": 0.75, "test_loss": 0.5,
             "wall_time_s": 1.0}]
    workdir.write_results(tmp_path, rows)
    before = (tmp_path / workdir.RESULTS_CSV).read_bytes()
    _fail_at(monkeypatch, "rename", errno.ENOSPC, name=workdir.RESULTS_CSV)
    with pytest.raises(disk.DiskError) as raised:
        workdir.write_results(tmp_path, [{**rows[0], "test_accuracy": 0.25}])
    monkeypatch.undo()
    _assert_one_line(raised.value, tmp_path / workdir.RESULTS_CSV, errno.ENOSPC)
    assert (tmp_path / workdir.RESULTS_CSV).read_bytes() == before
    assert "0.75" in before.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.RESULTS_CSV, workdir.RESULTS_JSON]


# ------------------------------------------------------------------ checkpoints

FIRST = {"x": np.arange(8, dtype=np.float32), "n": {"k": np.asarray([3, 4], np.int32)}}
SECOND = {"x": np.full(8, -2.5, np.float32), "n": {"k": np.asarray([5, 6], np.int32)}}


def _read(ckpt: checkpoint.Checkpointer, step: int):
    return ckpt.restore(jax.eval_shape(lambda: FIRST), step)


def _assert_resumes_from_the_first(directory: pathlib.Path, keep: int) -> None:
    """A new run on ``directory`` finds checkpoint 1 with FIRST's values; saving 2 (the rerun) then works."""
    assert sorted(p.name for p in directory.iterdir()) == ["1"]  # the failed save's temporary folder is gone
    with checkpoint.Checkpointer(directory, max_to_keep=keep) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        state, meta = ckpt.newest_readable(lambda step: _read(ckpt, step))
        assert meta == {"position": 1}
        np.testing.assert_array_equal(state["x"], np.arange(8, dtype=np.float32))
        np.testing.assert_array_equal(state["n"]["k"], [3, 4])
        ckpt.save(2, SECOND, {"position": 2})
        state, meta = ckpt.newest_readable(lambda step: _read(ckpt, step))
        assert meta == {"position": 2} and ckpt.all_steps() == ([2] if keep == 1 else [1, 2])
        np.testing.assert_array_equal(state["x"], SECOND["x"])


@pytest.mark.parametrize("keep", [1, 2])
def test_a_checkpoint_save_refused_in_orbaxs_writer_thread(tmp_path, monkeypatch, caplog, keep):
    """The JSON item is written by a writer thread of orbax's: its error surfaces in the save, as one line,
    without orbax's own traceback log; with max_to_keep=1 too, where step 1 is the only good checkpoint."""
    directory = tmp_path / "checkpoints"
    with checkpoint.Checkpointer(directory, max_to_keep=keep) as ckpt:
        ckpt.save(1, FIRST, {"position": 1})

    async def half_written(self, item, folder):
        (folder / "metadata").write_text('{"posi')
        raise _refused(errno.ENOSPC)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", half_written)
    caplog.set_level(logging.INFO)
    with pytest.raises(disk.DiskError) as raised:
        with checkpoint.Checkpointer(directory, max_to_keep=keep) as ckpt:  # closing must not replace the error
            ckpt.save(2, SECOND, {"position": 2})
    monkeypatch.undo()
    _assert_one_line(raised.value, directory, errno.ENOSPC, f"cannot save checkpoint step 2 in {directory}: ",
                     f"{RESUME} from checkpoint step 1")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    _assert_resumes_from_the_first(directory, keep)


def test_a_checkpoint_too_large_for_the_file_size_limit_is_real_disk_trouble(tmp_path):
    """A real refusal, from the OS to tensorstore's C++ writer (which orbax reports as a ValueError): a file
    size limit makes the write of a 4 MiB array fail with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 1 << 20
    if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN or (hard != resource.RLIM_INFINITY and hard < limit):
        pytest.skip("needs SIGXFSZ ignored and a hard file size limit of at least 1 MiB")
    directory = tmp_path / "checkpoints"
    with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(1, FIRST, {"position": 1})
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            with pytest.raises(disk.DiskError) as raised:
                noise = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # incompressible
                ckpt.save(2, {"x": noise, "n": SECOND["n"]}, {"position": 2})
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _assert_one_line(raised.value, directory, errno.EFBIG, "cannot save checkpoint step 2",
                     f"{RESUME} from checkpoint step 1")
    assert isinstance(raised.value.__cause__, ValueError) and "os_error_code" in str(raised.value.__cause__)
    _assert_resumes_from_the_first(directory, 1)


def test_the_first_checkpoint_refused_resumes_from_the_start(tmp_path, monkeypatch):
    async def full(self, item, folder):
        raise _refused(errno.ENOSPC)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        with pytest.raises(disk.DiskError, match="resume from the start") as raised:
            ckpt.save(1, FIRST, {"position": 1})
        assert ckpt.latest_step() is None
    _assert_one_line(raised.value, tmp_path, errno.ENOSPC)
    assert list(tmp_path.iterdir()) == []


def test_other_checkpoint_errors_pass_unchanged(tmp_path, monkeypatch):
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(1, FIRST, {"position": 1})

        async def buggy(self, item, folder):
            raise TypeError("a bug, not the disk")

        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", buggy)
        with pytest.raises(TypeError, match="a bug, not the disk"):
            ckpt.save(2, SECOND, {"position": 2})
        assert ckpt.latest_step() == 1


def test_a_write_refused_when_closing_is_one_line(tmp_path, monkeypatch):
    """An error orbax raises only when waited for (here tensorstore's report of a full disk) at close."""
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")

    def wait():
        raise ValueError('DATA_LOSS: Error writing "x/0": Failed to write 16 bytes to file 9: '
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt._manager, "wait_until_finished", wait)
    with pytest.raises(disk.DiskError) as raised:
        ckpt.close()
    _assert_one_line(raised.value, tmp_path / "checkpoints", errno.ENOSPC, "cannot finish writing the checkpoints in")


def test_a_checkpoint_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "checkpoints"
    path.write_text("not a folder\n")
    with pytest.raises(disk.DiskError, match="is a file, not a folder; move it aside") as raised:
        checkpoint.Checkpointer(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert path.read_text() == "not a folder\n"
