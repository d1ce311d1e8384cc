"""Vision Transformers: torchvision's names and counts, a numpy forward of torchvision's semantics, kinds,
bicubic position-embedding interpolation, every prompt kind, option errors and bfloat16 compute (tiny models,
no compile over ~1 s)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vpns_jax.core import masking, optim, prompts
from vpns_jax.models import CLASSIFIER_PATHS, MODEL_NAMES, create_model, functional, layers, vit

TINY = dict(patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12)
BLOCK_LEAVES = {
    ("ln_1", "scale"): (768,), ("ln_1", "bias"): (768,), ("ln_2", "scale"): (768,), ("ln_2", "bias"): (768,),
    ("self_attention", "in_proj", "kernel"): (768, 2304), ("self_attention", "in_proj", "bias"): (2304,),
    ("self_attention", "out_proj", "kernel"): (768, 768), ("self_attention", "out_proj", "bias"): (768,),
    ("mlp", 0, "kernel"): (768, 3072), ("mlp", 0, "bias"): (3072,),
    ("mlp", 3, "kernel"): (3072, 768), ("mlp", 3, "bias"): (768,),
}


def _rngs(seed: int = 0) -> nnx.Rngs:
    # rbg keys: threefry's per-shape compile costs ~1 s on a small CPU.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _flat_shapes(model: nnx.Module) -> dict[tuple[Any, ...], tuple[int, ...]]:
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(state).items()}


def _tiny(image_size: int = 8, seed: int = 0, **kwargs: Any) -> nnx.Module:
    return create_model("vit_b_16", num_classes=3, image_size=image_size, vit=TINY, rngs=_rngs(seed), **kwargs)


def _randomized(model: nnx.Module, seed: int = 1) -> tuple[nnx.GraphDef, dict, dict]:
    """The model's split with every weight random (torchvision zeroes the head and class token)."""
    graphdef, weights, batch_stats = functional.split_model(model)
    leaves, treedef = jax.tree.flatten(weights)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(0.5 * rng.standard_normal(np.shape(leaf)), np.float32) for leaf in leaves]
    return graphdef, jax.tree.unflatten(treedef, leaves), batch_stats


def test_vit_b_16_weights_dict_is_torchvisions() -> None:
    model = nnx.eval_shape(lambda: create_model("vit_b_16", num_classes=1000, rngs=nnx.Rngs(0)))
    shapes = _flat_shapes(model)
    expected = {("conv_proj", "kernel"): (16, 16, 3, 768), ("conv_proj", "bias"): (768,),
                ("class_token",): (1, 1, 768), ("encoder", "pos_embedding"): (1, 197, 768),
                ("encoder", "ln", "scale"): (768,), ("encoder", "ln", "bias"): (768,),
                ("heads", "head", "kernel"): (768, 1000), ("heads", "head", "bias"): (1000,)}
    for i in range(12):
        expected.update({("encoder", "layers", f"encoder_layer_{i}", *leaf): shape
                         for leaf, shape in BLOCK_LEAVES.items()})
    assert shapes == expected
    assert sum(math.prod(s) for s in shapes.values()) == 86_567_656  # torchvision's vit_b_16 num_params
    assert nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) == {}
    assert set(vit.VIT_NAMES) <= set(MODEL_NAMES) and CLASSIFIER_PATHS["vit_b_16"] == ("heads", "head")


@pytest.mark.parametrize(("name", "expected"), [("vit_b_32", 88_224_232), ("vit_l_16", 304_326_632)])
def test_parameter_counts_match_torchvision(name: str, expected: int) -> None:
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0)))
    assert sum(math.prod(s) for s in _flat_shapes(model).values()) == expected


def test_factories_options_and_width() -> None:
    small = nnx.eval_shape(lambda: vit.vit_b_32(num_classes=5, image_size=64, rngs=nnx.Rngs(0)))
    assert _flat_shapes(small)[("encoder", "pos_embedding")] == (1, 5, 768)
    assert vit.vit_shape("vit_l_16") == vit.ViTShape(16, 24, 16, 1024, 4096)
    # 0 or missing: the named value; width scales hidden (to a multiple of the heads, at least one each) and mlp.
    assert vit.vit_shape("vit_b_16", {"num_layers": 2, "mlp_dim": 0}) == vit.ViTShape(16, 2, 12, 768, 3072)
    assert vit.vit_shape("vit_b_16", width=0.1) == vit.ViTShape(16, 12, 12, 72, 307)
    assert vit.vit_shape("vit_b_16", TINY, width=0.1) == vit.ViTShape(4, 2, 2, 2, 1)
    assert vit.vit_shape("vit_b_16", TINY, width=1.0) == vit.ViTShape(**TINY)


