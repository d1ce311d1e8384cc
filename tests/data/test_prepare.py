"""The prepare CLI: prepares our builders offline, refuses TFDS downloads without --download, never rewrites."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from vpns_jax.data import registry
from vpns_jax.data.prepare import main, prepare, split_sizes
from tests.data.test_builders import make_tiny_imagenet, zip_tree

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
    assert f"tiny_imagenet: prepared {tmp_path / 'data' / 'tiny_imagenet' / '1.0.0'} (train: 7, validation: 3)" in out


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
