"""The catalogue of bad inputs: each one is a one-line error naming the problem and the fix, exit status 2,
no traceback (unless --verbose), and nothing a user already has is changed.

Every case runs the real command line in-process (``vpns_jax.main.command`` or the
prepare CLI) on a tiny setting, so no case trains or compiles a step.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from tests import helpers
from tests.helpers import TRUNCATED, make_fashion, make_tiny_imagenet, truncate, zip_tree
from vpns_jax import config_checks, main, predict
from vpns_jax.core import masking
from vpns_jax.io import array_files, checkpoint, export, workdir_guard
from vpns_jax.data import prepare
from vpns_jax.models import create_model, functional


@dataclasses.dataclass(frozen=True)
class Env:
    """What a case builds on: a scratch folder, the prepared data, a fitting source-model file."""

    tmp: pathlib.Path
    data_dir: str
    source: pathlib.Path
    subnetwork: pathlib.Path  # an exported subnetwork, for predict's cases

    @property
    def workdir(self) -> pathlib.Path:
        return self.tmp / "work"

    def argv(self, *extra: str) -> list[str]:
        """A tiny, otherwise valid main command line, then ``extra`` (a repeated override takes its last value)."""
        return ["vpns_jax.main", f"--workdir={self.workdir}", f"--config.data.data_dir={self.data_dir}",
                "--config.model.width=0.0625", "--config.model.stem=cifar", f"--config.model.init_from={self.source}",
                "--config.source.enabled=False", "--config.compilation_cache_dir=none", "--config.densities=(0.5,)",
                "--config.data.train_limit=64", "--config.data.test_limit=64", "--config.data.batch_size=32",
                "--config.data.eval_batch_size=64", "--config.prompt.input_size=16",
                "--config.prompt.output_size=16", "--config.prompt.pad_size=2", *extra]

    def run_of_this_config(self, *extra: str) -> None:
        """A workdir tied to this command line's config, as a finished earlier run leaves it."""
        config = main.parse_flags(self.argv(*extra)).config
        workdir_guard.guard_workdir(self.workdir, config_checks.fingerprint(config))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Env], list[str]]  # builds the bad input; returns the command line
    expect: str  # in the error line
    cli: str = "main"  # or "prepare", "predict"


def _prepare_argv(env: Env, dataset: str, manual: pathlib.Path) -> list[str]:
    return [f"--dataset={dataset}", f"--data_dir={env.tmp / 'tfds'}", f"--manual_dir={manual}"]


def _truncated_idx(env: Env) -> list[str]:
    make_fashion(env.tmp / "idx")
    path = env.tmp / "idx" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    return _prepare_argv(env, "fashion_mnist", env.tmp / "idx")