def test_kinds_prunable_kernels_and_optimiser_labels() -> None:
    model = _tiny()
    kinds = traverse_util.flatten_dict(functional.leaf_kinds(model))
    block = lambda i, *leaf: ("encoder", "layers", f"encoder_layer_{i}", *leaf)  # noqa: E731
    prunable = {("conv_proj", "kernel"), ("heads", "head", "kernel")}
    for i in range(2):
        prunable |= {block(i, "self_attention", "in_proj", "kernel"), block(i, "self_attention", "out_proj", "kernel"),
                     block(i, "mlp", 0, "kernel"), block(i, "mlp", 3, "kernel")}
    assert set(masking.prunable_paths(functional.leaf_kinds(model))) == prunable
    assert kinds[("class_token",)] == kinds[("encoder", "pos_embedding")] == functional.EMBEDDING
    assert kinds[block(1, "ln_2", "scale")] == kinds[("encoder", "ln", "bias")] == functional.BN
    assert kinds[block(0, "self_attention", "in_proj", "bias")] == functional.BIAS
    _, weights, _ = functional.split_model(model)
    labels = traverse_util.flatten_dict(optim.param_labels({"weights": weights}, functional.leaf_kinds(model)))
    assert labels[("weights", "class_token")] == labels[("weights", "encoder", "pos_embedding")] == "weights"
    assert labels[("weights", *block(0, "ln_1", "scale"))] == "bn"


def _np_layer_norm(x: np.ndarray, ln: dict) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * ln["scale"] + ln["bias"]


def _np_attention(x: np.ndarray, att: dict, heads: int) -> np.ndarray:
    """torch MultiheadAttention: rows of in_proj_weight (here columns) q | k | v, head h on dims h*dh:(h+1)*dh."""
    q, k, v = np.split(x @ att["in_proj"]["kernel"] + att["in_proj"]["bias"], 3, axis=-1)
    dh = x.shape[-1] // heads
    outs = []
    for h in range(heads):
        part = slice(h * dh, (h + 1) * dh)
        scores = q[..., part] @ np.swapaxes(k[..., part], -1, -2) / math.sqrt(dh)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        outs.append(weights / weights.sum(-1, keepdims=True) @ v[..., part])
    return np.concatenate(outs, -1) @ att["out_proj"]["kernel"] + att["out_proj"]["bias"]


def _np_vit(w: dict, images_nchw: np.ndarray, patch: int, heads: int) -> np.ndarray:
    """torchvision's VisionTransformer.forward in float64 numpy, on NCHW images."""
    from scipy.special import erf

    n, _, side, _ = images_nchw.shape
    g = side // patch
    kernel = np.transpose(w["conv_proj"]["kernel"], (3, 2, 0, 1))  # OIHW
    cells = images_nchw.reshape(n, 3, g, patch, g, patch)
    x = np.einsum("ncipjq,dcpq->ndij", cells, kernel) + w["conv_proj"]["bias"][:, None, None]
    x = x.reshape(n, -1, g * g).transpose(0, 2, 1)  # (n, D, h*w) permuted: row-major patches
    x = np.concatenate([np.broadcast_to(w["class_token"], (n, 1, x.shape[-1])), x], 1) + w["encoder"]["pos_embedding"]
    for i in range(len(w["encoder"]["layers"])):
        block = w["encoder"]["layers"][f"encoder_layer_{i}"]
        x = x + _np_attention(_np_layer_norm(x, block["ln_1"]), block["self_attention"], heads)
        y = _np_layer_norm(x, block["ln_2"]) @ block["mlp"][0]["kernel"] + block["mlp"][0]["bias"]
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        x = x + y @ block["mlp"][3]["kernel"] + block["mlp"][3]["bias"]
    return _np_layer_norm(x, w["encoder"]["ln"])[:, 0] @ w["heads"]["head"]["kernel"] + w["heads"]["head"]["bias"]


def test_forward_matches_a_numpy_torchvision_forward_in_eval_and_train() -> None:
    graphdef, weights, batch_stats = _randomized(_tiny())
    images = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = _np_vit(jax.tree.map(lambda a: np.asarray(a, np.float64), weights), images.astype(np.float64), 4, 2)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    ours, stats = functional.apply_model(graphdef, weights, batch_stats, nhwc, train=False)
    assert ours.dtype == jnp.float32 and stats == {}
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=2e-5)
    trained, stats = functional.apply_model(graphdef, weights, batch_stats, nhwc, train=True,
                                            dropout_key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(trained), np.asarray(ours))  # dropout rates 0: the same function
    assert stats == {}


