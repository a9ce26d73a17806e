"""The transformation head: a small classifier that tells which geometric transformation was
applied to an image, trained on the normal images only; its surprise is a score part.

A classifier that has learnt to recognise the rotations and shifts of the normal class's images
does so by their shape (which way up a shoe is, where a bag's handle sits), so an image of another
kind leaves it unsure. Geometric-transformation methods (Golan & El-Yaniv, NeurIPS 2018; GOAD,
Bergman & Hoshen, ICLR 2020) score with exactly this; here a small MLP over a few transformations
sits beside the VAE, whose likelihood it complements (docs/experiments.md, "Eighth session")::

    transformation(x) = - sum_k log p(k | T_k x)       in nats, over the K transformations

Every transformation is a permutation of the pixels (a rotation by a multiple of 90 degrees, a
cyclic shift), so ``T_k x = x[perm_k]`` and the first layer applied to all K transformed copies is
one matrix product with the weight's columns permuted: the K copies are never materialised. The
permutations follow from the image shape and the transformation set's name; the artifact stores
only the two layers (``head.safetensors``) and this config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from detector.errors import ConfigError

# rotations by 0/90/180/270 degrees, each unshifted and cyclically shifted by a seventh of the
# side left, right, up and down (4 pixels of 28): 20 transformations
ROTATE_SHIFT = "rotate4-shift4"
TRANSFORM_SETS: tuple[str, ...] = (ROTATE_SHIFT,)
DEFAULT_WIDTH = 128
MAX_TRANSFORMS = 64


@dataclass(frozen=True)
class HeadConfig:
    """The head's network: ``input_shape`` (H, W) or (C, H, W) square images, the
    transformation set's name, the hidden layer's width, and the input map ``(x - offset) /
    scale`` (the image's value range onto [0, 1], or the training pixels' mean and spread)."""

    input_shape: tuple[int, ...]
    transforms: str = ROTATE_SHIFT
    width: int = DEFAULT_WIDTH
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        check_image_shape(self.input_shape)
        if self.transforms not in TRANSFORM_SETS:
            raise ConfigError(
                f"unknown transformation set {self.transforms!r}; choose one of {TRANSFORM_SETS}"
            )
        if not 1 <= self.width <= 4096:
            raise ConfigError(f"head width must be 1-4096, got {self.width}")
        if not (math.isfinite(self.offset) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(
                f"head input map needs a finite offset and a scale > 0, got {self.offset}, "
                f"{self.scale}"
            )

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_transforms(self) -> int:
        return len(_moves(self.transforms, self.input_shape[-1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "transforms": self.transforms,
            "width": self.width,
            "offset": self.offset,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        if not isinstance(d, dict) or set(d) != set(_KEYS):
            raise ValueError(f"head config must hold exactly {', '.join(_KEYS)}")
        shape = d["input_shape"]
        if not isinstance(shape, list) or not all(type(s) is int for s in shape):
            raise ValueError("head input_shape must be a list of integers")
        if type(d["width"]) is not int or not isinstance(d["transforms"], str):
            raise ValueError("head width must be an integer and transforms a name")
        if not all(type(d[k]) in (int, float) for k in ("offset", "scale")):
            raise ValueError("head offset and scale must be numbers")
        try:
            return cls(tuple(shape), d["transforms"], d["width"], d["offset"], d["scale"])
        except ConfigError as e:
            raise ValueError(str(e)) from e


_KEYS = ("input_shape", "transforms", "width", "offset", "scale")


def supports(sample_shape: tuple[int, ...]) -> bool:
    """Whether the head applies: square images (H, W) or (C, H, W) with C <= 4, side >= 8."""
    try:
        check_image_shape(tuple(sample_shape))
    except ConfigError:
        return False
    return True


def check_image_shape(shape: tuple[int, ...]) -> None:
    if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[0] <= 4):
        raise ConfigError(
            f"the transformation head needs images (H, W) or (C, H, W) with C <= 4, got {shape}"
        )
    h, w = shape[-2:]
    if h != w or h < 8 or h > 1024:
        raise ConfigError(
            f"the transformation head needs square images of side 8-1024, got {h}x{w}"
        )


def _moves(name: str, side: int) -> list[tuple[int, int, int]]:
    """(quarter turns, shift along H, shift along W) per transformation."""
    d = max(1, round(side / 7))
    shifts = [(0, 0), (0, -d), (0, d), (-d, 0), (d, 0)]
    return [(k, dh, dw) for dh, dw in shifts for k in range(4)]


def permutations(config: HeadConfig) -> torch.Tensor:
    """(K, n_features) int64: row k is the flat pixel index each position of T_k x comes from."""
    shape = config.input_shape
    index = torch.arange(config.n_features).reshape(shape)
    rows = []
    for k, dh, dw in _moves(config.transforms, shape[-1]):
        t = torch.rot90(index, k, (-2, -1))
        rows.append(torch.roll(t, (dh, dw), (-2, -1)).reshape(-1))
    return torch.stack(rows)


class TransformHead(nn.Module):
    """Flattened image -> hidden (SiLU) -> one logit per transformation."""

    perms: torch.Tensor
    inverse: torch.Tensor
    eye: torch.Tensor

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        if config.n_transforms > MAX_TRANSFORMS:
            raise ConfigError(
                f"at most {MAX_TRANSFORMS} transformations, got {config.n_transforms}"
            )
        self.hidden = nn.Linear(config.n_features, config.width)
        self.out = nn.Linear(config.width, config.n_transforms)
        perms = permutations(config)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inverse", torch.argsort(perms, dim=1), persistent=False)
        self.register_buffer("eye", torch.eye(config.n_transforms), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for already-transformed flat images (N, n_features): training."""
        return self.out(F.silu(self.hidden(self.normalise(x))))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.config.offset) / self.config.scale

    def transformed(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Row i of ``x`` (N, n_features) under transformation ``k[i]``."""
        return torch.gather(x, 1, self.perms[k])

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) images -> (N,) the summed surprise -sum_k log p(k | T_k x), in nats."""
        flat = self.normalise(x.reshape(x.shape[0], -1))
        kk, width = self.config.n_transforms, self.config.width
        # x[perm_k] @ W.T == x @ W[:, inverse_k].T: all K transformed copies in one product
        weight = self.hidden.weight[:, self.inverse].permute(1, 0, 2).reshape(kk * width, -1)
        h = F.silu(flat @ weight.T + self.hidden.bias.repeat(kk)).reshape(-1, kk, width)
        logp = F.log_softmax(self.out(h), dim=-1)  # (N, K transformed copies, K classes)
        return -(logp * self.eye).sum((1, 2))  # the diagonal: copy k's log p(k)


__all__ = [
    "DEFAULT_WIDTH",
    "ROTATE_SHIFT",
    "TRANSFORM_SETS",
    "HeadConfig",
    "TransformHead",
    "permutations",
    "supports",
]
