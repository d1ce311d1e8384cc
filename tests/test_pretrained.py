"""torchvision weights: parity with torch logits (committed fixtures), exact-once mapping, file reading.

The fixtures come from tests/fixtures/make_torchvision_fixtures.py (plain-torch
models with torchvision's names); these tests need no torch, except the .pth
round trips, which skip without it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from tests.helpers import (BAD_TENSORS, FIXTURES, NOT_FINITE, NOT_FLOAT, ROOT, TOLERANCE, UNREADABLE, VIT_FIXTURES,
                           VIT_TOLERANCE, forward, load_fixture, load_vit_fixture, templates, vit_templates,
                           write_weights)
from vpns_jax.io import pretrained
from vpns_jax.models import create_model, functional


def fixture_by_model(model: str) -> pathlib.Path:
    return next(path for path in FIXTURES if path.name.startswith(model + "_w"))


def test_fixtures_cover_every_model_and_both_stems() -> None:
    settings = {(f["model"], f["stem"]) for f in map(load_fixture, FIXTURES)}
    assert settings == {("resnet18", "imagenet"), ("resnet18", "cifar"), ("resnet50", "imagenet"),
                        ("vgg16_bn", "imagenet"), ("vgg16", "imagenet")}
    assert sum(path.stat().st_size for path in FIXTURES + VIT_FIXTURES) < 3_000_000
    # One ViT file at the side it was made for, one whose position embedding the model must interpolate.
    assert [(f["file_image_size"], f["image_size"]) for f in map(load_vit_fixture, VIT_FIXTURES)] == [
        (32, 32), (32, 48)]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_logits_match_torch(path: pathlib.Path) -> None:
    fixture = load_fixture(path)
    graphdef, weights_t, stats_t = templates(fixture)
    weights, batch_stats = pretrained.from_torchvision(fixture["state_dict"], weights_t, stats_t)
    torch_logits = fixture["logits"]
    assert torch_logits.shape == (2, fixture["num_classes"]) and torch_logits.std() > 0.1
    ours = forward(graphdef, weights, batch_stats, fixture["input"])
    assert np.abs(ours - torch_logits).max() <= TOLERANCE

    if batch_stats:
        # The fixture's running statistics are not the defaults, so eval mode really uses them.
        defaults = jax.tree.map(np.ones_like, batch_stats)
        defaults = traverse_util.unflatten_dict(
            {p: (np.zeros_like(a) if p[-1] == "mean" else a) for p, a in traverse_util.flatten_dict(defaults).items()}
        )
        assert np.abs(forward(graphdef, weights, defaults, fixture["input"]) - torch_logits).max() > 100 * TOLERANCE


@pytest.mark.parametrize("path", VIT_FIXTURES, ids=lambda p: p.stem)
def test_vit_logits_match_torch(path: pathlib.Path) -> None:
    fixture = load_vit_fixture(path)
    graphdef, weights_t, stats_t = vit_templates(fixture)
    weights, batch_stats = pretrained.from_torchvision(fixture["state_dict"], weights_t, stats_t)
    assert batch_stats == {} and fixture["logits"].std() > 0.1
    assert np.abs(forward(graphdef, weights, batch_stats, fixture["input"]) - fixture["logits"]).max() <= VIT_TOLERANCE
    if "interpolated_pos_embedding" in fixture:
        # The file's 4x4 grid resized to 6x6 as torchvision's interpolate_embeddings does it.
        assert fixture["state_dict"]["encoder.pos_embedding"].shape == (1, 17, 16)
        np.testing.assert_allclose(weights["encoder"]["pos_embedding"], fixture["interpolated_pos_embedding"],
                                   rtol=0, atol=1e-6)


def test_vit_names_land_where_torchvision_has_them() -> None:
    fixture = load_vit_fixture(VIT_FIXTURES[0])
    state_dict = fixture["state_dict"]
    _, weights_t, stats_t = vit_templates(fixture)
    weights, _ = pretrained.from_torchvision(state_dict, weights_t, stats_t)
    block = weights["encoder"]["layers"]["encoder_layer_1"]
    torch_block = "encoder.layers.encoder_layer_1."
    np.testing.assert_array_equal(block["self_attention"]["in_proj"]["kernel"],
                                  state_dict[torch_block + "self_attention.in_proj_weight"].T)
    np.testing.assert_array_equal(block["self_attention"]["in_proj"]["bias"],
                                  state_dict[torch_block + "self_attention.in_proj_bias"])
    np.testing.assert_array_equal(block["mlp"][3]["kernel"], state_dict[torch_block + "mlp.3.weight"].T)
    np.testing.assert_array_equal(block["ln_2"]["scale"], state_dict[torch_block + "ln_2.weight"])
    np.testing.assert_array_equal(weights["conv_proj"]["kernel"],
                                  state_dict["conv_proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights["class_token"], state_dict["class_token"])
    np.testing.assert_array_equal(weights["encoder"]["pos_embedding"], state_dict["encoder.pos_embedding"])
    np.testing.assert_array_equal(weights["heads"]["head"]["kernel"], state_dict["heads.head.weight"].T)

    # Older torchvision files name the MLP's Linears linear_1 / linear_2.
    renamed = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
               for k, v in state_dict.items()}
    old, _ = pretrained.from_torchvision(renamed, weights_t, stats_t)
    jax.tree.map(np.testing.assert_array_equal, old, weights)
    both = {**state_dict, torch_block + "mlp.linear_1.bias": state_dict[torch_block + "mlp.0.bias"]}
    assert (f"{torch_block}mlp.linear_1.bias maps to the same tensor as {torch_block}mlp.0.bias"
            in _error(both, weights_t, stats_t))


def test_vit_missing_and_misshapen_tensors_are_named_by_torchvision_names() -> None:
    fixture = load_vit_fixture(VIT_FIXTURES[0])
    state_dict = fixture["state_dict"]
    _, weights_t, stats_t = vit_templates(fixture)
    for name in ("encoder.layers.encoder_layer_0.self_attention.in_proj_weight", "class_token",
                 "encoder.pos_embedding", "encoder.ln.weight"):
        trimmed = {k: v for k, v in state_dict.items() if k != name}
        assert f"(1 missing: missing {name})" in _error(trimmed, weights_t, stats_t)
    in_proj = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert f"{in_proj} has shape (16, 48), the model needs (48, 16)" in _error(
        {**state_dict, in_proj: state_dict[in_proj].T}, weights_t, stats_t)
    # A position embedding of another width, or not a square grid, is misshapen rather than interpolated.
    for bad in (np.zeros((1, 17, 8), np.float32), np.zeros((1, 11, 16), np.float32)):
        message = _error({**state_dict, "encoder.pos_embedding": bad}, weights_t, stats_t)
        assert f"encoder.pos_embedding has shape {bad.shape}, the model needs (1, 17, 16)" in message
        assert message.endswith(f"{pretrained.FIX_HINT}") and "config.model.vit" in message


@pytest.mark.parametrize("model", ["vgg16_bn", "vgg16"])
def test_vgg_flatten_order_is_torchs(model: str) -> None:
    """classifier.0 reads torch's (C, H, W) flatten: the same weight read in (H, W, C) order misses the logits."""
    fixture = load_fixture(fixture_by_model(model))
    graphdef, weights_t, stats_t = templates(fixture)
    weights, batch_stats = pretrained.from_torchvision(fixture["state_dict"], weights_t, stats_t)
    kernel = weights["classifier"][0]["kernel"]  # (C*7*7, hidden), rows in (C, H, W) order
    channels = kernel.shape[0] // 49
    hwc_rows = kernel.reshape(channels, 7, 7, -1).transpose(1, 2, 0, 3).reshape(kernel.shape)
    weights["classifier"][0]["kernel"] = hwc_rows
    assert np.abs(forward(graphdef, weights, batch_stats, fixture["input"]) - fixture["logits"]).max() > 100 * TOLERANCE


