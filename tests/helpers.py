"""Helpers shared by several test modules: tiny configs and runs, random networks, fake datasets, fixtures' files.

Test modules import shared helpers from here (or take conftest.py's fixtures), never from another test module:
tests/test_suite_layout.py checks it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import io
import math
import os
import pathlib
import platform
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx, traverse_util
from ml_collections import config_flags
from PIL import Image

from experiments import measurement
from vpns_jax.config import offline
from vpns_jax.core import masking, prompts
from vpns_jax.io import array_files
from vpns_jax.io import workdir as workdir_files
from vpns_jax.models import create_model, functional

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- Configs, as python -m vpns_jax.main builds them ---


def load_config(name: str, *overrides: str):
    """The config of configs/<name> (``file.py`` or ``file.py:ARG``) as config_flags builds it for
    `python -m vpns_jax.main --config=configs/<name> [overrides]`."""
    argv = ["vpns_jax.main", f"--config={ROOT / 'configs' / name}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config



def set_fields(config, updates):
    """``config`` unlocked, with each dotted path of ``updates`` set to its value."""
    config.unlock()
    for path, value in updates.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config



# --- Tiny end-to-end runs (train.run on a width-1/16 ResNet-18 at 16 px) ---

DENSITIES = (0.5, 0.2)


def write_source(tmp_path_factory, model) -> tuple[str, dict]:
    """(path, weights) of a source model file holding ``model``'s initial weights and statistics."""
    _, weights, batch_stats = functional.split_model(model)
    path = tmp_path_factory.mktemp("source") / "source.npz"
    array_files.save_arrays(path, {"weights": weights, "batch_stats": batch_stats})
    return str(path), weights



def tiny_config(data_dir, source_path, method, **overrides):
    """The default config shrunk to a few steps of ``method`` per stage; ``overrides``: field or section.field."""
    config = offline.resnet()
    config.method = method
    config.densities = DENSITIES
    config.model.update(width=1 / 16, stem="cifar", num_classes=10, init_from=source_path)
    config.source.enabled = False
    config.data.update(data_dir=data_dir, train_limit=64, test_limit=64, batch_size=32, eval_batch_size=64)
    config.prompt.update(input_size=16, output_size=16, pad_size=2)
    for section, field in (("stage1", "epochs"), ("stage2", "epochs"), ("hydra", "prune_epochs"),
                           ("hydra", "finetune_epochs"), ("bip", "epochs"), ("finetune", "epochs"),
                           ("finetune", "dense_epochs"), ("structured", "warmup_epochs"),
                           ("structured", "prune_epochs"), ("structured", "finetune_epochs"), ("slim", "epochs")):
        config[section][field] = 1
    config.oneshot.update(batches=1, synflow_iterations=2)
    config.checkpoint.update(every_steps=1000, max_to_keep=50)
    config.compilation_cache_dir = "none"
    for key, value in overrides.items():
        if "." in key:
            section, field = key.split(".")
            config[section][field] = value
        else:
            config[key] = value
    return config


def kept_count(masks) -> tuple[int, int]:
    """(kept, total) entries of a mask tree."""
    leaves = jax.tree.leaves(masks)
    return sum(int(np.count_nonzero(m)) for m in leaves), sum(m.size for m in leaves)


def unit_masks(workdir, density):
    """The masks a run in ``workdir`` saved for ``density``."""
    return array_files.load_arrays(workdir_files.unit_folder(pathlib.Path(workdir), density) / "masks.npz")



# --- Random networks (NumPy values on the abstract model: no initialiser is compiled) ---

