"""Config files and their checks: every config loads through config_flags (with and without its ``:ARG``) and
validates; bad fields and bad ARGs fail in one line."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import pytest

from tests.helpers import load_config, set_fields
from vpns_jax import config_checks, main
from vpns_jax.core import optim
from vpns_jax.config_checks import ConfigError
from vpns_jax.data import registry
from vpns_jax.models import MODEL_NAMES

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.py"))
COMMAND = "python -m vpns_jax.main --config=configs/{}"
# The five optimiser groups of VPNs' two stages, by config path.
VPNS_GROUPS = ("stage1.scores", "stage1.prompt", "stage2.weights", "stage2.bn", "stage2.prompt")

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


def docstring(name: str) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_doc_{name[:-3]}", CONFIG_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__, f"configs/{name} has no docstring"
    return module.__doc__


def test_the_paper_configs_are_there():
    assert set(PAPER) <= set(CONFIG_FILES)
    assert "default.py" in CONFIG_FILES


def parse(name: str, *flags_: str):
    """``main.parse_flags`` of `python -m vpns_jax.main --config=configs/<name> [flags]`: the path main runs."""
    return main.parse_flags(["vpns_jax.main", f"--config={CONFIG_DIR / name}", *flags_])


def doc_commands(name: str) -> list[str]:
    """The command lines that open configs/<name>'s docstring (its lines up to the first empty one)."""
    lines = docstring(name).strip().splitlines()
    return [line.strip() for line in lines[:lines.index("")]] if "" in lines else [lines[0].strip()]


# An ARG of each config file: a method for default.py, a model for the dataset configs.
METHOD_ARG_CONFIGS = ("default.py", "default_vit.py")  # their ARG is a method; the dataset configs' a model
ARG = {name: "resnet50" for name in PAPER} | {name: "hydra" for name in METHOD_ARG_CONFIGS}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_and_validates(name):
    config = load_config(name)
    config_checks.validate(config, num_devices=1)
    for path in VPNS_GROUPS:
        group = config_checks.group_optimizer(config[path.split(".")[0]][path.split(".")[1]])
        assert isinstance(group, optim.GroupOptimizer)
    # The docstring opens with the command that runs this very file.
    first = doc_commands(name)[0]
    assert first.startswith(COMMAND.format(name)) and first[len(COMMAND.format(name)):][:1] in ("", " ", ":"), first


def test_every_config_file_takes_an_arg():
    assert set(ARG) == set(CONFIG_FILES), "give the new config file an ARG here"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_with_and_without_its_arg_as_main_loads_it(name):
    plain = parse(name).config
    assert plain.to_dict() == load_config(name).to_dict()
    # An empty ARG is no ARG.
    assert parse(f"{name}:").config.to_dict() == plain.to_dict()
    with_arg = parse(f"{name}:{ARG[name]}").config
    assert with_arg.to_dict() == load_config(f"{name}:{ARG[name]}").to_dict()
    config_checks.validate(with_arg, num_devices=1)
    takes_method = name in METHOD_ARG_CONFIGS
    field = "method" if takes_method else "model.name"
    got = with_arg.method if takes_method else with_arg.model.name
    assert got == ARG[name], field
    # The ARG changes that one field and nothing else; overrides still apply after it.
    assert set_fields(with_arg.copy_and_resolve_references(), {field: "vpns" if takes_method else "resnet18"}
                ).to_dict() == plain.to_dict()
    overridden = parse(f"{name}:{ARG[name]}", "--config.seed=9").config
    assert overridden.seed == 9 and (overridden.method, overridden.model.name) == (with_arg.method, with_arg.model.name)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_the_docstring_commands_parse_as_main_parses_them(name):
    commands = doc_commands(name)
    assert any(":" in shlex.split(line)[3] for line in commands), f"configs/{name}'s docstring shows no ARG"
    for line in commands:
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", "vpns_jax.main"], line
        config_flag = words[3]
        assert config_flag.startswith(f"--config=configs/{name}"), line
        rest = [word for word in words[4:] if not word.startswith("--workdir=")]
        values = parse(config_flag.removeprefix(f"--config=configs/"), *rest)
        _, arg = main.split_config_arg(config_flag)
        if arg and name in METHOD_ARG_CONFIGS:
            assert values.config.method == arg, line
        elif arg:
            assert values.config.model.name == arg, line


