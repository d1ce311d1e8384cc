"""experiments/custom_method.py: a method defined outside the package runs end to end through vpns_jax.main."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import custom_method
from vpns_jax import config_checks, main, methods
from vpns_jax.core import saliency, selection
from vpns_jax.io import array_files, workdir
from vpns_jax.models import create_model, functional

pytestmark = pytest.mark.slow  # a method end to end through the command line

CONFIG = "experiments/custom_method.py"


def _argv(tmp, data_dir, source_path, *extra):
    return ["vpns_jax.main", f"--config={CONFIG}", f"--workdir={tmp}", "--config.densities=(0.5,0.2)",
            "--config.model.width=0.0625", "--config.model.stem=cifar", "--config.model.num_classes=10",
            f"--config.model.init_from={source_path}", "--config.source.enabled=False",
            f"--config.data.data_dir={data_dir}", "--config.data.train_limit=64", "--config.data.test_limit=64",
            "--config.data.batch_size=32", "--config.data.eval_batch_size=64", "--config.prompt.input_size=16",
            "--config.prompt.output_size=16", "--config.prompt.pad_size=2", "--config.source_magnitude.epochs=1",
            "--config.compilation_cache_dir=none", *extra]


def test_the_registered_method_is_known_to_the_registry_and_the_checks():
    assert "source_magnitude" in methods.names() and methods.get_method("source_magnitude") is custom_method.METHOD
    config = custom_method.get_config()
    config_checks.validate(config, num_devices=1)
    plan = methods.make_plan(config)
    assert [u.stages for u in plan.units] == [(2,)] * 4 and plan.epochs == {2: 3}
    assert plan.phases[2].trains == ("weights", "prompt") and set(plan.groups[2]) == {"weights", "bn", "prompt"}
    config.source_magnitude.scope = "row"
    with pytest.raises(config_checks.ConfigError, match=r"config.source_magnitude.scope='row' is unknown"):
        config_checks.validate(config, num_devices=1)


def test_custom_method_runs_end_to_end_through_the_command_line(fashion_data_dir, source, tmp_path, capsys):
    source_path, source_weights = source
    assert main.command(_argv(tmp_path, fashion_data_dir, source_path)) == 0
    assert "source_magnitude" in capsys.readouterr().out
    rows = json.loads((tmp_path / workdir.RESULTS_JSON).read_text())
    assert [(r["method"], r["density"]) for r in rows] == [("source_magnitude", 0.5), ("source_magnitude", 0.2)]
    kinds = functional.leaf_kinds(create_model("resnet18", num_classes=10, width=1 / 16, stem="cifar",
                                               rngs=nnx.Rngs(0)))
    importance = saliency.magnitude_importance(source_weights, kinds)
    for density in (0.5, 0.2):
        folder = workdir.unit_folder(tmp_path, density)
        masks = array_files.load_arrays(folder / "masks.npz")
        # Exactly the largest |W| of the source weights: the masks equal a fresh one-shot selection.
        expected = selection.keep_largest(importance, selection.keep_counts(importance, density))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)))
        kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
        total = sum(m.size for m in jax.tree.leaves(masks))
        assert kept == total - int((1 - density) * total)
        # VPNs' stage 2 trained a prompt (it starts at zero).
        assert np.abs(array_files.load_arrays(folder / "prompt.npz")["program"]).max() > 0