def random_network(name: str, *, width: float = 1 / 16, num_classes: int = 10, seed: int = 0):
    """(graphdef, weights, batch_stats) of ``name`` with random NumPy values.

    Built from the abstract model so that no initialiser is compiled; BN
    statistics and affine terms are random too, so folding them is exercised.
    """
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, width=width, rngs=nnx.Rngs(0)))
    graphdef, weights, batch_stats = functional.split_model(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        last = path[-1].key
        if last == "kernel":
            values = rng.normal(0.0, math.sqrt(2.0 / math.prod(leaf.shape[:-1])), leaf.shape)
        elif last in ("scale", "var"):
            values = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # biases, BN bias and running mean
            values = rng.normal(0.0, 0.2, leaf.shape)
        return jnp.asarray(values, jnp.float32)

    fill_tree = lambda tree: jax.tree_util.tree_map_with_path(fill, tree)  # noqa: E731
    return graphdef, fill_tree(weights), fill_tree(batch_stats)


# random_model's network and prompt, as test_export exports them.
SPEC = prompts.PromptSpec("pad", input_size=32, output_size=32, pad_size=4)
WIDTH = 1 / 16


def random_model(stem, seed=0):
    """(graphdef, weights, batch_stats, scores, prompt) of a tiny ResNet-18, every leaf random.

    Values from numpy on the model's abstract shapes: initialising the model eagerly compiles one
    op per leaf shape, about 20 s on two cores.
    """
    model = nnx.eval_shape(lambda: create_model("resnet18", num_classes=10, width=WIDTH, stem=stem, rngs=nnx.Rngs(0)))
    graphdef, weights, batch_stats = functional.split_model(model)
    kinds = functional.leaf_kinds(model)
    rng = np.random.default_rng(seed)

    def weight(path, leaf):
        kind = traverse_util.flatten_dict(kinds)[path]
        if kind == functional.BN:
            return rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.2, leaf.shape)
        if kind == functional.BIAS:
            return rng.normal(0.0, 0.1, leaf.shape)
        return rng.normal(0.0, math.sqrt(2.0 / math.prod(leaf.shape[:-1])), leaf.shape)  # He init on fan-in

    def stat(path, leaf):
        return rng.normal(0.0, 0.1, leaf.shape) if path[-1] == "mean" else rng.uniform(0.5, 2.0, leaf.shape)

    def fill(tree, value):
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({p: jnp.asarray(value(p, leaf), jnp.float32) for p, leaf in flat.items()})

    weights, batch_stats = fill(weights, weight), fill(batch_stats, stat)
    scores = jax.jit(lambda w: masking.init_scores(w, kinds))(weights)  # jitted: one compile, not one per leaf
    prompt = {"program": jnp.asarray(rng.normal(0, 0.3, (32, 32, 3)), jnp.float32)}
    return graphdef, weights, batch_stats, scores, prompt


_model = functools.lru_cache(maxsize=None)(random_model)


_masks_from_scores = jax.jit(masking.masks_from_scores)


# --- Train-step state ---

def clone(tree):
    """A copy of every leaf (steps donate their inputs)."""
    return jax.tree.map(lambda x: x.copy(), tree)


def adam_counts(opt_state):
    """The Adam step count of each partition group."""
    counts = {}
    for label, inner in opt_state.inner_states.items():
        for leaf in jax.tree.leaves(inner, is_leaf=lambda x: hasattr(x, "count") and hasattr(x, "mu")):
            if hasattr(leaf, "mu"):
                counts[label] = int(leaf.count)
    return counts



# --- torchvision fixtures (tests/fixtures, made by make_torchvision_fixtures.py) ---

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures"
FIXTURES = sorted(path for path in FIXTURE_DIR.glob("*.npz") if not path.name.startswith("vit_"))
VIT_FIXTURES = sorted(FIXTURE_DIR.glob("vit_*.npz"))
STATE_PREFIX = "state_dict/"
TOLERANCE = 1e-4
VIT_TOLERANCE = 1e-5


def load_fixture(path: pathlib.Path) -> dict[str, Any]:
    """Settings, torchvision state dict, NCHW input and torch logits of one fixture file."""
    with np.load(path, allow_pickle=False) as data:
        fixture = {
            "model": str(data["model"]),
            "width": float(data["width"]),
            "stem": str(data["stem"]),
            "num_classes": int(data["num_classes"]),
            "state_dict": {k[len(STATE_PREFIX):]: data[k] for k in data.files if k.startswith(STATE_PREFIX)},
            "input": data["input"],
            "logits": data["logits"],
        }
    # The file name states the same settings, so that a renamed or regenerated file cannot drift.
    assert path.name == f"{fixture['model']}_w{fixture['width']:g}_{fixture['stem']}_c{fixture['num_classes']}.npz"
    return fixture


