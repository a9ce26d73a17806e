"""The transformation head: a small classifier that tells which geometric transformation was
applied to an image, trained on the normal images only; its surprise is a score part.

A classifier that has learnt to recognise the rotations and shifts of the normal class's images
does so by their shape (which way up a shoe is, where a bag's handle sits), so an image of another
kind leaves it unsure. Geometric-transformation methods (Golan & El-Yaniv, NeurIPS 2018; GOAD,
Bergman & Hoshen, ICLR 2020) score with exactly this; here a small MLP over a few transformations
sits beside the VAE, whose likelihood it complements (docs/experiments.md, "Eighth session")::

    transformation(x) = - sum_k log p(k | T_k x)       in nats, over the K transformations

The head sees the image as it is up to 63 pixels across, and average-pooled by ``pool`` beyond
(to 32-63 pixels: a large image costs what a small one does; pooling a 28 x 28 image would lose
Fashion-MNIST's detail). Every transformation is a permutation of those pixels (a rotation by a multiple of 90 degrees, a cyclic shift), so ``T_k x
= x[perm_k]`` and the first layer applied to all K transformed copies is one matrix product with
the weight's columns permuted: the K copies are never materialised. The permutations follow from
the shape and the transformation set's name; the artifact stores only the two layers
(``head.safetensors``) and this config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from detector.errors import ConfigError

# rotations by 0/90/180/270 degrees, each as it is and cyclically shifted sideways by a seventh
# of the side both ways (4 pixels of 28): 12 transformations
ROTATE_SHIFT = "rotate4-shift3"
TRANSFORM_SETS: tuple[str, ...] = (ROTATE_SHIFT,)
DEFAULT_WIDTH = 64
POOL_TO = 32  # images wider than 2 x POOL_TO are pooled to POOL_TO-63 pixels across
MAX_TRANSFORMS = 64


@dataclass(frozen=True)
class HeadConfig:
    """The head's network: ``input_shape`` (H, W) or (C, H, W) square images, the
    transformation set's name, the hidden layer's width, the input map ``(x - offset) /
    scale`` (the image's value range onto [0, 1], or the training pixels' mean and spread), and
    the average pooling ``pool`` the head sees the image through."""

    input_shape: tuple[int, ...]
    transforms: str = ROTATE_SHIFT
    width: int = DEFAULT_WIDTH
    offset: float = 0.0
    scale: float = 1.0
    pool: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        check_image_shape(self.input_shape)
        if self.transforms not in TRANSFORM_SETS:
            raise ConfigError(
                f"unknown transformation set {self.transforms!r}; choose one of {TRANSFORM_SETS}"
            )
        if not 1 <= self.width <= 4096:
            raise ConfigError(f"head width must be 1-4096, got {self.width}")
        if not 1 <= self.pool <= self.input_shape[-1] // 8:
            raise ConfigError(
                f"head pooling must leave a side of at least 8 pixels, got {self.pool} for "
                f"{self.input_shape[-1]}"
            )
        if not (math.isfinite(self.offset) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(
                f"head input map needs a finite offset and a scale > 0, got {self.offset}, "
                f"{self.scale}"
            )

    @property
    def n_features(self) -> int:
        """The image's values, as the detector validates them."""
        return math.prod(self.input_shape)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(C, H, W) of the pooled image the head sees."""
        c = self.input_shape[0] if len(self.input_shape) == 3 else 1
        side = self.input_shape[-1] // self.pool
        return c, side, side

    @property
    def n_inputs(self) -> int:
        return math.prod(self.grid)

    @property
    def n_transforms(self) -> int:
        return len(_moves(self.transforms, self.grid[-1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "transforms": self.transforms,
            "width": self.width,
            "offset": self.offset,
            "scale": self.scale,
            "pool": self.pool,
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
        if type(d["pool"]) is not int:
            raise ValueError("head pool must be an integer")
        try:
            return cls(
                tuple(shape), d["transforms"], d["width"], d["offset"], d["scale"], d["pool"]
            )
        except ConfigError as e:
            raise ValueError(str(e)) from e


_KEYS = ("input_shape", "transforms", "width", "offset", "scale", "pool")


def default_pool(side: int) -> int:
    """The largest pooling that leaves the image at least ``POOL_TO`` pixels across."""
    return max(1, side // POOL_TO)


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


def _moves(name: str, side: int) -> list[tuple[int, int]]:
    """(quarter turns, sideways shift) per transformation of the ``side``-wide pooled image."""
    d = max(1, round(side / 7))
    return [(k, dw) for dw in (0, -d, d) for k in range(4)]


def permutations(config: HeadConfig) -> torch.Tensor:
    """(K, n_inputs) int64: row k is the flat index (in the pooled image) each position of T_k x
    comes from."""
    shape = config.grid
    index = torch.arange(config.n_inputs).reshape(shape)
    rows = []
    for k, dw in _moves(config.transforms, shape[-1]):
        rows.append(torch.roll(torch.rot90(index, k, (-2, -1)), dw, -1).reshape(-1))
    return torch.stack(rows)


class TransformHead(nn.Module):
    """Pooled, flattened image -> hidden (SiLU) -> one logit per transformation."""

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
        self.hidden = nn.Linear(config.n_inputs, config.width)
        self.out = nn.Linear(config.width, config.n_transforms)
        perms = permutations(config)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inverse", torch.argsort(perms, dim=1), persistent=False)
        self.register_buffer("eye", torch.eye(config.n_transforms), persistent=False)
        self._stacked: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for already-transformed inputs (N, n_inputs): training."""
        return self.out(F.silu(self.hidden(x)))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, ...) as the head sees them: (N, n_inputs), pooled and normalised."""
        c, h, w = self.config.grid
        side = self.config.input_shape[-1]
        x = x.reshape(x.shape[0], c, side, side)
        if self.config.pool > 1:
            x = F.avg_pool2d(x, self.config.pool)
        return (x.reshape(x.shape[0], c * h * w) - self.config.offset) / self.config.scale

    def stacked_weight(self) -> torch.Tensor:
        """(K * width, n_inputs): x[perm_k] @ W.T == x @ W[:, inverse_k].T, so all K transformed
        copies go through the first layer in one product. Kept between calls while the weight
        is unchanged and nothing is being trained (scoring)."""
        w = self.hidden.weight
        key = (w.data_ptr(), w._version)
        if self._stacked is not None and self._stacked[0] == key and not torch.is_grad_enabled():
            return self._stacked[1]
        kk, width = self.config.n_transforms, self.config.width
        stacked = w[:, self.inverse].permute(1, 0, 2).reshape(kk * width, -1)
        if not torch.is_grad_enabled() and not torch.jit.is_tracing():
            self._stacked = (key, stacked)
        return stacked

    def transformed(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Row i of the head's inputs ``x`` (N, n_inputs) under transformation ``k[i]``."""
        return torch.gather(x, 1, self.perms[k])

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) images -> (N,) the summed surprise -sum_k log p(k | T_k x), in nats."""
        flat = self.inputs(x)
        kk, width = self.config.n_transforms, self.config.width
        h = F.silu(flat @ self.stacked_weight().T + self.hidden.bias.repeat(kk))
        h = h.reshape(-1, kk, width)
        logp = F.log_softmax(self.out(h), dim=-1)  # (N, K transformed copies, K classes)
        return -(logp * self.eye).sum((1, 2))  # the diagonal: copy k's log p(k)


__all__ = [
    "DEFAULT_WIDTH",
    "ROTATE_SHIFT",
    "TRANSFORM_SETS",
    "HeadConfig",
    "TransformHead",
    "default_pool",
    "permutations",
    "supports",
]
