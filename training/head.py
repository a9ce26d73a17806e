"""Training the transformation head (``detector.transforms``) on the normal training images, and
fitting its weight in the score on the validation images."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from detector.detector import Detector
from detector.errors import ConfigError
from detector.model import VAE
from detector.score import ScoreConfig
from detector.spec import InputSpec
from detector.transforms import HeadConfig, TransformHead, default_pool
from training.augment import Shift
from training.threads import step_threads

HEAD_EPOCHS = 16  # passes over the N x K (image, transformation) pairs
HEAD_SHIFT = 1  # pixels: each training pair's image moved by up to one pixel either way first
HEAD_SHIFT_SHARE = 1.0  # of each batch (a draw of no move included)
HEAD_MIN_STEPS = 1000  # small data sets get more passes, so that the head learns at all
HEAD_MAX_EPOCHS = 200
HEAD_BATCH = 256
HEAD_LR = 1e-3
OFFSET_QUANTILE = 0.75  # of the validation normals' surprise (fit_transformation_term)
# nats: the offset is at least one nat, so that where the head is sure of most normal images (a
# surprise of thousandths of a nat over its 12 transformations) the log does not spread those
# meaningless differences across the score. 3 seeds: Fashion-MNIST 94.52 -> 94.58 (sneakers
# 98.49 -> 98.64, sandals 89.72 -> 90.12), MNIST 99.19 -> 99.17 (docs/experiments.md, "Twelfth
# session"); 0.3 and 3 nats score the same
MIN_OFFSET = 1.0


def head_config(
    x_train: npt.NDArray[np.float32],
    sample_shape: tuple[int, ...],
    value_range: tuple[float, float] | None,
) -> HeadConfig:
    """The head for these images: their value range onto [0, 1], or without a known range, the
    training pixels standardised by their mean and spread; pooled to ``POOL_TO`` pixels across
    or a little more."""
    pool = default_pool(sample_shape[-1])
    if value_range is not None:
        lo, hi = value_range
        return HeadConfig(tuple(sample_shape), offset=float(lo), scale=float(hi - lo), pool=pool)
    spread = float(np.std(x_train))
    return HeadConfig(
        tuple(sample_shape),
        offset=float(np.mean(x_train)),
        scale=spread if math.isfinite(spread) and spread > 0 else 1.0,
        pool=pool,
    )


def fit_head(
    x_train: npt.NDArray[np.float32],
    sample_shape: tuple[int, ...],
    value_range: tuple[float, float] | None,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    desc: str = "transformation head",
) -> TransformHead:
    """Train a head to tell which of its K transformations was applied to each training image
    (cross-entropy over every (image, transformation) pair, Adam; a fixed schedule: nothing of
    the validation images is used). Each pair's image is first moved by up to ``HEAD_SHIFT``
    pixels along each axis (``training.augment.Shift``): the head then learns the normal
    images' shape rather than the exact place of every stroke, and a normal test image a pixel
    off its training siblings surprises it less (docs/experiments.md, "Ninth session")."""
    n = int(x_train.shape[0])
    if n < 1:
        raise ConfigError("the transformation head needs at least one training image")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = TransformHead(head_config(x_train, sample_shape, value_range)).to(device)
    with torch.no_grad():
        x = head.inputs(torch.from_numpy(np.ascontiguousarray(x_train, np.float32)).to(device))
    kk = head.config.n_transforms
    pairs = n * kk
    per_epoch = math.ceil(pairs / HEAD_BATCH)
    epochs = min(HEAD_MAX_EPOCHS, max(HEAD_EPOCHS, math.ceil(HEAD_MIN_STEPS / per_epoch)))
    opt = torch.optim.Adam(head.parameters(), lr=HEAD_LR)
    shift = Shift(head.config.grid, pixels=HEAD_SHIFT, share=HEAD_SHIFT_SHARE, seed=seed)
    head.train()
    bar = tqdm(
        total=epochs * per_epoch,
        desc=desc,
        unit="step",
        leave=False,
        disable=None if progress is None else not progress,
    )
    with bar, step_threads(lambda: head(x[:HEAD_BATCH]), x.device):
        for _ in range(epochs):
            order = torch.randperm(pairs, generator=gen).to(device)
            for start in range(0, pairs, HEAD_BATCH):
                pick = order[start : start + HEAD_BATCH]
                k = pick // n
                logits = head(head.transformed(shift(x[pick % n]), k))
                loss = F.cross_entropy(logits, k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
    return head.eval()


def fit_transformation_term(
    score: npt.ArrayLike, transformation: npt.ArrayLike, share: float
) -> tuple[float, float]:
    """The weight and offset of log(transformation + offset) in the score, from the validation
    normals: the offset is their ``OFFSET_QUANTILE`` quantile of the surprise (the log in the
    normal data's own scale), at least ``MIN_OFFSET`` (one nat), and the weight makes the term's
    spread (standard deviation) ``share`` times the rest of the score's. Standard deviations, not
    robust spreads: the head is sure of most normal images (a surprise near 0) and its tail is
    what carries its evidence (docs/experiments.md, "Eighth session"). (0, 1) when ``share`` is 0
    or the surprise is constant."""
    if not (math.isfinite(share) and share >= 0):
        raise ConfigError(f"transformation share must be a finite number >= 0, got {share}")
    s = np.asarray(score, np.float64)
    t = np.asarray(transformation, np.float64)
    if share == 0 or t.size == 0:
        return 0.0, 1.0
    offset = max(float(np.quantile(t, OFFSET_QUANTILE)), MIN_OFFSET)
    spread_s, spread_t = float(np.std(s)), float(np.std(np.log(t + offset)))
    if not (math.isfinite(spread_s) and math.isfinite(spread_t)) or spread_t <= 0 or spread_s <= 0:
        return 0.0, 1.0  # a constant part carries no evidence
    return share * spread_s / spread_t, offset


def head_setup(
    model: VAE,
    x_train: npt.NDArray[np.float32],
    x_val: npt.NDArray[np.float32],
    input_spec: InputSpec,
    share: float,
    *,
    config: ScoreConfig,
    reference: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool | None = None,
    desc: str = "transformation head",
) -> tuple[TransformHead | None, float, float]:
    """The head trained on ``x_train``, and its term's weight and offset fitted on ``x_val``
    against the rest of the score (``config``: the likelihood, complexity and neighbour terms);
    (None, 0.0, 1.0) when ``share`` is 0."""
    if share == 0:
        return None, 0.0, 1.0
    head = fit_head(
        x_train,
        input_spec.shape,
        input_spec.value_range,
        seed=seed,
        device=device,
        progress=progress,
        desc=desc,
    )
    rest = config.replace(transformation_weight=0.0)
    parts = Detector(
        model, None, input_spec, device=device, reference=reference, head=head
    ).score_parts(x_val, config=rest)
    return head, *fit_transformation_term(parts["score"], parts["transformation"], share)


__all__ = ["fit_head", "fit_transformation_term", "head_config", "head_setup"]
