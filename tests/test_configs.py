"""Config files and their checks: every config loads through config_flags and validates; bad fields fail in one line."""

import json
import pathlib
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from vpns_jax import config_checks
from vpns_jax.core import optim
from vpns_jax.config_checks import ConfigError
from vpns_jax.data import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.py") if p.name not in ("base.py", "__init__.py"))
COMMAND = "python -m vpns_jax.main --config=configs/{}"

ADAM_1E4, ADAM_1E3 = ("adam", 1e-4), ("adam", 1e-3)
SGD_001, SGD_005 = ("sgd", 0.01), ("sgd", 0.05)
# file: (data.name, batch size, (stage1.scores, stage1.prompt, stage2.weights, stage2.bn, stage2.prompt)),
# from docs/method.md, sections 2.2 and 6.3.
PAPER = {
    "cifar10.py": ("cifar10", 256, (ADAM_1E4, ADAM_1E4, SGD_001, SGD_001, SGD_001)),
    "cifar100.py": ("cifar100", 256, (ADAM_1E4, ADAM_1E4, SGD_001, SGD_001, SGD_001)),
    "tiny_imagenet.py": ("tiny_imagenet", 256, (ADAM_1E4, ADAM_1E4, SGD_001, SGD_001, SGD_001)),
    "food101.py": ("food101", 256, (ADAM_1E4, ADAM_1E4, SGD_001, SGD_001, SGD_001)),
    "dtd.py": ("dtd", 64, (ADAM_1E4, ADAM_1E4, SGD_001, SGD_001, SGD_001)),
    "oxford_pets.py": ("oxford_iiit_pet", 64, (SGD_005, SGD_005, SGD_001, SGD_001, SGD_001)),
    "flowers102.py": ("oxford_flowers102", 128, (ADAM_1E3, ADAM_1E3, ADAM_1E3, ADAM_1E3, ADAM_1E3)),
    "stanford_cars.py": ("stanford_cars", 128, (ADAM_1E3, ADAM_1E3, ADAM_1E3, ADAM_1E3, ADAM_1E3)),
}


