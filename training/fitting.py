"""Fitting one model, and the K-fold models of cross-fit calibration (``training.pipeline``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from detector.detector import Detector
from detector.model import VAE, VAEConfig
from detector.score import ScoreConfig
from detector.spec import InputSpec
from detector.threshold import Calibration
from detector.transforms import TransformHead
from training.augment import make_augmentation
from training.calibrate import neighbour_setup
from training.data import Split
from training.head import head_setup
from training.train import TrainConfig, TrainResult, fit

if TYPE_CHECKING:
    from training.options import CalibrationOptions

CROSS_FIT_FOLDS = 5


@dataclass(frozen=True)
class ScoreTerms:
    """What a fitted model's score needs beyond the model: the neighbour term's reference rows,
    the transformation head, and the likelihood's config with both terms' fitted weights."""

    reference: torch.Tensor | None
    head: TransformHead | None
    config: ScoreConfig
    head_seconds: float


def fit_score_terms(
    model: VAE,
    x_train: npt.NDArray[np.float32],
    x_val: npt.NDArray[np.float32],
    spec: InputSpec,
    likelihood: ScoreConfig,
    neighbour_share: float,
    transformation_share: float,
    *,
    device: str,
    seed: int,
    progress: bool | None,
    desc: str = "transformation head",
) -> ScoreTerms:
    """The neighbour term (its weight fitted against ``likelihood`` on ``x_val``), then the
    transformation head (trained on ``x_train``, its term fitted against the two): the same
    steps for the final model and for every cross-fit fold's."""
    reference, weight = neighbour_setup(
        model, x_train, x_val, spec, neighbour_share, config=likelihood, device=device, seed=seed
    )
    with_neighbour = likelihood.replace(neighbour_weight=weight)
    start = time.perf_counter()
    head, head_weight, head_offset = head_setup(
        model,
        x_train,
        x_val,
        spec,
        transformation_share,
        config=with_neighbour,
        reference=reference,
        device=device,
        seed=seed,
        progress=progress,
        desc=desc,
    )
    return ScoreTerms(
        reference,
        head,
        with_neighbour.replace(
            transformation_weight=head_weight, transformation_offset=head_offset
        ),
        time.perf_counter() - start if head is not None else 0.0,
    )


def fit_model(
    cfg: VAEConfig,
    x_train: npt.NDArray[np.float32],
    x_val: npt.NDArray[np.float32],
    train: TrainConfig,
    in_unit: bool,
    progress: bool | None,
    desc: str,
    sample_shape: tuple[int, ...] = (),
    value_range: tuple[float, float] | None = None,
) -> TrainResult:
    """Fit one VAE: its input map (tables: per column; images: their ``value_range`` onto
    [0, 1]; other real values: per feature), the data's augmentation (``training.augment``;
    ``sample_shape`` is the data's own, e.g. (1, 28, 28))."""
    torch.manual_seed(train.seed)
    vae = VAE(cfg)
    if cfg.is_table:
        # numeric columns standardised with the training rows' statistics, missing cells left
        # out; one-hot blocks as they are
        mean, scale = _masked_moments(x_train.reshape(len(x_train), -1))
        for start, size in cfg.categorical:
            mean[start : start + size], scale[start : start + size] = 0.0, 1.0
        vae.set_standardization(torch.from_numpy(mean), torch.from_numpy(scale))
    elif cfg.likelihood == "gaussian" and value_range is not None:
        # Images with a known range (a user's uint8 .npy: 0-255) are mapped onto [0, 1], the
        # scale the built-in image sets are modelled on, so sigma means the same for both.
        lo, hi = value_range
        d = x_train[0].size
        vae.set_standardization(torch.full((d,), float(lo)), torch.full((d,), float(hi - lo)))
    elif cfg.likelihood == "gaussian" and not in_unit:
        # Real-valued features: standardise with the training data's statistics (saved with the
        # weights). Data already in [0, 1] (images) is modelled as it is.
        std = x_train.std(axis=0)
        vae.set_standardization(
            torch.from_numpy(x_train.mean(axis=0)),
            torch.from_numpy(np.where(std > 1e-8, std, 1.0).astype(np.float32)),
        )
    augment = make_augmentation(train.augment, sample_shape, is_table=cfg.is_table, seed=train.seed)
    result = fit(vae, x_train, x_val, train, progress=progress, desc=desc, augment=augment)
    if cfg.is_table:  # what a missing cell will count: its column's typical term
        result.model.set_missing_nats(torch.from_numpy(flat(x_train, cfg)))
    return result


