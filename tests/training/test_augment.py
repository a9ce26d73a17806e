"""Training augmentation: one-pixel shifts of images, nothing for tables."""

from __future__ import annotations

import pytest
import torch

from detector.errors import ConfigError
from training.augment import Shift, image_size, make_augmentation


def test_image_size_recognises_images_only() -> None:
    assert image_size((1, 28, 28)) == (1, 28, 28)
    assert image_size((28, 28)) == (1, 28, 28)
    assert image_size((3, 32, 32)) == (3, 32, 32)
    assert image_size((784,)) is None
    assert image_size((3, 4)) is None  # a small 2-D reading is not an image
    assert image_size((32, 32, 3)) == (3, 32, 32)  # channels-last, as the complexity term reads it


def test_shift_of_channels_last_images_moves_the_same_pixels() -> None:
    x = torch.rand(64, 3, 16, 16)
    first = Shift((3, 16, 16), seed=1)(x)
    last = Shift((3, 16, 16), seed=1, channels_last=True)(x.permute(0, 2, 3, 1).reshape(64, -1))
    assert torch.equal(last.reshape(64, 16, 16, 3).permute(0, 3, 1, 2), first)
    aug = make_augmentation("auto", (16, 16, 3), is_table=False, seed=1)
    assert isinstance(aug, Shift) and aug.last


def test_shift_moves_half_the_batch_by_at_most_one_pixel() -> None:
    x = torch.zeros(400, 1, 28, 28)
    x[:, 0, 10, 12] = 1.0
    out = Shift((1, 28, 28), seed=0)(x)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 28, where % 28
    assert ((rows - 10).abs() <= 1).all() and ((cols - 12).abs() <= 1).all()
    unmoved = ((rows == 10) & (cols == 12)).float().mean()
    assert 0.45 < unmoved < 0.65  # half kept, and 1/9 of the moved ones drew (0, 0)
    # flat rows (the MLP's input) are shifted as images too, and the same seed repeats
    flat = x.reshape(400, 784)
    assert torch.equal(Shift((1, 28, 28), seed=0)(flat), out.reshape(400, 784))


def test_make_augmentation_resolves_auto() -> None:
    assert isinstance(make_augmentation("auto", (1, 28, 28), is_table=False, seed=0), Shift)
    assert make_augmentation("auto", (30,), is_table=True, seed=0) is None
    assert make_augmentation("none", (1, 28, 28), is_table=False, seed=0) is None
    with pytest.raises(ConfigError, match="--augment shift needs images"):
        make_augmentation("shift", (30,), is_table=False, seed=0)