def load(name: str, *overrides: str):
    """The config of configs/<name> as `python -m vpns_jax.main --config=configs/<name> [overrides]` builds it."""
    if str(REPO) not in sys.path:  # python -m from the repo root puts it there
        sys.path.insert(0, str(REPO))
    argv = ["vpns_jax.main", f"--config={CONFIG_DIR / name}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def docstring(name: str) -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_doc_{name[:-3]}", CONFIG_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__, f"configs/{name} has no docstring"
    return module.__doc__


def test_the_paper_configs_are_there():
    assert set(PAPER) <= set(CONFIG_FILES)
    assert "default.py" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_and_validates(name):
    config = load(name)
    config_checks.validate(config, num_devices=1)
    for path in config_checks.OPTIMIZER_FIELDS:
        group = config_checks.group_optimizer(config[path.split(".")[0]][path.split(".")[1]])
        assert isinstance(group, optim.GroupOptimizer)
    # The docstring names the command that runs this very file.
    lines = [line.strip() for line in docstring(name).splitlines()]
    assert any(line.startswith(COMMAND.format(name) + " ") or line == COMMAND.format(name) for line in lines), lines[:3]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_docstring_opens_with_its_command(name):
    doc = docstring(name)
    first = doc.splitlines()[0]
    stem = name[:-3]
    assert first == f"{COMMAND.format(name)} --workdir=workdir/{stem} --config.model.init_from=PATH"
    dataset = PAPER[name][0]
    how_to_get = registry.DATASETS[dataset].how_to_get
    prepare = f"python -m vpns_jax.data.prepare --dataset={dataset}"
    if prepare in how_to_get:
        assert prepare in doc
    assert "init_from" in doc and "results.json" in doc and "90 % sparsity" in doc


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_values(name):
    dataset, batch, groups = PAPER[name]
    config = load(name)
    assert config.data.name == dataset
    assert (config.data.batch_size, config.data.eval_batch_size) == (batch, batch)
    vpns_fields = config_checks.OPTIMIZER_FIELDS[:5]  # stage1.* and stage2.*
    got = tuple((config[a][b].optimizer, config[a][b].lr) for a, b in (path.split(".") for path in vpns_fields))
    assert got == groups
    for a, b in (path.split(".") for path in vpns_fields):
        assert (config[a][b].weight_decay, config[a][b].momentum) == (1e-4, 0.9)
    assert (config.model.name, config.model.stem, config.model.width, config.model.num_classes) == (
        "resnet18", "imagenet", 1.0, 1000)
    assert config.model.init_from == "" and not config.source.enabled
    assert tuple(config.densities) == (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    assert (config.stage1.epochs, config.stage2.epochs) == (30, 30)
    assert (config.prompt.kind, config.prompt.input_size, config.prompt.output_size, config.prompt.pad_size) == (
        "pad", 224, 224, 16)
    assert config.mask.scope == "global" and config.eval.with_prompt is False
    assert config.data.classes == () and config.data.train_limit == 0


def test_spot_checks_and_group_optimizer():
    assert load("dtd.py").data.batch_size == 64
    flowers = load("flowers102.py")
    for group in (flowers.stage1.scores, flowers.stage1.prompt, flowers.stage2.weights, flowers.stage2.prompt):
        assert config_checks.group_optimizer(group) == optim.GroupOptimizer("adam", 1e-3, 1e-4, 0.9)
    pets = load("oxford_pets.py")
    assert config_checks.group_optimizer(pets.stage1.scores) == optim.GroupOptimizer("sgd", 0.05, 1e-4, 0.9)
    assert config_checks.group_optimizer(pets.stage2.weights) == optim.GroupOptimizer("sgd", 0.01, 1e-4, 0.9)


def test_command_line_overrides_reach_the_checks():
    config = load("dtd.py", "--config.data.batch_size=32", "--config.stage1.scores.lr=0.5")
    assert (config.data.batch_size, config.stage1.scores.lr) == (32, 0.5)
    config_checks.validate(config, num_devices=1)
    with pytest.raises(ConfigError, match=r"config\.stage1\.epochs=0"):
        config_checks.validate(load("dtd.py", "--config.stage1.epochs=0"), num_devices=1)


# (updates to configs/default.py's config, field named in the message, bad value as it appears there)
BAD = [
    ({"densities": ()}, "densities", "()"),
    ({"densities": (0.5, 0.0)}, "densities", "0.0"),
    ({"densities": (1.5,)}, "densities", "1.5"),
    ({"densities": (0.5, -0.1)}, "densities", "-0.1"),
    ({"densities": (0.5, 0.1, 0.5)}, "densities", "0.5"),
    ({"method": "hydra2"}, "method", "'hydra2'"),
    ({"method": "hydra", "mask.granularity": "channel"}, "mask.granularity", "'channel'"),
    ({"method": "random", "transfer.masks_from": "workdir/a"}, "transfer.masks_from", "random"),
    ({"mask.granularity": "filter"}, "mask.granularity", "'filter'"),
    ({"finetune.lth_fraction": 1.0}, "finetune.lth_fraction", "1.0"),
    ({"structured.channel_max": 0.0}, "structured.channel_max", "0.0"),
    ({"hydra.prune_epochs": 0}, "hydra.prune_epochs", "0"),
    ({"structured.scores.clip_value": -1.0}, "structured.scores.clip_value", "-1.0"),
    ({"model.name": "resnet34"}, "model.name", "'resnet34'"),
    ({"model.stem": "tiny"}, "model.stem", "'tiny'"),
    ({"model.name": "vgg16", "model.stem": "cifar"}, "model.stem", "'cifar'"),
    ({"model.width": 0.0}, "model.width", "0.0"),
    ({"model.width": -0.25}, "model.width", "-0.25"),
    ({"model.num_classes": 0}, "model.num_classes", "0"),
    ({"model.num_classes": 4}, "model.num_classes", "4"),  # fewer than the 5 target classes
    ({"data.name": "imagenet"}, "data.name", "'imagenet'"),
    ({"source.dataset": "mnist"}, "source.dataset", "'mnist'"),
    ({"prompt.kind": "sigmoid"}, "prompt.kind", "'sigmoid'"),
    ({"prompt.pad_size": 17}, "prompt.pad_size", "17"),  # 2 * 17 > output_size 32
    ({"prompt.input_size": 40}, "prompt.input_size", "40"),  # > output_size 32
    ({"prompt.output_size": 0}, "prompt.output_size", "0"),
    ({"prompt.kind": "fix", "prompt.mask_size": 33}, "prompt.mask_size", "33"),
    ({"data.batch_size": 0}, "data.batch_size", "0"),
    ({"data.eval_batch_size": -250}, "data.eval_batch_size", "-250"),
    ({"source.batch_size": 0}, "source.batch_size", "0"),
    ({"stage1.epochs": 0}, "stage1.epochs", "0"),
    ({"stage2.epochs": -1}, "stage2.epochs", "-1"),
    ({"source.epochs": 0}, "source.epochs", "0"),
    ({"stage1.scores.optimizer": "rmsprop"}, "stage1.scores.optimizer", "'rmsprop'"),
    ({"stage1.scores.lr": 0.0}, "stage1.scores.lr", "0.0"),
    ({"stage1.prompt.lr": -1e-3}, "stage1.prompt.lr", "-0.001"),
    ({"stage1.prompt.optimizer": "adamw"}, "stage1.prompt.optimizer", "'adamw'"),
    ({"stage2.weights.optimizer": "adamw"}, "stage2.weights.optimizer", "'adamw'"),
    ({"stage2.weights.lr": 0.0}, "stage2.weights.lr", "0.0"),
    ({"stage2.weights.weight_decay": -1e-4}, "stage2.weights.weight_decay", "-0.0001"),
    ({"stage2.bn.lr": 0.0}, "stage2.bn.lr", "0.0"),
    ({"stage2.bn.optimizer": "lion"}, "stage2.bn.optimizer", "'lion'"),
    ({"stage2.prompt.optimizer": "lion"}, "stage2.prompt.optimizer", "'lion'"),
    ({"stage2.prompt.lr": -0.01}, "stage2.prompt.lr", "-0.01"),
    ({"source.optimizer.optimizer": "adagrad"}, "source.optimizer.optimizer", "'adagrad'"),
    ({"source.optimizer.lr": 0.0}, "source.optimizer.lr", "0.0"),
    ({"mask.scope": "local"}, "mask.scope", "'local'"),
    ({"data.classes": (5, 5, 6)}, "data.classes", "(5, 5, 6)"),
    ({"data.classes": (5, -1)}, "data.classes", "(5, -1)"),
    ({"data.classes": (5, 10)}, "data.classes", "(5, 10)"),  # fashion_mnist has classes 0..9
    ({"source.classes": (0, 1, 1)}, "source.classes", "(0, 1, 1)"),
    ({"source.classes": (-2,)}, "source.classes", "(-2,)"),
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps", "0"),
    ({"checkpoint.max_to_keep": 0}, "checkpoint.max_to_keep", "0"),
    ({"log_every_steps": 0}, "log_every_steps", "0"),
    ({"eval.with_prompt": None}, "eval.with_prompt", "None"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite", "'ignore'"),
    ({"eval.every_epochs": -1}, "eval.every_epochs", "-1"),
]


def _set(config, updates):
    config.unlock()
    for path, value in updates.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@pytest.mark.parametrize("updates,field,shown", BAD, ids=[f"{f}={s}" for _, f, s in BAD])
def test_bad_field_is_one_line_naming_field_value_and_fix(updates, field, shown):
    config = _set(load("default.py"), updates)
    with pytest.raises(ConfigError) as info:
        config_checks.validate(config, num_devices=1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config.{field}"), message
    assert shown in message, message
    assert any(word in message for word in ("use ", "must ", "list ")), message  # says what to do
    assert isinstance(info.value, ValueError)


def test_the_unmodified_default_is_valid_and_every_bad_case_starts_from_it():
    config_checks.validate(load("default.py"), num_devices=1)


def test_source_fields_are_ignored_when_source_is_off():
    config = _set(load("default.py"), {
        "source.enabled": False, "source.dataset": "mnist", "source.epochs": 0,
        "source.batch_size": 3, "source.classes": (1, 1), "source.optimizer.lr": 0.0, "model.init_from": "",
    })
    config_checks.validate(config, num_devices=2)  # an empty init_from is the trainer's business
    _set(config, {"source.enabled": True})
    with pytest.raises(ConfigError, match=r"^config\.source\.dataset='mnist'"):
        config_checks.validate(config, num_devices=2)


def test_batch_must_split_over_the_devices():
    config = load("dtd.py")
    assert config.data.batch_size == 64
    with pytest.raises(ConfigError) as info:
        config_checks.validate(config, num_devices=3)
    assert str(info.value) == (
        "config.data.batch_size=64 is not divisible by the 3 devices: use a multiple of 3, e.g. 63 or 66"
    )
    config_checks.validate(config, num_devices=4)
    # default.py: batch 64 and eval batch 200 split over 1, 2, 4 and 8 devices, not over 3.
    default = load("default.py")
    for devices in (1, 2, 4, 8):
        config_checks.validate(default, num_devices=devices)
    with pytest.raises(ConfigError, match=r"^config\.data\.batch_size=64 is not divisible by the 3 devices"):
        config_checks.validate(default, num_devices=3)
    with pytest.raises(ValueError, match="num_devices"):
        config_checks.validate(default, num_devices=0)


def test_group_optimizer_rejects_what_optim_rejects():
    config = load("default.py")
    assert config_checks.group_optimizer(config.stage1.scores) == optim.GroupOptimizer("adam", 3e-3, 1e-4, 0.9)
    assert config_checks.group_optimizer(config.source.optimizer) == optim.GroupOptimizer("sgd", 0.05, 1e-4, 0.9)
    _set(config, {"stage2.weights.optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="rmsprop"):
        config_checks.group_optimizer(config.stage2.weights)


def test_missing_field_is_named():
    config = load("default.py")
    config.unlock()
    del config.mask["scope"]
    with pytest.raises(ConfigError, match=r"^config\.mask\.scope is missing"):
        config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize("updates", [
    {"checkpoint.every_steps": 7}, {"checkpoint.max_to_keep": 1}, {"log_every_steps": 1},
    {"data.num_threads": 16}, {"data.auto_prepare": False}, {"data.data_dir": "/elsewhere"},
    {"compilation_cache_dir": "none"}, {"on_nonfinite": "skip"}, {"eval.every_epochs": 1},
])
def test_fingerprint_ignores_what_does_not_change_results(updates):
    assert config_checks.fingerprint(_set(load("default.py"), updates)) == config_checks.fingerprint(load("default.py"))


@pytest.mark.parametrize("updates", [
    {"densities": (0.5, 0.1)}, {"seed": 9}, {"stage1.scores.lr": 1e-4}, {"data.batch_size": 32},
    {"model.init_from": "w.npz"}, {"prompt.pad_size": 8}, {"eval.with_prompt": True}, {"data.train_limit": 10},
])
def test_fingerprint_sees_what_changes_results(updates):
    assert config_checks.fingerprint(_set(load("default.py"), updates)) != config_checks.fingerprint(load("default.py"))


def test_fingerprint_is_plain_json_that_survives_a_round_trip():
    fp = config_checks.fingerprint(load("cifar10.py"))
    assert json.loads(json.dumps(fp)) == fp
    assert "checkpoint" not in fp and "log_every_steps" not in fp and "compilation_cache_dir" not in fp
    assert set(fp["data"]) == {"name", "classes", "train_limit", "test_limit", "batch_size", "eval_batch_size"}
    assert fp["densities"] == [1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert fp["stage1"]["scores"] == {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "momentum": 0.9,
                                      "clip_value": 0.0}
    assert fp["model"]["name"] == "resnet18" and fp["method"] == "vpns"
