"""Augmentation of normal images during training: small translations.

A VAE trained on centred images learns the exact position of every stroke; a normal test image
one pixel off its training siblings then reconstructs worse than it should, and its score moves
towards the anomalies'. Shifting half of each batch by up to one pixel in each direction (zero
padding at the border) teaches the model that a one-pixel offset is not a difference, at no cost
at scoring time. Measured on MNIST and Fashion-MNIST one-vs-rest in docs/experiments.md.

Used for inputs with two spatial axes (images: the data's sample shape is (H, W), (C, H, W) or
channels-last (H, W, C) with C <= 4, as ``detector.complexity.image_axes`` reads them; H and W
>= 8); tables and flat feature vectors are not augmented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from detector.complexity import image_axes

AUGMENTATIONS: tuple[str, ...] = ("auto", "none", "shift")
MIN_SIDE = 8  # smaller "images" (a 2-D table of 3 x 4 readings) are not translated


def image_size(sample_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(channels, height, width) of an image-shaped sample; None for anything else."""
    dims = _image_dims(sample_shape)
    if len(dims) == 2:
        c, (h, w) = 1, dims
    elif channels_last(dims):
        h, w, c = dims
    elif len(dims) == 3:
        c, h, w = dims
    else:
        return None
    return (c, h, w) if min(h, w) >= MIN_SIDE else None


def _image_dims(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without its unit axes when it has more than three (e.g. (1, 1, 28, 28))."""
    return tuple(d for d in sample_shape if d != 1) if len(sample_shape) > 3 else sample_shape


def channels_last(sample_shape: tuple[int, ...]) -> bool:
    """Whether a sample of this shape is an (H, W, C) image (the complexity term's reading)."""
    return len(sample_shape) == 3 and image_axes(sample_shape) == (0, 1)


class Shift:
    """Translate a random half of a batch by -k..k pixels along each spatial axis."""

    def __init__(
        self,
        image: tuple[int, int, int],
        pixels: int = 1,
        share: float = 0.5,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.c, self.h, self.w = image
        self.last = channels_last
        self.k, self.share = pixels, share
        self.gen = torch.Generator().manual_seed(seed)
        # Flat index, in the padded image, of each output position before its move: one gather
        # then moves a whole batch (4x faster than indexing rows and columns apiece).
        hp, wp = self.h + 2 * pixels, self.w + 2 * pixels
        self.base = (
            torch.arange(self.c)[:, None, None] * (hp * wp)
            + torch.arange(self.h)[None, :, None] * wp
            + torch.arange(self.w)[None, None, :]
        ).reshape(1, -1)

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        b, k = xb.shape[0], self.k
        if b == 0 or math.prod(xb.shape[1:]) != self.c * self.h * self.w:
            return xb
        moved = torch.rand(b, generator=self.gen) < self.share
        dy = torch.where(moved, torch.randint(0, 2 * k + 1, (b,), generator=self.gen), k)
        dx = torch.where(moved, torch.randint(0, 2 * k + 1, (b,), generator=self.gen), k)
        dev = xb.device
        img = (
            xb.reshape(b, self.h, self.w, self.c).permute(0, 3, 1, 2)
            if self.last
            else xb.reshape(b, self.c, self.h, self.w)
        )
        padded = F.pad(img, (k, k, k, k)).reshape(b, -1)
        if self.base.device != dev:
            self.base = self.base.to(dev)
        index = self.base + (dy * (self.w + 2 * k) + dx).to(dev)[:, None]
        out = torch.gather(padded, 1, index).reshape(b, self.c, self.h, self.w)
        return (out.permute(0, 2, 3, 1) if self.last else out).reshape(xb.shape)


def make_augmentation(
    name: str, sample_shape: tuple[int, ...], *, is_table: bool, seed: int
) -> Shift | None:
    """The augmentation ``name`` resolves to for this data (``auto``: shift for images)."""
    if name == "none" or is_table:
        return None
    image = image_size(sample_shape)
    if image is None:
        if name == "shift":
            from detector.errors import ConfigError

            raise ConfigError(
                f"--augment shift needs images (H x W or C x H x W, sides >= {MIN_SIDE}); the "
                f"data's samples are shaped {sample_shape}"
            )
        return None
    return Shift(image, seed=seed, channels_last=channels_last(_image_dims(sample_shape)))
