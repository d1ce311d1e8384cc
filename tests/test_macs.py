"""MACs counter: hand counts, torchvision's ResNet-18 and ViT figures, the drop from masking channels, bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vpns_jax.core import structured
from vpns_jax.models import macs
from vpns_jax.models import create_model, functional, layers


def _ones_network(name: str, width: float, num_classes: int):
    """(graphdef, weights, batch_stats) with every entry 1: nnz = size, and nothing is compiled."""
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, width=width, rngs=nnx.Rngs(0)))
    graphdef, weights, batch_stats = functional.split_model(abstract)
    ones = lambda tree: jax.tree.map(lambda s: np.ones(s.shape, np.float32), tree)  # noqa: E731
    return graphdef, ones(weights), ones(batch_stats)


def test_hand_count_on_a_tiny_resnet18():
    # Width 1/16: stage widths 4, 8, 16, 32; ImageNet stem at 64 px, 10 classes.
    graphdef, weights, batch_stats = _ones_network("resnet18", 1 / 16, 10)
    report = macs.count_macs(graphdef, weights, batch_stats, 64)
    rows = {layer.name: layer for layer in report.layers}
    # Stem: 7*7*3*4 = 588 weights, stride 2 -> 32x32 outputs.
    assert rows["conv1"].output_positions == 32 * 32 and rows["conv1"].macs == 588 * 1024 == 602_112
    # After the 3x3/2 max-pool, layer1 runs at 16x16: 3*3*4*4 = 144 weights.
    assert rows["layer1.0.conv1"].macs == 144 * 256 == 36_864
    # layer3 at 4x4: conv1 3*3*8*16 = 1152 weights, the 1x1 downsample 8*16 = 128.
    assert rows["layer3.0.conv1"].macs == 1152 * 16
    assert rows["layer3.0.downsample.0"].macs == 128 * 16 == 2_048
    assert rows["fc"].kind == "dense" and rows["fc"].macs == 32 * 10
    # Per later stage: conv1 18,432 + three 3x3 convs 36,864 each + downsample 2,048 = 131,072.
    assert report.total == 602_112 + 4 * 36_864 + 3 * 131_072 + 320 == 1_143_104
    assert report.dense_total == report.total and report.speedup == 1.0


def test_dense_resnet18_matches_torchvision_and_channel_masks_lower_it_by_hand():
    graphdef, weights, batch_stats = _ones_network("resnet18", 1.0, 1000)
    report = macs.count_macs(graphdef, weights, batch_stats, 224)
    # torchvision's 1.82 GMACs: stem 118,013,952 + layer1 4 * 115,605,504
    # + 3 later stages * (57,802,752 + 3 * 115,605,504 + 6,422,528) + fc 512,000.
    assert report.total == 1_814_073_344
    assert "1,814.07 MMACs" in report.format()

    groups = structured.channel_groups("resnet18", weights)
    masks = {g.name: jnp.ones(g.num_channels) for g in groups}
    masks["layer2.0.conv1"] = jnp.asarray(np.arange(128) < 64, jnp.float32)
    masked = structured.apply_channel_masks(weights, groups, masks)
    pruned = macs.count_macs(graphdef, masked, batch_stats, 224)
    # Half of layer2.0.conv1's 128 outputs go (3*3*64*64 weights at 28x28) and so do half of
    # layer2.0.conv2's inputs (3*3*64*128 weights at 28x28): 28,901,376 + 57,802,752.
    assert report.total - pruned.total == 86_704_128
    assert pruned.dense_total == report.total
    assert pruned.speedup == pytest.approx(1_814_073_344 / (1_814_073_344 - 86_704_128))

    # Unstructured zeros count too: 100 stem entries at 112x112 outputs.
    weights["conv1"]["kernel"].reshape(-1)[:100] = 0.0
    assert report.total - macs.count_macs(graphdef, weights, batch_stats, 224).total == 100 * 112 * 112


def test_convs_on_tiny_maps_count_the_same_through_im2col(monkeypatch):
    # At 32 px the ImageNet stem leaves 2 and 1 px maps, whose 3x3 convs run as im2col matmuls.
    model = create_model("resnet18", num_classes=10, width=1 / 16, rngs=nnx.Rngs(0))
    graphdef, weights, batch_stats = functional.split_model(model)

    def convs_traced() -> int:
        forward = lambda w: functional.apply_model(graphdef, w, batch_stats, jnp.zeros((1, 32, 32, 3)), train=False)
        return str(jax.make_jaxpr(forward)(weights)).count("conv_general_dilated")

    through_im2col, im2col_convs = macs.count_macs(graphdef, weights, batch_stats, 32), convs_traced()
    monkeypatch.setattr(layers, "runs_as_im2col", lambda map_size, kernel_size: False)
    as_convs, plain_convs = macs.count_macs(graphdef, weights, batch_stats, 32), convs_traced()
    assert plain_convs == 20 and im2col_convs < plain_convs
    assert [(lm.name, lm.kind, lm.output_positions, lm.nnz) for lm in through_im2col.layers] == [
        (lm.name, lm.kind, lm.output_positions, lm.nnz) for lm in as_convs.layers
    ]
    assert through_im2col.total == as_convs.total


def test_bfloat16_compute_counts_the_same():
    """A bfloat16 model casts each kernel before its conv or dot: still that kernel's use."""
    graphdef, weights, batch_stats = _ones_network("resnet18", 1 / 16, 10)
    abstract = nnx.eval_shape(lambda: create_model("resnet18", num_classes=10, width=1 / 16, rngs=nnx.Rngs(0),
                                                   dtype="bfloat16"))
    low = macs.count_macs(functional.split_model(abstract)[0], weights, batch_stats, 64)
    assert low.layers == macs.count_macs(graphdef, weights, batch_stats, 64).layers and low.total == 1_143_104