def templates(fixture: dict[str, Any]) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, weights, batch_stats) of the fixture's model, shapes only."""
    model = nnx.eval_shape(
        lambda: create_model(fixture["model"], num_classes=fixture["num_classes"], width=fixture["width"],
                             stem=fixture["stem"], rngs=nnx.Rngs(0))
    )
    return functional.split_model(model)


# Jitted as training runs it; one compile per model, reused for every weights tree of that model.
_apply = jax.jit(functools.partial(functional.apply_model, train=False), static_argnums=0)


def forward(graphdef: nnx.GraphDef, weights: dict, batch_stats: dict, x_nchw: np.ndarray) -> np.ndarray:
    """Eval-mode logits of the model on an NCHW input (transposed to NHWC)."""
    logits, _ = _apply(graphdef, weights, batch_stats, jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1))))
    return np.asarray(logits)


def load_vit_fixture(path: pathlib.Path) -> dict[str, Any]:
    """A ViT fixture: its settings (image sides, ``vit`` options), state dict, NCHW input and torch logits."""
    with np.load(path, allow_pickle=False) as data:
        fixture = {name: data[name] for name in data.files if not name.startswith((STATE_PREFIX, "vit/"))}
        fixture["state_dict"] = {k[len(STATE_PREFIX):]: data[k] for k in data.files if k.startswith(STATE_PREFIX)}
        fixture["vit"] = {k[len("vit/"):]: int(data[k]) for k in data.files if k.startswith("vit/")}
    for key in ("image_size", "file_image_size", "num_classes"):
        fixture[key] = int(fixture[key])
    vit, sides = fixture["vit"], (fixture["file_image_size"], fixture["image_size"])
    side = f"i{sides[0]}" if sides[0] == sides[1] else f"i{sides[0]}to{sides[1]}"
    assert path.name == (f"{fixture['model']}_p{vit['patch_size']}_l{vit['num_layers']}_h{vit['num_heads']}_"
                         f"d{vit['hidden_dim']}_m{vit['mlp_dim']}_{side}_c{fixture['num_classes']}.npz")
    return fixture


def vit_templates(fixture: dict[str, Any], image_size: int | None = None) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, weights, batch_stats) of the fixture's ViT at ``image_size`` (default: the fixture's), shapes only."""
    model = nnx.eval_shape(lambda: create_model(
        str(fixture["model"]), num_classes=fixture["num_classes"], image_size=image_size or fixture["image_size"],
        vit=fixture["vit"], rngs=nnx.Rngs(0)))
    return functional.split_model(model)



# What every weights file is checked for where it enters (pretrained.check_tensors), and how it says so.
NOT_FLOAT = ("holds tensors that are not floating point ({}): every weight must be float16, bfloat16, float32 or "
             "float64; give the float weights of the model, not a quantized or integer export")
NOT_FINITE = ("holds NaN/Inf values (in {}): every weight must be finite; the file is damaged or comes from a "
              "diverged training, use another")
UNREADABLE = ("cannot be read: it is not {} ({}); give a weights file written by python -m vpns_jax.convert, or a "
              "torchvision .pth/.safetensors state dict (download or convert it again if this one was cut short)")
BAD_TENSORS = {
    "int32": (np.arange(6, dtype=np.int32).reshape(2, 3), NOT_FLOAT.format("fc.weight: int32")),
    "bool": (np.ones((2, 3), bool), NOT_FLOAT.format("fc.weight: bool")),
    "nan": (np.array([[0.5, np.nan, 1.0], [1.0, 2.0, 3.0]], np.float32), NOT_FINITE.format("fc.weight")),
    "inf": (np.array([[0.5, 1.0, 1.0], [1.0, -np.inf, 3.0]], np.float32), NOT_FINITE.format("fc.weight")),
}


def write_weights(path: pathlib.Path, state_dict: dict[str, np.ndarray]) -> pathlib.Path:
    """``state_dict`` as the .npz or .safetensors file ``path``; returns ``path``."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(state_dict, str(path))
    else:
        np.savez(path, **state_dict)
    return path


# --- Fake datasets: Tiny-ImageNet's tree, Fashion-MNIST's IDX files ---