def test_attention_over_one_token_is_the_value_projection() -> None:
    attention = vit.MultiheadSelfAttention(6, 3, rngs=_rngs())
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 1, 6)), jnp.float32)
    kernel, bias = attention.in_proj.kernel[...], attention.in_proj.bias[...]
    v = x @ kernel[:, 12:] + bias[12:]  # the third block of columns: torch's v rows
    expected = v @ attention.out_proj.kernel[...] + attention.out_proj.bias[...]
    np.testing.assert_allclose(np.asarray(attention(x)), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_blocks_with_zero_outputs_leave_the_class_token_path() -> None:
    """With every block's out_proj and mlp.3 zeroed the blocks are identities: the logits are the head of
    ln(class_token + pos_embedding[0]), whatever the image."""
    graphdef, weights, batch_stats = _randomized(_tiny())
    for block in weights["encoder"]["layers"].values():
        for leaf in (block["self_attention"]["out_proj"], block["mlp"][3]):
            leaf["kernel"], leaf["bias"] = np.zeros_like(leaf["kernel"]), np.zeros_like(leaf["bias"])
    token = weights["class_token"][0, 0] + weights["encoder"]["pos_embedding"][0, 0]
    head = weights["heads"]["head"]
    expected = _np_layer_norm(token.astype(np.float64), weights["encoder"]["ln"]) @ head["kernel"] + head["bias"]
    images = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 8, 3)), jnp.float32)
    logits, _ = functional.apply_model(graphdef, weights, batch_stats, images, train=False)
    np.testing.assert_allclose(np.asarray(logits), np.broadcast_to(expected, (2, 3)), rtol=0, atol=1e-5)


def test_layer_norm_is_torchs_and_computes_in_float32() -> None:
    norm = layers.LayerNorm(5, eps=1e-6)
    norm.scale.set_value(jnp.arange(1.0, 6.0))
    norm.bias.set_value(jnp.full((5,), 0.5))
    x = np.random.default_rng(5).standard_normal((3, 2, 5)).astype(np.float32) * 4 + 1
    expected = _np_layer_norm(x.astype(np.float64), {"scale": np.arange(1.0, 6.0), "bias": 0.5})
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
    low = norm(jnp.asarray(x, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), expected, rtol=0.05, atol=0.1)


def test_interpolation_is_the_identity_on_the_same_grid() -> None:
    pos = np.random.default_rng(6).standard_normal((1, 10, 4)).astype(np.float32)
    assert vit.interpolate_pos_embedding(pos, 3) is pos
    np.testing.assert_array_equal(vit.bicubic_matrix(5, 5), np.eye(5))


def test_interpolation_by_hand_2x2_to_3x3_and_a_cubic_tap() -> None:
    # align_corners=True: outputs sample 0, 0.5, 1; at 0.5 the taps (-1, 0, 1, 2) weigh (-3/32, 19/32, 19/32,
    # -3/32) for A = -0.75, and the border clamp folds taps -1 and 2 onto 0 and 1: the plain midpoint.
    a, b, c, d = 1.0, 2.0, 5.0, 11.0
    pos = np.array([[[7.0], [a], [b], [c], [d]]], np.float32)
    expected = np.array([[a, (a + b) / 2, b], [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2],
                         [c, (c + d) / 2, d]], np.float32)
    out = vit.interpolate_pos_embedding(pos, 3)
    assert out.shape == (1, 10, 1) and out.dtype == np.float32 and out[0, 0, 0] == 7.0
    np.testing.assert_array_equal(out[0, 1:, 0].reshape(3, 3), expected)
    # 4 -> 3 samples 0, 1.5, 3: the middle output takes all four taps unclamped.
    np.testing.assert_array_equal(vit.bicubic_matrix(4, 3)[1], [-3 / 32, 19 / 32, 19 / 32, -3 / 32])
    delta = np.zeros((1, 17, 2), np.float32)
    delta[0, 1 + 1 * 4 + 1] = 1.0  # grid cell (1, 1) of 4x4
    resized = np.asarray(vit.interpolate_pos_embedding(jnp.asarray(delta), 3))
    np.testing.assert_allclose(resized[0, 1 + 1 * 3 + 1], [(19 / 32) ** 2] * 2, rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(1, 11, 2\) is not \(1, 1 \+ g\*g, D\)"):
        vit.interpolate_pos_embedding(np.zeros((1, 11, 2)), 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(name="resnet18", vit={"num_layers": 2}),
     "model.vit options apply only to ViT models (vit_b_16, vit_b_32, vit_l_16), got resnet18"),
    (dict(name="vgg16", image_size=32), "model.image_size applies only to ViT models (vit_b_16, vit_b_32, "
                                        "vit_l_16), got vgg16"),
    (dict(vit={**TINY, "hidden_dim": 9}), "vit_b_16: hidden_dim 9 is not divisible by num_heads 2"),
    (dict(image_size=10), "model.image_size 10 is not divisible by vit_b_16's patch size 4"),
    (dict(stem="cifar"), "vit_b_16 supports only stem 'imagenet', got 'cifar'"),
    (dict(vit={**TINY, "num_layers": -1}), "model.vit.num_layers must be a positive integer (0: vit_b_16's 12)"),
    (dict(vit={**TINY, "patch_size": 2.5}), "model.vit.patch_size must be a positive integer"),
    (dict(vit={**TINY, "depth": 3}), "unknown model.vit option(s) ['depth'] for vit_b_16"),
    (dict(image_size=0), "model.image_size must be a positive integer for vit_b_16, got 0"),
    (dict(width=0.0), "vit_b_16: width must be > 0, got 0.0"),
])
def test_bad_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    options = {"name": "vit_b_16", "vit": TINY, "image_size": 8, **kwargs}
    if options["name"] != "vit_b_16":
        options = {k: v for k, v in options.items() if k in ("name", *kwargs)}
    with pytest.raises(ValueError) as info:
        nnx.eval_shape(lambda: create_model(options.pop("name"), num_classes=3, rngs=nnx.Rngs(0), **options))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cnns_accept_an_all_zero_vit_dict_and_wrong_image_sides_are_refused() -> None:
    nnx.eval_shape(lambda: create_model("resnet18", num_classes=3, vit={"num_layers": 0}, rngs=nnx.Rngs(0)))
    graphdef, weights, batch_stats = functional.split_model(nnx.eval_shape(_tiny))
    with pytest.raises(ValueError, match=r"NHWC images of 8x8 px .* got input shape \(1, 12, 12, 3\)"):
        jax.eval_shape(lambda w: functional.apply_model(graphdef, w, batch_stats, jnp.zeros((1, 12, 12, 3)),
                                                        train=False), weights)


