"""The one-file subnetwork export: exact round trip of W * m, logits as evaluation computes them, sizes, bad files."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.helpers import SPEC, WIDTH, random_model
from vpns_jax.core import label_mapping, masking, nm, prompts, steps
from vpns_jax.io import disk, export, export_size, subnetwork, subnetwork_format
from vpns_jax.models import functional

LABEL_MAP = np.array([7, 2, 9, 0], np.int32)
CLASS_NAMES = ["cat", "ship", "truck", "plane"]


_model = functools.lru_cache(maxsize=None)(random_model)


_masks_from_scores = jax.jit(masking.masks_from_scores)


def _masks(stem, density):
    scores = _model(stem)[3]
    return _masks_from_scores(scores, jnp.asarray(masking.prune_counts(scores, density)))


def _export(path, stem="cifar", density=0.1, eval_with_prompt=False, class_names=None, **kwargs):
    _, weights, batch_stats, _, prompt = _model(stem)
    return export.export_subnetwork(
        path, model_name="resnet18", num_classes=10, width=WIDTH, stem=stem, weights=weights,
        batch_stats=batch_stats, masks=_masks(stem, density), prompt_spec=SPEC, prompt=prompt, label_map=LABEL_MAP,
        eval_with_prompt=eval_with_prompt, class_names=class_names, **kwargs,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _evaluate(graphdef, spec, with_prompt, weights, masks, batch_stats, prompt, images, rng):
    """The evaluation's computation, in memory: masked weights, prompt or normalise, eval-mode model, label map.
    Jitted as the export's logits are: eager op-by-op results differ from a compiled program's in the last bits."""
    masked = masking.apply_masks(weights, masks)
    if with_prompt:
        x = prompts.apply_prompt(spec, prompt, images, key=steps.eval_prompt_key(rng))
    else:
        x = prompts.normalize(images)
    logits, _ = functional.apply_model(graphdef, masked, batch_stats, x, train=False)
    return label_mapping.map_logits(logits, LABEL_MAP)


def _reference_logits(stem, density, images, with_prompt, rng=jax.random.PRNGKey(0)):
    graphdef, weights, batch_stats, _, prompt = _model(stem)
    masks = _masks(stem, density)
    return np.asarray(_evaluate(graphdef, SPEC, with_prompt, weights, masks, batch_stats, prompt, images, rng))


IMAGES = np.random.default_rng(1).uniform(0, 1, (6, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("stem, density, with_prompt", [
    ("cifar", 0.5, False), ("cifar", 0.5, True), ("cifar", 0.1, False), ("imagenet", 0.1, True),
])
def test_logits_match_the_in_memory_evaluation(tmp_path, stem, density, with_prompt):
    _export(tmp_path / "sub.npz", stem=stem, density=density, eval_with_prompt=with_prompt)
    sub = subnetwork.load_subnetwork(tmp_path / "sub.npz")
    got = np.asarray(sub.logits(IMAGES))
    want = _reference_logits(stem, density, IMAGES, with_prompt)
    assert got.shape == (6, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The prompt really is (or is not) applied: the other path gives clearly different logits.
    other = _reference_logits(stem, density, IMAGES, not with_prompt)
    assert np.max(np.abs(other - want)) > 1e-2
    np.testing.assert_array_equal(sub.predict(IMAGES), np.argmax(want, axis=-1))
    probabilities = sub.probabilities(IMAGES)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


def test_random_prompt_uses_the_runs_key(tmp_path):
    """The 'random' prompt draws its square from fold_in(run rng, eval seed), as evaluation does."""
    spec = prompts.PromptSpec("random", input_size=32, output_size=32, mask_size=8)
    _, weights, batch_stats, _, prompt = _model("cifar")
    rng = jax.random.PRNGKey(42)
    export.export_subnetwork(
        tmp_path / "sub.npz", model_name="resnet18", num_classes=10, width=WIDTH, stem="cifar", weights=weights,
        batch_stats=batch_stats, masks=_masks("cifar", 0.5), prompt_spec=spec, prompt=prompt, label_map=LABEL_MAP,
        eval_with_prompt=True, rng=rng,
    )
    sub = subnetwork.load_subnetwork(tmp_path / "sub.npz")
    graphdef = _model("cifar")[0]
    want = _evaluate(graphdef, spec, True, weights, _masks("cifar", 0.5), batch_stats, prompt, IMAGES, rng)
    np.testing.assert_allclose(np.asarray(sub.logits(IMAGES)), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sub.rng, np.asarray(rng))


def test_round_trip_is_exact(tmp_path):
    _export(tmp_path / "sub.npz", density=0.1, eval_with_prompt=True, class_names=CLASS_NAMES)
    sub = subnetwork.load_subnetwork(tmp_path / "sub.npz")
    _, weights, batch_stats, _, prompt = _model("cifar")
    masks = traverse_util.flatten_dict(_masks("cifar", 0.1))
    flat_weights = traverse_util.flatten_dict(weights)
    got_weights = traverse_util.flatten_dict(sub.weights)
    got_masks = traverse_util.flatten_dict(sub.masks)
    assert set(got_weights) == set(flat_weights) and set(got_masks) == set(masks)
    assert len(masks) == 21  # 20 convs (3 of them 1x1 downsamples) and the fc
    kept = 0
    for path, weight in flat_weights.items():
        if path in masks:
            np.testing.assert_array_equal(np.asarray(got_weights[path]), np.asarray(weight * masks[path]))
            np.testing.assert_array_equal(np.asarray(got_masks[path]), np.asarray(masks[path]))
            assert np.all(np.asarray(got_weights[path])[np.asarray(masks[path]) == 0] == 0)
            kept += int(np.asarray(masks[path]).sum())
        else:
            np.testing.assert_array_equal(np.asarray(got_weights[path]), np.asarray(weight))
    total = sum(math.prod(m.shape) for m in masks.values())
    assert kept == total - int(0.9 * total)
    for path, stat in traverse_util.flatten_dict(batch_stats).items():
        np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(sub.batch_stats)[path]), np.asarray(stat))
    np.testing.assert_array_equal(np.asarray(sub.prompt["program"]), np.asarray(prompt["program"]))
    np.testing.assert_array_equal(sub.label_map, LABEL_MAP)
    assert sub.class_names == tuple(CLASS_NAMES)
    assert sub.prompt_spec == SPEC and sub.eval_with_prompt is True
    assert (sub.model_name, sub.num_classes, sub.width, sub.stem) == ("resnet18", 10, WIDTH, "cifar")
    assert sub.meta["kept_fraction"] == pytest.approx(kept / total)
    assert sub.meta["prunable_paths"][2] == ["layer1", 0, "conv1", "kernel"]


def test_size_by_hand():
    """A 10x10 kernel at density 0.1: 13 bytes of bitmask (100 bits) + 10 float32 values; the rest dense."""
    keep = np.zeros(100, np.float32)
    keep[[0, 7, 8, 15, 33, 50, 64, 71, 98, 99]] = 1
    weights = {"conv": {"kernel": np.ones((10, 10), np.float32)},
               "bn": {"scale": np.ones(10, np.float32), "bias": np.zeros(10, np.float32)}}
    size = subnetwork_format.compute_size(weights, {"bn": {"mean": np.zeros(10), "var": np.ones(10)}},
                               {"conv": {"kernel": keep.reshape(10, 10)}}, {"program": np.zeros((2, 2, 3))})
    rest = 4 * (10 + 10 + 10 + 10 + 12)
    assert (size.prunable_entries, size.kept_entries) == (100, 10)
    assert (size.bitmask_bytes, size.values_bytes, size.rest_bytes) == (13, 40, rest)
    assert size.dense_bytes == 400 + rest == 608
    assert size.compressed_bytes == 13 + 40 + rest == 261
    assert "(608 B) -> compressed 0.000 MiB (261 B) (2.33x smaller" in size.format()


def test_export_size_matches_the_files_arrays(tmp_path):
    sizes = {d: _export(tmp_path / f"sub_{d}.npz", density=d) for d in (0.5, 0.1)}
    for density, size in sizes.items():
        path = tmp_path / f"sub_{density}.npz"
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
        bits = sum(a.nbytes for n, a in arrays.items() if n.endswith("/bits"))
        values = sum(a.nbytes for n, a in arrays.items() if n.endswith("/values"))
        entries = sum(int(np.prod(a)) for n, a in arrays.items() if n.endswith("/shape"))
        rest = sum(a.nbytes for n, a in arrays.items() if n.split("/")[0] in subnetwork_format.DENSE_GROUPS)
        assert all(a.dtype == np.float32 for n, a in arrays.items() if n.endswith("/values"))
        assert (size.bitmask_bytes, size.values_bytes, size.rest_bytes) == (bits, values, rest)
        assert size.prunable_entries == entries and size.values_bytes == 4 * (entries - int((1 - density) * entries))
        assert size.dense_bytes == 4 * entries + rest
        assert size.file_bytes == os.path.getsize(path)
        assert subnetwork.load_subnetwork(path).size == size
    assert sizes[0.1].compressed_bytes < sizes[0.5].compressed_bytes < sizes[0.5].dense_bytes
    assert sizes[0.1].compressed_bytes < 0.25 * sizes[0.1].dense_bytes
    assert sizes[0.1].file_bytes < sizes[0.1].dense_bytes


def _rewrite(path, edit):
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    edit(arrays)
    np.savez(path, **arrays)


def _meta_edit(**changes):
    def edit(arrays):
        meta = json.loads(arrays["meta"].tobytes())
        meta.update(changes)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return edit


def _one_line_value_error(path, *fragments):
    with pytest.raises(ValueError) as caught:
        subnetwork.load_subnetwork(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_truncated_file_is_a_one_line_error(tmp_path):
    _export(tmp_path / "sub.npz")
    data = (tmp_path / "sub.npz").read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        _one_line_value_error(tmp_path / "cut.npz", "not a readable vpns_jax subnetwork export")
    (tmp_path / "text.npz").write_text("hello\n")
    _one_line_value_error(tmp_path / "text.npz", "not a readable")


@pytest.mark.parametrize("edit, fragment", [
    (_meta_edit(format_version=2), "format version 2, this code reads version 1"),
    (_meta_edit(format="something.else"), "does not say format"),
    (lambda a: a.update(meta=np.frombuffer(b"{not json", np.uint8)), "not JSON"),
    (lambda a: a.pop("meta"), "no 'meta' entry"),
    (_meta_edit(model={"name": "resnet18", "num_classes": 10, "width": 0.125, "stem": "cifar"}), "shape"),
    (lambda a: a.update({"kernels/fc/kernel/values": np.append(a["kernels/fc/kernel/values"], np.float32(1))}),
     "'kernels/fc/kernel/values' is float32"),
    (lambda a: a.pop("batch_stats/bn1/var"), "'batch_stats/bn1/var' is missing"),
    (_meta_edit(label_map=[3, 11]), "does not fit a 10-class head"),
])
def test_foreign_or_corrupt_content_is_a_one_line_error(tmp_path, edit, fragment):
    _export(tmp_path / "sub.npz")
    _rewrite(tmp_path / "sub.npz", edit)
    _one_line_value_error(tmp_path / "sub.npz", fragment)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        subnetwork.load_subnetwork(tmp_path / "absent.npz")


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = tmp_path / "sub.npz"
    _export(path, density=0.5)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _export(path, density=0.1)
    assert path.read_bytes() == before
    _export(path, density=0.1, overwrite=True)
    assert path.read_bytes() != before
    assert subnetwork.load_subnetwork(path).meta["kept_fraction"] == pytest.approx(0.1, abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.npz"]  # no temporary files left


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(disk.DiskError, match="disk full") as raised:
        _export(tmp_path / "sub.npz")
    # One line naming the file (not its temporary twin) and the fix (tests/test_disk_errors.py has the rest).
    assert str(raised.value).startswith(f"cannot write {tmp_path / 'sub.npz'}: disk full; ")
    assert "\n" not in str(raised.value) and "rerun the same command" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_export_checks_its_inputs(tmp_path):
    _, weights, batch_stats, _, prompt = _model("cifar")
    masks = _masks("cifar", 0.5)
    common = dict(model_name="resnet18", num_classes=10, width=WIDTH, stem="cifar", weights=weights,
                  batch_stats=batch_stats, prompt_spec=SPEC, prompt=prompt, label_map=LABEL_MAP)
    partial = traverse_util.unflatten_dict({p: m for p, m in traverse_util.flatten_dict(masks).items() if p[0] != "fc"})
    with pytest.raises(ValueError, match="masks must cover exactly"):
        export.export_subnetwork(tmp_path / "a.npz", **{**common, "masks": partial})
    soft = jax.tree.map(lambda m: m * 0.5, masks)
    with pytest.raises(ValueError, match="not binary"):
        export.export_subnetwork(tmp_path / "b.npz", **{**common, "masks": soft})
    with pytest.raises(ValueError, match="do not fit the model"):
        export.export_subnetwork(tmp_path / "c.npz", **{**common, "masks": masks, "width": 0.125})
    with pytest.raises(ValueError, match="2 class names for 4 target classes"):
        export.export_subnetwork(tmp_path / "d.npz", **{**common, "masks": masks, "class_names": ["a", "b"]})
    assert list(tmp_path.iterdir()) == []


def test_size_report_command(capsys):
    assert export_size.main(["--size_report", "--model=resnet18", "--width=0.0625", "--num_classes=10",
                        "--densities", "0.5", "0.1", "--prompt_size=32", "--pad_size=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet18 width 0.0625, 10 classes") and len(lines) == 3
    _, weights, batch_stats, _, _ = _model("imagenet")
    entries = sum(math.prod(leaf.shape) for path, leaf in traverse_util.flatten_dict(weights).items()
                  if path[-1] == "kernel")
    dense = 4 * sum(x.size for x in jax.tree.leaves((weights, batch_stats))) + 4 * 32 * 32 * 3
    for line, density in zip(lines[1:], (0.5, 0.1)):
        kept = entries - int((1 - density) * entries)
        assert line.startswith(f"density {density:g}: dense ") and f"({dense:,} B) -> compressed" in line
        assert f"kept {kept:,} of {entries:,} kernel entries" in line and "; file " in line


# ---------------------------------------------------------------- N:M masks


_nm_masks = jax.jit(nm.nm_masks, static_argnums=(1, 2))


def _export_nm(path, n=2, m=4, stem="cifar", eval_with_prompt=False):
    _, weights, batch_stats, scores, prompt = _model(stem)
    masks = _nm_masks(scores, n, m)
    size = export.export_subnetwork(
        path, model_name="resnet18", num_classes=10, width=WIDTH, stem=stem, weights=weights,
        batch_stats=batch_stats, masks=masks, prompt_spec=SPEC, prompt=prompt, label_map=LABEL_MAP,
        eval_with_prompt=eval_with_prompt, nm_pattern=(n, m),
    )
    return masks, size


@pytest.mark.parametrize("n, m, stem, with_prompt", [(2, 4, "cifar", False), (1, 4, "imagenet", True),
                                                     (4, 8, "cifar", True)])
def test_n_m_export_rebuilds_the_exact_masks_and_the_same_logits(tmp_path, n, m, stem, with_prompt):
    masks, size = _export_nm(tmp_path / "sub.npz", n, m, stem, with_prompt)
    sub = subnetwork.load_subnetwork(tmp_path / "sub.npz")
    assert sub.nm_pattern == (n, m) and sub.meta["mask_pattern"] == f"{n}:{m}"
    _, weights, batch_stats, _, prompt = _model(stem)
    flat_masks = traverse_util.flatten_dict(masks)
    for path, mask in flat_masks.items():
        np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(sub.masks)[path]), np.asarray(mask))
        np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(sub.weights)[path]),
                                      np.asarray(traverse_util.flatten_dict(weights)[path] * mask))
    kept = sum(nm.kept_count(mask.shape, n, m) for mask in flat_masks.values())
    assert size.kept_entries == kept and sub.size == size
    # The masked model's logits, bit for bit: the same program on the same (already masked) weights.
    want = _evaluate(_model(stem)[0], SPEC, with_prompt, weights, masks, batch_stats, prompt, IMAGES,
                     jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(sub.logits(IMAGES)), np.asarray(want))


def test_n_m_file_stores_packed_indices_and_their_size_by_hand(tmp_path):
    masks, size = _export_nm(tmp_path / "sub.npz")
    with np.load(tmp_path / "sub.npz") as data:
        arrays = {name: data[name] for name in data.files}
    assert not any(name.endswith("/bits") for name in arrays)
    # conv1 (3, 3, 3, 4) at 2:4: 36 runs of one cut group, 2 slots of 2 bits each = 144 bits = 18 bytes;
    # fc (32, 10): 10 columns of 8 groups, 2 slots of 2 bits = 320 bits = 40 bytes.
    assert arrays["kernels/conv1/kernel/nm_indices"].shape == (18,)
    assert arrays["kernels/fc/kernel/nm_indices"].shape == (40,)
    assert size.bitmask_bytes == 0
    assert size.index_bytes == sum(a.nbytes for n, a in arrays.items() if n.endswith("/nm_indices"))
    assert size.compressed_bytes == size.index_bytes + size.values_bytes + size.rest_bytes
    assert "N:M indices" in size.format() and "bitmask" not in size.format()
    # (5, 1) at 2:4: group [1, 0, 1, 0] -> positions 0 and 2, the cut group [1] -> 0 and an unused 0:
    # 2-bit fields 00 10 00 00, most significant first = 0b00100000.
    indices = nm.group_indices(np.array([[1], [0], [1], [0], [1]]), 2, 4)
    np.testing.assert_array_equal(subnetwork_format.pack_indices(indices, 4), [0b00100000])
    small = subnetwork_format.compute_size({"k": np.ones((5, 1))}, {}, {"k": np.ones((5, 1))}, {}, nm_pattern=(2, 4))
    assert (small.bitmask_bytes, small.index_bytes) == (0, 1)


def test_a_file_without_the_pattern_field_loads_as_per_weight_bits(tmp_path):
    _export(tmp_path / "sub.npz")
    sub = subnetwork.load_subnetwork(tmp_path / "sub.npz")
    assert sub.nm_pattern is None and "mask_pattern" not in sub.meta and sub.size.index_bytes == 0


def test_n_m_export_refuses_masks_that_are_not_n_m(tmp_path):
    _, weights, batch_stats, _, prompt = _model("cifar")
    with pytest.raises(ValueError, match=r"mask of \('conv1', 'kernel'\) is not 2:4"):
        export.export_subnetwork(
            tmp_path / "sub.npz", model_name="resnet18", num_classes=10, width=WIDTH, stem="cifar", weights=weights,
            batch_stats=batch_stats, masks=_masks("cifar", 0.5), prompt_spec=SPEC, prompt=prompt,
            label_map=LABEL_MAP, nm_pattern=(2, 4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, fragment", [
    (_meta_edit(mask_pattern="2:5"), "bad metadata (N:M pattern '2:5' has M = 5"),
    (_meta_edit(mask_pattern="1:4"), "'kernels/conv1/kernel/nm_indices' is uint8 (18,), expected uint8 (9,)"),
    # Every fc group's first index set to 3 and the second to 1: no longer ascending.
    (lambda a: a.update({"kernels/fc/kernel/nm_indices": np.full_like(a["kernels/fc/kernel/nm_indices"], 0b11011101)}),
     "kernel kernels/fc/kernel: N:M indices are not ascending"),
    (lambda a: a.pop("kernels/fc/kernel/nm_indices"), "'kernels/fc/kernel/nm_indices' is missing"),
])
def test_corrupt_n_m_content_is_a_one_line_error(tmp_path, edit, fragment):
    _export_nm(tmp_path / "sub.npz")
    _rewrite(tmp_path / "sub.npz", edit)
    _one_line_value_error(tmp_path / "sub.npz", fragment)


def test_size_report_of_a_pattern(capsys):
    assert export_size.main(["--size_report", "--model=resnet18", "--width=0.0625", "--num_classes=10", "--pattern=2:4",
                        "--prompt_size=32", "--pad_size=4", "--no_write"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("2:4 density 0.5: dense ") and "N:M indices" in lines[1]