@pytest.mark.parametrize("arg, method, granularity", [
    ("hydra", "hydra", "weight"), ("omp", "omp", "weight"), ("random_vp", "random_vp", "weight"),
    ("dense", "dense", "weight"), ("vpns", "vpns", "weight"), ("slim", "slim", "channel"),
    ("vpns_channel", "vpns", "channel"),
])
def test_default_config_arg_is_the_method(arg, method, granularity):
    config = parse(f"default.py:{arg}").config
    assert (config.method, config.mask.granularity) == (method, granularity)
    config_checks.validate(config, num_devices=1)
    # Everything else is the offline default's.
    assert set_fields(config.copy_and_resolve_references(), {"method": "vpns", "mask.granularity": "weight"}
                ).to_dict() == load_config("default.py").to_dict()


def test_default_config_without_arg_is_unstructured_vpns():
    config = parse("default.py").config
    assert (config.method, config.mask.granularity) == ("vpns", "weight")


def test_unknown_method_arg_is_a_one_line_error_of_the_checks():
    config = parse("default.py:magic").config  # the config file leaves method names to the checks
    assert config.method == "magic"
    with pytest.raises(ConfigError) as info:
        config_checks.validate(config, num_devices=1)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config.method='magic' is unknown: use one of "), message
    assert "'hydra'" in message


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_paper_config_arg_is_the_model(name, model):
    config = parse(f"{name}:{model}").config
    assert config.model.name == model
    config_checks.validate(config, num_devices=1)


def test_cifar100_resnet50():
    config = parse("cifar100.py:resnet50").config
    assert (config.model.name, config.data.name, config.method) == ("resnet50", "cifar100", "vpns")
    assert (config.model.stem, config.model.num_classes, config.data.batch_size) == ("imagenet", 1000, 256)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_unknown_model_arg_is_a_one_line_error_naming_the_fix(name):
    with pytest.raises(main.CommandLineError) as info:
        parse(f"{name}:resnet34")
    message = str(info.value)
    assert "\n" not in message, message
    assert message == (f"--config={CONFIG_DIR / name}:resnet34: unknown model 'resnet34': use one of "
                       f"{', '.join(MODEL_NAMES)} after the ':' (none for resnet18)")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_docstring_opens_with_its_command(name):
    doc = docstring(name)
    stem = name[:-3]
    assert doc_commands(name) == [
        f"{COMMAND.format(name)} --config.model.init_from=resnet18.npz",
        f"{COMMAND.format(name)}:resnet50 --config.model.init_from=resnet50.npz",
    ]
    assert f"workdir/{stem}_resnet50" in " ".join(doc.split())
    dataset = PAPER[name][0]
    how_to_get = registry.DATASETS[dataset].how_to_get
    prepare = f"python -m vpns_jax.data.prepare --dataset={dataset}"
    if prepare in how_to_get:
        assert prepare in doc
    assert "init_from" in doc and "results.json" in doc and "90 % sparsity" in doc


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_values(name):
    dataset, batch, groups = PAPER[name]
    config = load_config(name)
    assert config.data.name == dataset
    assert (config.data.batch_size, config.data.eval_batch_size) == (batch, batch)
    vpns_fields = VPNS_GROUPS
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
    assert load_config("dtd.py").data.batch_size == 64
    flowers = load_config("flowers102.py")
    for group in (flowers.stage1.scores, flowers.stage1.prompt, flowers.stage2.weights, flowers.stage2.prompt):
        assert config_checks.group_optimizer(group) == optim.GroupOptimizer("adam", 1e-3, 1e-4, 0.9)
    pets = load_config("oxford_pets.py")
    assert config_checks.group_optimizer(pets.stage1.scores) == optim.GroupOptimizer("sgd", 0.05, 1e-4, 0.9)
    assert config_checks.group_optimizer(pets.stage2.weights) == optim.GroupOptimizer("sgd", 0.01, 1e-4, 0.9)


def test_command_line_overrides_reach_the_checks():
    config = load_config("dtd.py", "--config.data.batch_size=32", "--config.stage1.scores.lr=0.5")
    assert (config.data.batch_size, config.stage1.scores.lr) == (32, 0.5)
    config_checks.validate(config, num_devices=1)
    with pytest.raises(ConfigError, match=r"config\.stage1\.epochs=0"):
        config_checks.validate(load_config("dtd.py", "--config.stage1.epochs=0"), num_devices=1)


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
    ({"model.dtype": "float16"}, "model.dtype", "'float16'"),
    ({"model.conv_impl": "winograd"}, "model.conv_impl", "'winograd'"),
    ({"model.pool_impl": "scatter"}, "model.pool_impl", "'scatter'"),
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
    ({"data.workers": -2}, "data.workers", "-2"),
    ({"mask.min_layer_density": 1.0}, "mask.min_layer_density", "1.0"),
    ({"mask.min_layer_density": -0.1}, "mask.min_layer_density", "-0.1"),
    ({"mask.min_layer_density": 0.05, "transfer.masks_from": "workdir/a"}, "mask.min_layer_density", "0.05"),
    ({"method": "slim", "mask.granularity": "channel", "mask.min_layer_density": 0.05}, "mask.min_layer_density",
     "0.05"),
    ({"model.dtype": "float64"}, "model.dtype", "'float64'"),
    ({"model.dtype": "float16"}, "model.dtype", "'float16'"),
    ({"data.num_threads": 0}, "data.num_threads", "0"),
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