def _rule_path(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_tensor_lands_once_where_its_name_says(path: pathlib.Path) -> None:
    fixture = load_fixture(path)
    _, weights_t, stats_t = templates(fixture)
    weights, batch_stats = pretrained.from_torchvision(fixture["state_dict"], weights_t, stats_t)
    flat_w = traverse_util.flatten_dict(weights)
    flat_s = traverse_util.flatten_dict(batch_stats) if batch_stats else {}
    used: list[tuple[str, tuple[Any, ...]]] = []
    for name, tensor in fixture["state_dict"].items():
        *prefix, leaf = _rule_path(name)
        prefix = tuple(prefix)
        if leaf == "num_batches_tracked":
            assert (*prefix, "mean") in flat_s  # only BatchNorms have it
            continue
        if leaf in ("running_mean", "running_var"):
            target = ("s", (*prefix, leaf[len("running_"):]))
            got = flat_s[target[1]]
            expected = tensor
        elif leaf == "weight" and (*prefix, "scale") in flat_w:
            target = ("w", (*prefix, "scale"))
            got, expected = flat_w[target[1]], tensor
        elif leaf == "weight":
            target = ("w", (*prefix, "kernel"))
            got = flat_w[target[1]]
            expected = tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T
        else:
            target = ("w", (*prefix, "bias"))
            got, expected = flat_w[target[1]], tensor
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        used.append(target)
    # Each name filled its own leaf, and together they filled all of them.
    assert len(used) == len(set(used)) == len(flat_w) + len(flat_s)
    assert set(used) == {("w", p) for p in flat_w} | {("s", p) for p in flat_s}
    np.testing.assert_array_equal(jax.tree.map(np.shape, weights), jax.tree.map(np.shape, weights_t))


@pytest.fixture(scope="module")
def resnet18_cifar() -> tuple[dict, dict, dict]:
    fixture = load_fixture(next(p for p in FIXTURES if p.name.startswith("resnet18_w0.0625_cifar")))
    _, weights_t, stats_t = templates(fixture)
    return fixture["state_dict"], weights_t, stats_t


def _error(state_dict: dict, weights_t: dict, stats_t: dict) -> str:
    with pytest.raises(ValueError) as info:
        pretrained.from_torchvision(state_dict, weights_t, stats_t)
    message = str(info.value)
    assert "\n" not in message and "check the model name, width, stem and num_classes" in message
    return message


def test_missing_tensor_is_named(resnet18_cifar) -> None:
    state_dict, weights_t, stats_t = resnet18_cifar
    for name in ("layer3.1.bn2.running_var", "layer2.0.downsample.0.weight", "fc.bias"):
        trimmed = {k: v for k, v in state_dict.items() if k != name}
        assert f"(1 missing: missing {name})" in _error(trimmed, weights_t, stats_t)


def test_extra_tensor_is_named(resnet18_cifar) -> None:
    state_dict, weights_t, stats_t = resnet18_cifar
    extras = {
        "layer3.1.conv3.weight": np.zeros((16, 16, 1, 1), np.float32),
        "fc.num_batches_tracked": np.array(3),  # only a BatchNorm's counter is dropped
        "layer1.0.bn1.momentum": np.array(0.1),
        "fc2.weight": np.zeros((10, 32), np.float32),
    }
    for name, value in extras.items():
        assert f"(1 unexpected: unexpected {name})" in _error({**state_dict, name: value}, weights_t, stats_t)


def test_misshapen_tensor_is_named_in_torch_layout(resnet18_cifar) -> None:
    state_dict, weights_t, stats_t = resnet18_cifar
    cases = {
        "fc.weight": (state_dict["fc.weight"].T, "fc.weight has shape (32, 10), the model needs (10, 32)"),
        "conv1.weight": (
            state_dict["conv1.weight"].transpose(2, 3, 1, 0),  # HWIO instead of OIHW
            "conv1.weight has shape (3, 3, 3, 4), the model needs (4, 3, 3, 3)",
        ),
        "layer1.0.bn1.running_mean": (np.zeros(5, np.float32), "layer1.0.bn1.running_mean has shape (5,)"),
    }
    for name, (value, expected) in cases.items():
        assert expected in _error({**state_dict, name: value}, weights_t, stats_t)


def test_same_tensor_twice_is_refused(resnet18_cifar) -> None:
    state_dict, weights_t, stats_t = resnet18_cifar
    doubled = {**state_dict, "layer1.01.conv1.weight": state_dict["layer1.1.conv1.weight"]}
    assert "layer1.01.conv1.weight maps to the same tensor as layer1.1.conv1.weight" in _error(
        doubled, weights_t, stats_t
    )


def test_num_batches_tracked_is_optional(resnet18_cifar) -> None:
    """Older torchvision files (e.g. vgg16_bn-6c64b313.pth) predate the counter."""
    state_dict, weights_t, stats_t = resnet18_cifar
    without = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(without) < len(state_dict)
    weights, _ = pretrained.from_torchvision(without, weights_t, stats_t)
    np.testing.assert_array_equal(weights["fc"]["bias"], state_dict["fc.bias"])


def test_wrong_model_settings_list_six_and_count_the_rest(resnet18_cifar) -> None:
    state_dict, _, _ = resnet18_cifar
    wider = nnx.eval_shape(lambda: create_model("resnet18", num_classes=10, width=0.125, stem="cifar",
                                                rngs=nnx.Rngs(0)))
    _, weights_t, stats_t = functional.split_model(wider)
    message = _error(state_dict, weights_t, stats_t)
    # Every conv (20) and BatchNorm tensor (4 x 20) has another width, and fc.weight; fc.bias keeps its 10 classes.
    assert "(101 misshapen:" in message and "and 95 more" in message
    assert "conv1.weight has shape (4, 3, 3, 3), the model needs (8, 3, 3, 3)" in message
    vgg = nnx.eval_shape(lambda: create_model("vgg16", num_classes=10, rngs=nnx.Rngs(0)))
    message = _error(state_dict, *functional.split_model(vgg)[1:])
    # Both kinds show among the first six, whichever comes first in the files.
    assert "(32 missing, 122 unexpected: missing classifier.0.bias, unexpected conv1.weight, " in message


def test_read_npz_and_safetensors(tmp_path: pathlib.Path, resnet18_cifar) -> None:
    from safetensors.numpy import save_file

    state_dict, _, _ = resnet18_cifar
    np.savez(tmp_path / "w.npz", **state_dict)
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        read = pretrained.read_state_dict(tmp_path / name)
        assert set(read) == set(state_dict)
        for key, value in state_dict.items():
            assert read[key].dtype == value.dtype
            np.testing.assert_array_equal(read[key], value)


def test_read_refuses_unknown_suffix_and_missing_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"unknown weights file type '\.bin'; give one of \('\.pth', '\.pt'"):
        pretrained.read_state_dict(tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.read_state_dict(tmp_path / "absent.pth")


def test_npz_with_pickled_objects_is_refused(tmp_path: pathlib.Path) -> None:
    np.savez(tmp_path / "w.npz", ok=np.ones(2), obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        pretrained.read_state_dict(tmp_path / "w.npz")


def test_pth_without_torch_says_what_to_do(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import torch` fail, whether or not torch is installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    (tmp_path / "w.pth").write_bytes(b"PK\3\4 not really a checkpoint")
    with pytest.raises(ImportError) as info:
        pretrained.read_state_dict(tmp_path / "w.pth")
    message = str(info.value)
    assert "\n" not in message and "needs torch" in message and ".safetensors or .npz" in message


def test_pth_round_trip(tmp_path: pathlib.Path, resnet18_cifar) -> None:
    torch = pytest.importorskip("torch")
    state_dict, weights_t, stats_t = resnet18_cifar
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, tmp_path / "w.pth")
    read = pretrained.read_state_dict(tmp_path / "w.pth")
    assert list(read) == list(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(read[key], value)
    weights, _ = pretrained.from_torchvision(read, weights_t, stats_t)
    np.testing.assert_array_equal(weights["fc"]["kernel"], state_dict["fc.weight"].T)

    torch.save({"w": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "bf16.pt")
    read = pretrained.read_state_dict(tmp_path / "bf16.pt")
    assert read["w"].dtype == np.float32 and read["w"].tolist() == [1.0, 1.0, 1.0]

    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="not a flat state dict: model, epoch are not tensors"):
        pretrained.read_state_dict(tmp_path / "nested.pth")


def read_error(path: pathlib.Path) -> str:
    """The message of the ValueError that reading ``path`` raises; asserted to be one line."""
    with pytest.raises(ValueError) as info:
        pretrained.read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("kind", BAD_TENSORS)
def test_tensor_that_is_not_float_or_not_finite_is_named(tmp_path: pathlib.Path, suffix: str, kind: str) -> None:
    bad, expected = BAD_TENSORS[kind]
    # The int64 BatchNorm counter of torchvision files passes: it is dropped, never a weight.
    state_dict = {"bn1.num_batches_tracked": np.array(7, np.int64), "fc.weight": bad,
                  "fc.bias": np.zeros(2, np.float32)}
    path = write_weights(tmp_path / f"w{suffix}", state_dict)
    assert read_error(path) == f"{path} {expected}"


def test_every_bad_tensor_is_listed(tmp_path: pathlib.Path) -> None:
    state_dict = {"a": np.ones(2, np.float32), "b": np.ones(2, np.int8), "c": np.ones(2, np.uint8),
                  "d": np.ones(2, np.complex64), "e.num_batches_tracked": np.ones(2, bool)}
    path = write_weights(tmp_path / "w.npz", state_dict)
    assert read_error(path) == f"{path} " + NOT_FLOAT.format("b: int8, c: uint8, d: complex64")
    state_dict = {"a": np.full(2, np.nan, np.float16), "b": np.ones(2, np.float32), "c": np.full(1, np.inf)}
    path = write_weights(tmp_path / "w2.npz", state_dict)  # .npz keeps the order (safetensors sorts its tensors)
    assert read_error(path) == f"{path} " + NOT_FINITE.format("a, c")


def test_half_bfloat16_and_double_tensors_are_read_and_mapped_to_float32(tmp_path: pathlib.Path,
                                                                         resnet18_cifar) -> None:
    import ml_dtypes

    state_dict, weights_t, stats_t = resnet18_cifar
    narrow = {**state_dict, "fc.weight": state_dict["fc.weight"].astype(ml_dtypes.bfloat16),
              "conv1.weight": state_dict["conv1.weight"].astype(np.float16),
              "fc.bias": state_dict["fc.bias"].astype(np.float64)}
    read = pretrained.read_state_dict(write_weights(tmp_path / "w.safetensors", narrow))
    assert [str(read[name].dtype) for name in ("fc.weight", "conv1.weight", "fc.bias", "bn1.num_batches_tracked")] \
        == ["bfloat16", "float16", "float64", "int64"]
    weights, _ = pretrained.from_torchvision(read, weights_t, stats_t)
    assert {weights["fc"]["kernel"].dtype, weights["conv1"]["kernel"].dtype, weights["fc"]["bias"].dtype} == {
        np.dtype(np.float32)}
    np.testing.assert_array_equal(weights["fc"]["kernel"], narrow["fc.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(weights["conv1"]["kernel"],
                                  narrow["conv1.weight"].astype(np.float32).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights["fc"]["bias"], state_dict["fc.bias"])


@pytest.mark.parametrize("suffix, what, reason", [
    (".npz", "a NumPy .npz archive of plain arrays", "no complete zip archive in it"),
    (".safetensors", "a safetensors file", "Error while deserializing header: header too large"),
    (".pth", "a torch .pth/.pt file", "it starts with b'fc.weigh': not a zip archive or a pickle"),
])
def test_text_file_named_as_weights_names_the_file_and_the_fix(tmp_path: pathlib.Path, suffix: str, what: str,
                                                               reason: str) -> None:
    # No torch needed for .pth: its first bytes already show that torch.save did not write it.
    path = tmp_path / f"W{suffix}"
    path.write_text("fc.weight = [[1, 2, 3]]\n")
    assert read_error(path) == f"{path} " + UNREADABLE.format(what, reason)


def test_truncated_files_name_the_file_and_the_fix(tmp_path: pathlib.Path, resnet18_cifar) -> None:
    state_dict, _, _ = resnet18_cifar
    header = "Error while deserializing header: "
    for suffix, what, reasons in (
        (".safetensors", "a safetensors file", [f"{header}header too small"] * 2 + [f"{header}invalid header length"]
         + [f"{header}incomplete metadata, file not fully covered"] * 2),
        (".npz", "a NumPy .npz archive of plain arrays", ["no complete zip archive in it"] * 5),
    ):
        data = write_weights(tmp_path / f"whole{suffix}", state_dict).read_bytes()
        for size, reason in zip((0, 5, 100, len(data) // 2, len(data) - 1), reasons):
            path = tmp_path / f"cut{size}{suffix}"
            path.write_bytes(data[:size])
            assert read_error(path) == f"{path} " + UNREADABLE.format(what, reason)


def test_pth_of_integer_nan_or_cut_tensors_is_refused(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    counter = {"bn1.num_batches_tracked": torch.tensor(7)}
    torch.save({**counter, "fc.weight": torch.ones(2, 3, dtype=torch.int32)}, tmp_path / "int.pth")
    assert read_error(tmp_path / "int.pth") == f"{tmp_path / 'int.pth'} " + NOT_FLOAT.format("fc.weight: int32")
    torch.save({**counter, "fc.bias": torch.tensor([0.0, float("nan")])}, tmp_path / "nan.pt")
    assert read_error(tmp_path / "nan.pt") == f"{tmp_path / 'nan.pt'} " + NOT_FINITE.format("fc.bias")
    torch.save({"fc.bias": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pth")
    assert pretrained.read_state_dict(tmp_path / "bf16.pth")["fc.bias"].tolist() == [1.0, 1.0]
    data = (tmp_path / "bf16.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert read_error(tmp_path / "cut.pth").startswith(
        f"{tmp_path / 'cut.pth'} cannot be read: it is not a torch .pth/.pt file")
    if hasattr(torch, "float8_e4m3fn"):  # a float numpy has no type for: named like an integer tensor
        torch.save({"fc.bias": torch.ones(2).to(torch.float8_e4m3fn)}, tmp_path / "f8.pth")
        assert read_error(tmp_path / "f8.pth") == f"{tmp_path / 'f8.pth'} " + NOT_FLOAT.format("fc.bias: float8_e4m3fn")


class _Payload:
    """Unpickling this would create a directory: the test checks that it never happens."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pth_with_code_is_refused_without_running_it(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "payload": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"holds more than tensors and is refused .*GLOBAL os\.makedirs"):
        pretrained.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_importing_the_package_needs_no_torch() -> None:
    code = (
        "import sys; import vpns_jax.io.pretrained, vpns_jax.convert, vpns_jax.source_model; "
        "print(sorted(m for m in ('torch', 'safetensors') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
