"""python -m vpns_jax.convert and model.init_from with torchvision files, on the committed fixtures."""

from __future__ import annotations

import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import (BAD_TENSORS, FIXTURES, NOT_FINITE, NOT_FLOAT, ROOT, TOLERANCE, UNREADABLE, VIT_FIXTURES,
                           VIT_TOLERANCE, forward, load_fixture, load_vit_fixture, templates, vit_templates,
                           write_weights)
from vpns_jax import convert, source_model
from vpns_jax.io import array_files


def _fixture(prefix: str) -> dict:
    return load_fixture(next(path for path in FIXTURES if path.name.startswith(prefix)))


def _args(fixture: dict, input_path: pathlib.Path, output_path: pathlib.Path, *extra: str) -> list[str]:
    return [
        f"--model={fixture['model']}", f"--input={input_path}", f"--output={output_path}",
        f"--num_classes={fixture['num_classes']}", f"--width={fixture['width']!r}", f"--stem={fixture['stem']}",
        *extra,
    ]


@pytest.mark.parametrize("prefix", ["resnet18_w0.0625_cifar", "vgg16_w"])
def test_converted_file_loads_and_reproduces_the_logits(prefix: str, tmp_path: pathlib.Path, capsys) -> None:
    fixture = _fixture(prefix)
    state_dict = fixture["state_dict"]
    source = tmp_path / "torchvision.npz"
    np.savez(source, **state_dict)
    output = tmp_path / "ours.npz"
    assert convert.main(_args(fixture, source, output)) == 0

    captured = capsys.readouterr()
    assert captured.err == ""
    kept = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    params = sum(math.prod(v.shape) for k, v in kept.items() if not k.endswith(("running_mean", "running_var")))
    assert captured.out.startswith(f"wrote {output}: {len(kept)} tensors (")
    assert f" with {params:,} parameters, " in captured.out
    assert captured.out.count("\n") == 1

    # The file is ours ({'weights', 'batch_stats'}), and init_from takes it.
    assert set(array_files.load_arrays(output)) == {"weights", "batch_stats"}
    graphdef, weights_t, stats_t = templates(fixture)
    weights, batch_stats = source_model.load_weights(output, weights_t, stats_t)
    assert np.abs(forward(graphdef, weights, batch_stats, fixture["input"]) - fixture["logits"]).max() <= TOLERANCE


def test_vit_file_converts_at_another_image_size(tmp_path: pathlib.Path, capsys) -> None:
    """A ViT state dict made at 32 px converted for 48 px: the position embedding is interpolated on the way."""
    fixture = load_vit_fixture(next(path for path in VIT_FIXTURES if "to48" in path.name))
    source, output = tmp_path / "vit.npz", tmp_path / "ours.npz"
    np.savez(source, **fixture["state_dict"])
    vit = ",".join(f"{key}={value}" for key, value in fixture["vit"].items())
    args = [f"--model={fixture['model']}", f"--input={source}", f"--output={output}", "--num_classes=10",
            "--image_size=48", f"--vit={vit}"]
    assert convert.main(args) == 0
    assert "for vit_b_16 (width 1, stem imagenet, 10 classes, image size 48, patch_size 8, num_layers 2" in (
        capsys.readouterr().out)
    graphdef, weights_t, stats_t = vit_templates(fixture)
    weights, batch_stats = source_model.load_weights(output, weights_t, stats_t)
    assert np.abs(forward(graphdef, weights, batch_stats, fixture["input"]) - fixture["logits"]).max() <= VIT_TOLERANCE
    assert convert.main([*args[:2], f"--output={tmp_path / 'bad.npz'}", "--vit=patch_size"]) == 2
    assert "--vit 'patch_size': 'patch_size' is not KEY=N" in capsys.readouterr().err


def test_init_from_takes_torchvision_files_directly(tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    fixture = _fixture("resnet50_w")
    state_dict = fixture["state_dict"]
    np.savez(tmp_path / "resnet50.npz", **state_dict)
    save_file(state_dict, str(tmp_path / "resnet50.safetensors"))
    paths = [tmp_path / "resnet50.npz", tmp_path / "resnet50.safetensors"]
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, tmp_path / "resnet50.pth")
        paths.append(tmp_path / "resnet50.pth")
    graphdef, weights_t, stats_t = templates(fixture)
    for path in paths:
        weights, batch_stats = source_model.load_weights(path, weights_t, stats_t)
        assert weights["fc"]["kernel"].dtype == np.float32
        assert np.abs(forward(graphdef, weights, batch_stats, fixture["input"]) - fixture["logits"]).max() <= TOLERANCE


