"""Transforms: torchvision semantics on hand-made images."""

import numpy as np
import pytest

from vpns_jax.data import transforms


def test_grey_becomes_three_identical_channels():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    rgb = transforms.to_rgb(grey)
    assert rgb.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey[..., 0])
    np.testing.assert_array_equal(transforms.to_rgb(grey[..., 0]), rgb)
    with pytest.raises(ValueError, match="uint8"):
        transforms.to_rgb(np.zeros((2, 2, 3), np.float32))


def test_bilinear_upsampling_by_hand():
    # Each row is [0, 200]. PIL's bilinear (half-pixel centres, edge weights renormalised)
    # samples input x = -0.25, 0.25, 0.75, 1.25 -> [0, 0.75*0 + 0.25*200, 0.25*0 + 0.75*200, 200].
    image = np.repeat(np.asarray([[[0], [200]]], np.uint8), 2, axis=0)
    out = transforms.resize_square(transforms.to_rgb(image), 4)
    np.testing.assert_array_equal(out[..., 0], [[0, 50, 150, 200]] * 4)


def test_antialiased_downsampling_by_hand():
    # Shrinking 4 -> 2 (scale 2) widens PIL's triangle filter to a support of 2 input pixels.
    # Output 0 is centred at 1.0 (pixel-edge coordinates): pixels 0, 1, 2 sit at distances
    # 0.5, 0.5, 1.5, i.e. weights 0.75, 0.75, 0.25, normalised by their sum 1.75.
    row = np.asarray([0, 70, 140, 210], np.uint8)
    image = np.repeat(row[None, :, None], 4, axis=0)
    out = transforms.resize_square(transforms.to_rgb(image), 2)[0, :, 0]
    expected0 = (0.75 * 0 + 0.75 * 70 + 0.25 * 140) / 1.75
    expected1 = (0.25 * 70 + 0.75 * 140 + 0.75 * 210) / 1.75
    np.testing.assert_allclose(out, [expected0, expected1], atol=0.5)


def test_clean_view_is_resize_then_unit_scale():
    image = np.full((5, 5, 3), 51, np.uint8)
    view = transforms.clean_view(image, 8)
    assert view.shape == (8, 8, 3) and view.dtype == np.float32
    np.testing.assert_allclose(view, 0.2)  # 51 / 255


def test_augmented_view_is_resize_crop_flip_with_torch_draw_order():
    assert transforms.augmented_size(224) == 252 and transforms.augmented_size(32) == 36
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    big = transforms.resize_square(image, 9)
    for seed in range(20):
        view = transforms.augmented_view(image, 8, np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        top, left = int(draws.integers(0, 2)), int(draws.integers(0, 2))  # RandomCrop: top, then left
        crop = big[top : top + 8, left : left + 8]
        expected = crop[:, ::-1] if draws.random() < 0.5 else crop  # then the flip
        np.testing.assert_array_equal(view, expected.astype(np.float32) / 255)


def test_augmentation_covers_every_crop_and_both_flips():
    image = np.arange(4 * 4, dtype=np.uint8).reshape(4, 4, 1)
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        crop = transforms.random_crop(transforms.to_rgb(image), 3, rng)
        flipped = transforms.random_horizontal_flip(crop, rng)
        seen.add((int(crop[0, 0, 0]), bool(flipped[0, 0, 0] != crop[0, 0, 0])))
    # 2 x 2 crop corners (values 0, 1, 4, 5) times flipped or not.
    assert seen == {(v, f) for v in (0, 1, 4, 5) for f in (False, True)}