# Tiny-ImageNet fake: wnids in UNSORTED order; n02's second train image is grayscale. words.txt names n02 and
# n03 both "crane" first (as ImageNet's bird and machine), and lists wnids of no class, as the real one does.
TINY_WNIDS = ["n03", "n01", "n02"]
TINY_WORDS = ["n00\tentity", "n01\tgoldfish, Carassius auratus", "n02\tcrane", "n03\tcrane, derrick",
              "n04\tgoldfish bowl"]
TINY_NAMES = ["goldfish", "crane (n02)", "crane (n03)"]  # of the sorted wnids n01, n02, n03
TINY_TRAIN = {"n03": 2, "n01": 3, "n02": 2}
TINY_GRAY = "n02_1.JPEG"
TINY_VAL = {"val_0.JPEG": "n02", "val_1.JPEG": "n03", "val_2.JPEG": "n01"}


def jpeg_bytes(array: np.ndarray) -> bytes:
    """``array`` as JPEG file bytes (quality 90)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_tiny_imagenet(root: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Writes a fake ``root/tiny-imagenet-200`` tree; returns {file name: (JPEG bytes, wnid)}."""
    tree = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    originals: dict[str, tuple[bytes, str]] = {}
    for wnid, count in TINY_TRAIN.items():
        images = tree / "train" / wnid / "images"
        images.mkdir(parents=True)
        (tree / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(count):
            name = f"{wnid}_{i}.JPEG"
            shape = (64, 64) if name == TINY_GRAY else (64, 64, 3)
            originals[name] = (jpeg_bytes(rng.integers(0, 256, shape, dtype=np.uint8)), wnid)
            (images / name).write_bytes(originals[name][0])
    (tree / "val" / "images").mkdir(parents=True)
    lines = []
    for name, wnid in TINY_VAL.items():
        originals[name] = (jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), wnid)
        (tree / "val" / "images" / name).write_bytes(originals[name][0])
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (tree / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (tree / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (tree / "words.txt").write_text("\n".join(TINY_WORDS) + "\n")
    return originals


def zip_tree(folder: pathlib.Path, zip_path: pathlib.Path) -> None:
    """Zips ``folder`` with its own name as the top directory, as the official zip is."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder.parent).as_posix())


TRUNCATED = "train/n01/images/n01_1.JPEG"


def truncate(path: pathlib.Path) -> None:
    """Cuts a JPEG in the middle of its pixel data, as an interrupted copy does: its header still opens."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        assert image.size == (64, 64)  # what storing it unchecked relied on
        with pytest.raises(OSError, match="image file is truncated"):
            image.load()


def write_idx_gz(path: pathlib.Path, array: np.ndarray) -> None:
    """``array`` (uint8) as a gzipped IDX file, as Fashion-MNIST ships."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion(folder: pathlib.Path, n_train: int = 12, n_test: int = 5) -> dict:
    """Fake Fashion-MNIST IDX files in ``folder``; returns {split: (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    data = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0] = 0  # the extremes survive exactly
        images[0, 0, :] = 255
        labels = (np.arange(n) * 7 + 3) % 10
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = (images, labels)
    return data


# --- Experiment manifests ---


def assert_provenance(manifest):
    """``manifest`` records what it ran on: the commit, the package versions and the machine (measurement.provenance)."""
    if measurement.git_state()["git_commit"] is None:  # run from a tree that is not a git checkout of its own
        assert manifest["git_commit"] is None and manifest["git_dirty"] is None
    else:
        commit = manifest["git_commit"]
        assert len(commit) == 40 and int(commit, 16) >= 0 and isinstance(manifest["git_dirty"], bool)
    packages = manifest["packages"]
    assert list(packages) == ["python", *measurement.RECORDED_PACKAGES]
    assert packages["python"] == platform.python_version()
    assert packages["jax"] == importlib.metadata.version("jax")
    assert packages["numpy"] == importlib.metadata.version("numpy")
    assert packages["tensorflow-datasets"] == importlib.metadata.version("tensorflow-datasets")
    import jax  # the test process may import jax; the sweep's own process never does

    assert manifest["machine"] == {"platform": platform.platform(), "cpu": measurement.cpu_model(),
                                   "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                                   "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count()}