def test_init_from_torchvision_file_of_another_width_names_the_file(tmp_path: pathlib.Path) -> None:
    fixture = _fixture("resnet18_w0.125_imagenet")
    np.savez(tmp_path / "r18.npz", **fixture["state_dict"])
    narrower = _fixture("resnet18_w0.0625_cifar")
    _, weights_t, stats_t = templates(narrower)
    with pytest.raises(ValueError) as info:
        source_model.load_weights(tmp_path / "r18.npz", weights_t, stats_t)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'r18.npz'} (a torchvision state dict): the state dict does not fit")
    assert "conv1.weight has shape (8, 3, 7, 7), the model needs (4, 3, 3, 3)" in message
    assert "\n" not in message


def test_refuses_to_overwrite(tmp_path: pathlib.Path, capsys) -> None:
    fixture = _fixture("vgg16_w")
    source = tmp_path / "vgg16.npz"
    np.savez(source, **fixture["state_dict"])
    output = tmp_path / "out.npz"
    output.write_bytes(b"keep me")
    assert convert.main(_args(fixture, source, output)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {output} exists; pass --overwrite to replace it\n"
    assert output.read_bytes() == b"keep me"

    assert convert.main(_args(fixture, source, output, "--overwrite")) == 0
    assert set(array_files.load_arrays(output)) == {"weights", "batch_stats"}


def test_wrong_model_is_one_line_and_writes_nothing(tmp_path: pathlib.Path) -> None:
    fixture = _fixture("vgg16_w")
    source = tmp_path / "vgg16.npz"
    np.savez(source, **fixture["state_dict"])
    output = tmp_path / "out.npz"
    args = _args(fixture, source, output)
    args[0] = "--model=resnet19"
    result = subprocess.run([sys.executable, "-m", "vpns_jax.convert", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: unknown model 'resnet19'; valid models: ('resnet18', 'resnet50', 'vgg16', 'vgg16_bn', 'vit_b_16', "
        "'vit_b_32', 'vit_l_16')\n"
    )
    assert not output.exists()


def test_mismatched_settings_and_usage_errors_are_one_line(tmp_path: pathlib.Path, capsys) -> None:
    fixture = _fixture("resnet18_w0.0625_cifar")
    source = tmp_path / "r18.npz"
    np.savez(source, **fixture["state_dict"])
    output = tmp_path / "out.npz"

    assert convert.main(_args(fixture, source, output)[:-1] + ["--stem=imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {source} as resnet18 (width 0.0625, stem imagenet, 10 classes)")
    assert "conv1.weight has shape (4, 3, 3, 3), the model needs (4, 3, 7, 7)" in err
    assert "check the model name, width, stem and num_classes" in err

    assert convert.main(_args(fixture, source, tmp_path / "out.bin")) == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'out.bin'} must end in .npz\n"

    assert convert.main(_args(fixture, tmp_path / "absent.pth", output)) == 2
    assert re.fullmatch(r"error: \S+absent\.pth does not exist\n", capsys.readouterr().err)

    with pytest.raises(SystemExit) as info:
        convert.main(["--model=resnet18", f"--output={output}"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "python -m vpns_jax.convert: error: the following arguments are required: --input (see --help)\n"
    )
    assert not output.exists()


def test_init_from_our_npz_of_another_width_keeps_its_message(tmp_path: pathlib.Path) -> None:
    fixture = _fixture("resnet18_w0.125_imagenet")
    source = tmp_path / "r18.npz"
    np.savez(source, **fixture["state_dict"])
    assert convert.main(_args(fixture, source, tmp_path / "ours.npz")) == 0
    _, weights_t, stats_t = templates(_fixture("resnet18_w0.0625_cifar"))
    with pytest.raises(ValueError) as info:
        source_model.load_weights(tmp_path / "ours.npz", weights_t, stats_t)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'ours.npz'} does not fit the model (weights/bn1.bias has shape (8,)")
    assert "weights/conv1.kernel has shape (7, 7, 3, 8), the model needs (3, 3, 3, 4);" in message
    assert message.endswith("and 95 more): check model.name, width, stem and num_classes")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("kind", BAD_TENSORS)
def test_convert_refuses_a_bad_tensor_in_one_line_and_writes_nothing(tmp_path: pathlib.Path, capsys, suffix: str,
                                                                     kind: str) -> None:
    bad, expected = BAD_TENSORS[kind]
    source = write_weights(tmp_path / f"r18{suffix}", {"fc.weight": bad})
    output = tmp_path / "out.npz"
    assert convert.main(_args(_fixture("resnet18_w0.0625_cifar"), source, output)) == 2
    assert capsys.readouterr().err == f"error: {source} {expected}\n"
    assert not output.exists()


def test_convert_refuses_a_file_that_is_no_weights_file(tmp_path: pathlib.Path, capsys) -> None:
    source = tmp_path / "r18.npz"
    source.write_text("not weights\n")
    assert convert.main(_args(_fixture("resnet18_w0.0625_cifar"), source, tmp_path / "out.npz")) == 2
    reason = "a NumPy .npz archive of plain arrays", "no complete zip archive in it"
    assert capsys.readouterr().err == f"error: {source} {UNREADABLE.format(*reason)}\n"


def _init_from_error(path: pathlib.Path) -> str:
    _, weights_t, stats_t = templates(_fixture("resnet18_w0.0625_cifar"))
    with pytest.raises(ValueError) as info:
        source_model.load_weights(path, weights_t, stats_t)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind", BAD_TENSORS)
def test_init_from_refuses_a_bad_tensor_of_a_torchvision_file(tmp_path: pathlib.Path, kind: str) -> None:
    bad, expected = BAD_TENSORS[kind]
    state_dict = {**_fixture("resnet18_w0.0625_cifar")["state_dict"], "fc.weight": bad}  # checked before fitted
    for suffix in (".npz", ".safetensors"):
        path = write_weights(tmp_path / f"r18{suffix}", state_dict)
        assert _init_from_error(path) == f"{path} {expected}"


def test_init_from_refuses_a_bad_tensor_of_our_npz(tmp_path: pathlib.Path) -> None:
    fixture = _fixture("resnet18_w0.0625_cifar")
    source = write_weights(tmp_path / "r18.npz", fixture["state_dict"])
    assert convert.main(_args(fixture, source, tmp_path / "ours.npz")) == 0
    tree = array_files.load_arrays(tmp_path / "ours.npz")
    for name, value, expected in (
        ("int.npz", tree["weights"]["fc"]["bias"].astype(np.int32), NOT_FLOAT.format("weights.fc.bias: int32")),
        ("bool.npz", tree["weights"]["fc"]["bias"] > 0, NOT_FLOAT.format("weights.fc.bias: bool")),
        ("inf.npz", np.full_like(tree["weights"]["fc"]["bias"], -np.inf), NOT_FINITE.format("weights.fc.bias")),
    ):
        bad = {**tree, "weights": {**tree["weights"], "fc": {**tree["weights"]["fc"], "bias": value}}}
        array_files.save_arrays(tmp_path / name, bad)
        assert _init_from_error(tmp_path / name) == f"{tmp_path / name} {expected}"


@pytest.mark.parametrize("suffix, what, reason", [
    (".npz", "a NumPy .npz archive of plain arrays", "no complete zip archive in it"),
    (".safetensors", "a safetensors file", "Error while deserializing header: header too large"),
    (".pth", "a torch .pth/.pt file", "it starts with b'not weig': not a zip archive or a pickle"),
    (".bin", "a NumPy .npz archive of plain arrays", "no complete zip archive in it"),
])
def test_init_from_names_a_file_that_is_no_weights_file(tmp_path: pathlib.Path, suffix: str, what: str,
                                                        reason: str) -> None:
    path = tmp_path / f"W{suffix}"
    path.write_text("not weights\n")
    assert _init_from_error(path) == f"{path} {UNREADABLE.format(what, reason)}"


def test_init_from_names_a_truncated_safetensors(tmp_path: pathlib.Path) -> None:
    data = write_weights(tmp_path / "whole.safetensors", _fixture("resnet18_w0.0625_cifar")["state_dict"]).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    reason = "Error while deserializing header: incomplete metadata, file not fully covered"
    assert _init_from_error(tmp_path / "cut.safetensors") == (
        f"{tmp_path / 'cut.safetensors'} {UNREADABLE.format('a safetensors file', reason)}")
