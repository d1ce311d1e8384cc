"""Tests for vpns_jax.core.prompts: masks, padding, clamp gradient, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpns_jax.core import prompts
from vpns_jax.core.prompts import PromptSpec
from vpns_jax.data import pipeline

MEAN = np.array(prompts.IMAGENET_MEAN, np.float32)
STD = np.array(prompts.IMAGENET_STD, np.float32)


def _images(shape, low=0.0, high=1.0, seed=0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _frame(size, pad):
    frame = np.ones((size, size), bool)
    frame[pad : size - pad, pad : size - pad] = False
    return frame


def _location(mask):
    """(row, col) of the top-left corner of the ones in an (H, W, 1) mask."""
    mask = np.asarray(mask)[..., 0]
    return int(np.argmax(mask.any(axis=1))), int(np.argmax(mask.any(axis=0)))


# ----------------------------------------------------------------- pad prompt


def test_pad_prompt_changes_only_the_frame():
    spec = PromptSpec(kind="pad", input_size=32, output_size=32, pad_size=4)
    images = _images((2, 32, 32, 3))
    program = np.random.default_rng(1).normal(0.0, 0.3, (32, 32, 3)).astype(np.float32)
    out = np.asarray(prompts.apply_prompt(spec, {"program": jnp.asarray(program)}, images))
    plain = np.asarray(prompts.normalize(images))
    frame = _frame(32, 4)
    assert out.shape == (2, 32, 32, 3)
    # Inside the frame the image passes untouched: bit-identical to normalize().
    np.testing.assert_array_equal(out[:, 4:28, 4:28], plain[:, 4:28, 4:28])
    assert np.all(out[:, frame] != plain[:, frame])
    # Frame: normalize(clip(x + P)) with the raw program (no sigmoid).
    expected = (np.clip(images + program, 0.0, 1.0) - MEAN) / STD
    np.testing.assert_allclose(out[:, frame], expected[:, frame], rtol=1e-6, atol=1e-6)


def test_zero_pad_prompt_is_plain_normalisation():
    spec = PromptSpec(kind="pad", input_size=32, output_size=32, pad_size=4)
    images = _images((3, 32, 32, 3))
    images[0, 0, 0] = [0.0, 1.0, 0.5]  # exact boundary values survive the clamp
    out = prompts.apply_prompt(spec, prompts.init_prompt(spec), images)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(prompts.normalize(images)))
    np.testing.assert_allclose(
        np.asarray(prompts.normalize(images)), (images - MEAN) / STD, rtol=1e-6, atol=1e-6
    )


def test_pad_all_ones_mask_when_pad_is_half_the_output():
    spec = PromptSpec(kind="pad", input_size=8, output_size=8, pad_size=4)
    np.testing.assert_array_equal(np.asarray(prompts.prompt_mask(spec)), np.ones((8, 8, 1)))


def test_init_prompt_is_full_size_zeros_for_every_kind():
    for kind in prompts.PROMPT_TYPES:
        prompt = prompts.init_prompt(PromptSpec(kind=kind, input_size=24, output_size=32, mask_size=10))
        assert prompt["program"].shape == (32, 32, 3)
        assert prompt["program"].dtype == jnp.float32
        assert not np.any(np.asarray(prompt["program"]))


# ------------------------------------------------------- parameter counts


def test_num_prompt_parameters_default_pad():
    # 3 * (4*16*224 - 4*16*16) = 3 * (14336 - 1024) = 39936, the paper's count.
    assert prompts.num_prompt_parameters(PromptSpec()) == 39936


@pytest.mark.parametrize(
    "spec, expected",
    [
        (PromptSpec(kind="pad", input_size=32, output_size=32, pad_size=4), 3 * (32 * 32 - 24 * 24)),
        (PromptSpec(kind="pad", input_size=8, output_size=8, pad_size=4), 3 * 64),
        (PromptSpec(kind="fix", input_size=32, output_size=32, mask_size=10), 300),
        (PromptSpec(kind="random", input_size=32, output_size=32, mask_size=10), 300),
        (PromptSpec(kind="expand", input_size=24, output_size=32), 3 * (1024 - 576)),
        (PromptSpec(kind="expand", input_size=23, output_size=32), 3 * (1024 - 529)),
        (PromptSpec(kind="fix"), 3 * 115 * 115),
    ],
)
def test_num_prompt_parameters_matches_mask(spec, expected):
    mask = prompts.prompt_mask(spec, jax.random.key(3))
    assert mask.shape == (spec.output_size, spec.output_size, 1)
    assert mask.dtype == jnp.float32
    assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
    assert prompts.num_prompt_parameters(spec) == expected
    assert int(np.asarray(mask).sum()) * 3 == expected


# --------------------------------------------------- zero padding and resize


def test_image_placed_at_torch_pad_offset():
    # l_pad = int((32 - 24 + 1) / 2) = 4, r_pad = int((32 - 24) / 2) = 4.
    spec = PromptSpec(kind="pad", input_size=24, output_size=32, pad_size=4)
    assert spec.pads == (4, 4)
    images = _images((2, 24, 24, 3), low=0.1, high=1.0)
    out = np.asarray(prompts.apply_prompt(spec, prompts.init_prompt(spec), images))
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(out[:, 4:28, 4:28], np.asarray(prompts.normalize(images)))
    border = np.ones((32, 32), bool)
    border[4:28, 4:28] = False
    zero = np.asarray(prompts.normalize(jnp.zeros((3,), jnp.float32)))
    np.testing.assert_allclose(zero, -MEAN / STD, rtol=1e-6)
    np.testing.assert_array_equal(out[:, border], np.broadcast_to(zero, out[:, border].shape))


def test_odd_padding_puts_the_extra_pixel_before():
    # out - in = 9: l_pad = int(10 / 2) = 5, r_pad = int(9 / 2) = 4 (torch F.pad split).
    spec = PromptSpec(kind="pad", input_size=23, output_size=32, pad_size=2)
    assert spec.pads == (5, 4)
    images = _images((1, 23, 23, 3), low=0.1, high=1.0)
    out = np.asarray(prompts.apply_prompt(spec, prompts.init_prompt(spec), images))
    np.testing.assert_array_equal(out[:, 5:28, 5:28], np.asarray(prompts.normalize(images)))
    zero = -MEAN / STD
    np.testing.assert_allclose(out[0, 4, 10], zero, rtol=1e-6)  # last padded row before
    np.testing.assert_allclose(out[0, 28, 10], zero, rtol=1e-6)  # first padded row after
    np.testing.assert_allclose(out[0, 10, 4], zero, rtol=1e-6)
    np.testing.assert_allclose(out[0, 10, 28], zero, rtol=1e-6)


def test_apply_prompt_resizes_to_input_size():
    spec = PromptSpec(kind="pad", input_size=24, output_size=32, pad_size=4)
    images = np.full((2, 16, 16, 3), 0.3, np.float32)
    out = np.asarray(prompts.apply_prompt(spec, prompts.init_prompt(spec), images))
    assert out.shape == (2, 32, 32, 3)
    # A constant image stays constant under the normalised bilinear filter.
    np.testing.assert_allclose(out[:, 4:28, 4:28], np.broadcast_to((0.3 - MEAN) / STD, (2, 24, 24, 3)), rtol=1e-5)
    np.testing.assert_allclose(out[:, 0, 0], np.broadcast_to(-MEAN / STD, (2, 3)), rtol=1e-6)


def test_resize_downsample_matches_pil_bilinear_weights():
    # Shrinking 8 -> 4 widens the triangle to radius 2: output i samples at 2i + 0.5
    # with weights 1/4, 3/4, 3/4, 1/4 on pixels 2i-1 .. 2i+2, renormalised where a
    # tap falls off the image (PIL's BILINEAR). Row values v = 0..7:
    #   i = 0: (0.75*0 + 0.75*1 + 0.25*2) / 1.75 = 1.25 / 1.75
    #   i = 1: (0.25*1 + 0.75*2 + 0.75*3 + 0.25*4) / 2 = 2.5
    #   i = 2: (0.25*3 + 0.75*4 + 0.75*5 + 0.25*6) / 2 = 4.5
    #   i = 3: (0.25*5 + 0.75*6 + 0.75*7) / 1.75 = 11 / 1.75
    ramp = np.arange(8, dtype=np.float32)
    images = np.broadcast_to(ramp[None, :, None, None], (1, 8, 8, 3)).copy()  # varies along H
    out = np.asarray(prompts.resize_images(images, 4))
    expected = np.array([1.25 / 1.75, 2.5, 4.5, 11 / 1.75], np.float32)
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 3, 2], expected, rtol=1e-6)  # constant along W


def test_resize_upsample_is_half_pixel_bilinear():
    # Growing 4 -> 8: output i samples at i/2 - 0.25. i = 0 falls before pixel 0's
    # centre and only pixel 0 is in range (weight renormalised to 1), as in PIL.
    #   i = 0: v0 = 0;  i = 1: 0.75*v0 + 0.25*v1 = 0.25;  i = 2: 0.25*v0 + 0.75*v1 = 0.75
    #   i = 7: v3 = 3
    ramp = np.arange(4, dtype=np.float32)
    images = np.broadcast_to(ramp[None, None, :, None], (1, 4, 4, 3)).copy()  # varies along W
    out = np.asarray(prompts.resize_images(images, 8))
    np.testing.assert_allclose(
        out[0, 0, :, 1], [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0], rtol=1e-6, atol=1e-6
    )


# ----------------------------------------------------------- clamp gradient


def test_clamp_unit_values_and_gradient_include_boundaries():
    x = jnp.array([-0.1, 0.0, 0.5, 1.0, 1.1], jnp.float32)
    np.testing.assert_array_equal(np.asarray(prompts.clamp_unit(x)), [0.0, 0.0, 0.5, 1.0, 1.0])
    grad = jax.grad(lambda v: prompts.clamp_unit(v).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 1.0, 1.0, 1.0, 0.0])
    grad_jit = jax.jit(jax.grad(lambda v: prompts.clamp_unit(v).sum()))(x)
    np.testing.assert_array_equal(np.asarray(grad_jit), [0.0, 1.0, 1.0, 1.0, 0.0])


def test_pad_prompt_gradient_on_black_image():
    # Zero program over black pixels puts every frame entry exactly on the clamp's
    # lower boundary; the torch-style clamp must still pass the gradient there.
    spec = PromptSpec(kind="pad", input_size=32, output_size=32, pad_size=4)
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)

    def loss(program):
        return prompts.apply_prompt(spec, {"program": program}, images).sum()

    grad = np.asarray(jax.grad(loss)(prompts.init_prompt(spec)["program"]))
    frame = _frame(32, 4)
    # d/dP sum_b (clamp(0 + P) - mean) / std = batch / std on every frame entry.
    np.testing.assert_allclose(grad[frame], np.broadcast_to(2.0 / STD, grad[frame].shape), rtol=1e-6)
    np.testing.assert_array_equal(grad[~frame], 0.0)


def test_saturated_pixels_get_no_prompt_gradient():
    spec = PromptSpec(kind="pad", input_size=8, output_size=8, pad_size=2)
    images = jnp.ones((1, 8, 8, 3), jnp.float32)
    program = jnp.full((8, 8, 3), 0.2, jnp.float32)  # 1 + 0.2 > 1: clamped

    def loss(p):
        return prompts.apply_prompt(spec, {"program": p}, images).sum()

    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(program)), 0.0)


# ------------------------------------------------- fix, random and expand


def test_fix_zero_program_adds_half_in_top_left_square():
    spec = PromptSpec(kind="fix", input_size=32, output_size=32, mask_size=10)
    images = _images((2, 32, 32, 3), high=0.5)  # x + 0.5 <= 1: no clamping
    out = np.asarray(prompts.apply_prompt(spec, prompts.init_prompt(spec), images))
    square = np.zeros((32, 32), bool)
    square[:10, :10] = True
    np.testing.assert_allclose(out[:, square] * STD + MEAN, images[:, square] + 0.5, atol=1e-6)
    np.testing.assert_array_equal(out[:, ~square], np.asarray(prompts.normalize(images))[:, ~square])


def test_random_location_depends_on_key_only():
    spec = PromptSpec(kind="random", input_size=32, output_size=32, mask_size=10)
    mask_a = np.asarray(prompts.prompt_mask(spec, jax.random.key(0)))
    mask_a2 = np.asarray(prompts.prompt_mask(spec, jax.random.key(0)))
    mask_b = np.asarray(prompts.prompt_mask(spec, jax.random.key(1)))
    np.testing.assert_array_equal(mask_a, mask_a2)
    loc_a, loc_b = _location(mask_a), _location(mask_b)
    assert loc_a != loc_b
    for mask, (row, col) in ((mask_a, loc_a), (mask_b, loc_b)):
        square = np.zeros((32, 32, 1), np.float32)
        square[row : row + 10, col : col + 10] = 1.0
        np.testing.assert_array_equal(mask, square)  # exactly one 10x10 square


def test_random_offsets_cover_exactly_the_reference_range():
    # out 8, mask 5: offsets drawn from [0, 3), so 0, 1 and 2 occur and 3 never does.
    spec = PromptSpec(kind="random", input_size=8, output_size=8, mask_size=5)
    keys = jax.random.split(jax.random.key(42), 300)
    masks = np.asarray(jax.vmap(lambda k: prompts.prompt_mask(spec, k))(keys))
    rows, cols = zip(*(_location(m) for m in masks))
    assert set(rows) == {0, 1, 2}
    assert set(cols) == {0, 1, 2}
    assert np.all(masks.reshape(300, -1).sum(axis=1) == 25)


def test_random_prompt_apply_uses_key_and_requires_it():
    spec = PromptSpec(kind="random", input_size=32, output_size=32, mask_size=10)
    images = _images((2, 32, 32, 3), high=0.5)
    key = jax.random.key(7)
    apply = jax.jit(prompts.apply_prompt, static_argnums=0)
    out = np.asarray(apply(spec, prompts.init_prompt(spec), images, key=key))
    mask = np.asarray(prompts.prompt_mask(spec, key))
    expected = (images + 0.5 * mask - MEAN) / STD  # one location for the whole batch
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        prompts.apply_prompt(spec, prompts.init_prompt(spec), images)


@pytest.mark.parametrize("input_size, before", [(24, 4), (23, 5)])
def test_expand_mask_is_the_zero_border(input_size, before):
    spec = PromptSpec(kind="expand", input_size=input_size, output_size=32)
    mask = np.asarray(prompts.prompt_mask(spec))[..., 0]
    placed = np.zeros((32, 32), np.float32)
    placed[before : before + input_size, before : before + input_size] = 1.0
    np.testing.assert_array_equal(mask, 1.0 - placed)
    # Zero program: the border shows sigmoid(0) = 0.5, the image is untouched.
    images = _images((1, input_size, input_size, 3))
    out = np.asarray(prompts.apply_prompt(spec, prompts.init_prompt(spec), images))
    inner = out[:, before : before + input_size, before : before + input_size]
    np.testing.assert_array_equal(inner, np.asarray(prompts.normalize(images)))
    border = out[:, placed == 0]
    np.testing.assert_allclose(border, np.broadcast_to((0.5 - MEAN) / STD, border.shape), rtol=1e-6)


# ------------------------------------------------------ spec and jit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="frame"), "kind='frame'"),
        (dict(input_size=0), "input_size=0"),
        (dict(output_size=-1, input_size=1), "output_size=-1"),
        (dict(pad_size=0), "pad_size=0"),
        (dict(kind="fix", mask_size=0), "mask_size=0"),
        (dict(input_size=2.5), "input_size=2.5"),
        (dict(input_size=40, output_size=32), "input_size=40 exceeds output_size=32"),
        (dict(kind="pad", output_size=32, input_size=32, pad_size=17), "pad should not exceed half"),
        (dict(kind="fix", output_size=32, input_size=32, mask_size=33), "mask_size=33 exceeds"),
        (dict(kind="random", output_size=32, input_size=32, mask_size=32), "mask_size=32 must be < output_size=32"),
    ],
)
def test_prompt_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptSpec(**kwargs)


def test_prompt_spec_accepts_limits_and_is_hashable():
    PromptSpec(kind="pad", input_size=32, output_size=32, pad_size=16)
    PromptSpec(kind="fix", input_size=32, output_size=32, mask_size=32)
    PromptSpec(kind="random", input_size=32, output_size=32, mask_size=31)
    spec = PromptSpec(input_size=np.int64(224))
    assert spec == PromptSpec() and hash(spec) == hash(PromptSpec())
    assert type(spec.input_size) is int


def test_apply_prompt_jit_matches_eager():
    spec = PromptSpec(kind="pad", input_size=24, output_size=32, pad_size=4)
    images = _images((2, 24, 24, 3))
    prompt = {"program": jnp.asarray(np.random.default_rng(2).normal(0, 0.3, (32, 32, 3)), jnp.float32)}
    eager = prompts.apply_prompt(spec, prompt, images)
    jitted = jax.jit(prompts.apply_prompt, static_argnames="spec")(spec, prompt, images)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_model_inputs_choose_between_prompt_and_plain_normalisation():
    spec = prompts.PromptSpec("pad", input_size=24, output_size=32, pad_size=4)
    images = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 24, 24, 3)), jnp.float32)
    program = {"program": jnp.full((32, 32, 3), 0.25, jnp.float32)}
    plain = prompts.model_inputs(spec, program, images, prompted=False)
    # Plain: no padding, no prompt, only normalisation at the input size.
    np.testing.assert_array_equal(plain, prompts.normalize(images))
    prompted = prompts.model_inputs(spec, program, images, prompted=True)
    np.testing.assert_array_equal(prompted, prompts.apply_prompt(spec, program, images))
    assert prompted.shape == (2, 32, 32, 3)
    # Images at another size are resized to input_size first in both cases.
    big = jnp.asarray(np.random.default_rng(6).uniform(size=(2, 48, 48, 3)), jnp.float32)
    np.testing.assert_allclose(prompts.model_inputs(spec, program, big, prompted=False),
                               prompts.normalize(prompts.resize_images(big, 24)), rtol=0, atol=0)


def test_unit_pixels_is_totensor_scaling_bit_for_bit_and_normalize_refuses_integers():
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 4, 4, 4)[..., :3]
    expected = pixels.astype(np.float32) / 255.0  # torchvision's ToTensor: a correctly rounded division
    got = np.asarray(pipeline.unit_pixels(jnp.asarray(pixels)))
    assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
    assert got[0, 0, 0, 0] == 0.0 and got.max() == np.float32(254 / 255)
    with pytest.raises(TypeError, match="uint8"):
        pipeline.unit_pixels(jnp.zeros((1, 2, 2, 3), jnp.float32))
    with pytest.raises(TypeError, match="floats in \\[0, 1\\].*unit_pixels"):
        prompts.normalize(jnp.asarray(pixels))
