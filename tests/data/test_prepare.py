"""The prepare CLI: prepares our builders offline, refuses TFDS downloads without --download, rewrites only with
--force and only once the new copy is complete, leaves nothing that passes for prepared when it fails."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers import TINY_NAMES, TRUNCATED, jpeg_bytes, make_tiny_imagenet, truncate, zip_tree
from vpns_jax.data import pipeline, registry, run_data
from vpns_jax.data.prepare import main, prepare, split_sizes

REPO = pathlib.Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    return subprocess.run([sys.executable, "-m", "vpns_jax.data.prepare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _mtimes(folder: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_cli_prepares_digits_then_prepare_twice_rewrites_nothing(tmp_path, capsys):
    data_dir = tmp_path / "data"
    result = _cli("--dataset=digits", f"--data_dir={data_dir}")
    assert result.returncode == 0, result.stderr
    version_dir = data_dir / "sklearn_digits" / "1.0.0"
    assert f"digits: prepared {version_dir} (test: 360, train: 1437)" in result.stdout
    assert split_sizes(version_dir) == {"train": 1437, "test": 360}

    before = _mtimes(data_dir)
    assert any(name.endswith(".array_record-00000-of-00001") for name in before)
    time.sleep(0.01)
    assert prepare("digits", data_dir=str(data_dir)) == version_dir
    assert main(["--dataset=digits", f"--data_dir={data_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"digits: already prepared, nothing done: {version_dir} (test: 360, train: 1437)" in out
    assert _mtimes(data_dir) == before


def test_tfds_dataset_without_download_fails_at_once(tmp_path):
    start = time.monotonic()
    result = _cli("--dataset=cifar10", f"--data_dir={tmp_path / 'data'}")
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert elapsed < 10, elapsed  # no download attempt (about 1 s here, most of it importing TFDS)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'cifar10'" in lines[0] and "--download was not given" in lines[0]
    assert registry.get_dataset_spec("cifar10").how_to_get in lines[0]
    assert not (tmp_path / "data").exists()  # nothing written, nothing downloaded


def test_tfds_dataset_already_prepared_is_found_without_download(tmp_path):
    version_dir = tmp_path / "cifar100" / "3.0.2"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text("{}")
    assert prepare("cifar100", data_dir=str(tmp_path)) == version_dir
    with pytest.raises(registry.DataNotFoundError, match=r"'dtd'.*not prepared.*--download"):
        prepare("dtd", data_dir=str(tmp_path))


@pytest.mark.parametrize("manual", ["empty", "none", "missing"])
def test_missing_tiny_imagenet_is_a_one_line_error(tmp_path, capsys, manual):
    args = ["--dataset=tiny_imagenet", f"--data_dir={tmp_path / 'data'}"]
    if manual == "empty":
        (tmp_path / "empty").mkdir()
        args.append(f"--manual_dir={tmp_path / 'empty'}")
    elif manual == "missing":
        args.append(f"--manual_dir={tmp_path / 'nowhere'}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    if manual == "missing":
        assert f"--manual_dir {tmp_path / 'nowhere'} is not a folder" in err
    else:
        expected = tmp_path / ("empty" if manual == "empty" else "data/downloads/manual")
        assert f"Tiny-ImageNet not found: the manual dir {expected} does not exist or is empty" in err
        assert "tiny-imagenet-200.zip" in err and "--manual_dir" in err
    assert not list((tmp_path / "data").glob("tiny_imagenet/*/dataset_info.json"))


def test_tiny_imagenet_from_the_default_manual_dir(tmp_path, capsys):
    make_tiny_imagenet(tmp_path / "src")
    manual = tmp_path / "data" / "downloads" / "manual"
    manual.mkdir(parents=True)
    zip_tree(tmp_path / "src" / "tiny-imagenet-200", manual / "tiny-imagenet-200.zip")
    assert main(["--dataset=tiny_imagenet", f"--data_dir={tmp_path / 'data'}"]) == 0
    out = capsys.readouterr().out
    assert f"tiny_imagenet: prepared {tmp_path / 'data' / 'tiny_imagenet' / '1.1.0'} (train: 7, validation: 3)" in out


def test_other_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["--dataset=imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'imagenet' is unknown" in err and "tiny_imagenet" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    assert main(["--dataset=fashion_mnist", f"--data_dir={tmp_path}", f"--manual_dir={tmp_path / 'other'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds none of the Fashion-MNIST files" in err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_convert_without_tensorflow_is_a_one_line_error(tmp_path):
    version = tmp_path / "cifar10" / "3.0.2"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text('{"fileFormat": "tfrecord"}')
    result = subprocess.run(
        [sys.executable, "-m", "vpns_jax.data.prepare", "--dataset=cifar10", "--convert", f"--data_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "needs TensorFlow: pip install tensorflow-cpu" in result.stderr
    else:
        pytest.skip("tensorflow is installed: the conversion itself is exercised instead by hand")


def _tiny_args(tmp_path: pathlib.Path) -> list[str]:
    return ["--dataset=tiny_imagenet", f"--data_dir={tmp_path / 'data'}", f"--manual_dir={tmp_path / 'src'}"]


def _stored(version_dir: pathlib.Path, split: str) -> dict[str, bytes]:
    """{file name: stored image bytes} of a prepared Tiny-ImageNet split."""
    source = tfds.builder_from_directory(str(version_dir)).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return {e["file_name"].decode(): e["image"] for e in (source[i] for i in range(len(source)))}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_truncated_jpeg_is_one_line_leaves_nothing_prepared_and_the_fixed_copy_prepares(tmp_path, capsys):
    originals = make_tiny_imagenet(tmp_path / "src")
    tree = tmp_path / "src" / "tiny-imagenet-200"
    truncate(tree / TRUNCATED)
    data_dir = tmp_path / "data"
    assert main(_tiny_args(tmp_path)) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"python -m vpns_jax.data.prepare: error: {tree / TRUNCATED}: not a readable image "
                           "(image file is truncated"), line
    assert line.endswith("then run the same prepare command again")
    assert not list(data_dir.rglob("dataset_info.json")) and not list(data_dir.glob(".incomplete-*"))
    with pytest.raises(registry.DataNotFoundError, match="'tiny_imagenet' is not prepared"):
        registry.prepared_dir(registry.get_dataset_spec("tiny_imagenet"), str(data_dir))

    (tree / TRUNCATED).write_bytes(originals["n01_1.JPEG"][0])  # the fix: an intact copy of the file
    assert main(_tiny_args(tmp_path)) == 0  # the same command, no --force needed
    version_dir = data_dir / "tiny_imagenet" / "1.1.0"
    assert f"tiny_imagenet: prepared {version_dir} (train: 7, validation: 3)\n" in capsys.readouterr().out
    assert _stored(version_dir, "train")["n01_1.JPEG"] == originals["n01_1.JPEG"][0]
    assert sorted(p.name for p in data_dir.iterdir()) == ["downloads", "tiny_imagenet"]  # no staging folder left


def test_force_prepares_again_and_replaces_the_old_copy_only_when_the_new_one_is_complete(tmp_path, capsys):
    originals = make_tiny_imagenet(tmp_path / "src")
    tree = tmp_path / "src" / "tiny-imagenet-200"
    version_dir = tmp_path / "data" / "tiny_imagenet" / "1.1.0"
    assert main(_tiny_args(tmp_path)) == 0
    extra = jpeg_bytes(np.full((64, 64, 3), 7, np.uint8))
    (tree / "train" / "n01" / "images" / "n01_9.JPEG").write_bytes(extra)  # the source copy changes
    before = _mtimes(tmp_path / "data" / "tiny_imagenet")
    capsys.readouterr()
    assert main(_tiny_args(tmp_path)) == 0  # without --force: the old copy is kept
    assert (f"tiny_imagenet: already prepared, nothing done: {version_dir} (train: 7, validation: 3); "
            "--force prepares it again") in capsys.readouterr().out
    assert _mtimes(tmp_path / "data" / "tiny_imagenet") == before

    truncate(tree / TRUNCATED)  # a --force that fails leaves the old copy as it was
    assert main([*_tiny_args(tmp_path), "--force"]) == 2
    assert f"{tree / TRUNCATED}: not a readable image" in _one_error_line(capsys)
    assert _mtimes(tmp_path / "data" / "tiny_imagenet") == before
    assert split_sizes(version_dir) == {"train": 7, "validation": 3}
    assert not list((tmp_path / "data").glob(".incomplete-*"))

    (tree / TRUNCATED).write_bytes(originals["n01_1.JPEG"][0])
    assert main([*_tiny_args(tmp_path), "--force"]) == 0
    assert (f"tiny_imagenet: prepared again, the previous copy replaced: {version_dir} (train: 8, validation: 3)"
            in capsys.readouterr().out)
    assert _stored(version_dir, "train")["n01_9.JPEG"] == extra
    assert [p.name for p in (tmp_path / "data" / "tiny_imagenet").iterdir()] == ["1.1.0"]
    assert not list((tmp_path / "data").glob(".incomplete-*"))


def test_force_errors_are_one_line(tmp_path, capsys):
    assert main(["--dataset=cifar10", f"--data_dir={tmp_path / 'data'}", "--force"]) == 2
    line = _one_error_line(capsys)
    assert "--force prepares 'cifar10' again from its source, which for TFDS's own builders needs --download" in line
    assert main(["--dataset=cifar10", f"--data_dir={tmp_path / 'data'}", "--force", "--convert"]) == 2
    assert "--force prepares again and --convert converts in place: give one of them" in _one_error_line(capsys)
    assert not (tmp_path / "data").exists()


def test_a_version_folder_that_is_not_prepared_is_replaced_only_with_force(tmp_path, capsys):
    folder = tmp_path / "data" / "sklearn_digits" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert main(["--dataset=digits", f"--data_dir={tmp_path / 'data'}"]) == 2
    assert f"{folder} exists but is not a prepared dataset (no dataset_info.json): delete it, or pass --force" \
        in _one_error_line(capsys)
    assert (folder / "notes.txt").read_text() == "mine"
    assert main(["--dataset=digits", f"--data_dir={tmp_path / 'data'}", "--force"]) == 0
    assert split_sizes(folder) == {"train": 1437, "test": 360} and not (folder / "notes.txt").exists()


def test_an_interrupted_tfds_folder_does_not_pass_for_prepared(tmp_path):
    # TFDS writes dataset_info.json into incomplete.<id>_<version> just before renaming it.
    leftover = tmp_path / "sklearn_digits" / "incomplete.AB12CD_1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "dataset_info.json").write_text("{}")
    with pytest.raises(registry.DataNotFoundError, match="'digits' is not prepared"):
        registry.prepared_dir(registry.get_dataset_spec("digits"), str(tmp_path))
    assert prepare("digits", data_dir=str(tmp_path)) == tmp_path / "sklearn_digits" / "1.0.0"


def _run_config(name: str, data_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """What open_run_data reads before it opens any stream."""
    return ml_collections.ConfigDict({
        "data": {"name": name, "data_dir": str(data_dir), "auto_prepare": False},
        "source": {"enabled": False, "dataset": name},
    })


def test_class_count_differing_from_the_config_is_one_line(tmp_path, capsys):
    make_tiny_imagenet(tmp_path / "src")  # 3 classes; the registry's tiny_imagenet has 200
    assert main(_tiny_args(tmp_path)) == 0
    version_dir = tmp_path / "data" / "tiny_imagenet" / "1.1.0"
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    expected = (f"dataset 'tiny_imagenet' in {version_dir} has 3 classes where the config expects 200: prepare it "
                "again from a complete copy, adding --force to replace this one (put tiny-imagenet-200.zip")
    assert warning.startswith(f"python -m vpns_jax.data.prepare: warning: {expected}"), warning
    assert registry.prepared_num_classes(version_dir) == 3
    with pytest.raises(ValueError) as error:
        run_data.open_run_data(_run_config("tiny_imagenet", tmp_path / "data"))
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    assert "--manual_dir=FOLDER" in str(error.value)

    assert main(["--dataset=digits", f"--data_dir={tmp_path / 'data'}"]) == 0  # 10 classes, as expected
    assert "warning" not in capsys.readouterr().err
    digits_dir = tmp_path / "data" / "sklearn_digits" / "1.0.0"
    assert registry.prepared_num_classes(digits_dir) == 10
    registry.check_class_count(registry.get_dataset_spec("digits"), str(tmp_path / "data"))  # no error
    # A copy without features.json (older TFDS) is counted by its label names file; without either, not checked.
    (version_dir / "features.json").unlink()
    assert registry.prepared_num_classes(version_dir) == 3
    (version_dir / "label.labels.txt").unlink()
    assert registry.prepared_num_classes(version_dir) is None


def test_a_tiny_imagenet_1_0_0_copy_is_still_read_and_prepare_adds_1_1_0(tmp_path, capsys):
    make_tiny_imagenet(tmp_path / "src")
    data_dir = tmp_path / "data"
    new = prepare("tiny_imagenet", data_dir=str(data_dir), manual_dir=str(tmp_path / "src"))
    old = new.parent / "1.0.0"  # as 1.0.0 prepared it: the wnids as label names
    new.rename(old)
    info = json.loads((old / "dataset_info.json").read_text())
    (old / "dataset_info.json").write_text(json.dumps({**info, "version": "1.0.0"}))
    (old / "label.labels.txt").write_text("n01\nn02\nn03\n")
    source = pipeline.open_split("tiny_imagenet", "validation", str(data_dir))
    assert source.dataset_info.features["label"].names == ["n01", "n02", "n03"]
    assert sorted(int(source[i]["label"]) for i in range(len(source))) == [0, 1, 2]
    assert main(_tiny_args(tmp_path)) == 0
    assert f"tiny_imagenet: prepared {new} (train: 7, validation: 3)" in capsys.readouterr().out
    assert registry.prepared_dir(registry.get_dataset_spec("tiny_imagenet"), str(data_dir)) == new
    assert run_data.dataset_class_names("tiny_imagenet", str(data_dir)) == TINY_NAMES
    assert (old / "label.labels.txt").read_text() == "n01\nn02\nn03\n"  # the old copy is left as it was
