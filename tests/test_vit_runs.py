"""A tiny ViT end to end through ``train.run``: VPNs per weight and per head / MLP unit, and its export.

One module fixture runs each case once, on real Fashion-MNIST at 16 px with a 2-block ViT of width 16
(the layout of configs/default_vit.py, shrunk), from a random-init source file.
"""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from vpns_jax.config import offline
from tests.helpers import DENSITIES, kept_count, unit_masks, write_source
from vpns_jax import train
from vpns_jax.core import structured
from vpns_jax.io import array_files, subnetwork
from vpns_jax.io import workdir as workdir_files
from vpns_jax.models import create_model, functional

pytestmark = pytest.mark.slow  # ViT runs end to end through train.run

VIT = {"patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source(tmp_path_factory,
                        create_model("vit_b_16", num_classes=10, image_size=16, vit=VIT, rngs=nnx.Rngs(0)))[0]


def _config(data_dir, source_path, **mask):
    config = offline.vit()
    config.densities = DENSITIES
    config.model.update(num_classes=10, init_from=source_path)
    config.model.vit.update(VIT)
    config.source.enabled = False
    config.data.update(data_dir=data_dir, train_limit=64, test_limit=64, batch_size=32, eval_batch_size=64)
    config.prompt.update(input_size=16, output_size=16, pad_size=2)
    config.stage1.epochs = config.stage2.epochs = 1
    config.mask.update(mask)
    config.checkpoint.every_steps = 1000
    config.compilation_cache_dir = "none"
    return config


@pytest.fixture(scope="module")
def runs(fashion_data_dir, source, tmp_path_factory):
    cache = {}

    def run(granularity):
        if granularity not in cache:
            workdir = tmp_path_factory.mktemp(f"vit_{granularity}")
            results = train.run(_config(fashion_data_dir, source, granularity=granularity), workdir)
            cache[granularity] = workdir, results
        return cache[granularity]

    return run


def test_vit_vpns_keeps_exactly_k_of_every_prunable_kernel(runs):
    workdir, results = runs("weight")
    assert {r["density"] for r in results} == set(DENSITIES)
    for density in DENSITIES:
        masks = unit_masks(workdir, density)
        kept, total = kept_count(masks)
        assert kept == total - int((1 - density) * total)
        # The patch embedding, q|k|v, out, both MLP layers of each block, and the head.
        assert total == 4 * 4 * 3 * 16 + 2 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16) + 16 * 10
    row = next(r for r in results if r["density"] == DENSITIES[0])
    assert 0.0 <= row["test_accuracy"] <= 1.0


def test_vit_export_rebuilds_the_model_and_its_masks(runs):
    workdir, _ = runs("weight")
    folder = workdir_files.unit_folder(pathlib.Path(workdir), DENSITIES[1])
    loaded = subnetwork.load_subnetwork(folder / "subnetwork.npz")
    assert loaded.model_options == {"image_size": 16, "vit": VIT}
    masks = array_files.load_arrays(folder / "masks.npz")
    for got, want in zip(jax.tree.leaves(loaded.masks), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(got, want)


def test_vit_channel_vpns_prunes_whole_heads_and_units(runs):
    workdir, results = runs("channel")
    groups = structured.channel_groups("vit_b_16", abstract_weights(), num_heads=2)
    total = sum(g.num_channels for g in groups)
    assert total == 2 * (2 + 32)  # per block: 2 heads and 32 MLP units
    for density in DENSITIES:
        masks = unit_masks(workdir, density)
        pruned = sum(int(np.size(m) - np.count_nonzero(m)) for m in jax.tree.leaves(masks))
        assert pruned == int((1 - density) * total)
        folder = workdir_files.unit_folder(pathlib.Path(workdir), density)
        exported = subnetwork.load_subnetwork(folder / "subnetwork.npz").weights
        for block in range(2):
            name = f"encoder_layer_{block}"
            heads = np.asarray(masks[f"encoder.layers.{name}.self_attention"])
            in_proj = np.asarray(exported["encoder"]["layers"][name]["self_attention"]["in_proj"]["kernel"])
            for head, keep in enumerate(heads):
                columns = [part * 16 + head * 8 + j for part in range(3) for j in range(8)]
                assert bool(np.any(in_proj[:, columns])) == bool(keep)
    row = next(r for r in results if r["density"] == DENSITIES[1])
    assert 0.0 <= row["test_accuracy"] <= 1.0


def abstract_weights():
    """The tiny ViT's weights dict, shapes only."""
    model = nnx.eval_shape(lambda: create_model("vit_b_16", num_classes=10, image_size=16, vit=VIT, rngs=nnx.Rngs(0)))
    return functional.split_model(model)[1]