@pytest.mark.parametrize("updates,field,shown", BAD, ids=[f"{f}={s}" for _, f, s in BAD])
def test_bad_field_is_one_line_naming_field_value_and_fix(updates, field, shown):
    config = set_fields(load_config("default.py"), updates)
    with pytest.raises(ConfigError) as info:
        config_checks.validate(config, num_devices=1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config.{field}"), message
    assert shown in message, message
    assert any(word in message for word in ("use ", "must ", "list ")), message  # says what to do
    assert isinstance(info.value, ValueError)


def test_the_unmodified_default_is_valid_and_every_bad_case_starts_from_it():
    config_checks.validate(load_config("default.py"), num_devices=1)


def test_source_fields_are_ignored_when_source_is_off():
    config = set_fields(load_config("default.py"), {
        "source.enabled": False, "source.dataset": "mnist", "source.epochs": 0,
        "source.batch_size": 3, "source.classes": (1, 1), "source.optimizer.lr": 0.0, "model.init_from": "",
    })
    config_checks.validate(config, num_devices=2)  # an empty init_from is the trainer's business
    set_fields(config, {"source.enabled": True})
    with pytest.raises(ConfigError, match=r"^config\.source\.dataset='mnist'"):
        config_checks.validate(config, num_devices=2)


def test_batch_must_split_over_the_devices():
    config = load_config("dtd.py")
    assert config.data.batch_size == 64
    with pytest.raises(ConfigError) as info:
        config_checks.validate(config, num_devices=3)
    assert str(info.value) == (
        "config.data.batch_size=64 is not divisible by the 3 devices: use a multiple of 3, e.g. 63 or 66"
    )
    config_checks.validate(config, num_devices=4)
    # default.py: batch 64 and eval batch 200 split over 1, 2, 4 and 8 devices, not over 3.
    default = load_config("default.py")
    for devices in (1, 2, 4, 8):
        config_checks.validate(default, num_devices=devices)
    with pytest.raises(ConfigError, match=r"^config\.data\.batch_size=64 is not divisible by the 3 devices"):
        config_checks.validate(default, num_devices=3)
    with pytest.raises(ValueError, match="num_devices"):
        config_checks.validate(default, num_devices=0)


def test_group_optimizer_rejects_what_optim_rejects():
    config = load_config("default.py")
    assert config_checks.group_optimizer(config.stage1.scores) == optim.GroupOptimizer("adam", 3e-3, 1e-4, 0.9)
    assert config_checks.group_optimizer(config.source.optimizer) == optim.GroupOptimizer("sgd", 0.05, 1e-4, 0.9)
    set_fields(config, {"stage2.weights.optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="rmsprop"):
        config_checks.group_optimizer(config.stage2.weights)


def test_missing_field_is_named():
    config = load_config("default.py")
    config.unlock()
    del config.mask["scope"]
    with pytest.raises(ConfigError, match=r"^config\.mask\.scope is missing"):
        config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize("updates", [
    {"checkpoint.every_steps": 7}, {"checkpoint.max_to_keep": 1}, {"log_every_steps": 1},
    {"data.num_threads": 16}, {"data.workers": 3}, {"data.auto_prepare": False}, {"data.data_dir": "/elsewhere"},
    {"compilation_cache_dir": "none"}, {"on_nonfinite": "skip"}, {"eval.every_epochs": 1},
])
def test_fingerprint_ignores_what_does_not_change_results(updates):
    assert (config_checks.fingerprint(set_fields(load_config("default.py"), updates))
            == config_checks.fingerprint(load_config("default.py")))


@pytest.mark.parametrize("updates", [
    {"densities": (0.5, 0.1)}, {"seed": 9}, {"stage1.scores.lr": 1e-4}, {"data.batch_size": 32},
    {"model.init_from": "w.npz"}, {"prompt.pad_size": 8}, {"eval.with_prompt": True}, {"data.train_limit": 10},
    {"mask.min_layer_density": 0.05},
])
def test_fingerprint_sees_what_changes_results(updates):
    assert (config_checks.fingerprint(set_fields(load_config("default.py"), updates))
            != config_checks.fingerprint(load_config("default.py")))


def test_fingerprint_is_plain_json_that_survives_a_round_trip():
    fp = config_checks.fingerprint(load_config("cifar10.py"))
    assert json.loads(json.dumps(fp)) == fp
    assert "checkpoint" not in fp and "log_every_steps" not in fp and "compilation_cache_dir" not in fp
    assert set(fp["data"]) == {"name", "classes", "train_limit", "test_limit", "batch_size", "eval_batch_size"}
    assert fp["densities"] == [1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert fp["stage1"]["scores"] == {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "momentum": 0.9,
                                      "clip_value": 0.0}
    assert fp["model"]["name"] == "resnet18" and fp["method"] == "vpns"


def test_a_compute_dtype_the_backend_cannot_run_is_one_line(monkeypatch):
    config = set_fields(load_config("default.py"), {"model.dtype": "bfloat16"})
    config_checks.validate(config, num_devices=1)  # the CPU backend computes in bfloat16

    def refuse(a):
        raise RuntimeError("UNIMPLEMENTED: bf16 dot\nmore detail")

    monkeypatch.setattr(jax, "jit", lambda fn: refuse)
    with pytest.raises(config_checks.ConfigError) as error:
        config_checks.validate(config, num_devices=1)
    message = str(error.value)
    assert "\n" not in message and "config.model.dtype='bfloat16'" in message
    assert "cpu backend cannot compute in bfloat16 (UNIMPLEMENTED: bf16 dot)" in message and "'float32'" in message


@pytest.mark.parametrize("name, updates, message", [
    ("default.py", {"model.vit.patch_size": 4},
     "config.model.vit.patch_size=4 applies only to ViT models (vit_b_16, vit_b_32, vit_l_16), not resnet18: "
     "leave model.vit at 0 for a CNN"),
    ("default_vit.py", {"prompt.output_size": 36, "prompt.input_size": 36},
     "config.prompt.output_size=36 (the ViT's input side) is not a multiple of vit_b_16's patch size 8: use a "
     "multiple of it, or another model.vit.patch_size"),
    ("default_vit.py", {"prompt.kind": "expand", "prompt.input_size": 24},
     "config.prompt.input_size=24 differs from prompt.output_size=32, the ViT's input side, and vit_b_16 also sees "
     "unprompted images at input_size: use prompt.input_size=32 with a ViT, and prompt.kind 'pad', 'fix' or "
     "'random'"),
    ("default_vit.py", {"model.vit.num_heads": 5},
     "config.model.vit: vit_b_16: hidden_dim 64 is not divisible by num_heads 5; set model.vit.hidden_dim to a "
     "multiple of num_heads"),
    ("default_vit.py", {"model.vit.num_layers": -1},
     "config.model.vit: model.vit.num_layers must be a positive integer (0: vit_b_16's 12), got -1"),
    ("default_vit.py:slim", {},
     "config.method='slim' prunes by BatchNorm scales, and vit_b_16 has none: use 'vpns' with "
     "mask.granularity='channel' for a ViT's heads and MLP units"),
])
def test_bad_vit_options_are_one_line_errors(name, updates, message):
    with pytest.raises(ConfigError) as info:
        config_checks.validate(set_fields(load_config(name), updates), num_devices=1)
    assert str(info.value) == message


def test_the_vit_default_validates_and_builds_its_input_side():
    config = load_config("default_vit.py")
    config_checks.validate(config, num_devices=1)
    cnn = {"num_classes": 5, "width": 1.0, "stem": "imagenet", "dtype": "float32", "conv_impl": "auto",
           "pool_impl": "auto"}
    assert config_checks.model_arguments(config) == {**cnn, "image_size": 32, "vit": {
        "patch_size": 8, "num_layers": 4, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}}
    assert config_checks.model_arguments(load_config("default.py")) == {**cnn, "width": 0.25}


def test_every_config_file_loads_without_the_repository_on_sys_path(tmp_path):
    # A user's own config file, or one of configs/ run from elsewhere, imports its shared parts from the package.
    script = ("import sys, pathlib\nfrom absl import flags\nfrom ml_collections import config_flags\n"
              "assert not any(pathlib.Path(p or '.').resolve() == pathlib.Path(sys.argv[1]) for p in sys.path)\n"
              "for path in sys.argv[2:]:\n"
              "    values = flags.FlagValues()\n"
              "    argv = ['x', '--config=' + path]\n"
              "    config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)\n"
              "    values(argv)\n"
              "    print(path, values.config.method)\n")
    files = sorted(str(p) for p in CONFIG_DIR.glob("*.py"))
    done = subprocess.run([sys.executable, "-c", script, str(REPO), *files], capture_output=True, text=True,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == len(files) == 10