def _vit_network(name: str, fill: float, **kwargs):
    abstract = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))
    graphdef, weights, batch_stats = functional.split_model(abstract)
    # np.zeros stays unwritten (lazy pages): vit_b_16's 86M zeros cost no memory until counted.
    make = (lambda s: np.zeros(s.shape, np.float32)) if fill == 0 else (lambda s: np.full(s.shape, fill, np.float32))
    return graphdef, jax.tree.map(make, weights), batch_stats


def test_hand_count_on_a_tiny_vit_with_its_attention_matmuls():
    vit = dict(patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12)
    graphdef, weights, batch_stats = _vit_network("vit_b_16", 1.0, num_classes=3, image_size=8, vit=vit)
    report = macs.count_macs(graphdef, weights, batch_stats, 8)
    rows = {layer.name: layer for layer in report.layers}
    block = "encoder.layers.encoder_layer_1."
    # 4 patches of 4*4*3 weights per output; 5 tokens (class token first) through every dense layer.
    assert (rows["conv_proj"].kind, rows["conv_proj"].output_positions, rows["conv_proj"].macs) == ("conv", 4, 1536)
    assert (rows[block + "self_attention.in_proj"].output_positions, rows[block + "self_attention.in_proj"].macs) \
        == (5, 8 * 24 * 5)
    # q k^T: 2 heads x 5 x 5 scores of 4 products each; weights @ v: 5 tokens x 2 heads x 4 dims of 5 each.
    scores, mixed = rows[block + "self_attention.matmul0"], rows[block + "self_attention.matmul1"]
    assert (scores.kind, scores.output_positions, scores.nnz, scores.macs) == ("matmul", 50, 4, 200)
    assert (mixed.output_positions, mixed.nnz, mixed.macs) == (40, 5, 200)
    assert rows[block + "mlp.3"].macs == 12 * 8 * 5 and rows["heads.head"].macs == 24
    assert report.total == 1536 + 2 * (960 + 200 + 200 + 320 + 480 + 480) + 24 == 6840

    # Masks lower the kernels' share only: zeroed weights leave the activation products.
    zeros = jax.tree.map(np.zeros_like, weights)
    pruned = macs.count_macs(graphdef, zeros, batch_stats, 8)
    assert pruned.total == 2 * 400 and pruned.dense_total == 6840


def test_dense_vit_b_16_and_b_32_match_torchvision():
    # torchvision's published GFLOPS: 17.564 (vit_b_16) and 4.409 (vit_b_32) at 224 px, attention matmuls in.
    for name, expected in (("vit_b_16", 17_563_828_224), ("vit_b_32", 4_409_186_304)):
        graphdef, weights, batch_stats = _vit_network(name, 0.0, num_classes=1000)
        report = macs.count_macs(graphdef, weights, batch_stats, 224)
        assert report.dense_total == expected and round(expected / 1e9, 3) in (17.564, 4.409)