def _tiny_imagenet(env: Env, change: Callable[[pathlib.Path], None], zipped: bool = False) -> list[str]:
    make_tiny_imagenet(env.tmp / "src")
    change(env.tmp / "src" / "tiny-imagenet-200")
    if zipped:
        (env.tmp / "zip").mkdir()
        zip_tree(env.tmp / "src" / "tiny-imagenet-200", env.tmp / "zip" / "tiny-imagenet-200.zip")
        data = (env.tmp / "zip" / "tiny-imagenet-200.zip").read_bytes()
        (env.tmp / "zip" / "tiny-imagenet-200.zip").write_bytes(data[: len(data) // 2])
        return _prepare_argv(env, "tiny_imagenet", env.tmp / "zip")
    return _prepare_argv(env, "tiny_imagenet", env.tmp / "src")


def _small_jpeg(tree: pathlib.Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tree / "val" / "images" / "val_1.JPEG", format="JPEG")


def _empty_validation(tree: pathlib.Path) -> None:
    for image in (tree / "val" / "images").iterdir():
        image.unlink()
    (tree / "val" / "val_annotations.txt").write_text("")


def _empty_test_split(env: Env) -> list[str]:
    # The fake test split's 5 labels are 3, 0, 7, 4, 1: none of classes 5 and 6.
    make_fashion(env.tmp / "idx")
    prepare.prepare("fashion_mnist", data_dir=str(env.tmp / "fake"), manual_dir=str(env.tmp / "idx"))
    return env.argv(f"--config.data.data_dir={env.tmp / 'fake'}", "--config.data.classes=(5,6)",
                    "--config.data.batch_size=2")


def _pickled_weights(env: Env) -> list[str]:
    arrays = {"weights/fc/kernel": np.array([{"payload": 1}], dtype=object)}
    np.savez(env.tmp / "pickled.npz", **arrays)
    return env.argv(f"--config.model.init_from={env.tmp / 'pickled.npz'}")


def _truncated_weights(env: Env) -> list[str]:
    data = env.source.read_bytes()
    (env.tmp / "cut.npz").write_bytes(data[: len(data) // 3])
    return env.argv(f"--config.model.init_from={env.tmp / 'cut.npz'}")


def _unreadable_checkpoints(env: Env) -> list[str]:
    env.run_of_this_config()
    with checkpoint.Checkpointer(env.workdir / "checkpoints") as ckpt:
        for step in (3, 4):
            ckpt.save(step, {"x": np.zeros(2, np.float32)}, {"unit": 0})
    for meta in (env.workdir / "checkpoints").glob("*/meta/*"):
        if meta.is_file():
            meta.write_bytes(b"\x00garbage")
    return env.argv()


def _checkpoints_file(env: Env) -> list[str]:
    env.run_of_this_config()
    (env.workdir / "checkpoints").write_text("not a folder\n")
    return env.argv()


def _locked(env: Env) -> list[str]:
    env.run_of_this_config()
    return env.argv()


def _unprepared_version_folder(env: Env) -> list[str]:
    folder = env.tmp / "tfds" / "sklearn_digits" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("the user's")
    return ["--dataset=digits", f"--data_dir={env.tmp / 'tfds'}"]


def _too_few_classes(env: Env) -> list[str]:
    # The fake Tiny-ImageNet has 3 classes; the config's tiny_imagenet has 200.
    make_tiny_imagenet(env.tmp / "src")
    prepare.prepare("tiny_imagenet", data_dir=str(env.tmp / "tiny"), manual_dir=str(env.tmp / "src"))
    return env.argv(f"--config.data.data_dir={env.tmp / 'tiny'}", "--config.data.name=tiny_imagenet")


def _weights_file(name: str, tensors: dict[str, np.ndarray], cut: int = 0) -> Callable[[Env], list[str]]:
    """A case's ``make``: ``tensors`` saved as ``name`` (.npz or .safetensors, its last ``cut`` bytes dropped),
    as ``model.init_from``."""
    def make(env: Env) -> list[str]:
        path = env.tmp / name
        if name.endswith(".npz"):
            np.savez(path, **tensors)
        else:
            save_file(tensors, str(path))
        if cut:
            path.write_bytes(path.read_bytes()[:-cut])
        return env.argv(f"--config.model.init_from={path}")
    return make


def _text_weights(name: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        (env.tmp / name).write_text("not weights\n")
        return env.argv(f"--config.model.init_from={env.tmp / name}")
    return make


def _image(name: str, pixels: np.ndarray) -> Callable[[Env], list[str]]:
    """A case's ``make``: ``pixels`` saved as image file ``name`` (mode from their dtype), for predict."""
    def make(env: Env) -> list[str]:
        Image.fromarray(pixels).save(env.tmp / name)
        return [f"--subnetwork={env.subnetwork}", str(env.tmp / name)]
    return make


def _changed_weights(path: str, value: Callable | None) -> Callable[[Env], list[str]]:
    """A case's ``make``: the source model's arrays with the leaf at ``path`` replaced by ``value(old leaf)``
    (removed when ``value`` is None), as ``model.init_from``."""
    def make(env: Env) -> list[str]:
        tree = array_files.load_arrays(env.source)
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node[part]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value(node.get(leaf))
        array_files.save_arrays(env.tmp / "weights.npz", tree)
        return env.argv(f"--config.model.init_from={env.tmp / 'weights.npz'}")
    return make


CASES = [
    # Config values and flags.
    Case("density out of range", lambda e: e.argv("--config.densities=(0.5,1.5)"), "config.densities"),
    Case("no densities", lambda e: e.argv("--config.densities=()"), "config.densities"),
    Case("prompt wider than the image", lambda e: e.argv("--config.prompt.pad_size=20"), "config.prompt.pad_size"),
    Case("unknown dataset", lambda e: e.argv("--config.data.name=imagenet22k"), "config.data.name"),
    Case("unknown model", lambda e: e.argv("--config.model.name=resnet7"), "config.model.name"),
    Case("unknown method", lambda e: e.argv("--config.method=magic"), "config.method"),
    Case("negative learning rate", lambda e: e.argv("--config.stage1.scores.lr=-1.0"), "config.stage1.scores.lr"),
    Case("unknown optimiser", lambda e: e.argv("--config.stage2.weights.optimizer=adamw"),
         "config.stage2.weights.optimizer"),
    Case("zero batch size", lambda e: e.argv("--config.data.batch_size=0"), "config.data.batch_size"),
    Case("layer floor out of range", lambda e: e.argv("--config.mask.min_layer_density=1.0"),
         "config.mask.min_layer_density=1.0 must be a fraction in [0, 1)"),
    Case("negative worker count", lambda e: e.argv("--config.data.workers=-3"), "config.data.workers=-3"),
    Case("N:M pattern with M not a power of two", lambda e: e.argv("--config.mask.granularity=2:5"),
         "config.mask.granularity='2:5' has M = 5, but M must be a power of two in 2..16"),
    Case("N:M pattern for a method without N:M masks", lambda e: e.argv("--config.mask.granularity=2:4",
                                                                       "--config.method=snip"),
         "config.mask.granularity='2:4' is not available for method 'snip': use one of vpns, hydra, omp, omp_vp"),
    Case("N:M pattern at another density", lambda e: e.argv("--config.mask.granularity=1:4"),
         "config.mask.granularity='1:4' keeps N/M = 0.25 of every group, but config.densities=(0.5,): set "
         "config.densities=(0.25,)"),
    Case("N:M masks in the field they had before they became a granularity",
         lambda e: e.argv("--config.mask.pattern=2:4"),
         "config.mask.pattern was folded into config.mask.granularity: use --config.mask.granularity=2:4"),
    Case("float64 compute dtype", lambda e: e.argv("--config.model.dtype=float64"),
         "config.model.dtype='float64' is not a training dtype"),
    Case("unknown NaN policy", lambda e: e.argv("--config.on_nonfinite=ignore"), "config.on_nonfinite"),
    Case("class out of range", lambda e: e.argv("--config.data.classes=(5,10)"), "config.data.classes"),
    Case("mistyped config field", lambda e: e.argv("--config.stage1.epochz=3"),
         'does not have: \'epochz\' Did you mean "epochs"'),
    Case("value of the wrong type", lambda e: e.argv("--config.stage1.epochs=three"),
         "flag --config.stage1.epochs=three: invalid literal"),
    Case("unknown flag", lambda e: e.argv("--learning_rate=3"), "Unknown command line flag 'learning_rate'"),
    Case("missing config file", lambda e: e.argv(f"--config={e.tmp / 'nope.py'}"), "nope.py does not exist"),
    Case("config file that does not parse", lambda e: (e.tmp / "broken.py").write_text("def get_config(:\n")
         and e.argv(f"--config={e.tmp / 'broken.py'}"), "broken.py does not load: SyntaxError"),
    Case("stray argument", lambda e: e.argv("cifar10"), "unexpected arguments 'cifar10'"),
    Case("half a multi-process setup", lambda e: e.argv("--coordinator_address=127.0.0.1:1234"),
         "--coordinator_address needs --num_processes and --process_id"),
    Case("transfer from a run without that density", lambda e: e.argv(f"--config.transfer.masks_from={e.tmp}"),
         "has no finished subnetwork for densities [0.5]"),
    # Data.
    Case("dataset not prepared", lambda e: e.argv(f"--config.data.data_dir={e.tmp / 'none'}",
                                                  "--config.data.auto_prepare=False"),
         "dataset 'fashion_mnist' is not prepared in"),
    Case("empty test split", _empty_test_split, "the test split of 'fashion_mnist' has no examples"),
    Case("truncated IDX file", _truncated_idx, "train-images-idx3-ubyte.gz: IDX payload has", cli="prepare"),
    Case("truncated zip", lambda e: _tiny_imagenet(e, lambda tree: None, zipped=True), "not a readable zip",
         cli="prepare"),
    Case("image of the wrong size", lambda e: _tiny_imagenet(e, _small_jpeg), "image of size (32, 32)",
         cli="prepare"),
    Case("empty validation split", lambda e: _tiny_imagenet(e, _empty_validation), "is empty", cli="prepare"),
    Case("truncated JPEG", lambda e: _tiny_imagenet(e, lambda tree: truncate(tree / TRUNCATED)),
         "train/n01/images/n01_1.JPEG: not a readable image (image file is truncated", cli="prepare"),
    Case("class names missing from words.txt",
         lambda e: _tiny_imagenet(e, lambda tree: (tree / "words.txt").write_text("n01\tgoldfish\n")),
         "words.txt: no name for 2 wnid(s) of wnids.txt, e.g. n02", cli="prepare"),
    Case("--force for a TFDS builder without --download",
         lambda e: ["--dataset=cifar10", f"--data_dir={e.tmp / 'tfds'}", "--force"],
         "--force prepares 'cifar10' again from its source, which for TFDS's own builders needs --download",
         cli="prepare"),
    Case("version folder that is not a prepared dataset", _unprepared_version_folder,
         "exists but is not a prepared dataset (no dataset_info.json): delete it, or pass --force", cli="prepare"),
    Case("prepared dataset with another class count", _too_few_classes,
         "has 3 classes where the config expects 200: prepare it again from a complete copy, adding --force"),
    # Pretrained weights.
    Case("weights file missing", lambda e: e.argv(f"--config.model.init_from={e.tmp / 'w.npz'}"),
         "w.npz does not exist"),
    Case("weights with a tensor missing", _changed_weights("weights/fc/bias", None), "missing weights/fc.bias"),
    Case("weights with an extra tensor", _changed_weights("weights/fc/extra", lambda _: np.ones(3)),
         "extra weights/fc.extra"),
    Case("weights of the wrong shape", _changed_weights("weights/fc/bias", lambda _: np.ones(7)),
         "weights/fc.bias has shape (7,), the model needs (5,)"),
    Case("weights with NaN", _changed_weights("weights/fc/bias", lambda bias: bias * np.nan),
         "holds NaN/Inf values (in weights.fc.bias)"),
    Case("truncated weights file", _truncated_weights, "cut.npz cannot be read"),
    Case("weights file with pickled objects", _pickled_weights, "pickled.npz cannot be read"),
    *[Case(f"weights tensor of {kind} ({name[2:]})", _weights_file(name, {"fc.weight": np.ones((5, 4), dtype)}),
           f"{name} holds tensors that are not floating point (fc.weight: {kind}): every weight must be float16")
      for name in ("w.npz", "w.safetensors") for kind, dtype in (("int32", np.int32), ("bool", bool))],
    *[Case(f"weights tensor with {what} ({name[2:]})", _weights_file(name, {"fc.bias": np.full(5, value, np.float32)}),
           f"{name} holds NaN/Inf values (in fc.bias): every weight must be finite")
      for name in ("w.npz", "w.safetensors") for what, value in (("NaN", np.nan), ("Inf", -np.inf))],
    Case("text file named .safetensors", _text_weights("w.safetensors"),
         "w.safetensors cannot be read: it is not a safetensors file (Error while deserializing header"),
    Case("text file named .npz", _text_weights("w.npz"),
         "w.npz cannot be read: it is not a NumPy .npz archive of plain arrays (no complete zip archive in it)"),
    Case("text file named .pth", _text_weights("w.pth"),
         "w.pth cannot be read: it is not a torch .pth/.pt file (it starts with b'not weig'"),
    Case("truncated .safetensors", _weights_file("cut.safetensors", {"fc.bias": np.ones(5, np.float32)}, cut=8),
         "cut.safetensors cannot be read: it is not a safetensors file (Error while deserializing header: incomplete"),
    # Images given to predict.
    Case("float image above 1", _image("f.tif", np.array([[0.0, 2.0], [0.5, 1.0]], np.float32)),
         "has mode F (32-bit float) with values from 0.0 to 2.0, not all in [0, 1]", cli="predict"),
    Case("float image with NaN", _image("f.tif", np.array([[0.0, np.nan], [0.5, 0.625]], np.float32)),
         "has mode F (32-bit float) with values from 0.0 to 0.625 and NaN", cli="predict"),
    Case("32-bit integer image", _image("i.tif", np.array([[1, 70000], [3, 4]], np.int32)),
         "has mode I (32-bit integer) with values from 1 to 70000, not all in [0, 65535]", cli="predict"),
    # Workdirs and checkpoints.
    Case("workdir of another config", lambda e: e.run_of_this_config("--config.seed=8") or e.argv(),
         "holds a run of a different config (differs in: seed); use another --workdir, or pass --replace_workdir"),
    Case("unreadable config.json", lambda e: (e.workdir.mkdir() or (e.workdir / "config.json").write_text("{"))
         and e.argv(), "has an unreadable config.json"),
    Case("workdir in use", _locked, "is in use by another run"),
    Case("checkpoint folder that is a file", _checkpoints_file,
         "checkpoints is a file, not a folder; move it aside, then rerun the same command to resume"),
    Case("workdir that is a file", lambda e: e.workdir.write_text("not a folder\n") and e.argv(),
         "/work: File exists [EEXIST]; move aside what is in the way"),
    Case("every checkpoint corrupted", _unreadable_checkpoints, "reads back whole"),
]


def _snapshot(root: pathlib.Path) -> dict[str, str]:
    """Hash of every file under ``root`` but lock files (a run rewrites the pid in one it takes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != workdir_guard.LOCK_FILE}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
    model = create_model("resnet18", num_classes=5, width=1 / 16, stem="cifar", rngs=nnx.Rngs(0))
    _, weights, batch_stats = functional.split_model(model)
    path = tmp_path_factory.mktemp("source") / "source.npz"
    array_files.save_arrays(path, {"weights": weights, "batch_stats": batch_stats})
    return path


@pytest.fixture(scope="module")
def subnetwork(tmp_path_factory) -> pathlib.Path:
    """A tiny exported subnetwork (random weights), for predict's cases."""
    _, weights, batch_stats, scores, prompt = helpers.random_model("cifar")
    masks = masking.masks_from_scores(scores, jnp.asarray(masking.prune_counts(scores, 0.5)))
    path = tmp_path_factory.mktemp("subnetwork") / "subnetwork.npz"
    export.export_subnetwork(path, model_name="resnet18", num_classes=10, width=helpers.WIDTH, stem="cifar",
                             weights=weights, batch_stats=batch_stats, masks=masks, prompt_spec=helpers.SPEC,
                             prompt=prompt, label_map=[0, 1, 2, 3], eval_with_prompt=True)
    return path


def test_the_catalogue_has_at_least_61_distinct_cases():
    assert len(CASES) >= 61 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.slow  # main end to end on real Fashion-MNIST, once per case
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, fashion_data_dir, source, subnetwork, tmp_path,
                                                        capsys):
    env = Env(tmp_path, fashion_data_dir, source, subnetwork)
    argv = case.make(env)
    existed = env.workdir.exists()
    before = _snapshot(tmp_path)
    capsys.readouterr()
    if case.name == "workdir in use":
        with workdir_guard.workdir_lock(env.workdir):
            status = main.command(argv)
    elif case.cli == "prepare":
        status = prepare.main(argv)
    elif case.cli == "predict":
        status = predict.main(argv)
    else:
        status = main.command(argv)
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    assert case.expect in lines[0], lines[0]
    after = _snapshot(tmp_path)
    assert {name: digest for name, digest in after.items() if name in before} == before
    if not existed:
        assert not env.workdir.exists()  # no config.json left to refuse the corrected command


@pytest.mark.slow  # main end to end on real Fashion-MNIST
def test_verbose_adds_the_traceback_and_keeps_the_one_line_last(fashion_data_dir, source, tmp_path, capsys):
    env = Env(tmp_path, fashion_data_dir, source, tmp_path / "unused.npz")
    assert main.command(env.argv("--config.method=magic", "--verbose")) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1].startswith("error: config.method='magic'")

