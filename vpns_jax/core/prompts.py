"""Visual prompts of VPNs: additive programs in [0, 1] pixel space.

Every prompt follows the authors' ``visual_prompt.py``::

    x' = normalize(clamp(pad0(resize(x)) + P * M, 0, 1))

``pad0`` zero-pads the image from ``input_size`` to ``output_size`` (torch
``F.pad`` split: the extra odd pixel goes before). ``P`` is the learnable
program: raw for ``pad``, ``sigmoid(program)`` for ``fix``/``random``/``expand``.
``M`` is the kind's 0/1 mask. Images are NHWC float32 with pixel values in
[0, 1]. Every kind keeps a full ``(output_size, output_size, 3)`` zero-initialised
program, as the reference does; entries outside the mask get no gradient.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_TYPES = ("pad", "fix", "random", "expand")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Prompt = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """Static description of a prompt (hashable: it is a static jit argument).

    Attributes:
        kind: one of ``PROMPT_TYPES``.
        input_size: side the image is resized to before zero padding.
        output_size: side of the prompted image fed to the network.
        pad_size: width of the prompt frame (``pad`` only).
        mask_size: side of the prompt square (``fix`` and ``random`` only).
    """

    kind: str = "pad"
    input_size: int = 224
    output_size: int = 224
    pad_size: int = 16
    mask_size: int = 115

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_TYPES:
            raise ValueError(
                f"PromptSpec.kind={self.kind!r} is unknown; use one of {PROMPT_TYPES}."
            )
        for name in ("input_size", "output_size", "pad_size", "mask_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PromptSpec.{name}={value!r} must be a positive integer.")
            # Plain ints, so that specs built from numpy ints compare and hash alike.
            object.__setattr__(self, name, int(value))
        out, inp = self.output_size, self.input_size
        if inp > out:
            raise ValueError(
                f"PromptSpec.input_size={inp} exceeds output_size={out}; the image is "
                f"zero-padded up to output_size, so use input_size <= {out}."
            )
        if self.kind == "pad" and 2 * self.pad_size > out:
            raise ValueError(
                f"PromptSpec.pad_size={self.pad_size}: pad should not exceed half the "
                f"output size {out}; use pad_size <= {out // 2}."
            )
        if self.kind == "fix" and self.mask_size > out:
            raise ValueError(
                f"PromptSpec.mask_size={self.mask_size} exceeds output_size={out}; "
                f"use mask_size <= {out}."
            )
        if self.kind == "random" and self.mask_size >= out:
            raise ValueError(
                f"PromptSpec.mask_size={self.mask_size} must be < output_size={out} for "
                "'random' (the offset is drawn from [0, output_size - mask_size)); "
                f"use mask_size <= {out - 1}."
            )

    @property
    def pads(self) -> tuple[int, int]:
        """(before, after) zero padding of each spatial axis, split as the reference."""
        diff = self.output_size - self.input_size
        return int((diff + 1) / 2), int(diff / 2)


def init_prompt(spec: PromptSpec) -> Prompt:
    """Zero-initialised program of shape (output_size, output_size, 3)."""
    size = spec.output_size
    return {"program": jnp.zeros((size, size, 3), jnp.float32)}


def _square_mask(size: int, row: Any, col: Any, side: int) -> jax.Array:
    """0/1 mask of a ``side``-pixel square at (row, col); the offsets may be traced."""
    idx = jnp.arange(size)
    rows = (idx >= row) & (idx < row + side)
    cols = (idx >= col) & (idx < col + side)
    return (rows[:, None] & cols[None, :]).astype(jnp.float32)[..., None]


def prompt_mask(spec: PromptSpec, key: jax.Array | None = None) -> jax.Array:
    """The (output_size, output_size, 1) float32 0/1 mask M of the prompt.

    ``random`` needs ``key``. It draws one location for the whole batch, with
    row and column offsets each uniform in [0, output_size - mask_size), like
    the reference's ``np.random.choice`` on every forward call.
    """
    out = spec.output_size
    if spec.kind == "pad":
        mask = np.ones((out, out, 1), np.float32)
        p = spec.pad_size
        mask[p : out - p, p : out - p] = 0.0  # empty slice when out == 2p: all ones
        return jnp.asarray(mask)
    if spec.kind == "fix":
        mask = np.zeros((out, out, 1), np.float32)
        mask[: spec.mask_size, : spec.mask_size] = 1.0
        return jnp.asarray(mask)
    if spec.kind == "random":
        if key is None:
            raise ValueError(
                "prompt kind 'random' needs a PRNG key; pass key=jax.random.key(seed)."
            )
        row, col = jax.random.randint(key, (2,), 0, out - spec.mask_size)
        return _square_mask(out, row, col, spec.mask_size)
    # expand: the prompt covers exactly the zero border around the placed image.
    before, _ = spec.pads
    inp = spec.input_size
    mask = np.ones((out, out, 1), np.float32)
    mask[before : before + inp, before : before + inp] = 0.0
    return jnp.asarray(mask)


@jax.custom_jvp
def clamp_unit(x: jax.Array) -> jax.Array:
    """Clips to [0, 1], with derivative 1 on the closed interval and 0 outside.

    This is torch.clamp's backward. jnp.clip gives 0.5 at the boundaries; with a
    zero pad prompt over black pixels every frame entry sits exactly at 0, so the
    torch convention is what lets the prompt learn there at full rate.
    """
    return jnp.clip(x, 0.0, 1.0)


@clamp_unit.defjvp
def _clamp_unit_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    inside = (x >= 0.0) & (x <= 1.0)
    return clamp_unit(x), jnp.where(inside, t, jnp.zeros_like(t))


def normalize(images: jax.Array) -> jax.Array:
    """ImageNet per-channel normalisation (x - mean) / std over the last axis."""
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floats in [0, 1], got {images.dtype}: scale uint8 batches with "
                        "data.pipeline.unit_pixels (parallel.global_batch does, given it)")
    mean = jnp.asarray(IMAGENET_MEAN, dtype=images.dtype)
    std = jnp.asarray(IMAGENET_STD, dtype=images.dtype)
    return (images - mean) / std


def resize_images(images: jax.Array, size: int) -> jax.Array:
    """Square bilinear resize, with antialiasing, of NHWC images to (size, size).

    Uses the filter of torchvision's ``Resize`` on PIL images (PIL BILINEAR): a
    triangle kernel, widened by the scale factor when shrinking, half-pixel
    centres, and weights renormalised at the borders. The only difference is
    numeric: PIL works on uint8 with fixed-point weights and rounds to uint8 after
    each of its two separable passes, so its result can differ from this float
    computation by about one grey level (1/255) per pixel.
    """
    batch, _, _, channels = images.shape
    return jax.image.resize(
        images, (batch, size, size, channels), method="bilinear", antialias=True
    )


def apply_prompt(
    spec: PromptSpec,
    prompt: Prompt,
    images: jax.Array,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Prompts and normalises NHWC images in [0, 1]; returns (B, out, out, 3).

    Pure and jittable with ``spec`` static. ``key`` is required for ``random``
    and ignored by the other kinds.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"apply_prompt expects NHWC images with 3 channels, got shape {images.shape}."
        )
    if images.shape[1:3] != (spec.input_size, spec.input_size):
        images = resize_images(images, spec.input_size)
    before, after = spec.pads
    if before or after:
        images = jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)))
    program = prompt["program"]
    visual = program if spec.kind == "pad" else jax.nn.sigmoid(program)
    prompted = images + visual * prompt_mask(spec, key)
    return normalize(clamp_unit(prompted))


def plain_inputs(spec: PromptSpec, images: jax.Array) -> jax.Array:
    """The un-prompted input: resized to input_size if needed, then normalised (no padding)."""
    if images.shape[1:3] != (spec.input_size, spec.input_size):
        images = resize_images(images, spec.input_size)
    return normalize(images)


def model_inputs(spec: PromptSpec, prompt: Prompt, images: jax.Array, *, prompted: bool,
                 key: jax.Array | None = None) -> jax.Array:
    """What the network sees: ``apply_prompt`` when ``prompted``, else ``plain_inputs``."""
    return apply_prompt(spec, prompt, images, key=key) if prompted else plain_inputs(spec, images)


def num_prompt_parameters(spec: PromptSpec) -> int:
    """Number of program entries under the mask, i.e. those that affect the output."""
    out = spec.output_size
    if spec.kind == "pad":
        p = spec.pad_size
        return 3 * (4 * p * out - 4 * p * p)
    if spec.kind in ("fix", "random"):
        return 3 * spec.mask_size**2
    return 3 * (out**2 - spec.input_size**2)