def test_bfloat16_compute_keeps_float32_parameters_and_logits() -> None:
    graphdef32, weights, batch_stats = _randomized(_tiny())
    graphdef16, weights16, _ = functional.split_model(_tiny(dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(weights16)} == {jnp.dtype(jnp.float32)}
    images = jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, 8, 3)), jnp.float32)
    logits = lambda graphdef, w, train=False: functional.apply_model(  # noqa: E731
        graphdef, w, batch_stats, images, train=train)[0]
    low, full = jax.jit(logits, static_argnums=0)(graphdef16, weights), logits(graphdef32, weights)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), np.asarray(full), rtol=0, atol=0.15 * float(jnp.abs(full).max()))
    # Matmuls run in bfloat16; the attention scores leave their dot in float32 for the softmax.
    jaxpr = str(jax.make_jaxpr(lambda w: logits(graphdef16, w))(weights))
    assert "bf16[2,5,24]" in jaxpr and "f32[2,2,5,5]" in jaxpr
    grads = jax.jit(jax.grad(lambda w: logits(graphdef16, w, True).sum()))(weights)
    assert grads["encoder"]["pos_embedding"].dtype == jnp.float32 and float(jnp.abs(grads["class_token"]).sum()) > 0


@pytest.mark.parametrize("kind, input_size", [("pad", 8), ("fix", 8), ("random", 8), ("expand", 6)])
def test_every_prompt_kind_feeds_a_vit_and_trains_only_its_own_pixels(kind: str, input_size: int) -> None:
    """The prompt is the CNNs' one: the prompted image has the ViT's side, and the gradient of the logits
    reaches exactly the pixels of the prompt's mask, under jit."""
    graphdef, weights, batch_stats = _randomized(_tiny())
    spec = prompts.PromptSpec(kind=kind, input_size=input_size, output_size=8, pad_size=2, mask_size=3)
    key = jax.random.key(5)
    rng = np.random.default_rng(8)
    # Images and program inside (0, 1) after the sum, so that the clamp passes every gradient through.
    images = jnp.asarray(rng.uniform(0.3, 0.6, (2, input_size, input_size, 3)), jnp.float32)
    program = jnp.asarray(rng.uniform(-0.2, 0.2, (8, 8, 3)) if kind == "pad" else rng.normal(-3, 0.1, (8, 8, 3)),
                          jnp.float32)

    @jax.jit
    def logit_sum(program):
        x = prompts.apply_prompt(spec, {"program": program}, images, key=key)
        logits, _ = functional.apply_model(graphdef, weights, batch_stats, x, train=False)
        return logits.sum(), logits

    (_, logits), grad = jax.value_and_grad(logit_sum, has_aux=True)(program)
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()
    touched = np.asarray(grad != 0).any(axis=-1)
    mask = np.asarray(prompts.prompt_mask(spec, key))[..., 0] == 1
    np.testing.assert_array_equal(touched, mask)
    expected = {"pad": 64 - 16, "fix": 9, "random": 9, "expand": 64 - 36}[kind]
    assert mask.sum() == expected