def cross_fit_calibration(
    split: Split,
    cfg: VAEConfig,
    spec: InputSpec,
    train: TrainConfig,
    in_unit: bool,
    cal_opts: CalibrationOptions,
    likelihood: ScoreConfig,
    progress: bool | None,
    device: str,
    seed: int,
    transformation_share: float = 0.0,
) -> Calibration:
    """K-fold out-of-fold scores of every pooled normal row (cross-conformal calibration, Vovk
    2015): fold k's rows are scored by a model trained on the other folds only, with the final
    model's score settings (``likelihood``: the complexity cap included); each fold model's
    neighbour term uses its own training rows and weight, fitted as the final model's are, and so
    does its transformation head (``transformation_share``). The caller sets the final model's
    weights on the returned calibration."""
    pool = split.x_cal
    n = pool.shape[0]
    folds = np.array_split(np.random.default_rng(seed + 1).permutation(n), CROSS_FIT_FOLDS)
    scores = np.empty(n, np.float64)
    val_fraction = split.info.get("val_fraction", 0.1)
    for k, held in enumerate(folds):
        rest = np.setdiff1d(np.arange(n), held)
        rng = np.random.default_rng(seed + 2 + k)
        rest = rng.permutation(rest)
        n_val = max(1, round(val_fraction * n))
        val, tr = np.sort(rest[:n_val]), np.sort(rest[n_val:])
        fold = fit_model(
            cfg,
            flat(pool[tr], cfg),
            flat(pool[val], cfg),
            train,
            in_unit,
            progress,
            f"calibration fold {k + 1}/{CROSS_FIT_FOLDS}",
            sample_shape=spec.shape,
            value_range=model_range(cfg, spec),
        )
        terms = fit_score_terms(
            fold.model,
            pool[tr],
            pool[val],
            spec,
            likelihood,
            cal_opts.neighbour_share,
            transformation_share,
            device=device,
            seed=train.seed,
            progress=progress,
            desc=f"calibration fold {k + 1}/{CROSS_FIT_FOLDS}: transformation head",
        )
        scores[held] = Detector(
            fold.model, None, spec, device=device, reference=terms.reference, head=terms.head
        ).score_parts(pool[held], config=terms.config)["score"]
    return Calibration.fit(
        scores, cal_opts.target_fpr, score_config=likelihood, protocol="cross-fit"
    )


def model_range(cfg: VAEConfig, spec: InputSpec) -> tuple[float, float] | None:
    """The value range the model maps onto [0, 1]: an image's known range, Gaussian only."""
    if cfg.is_table or cfg.likelihood != "gaussian" or spec.value_range == (0.0, 1.0):
        return None
    return spec.value_range


def _masked_moments(
    x: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Mean and standard deviation of each column over its observed (non-NaN) cells; a column
    with no spread (or no observed cell) gets mean 0 or its value, and scale 1."""
    observed = ~np.isnan(x)
    count = observed.sum(axis=0)
    safe = np.where(observed, x, 0.0).astype(np.float64)
    mean = safe.sum(axis=0) / np.maximum(count, 1)
    var = (np.where(observed, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
    std = np.sqrt(var)
    scale = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def flat(x: npt.NDArray[np.float32], cfg: VAEConfig) -> npt.NDArray[np.float32]:
    return x.reshape(x.shape[0], *cfg.input_shape)
