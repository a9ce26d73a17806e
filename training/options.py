"""What a training run is told: the data, the model and the calibration options, each with the
defaults the benchmarks chose (docs/experiments.md) and the ``auto`` choices that adapt to the
data. ``training.pipeline`` resolves them against the data set."""

from __future__ import annotations

import math
from dataclasses import dataclass

from detector.complexity import DEFAULT_CODEC, DEFAULT_FILTER, DEFAULT_LEVEL
from detector.errors import ConfigError
from detector.neighbours import check_space
from detector.score import TABLE_RECONSTRUCTION_WEIGHT
from detector.transforms import supports as head_supports
from training.calibrate import (
    DEFAULT_COMPLEXITY_CAP_QUANTILE,
    DEFAULT_COMPLEXITY_FLOOR_QUANTILE,
    DEFAULT_NEIGHBOUR_SHARE,
    DEFAULT_TARGET_FPR,
)
from training.data import TableOptions

CALIBRATION_METHODS: tuple[str, ...] = ("auto", "split", "cross-fit")
# the transformation head's share of an image score's spread (CalibrationOptions)
IMAGE_TRANSFORMATION_SHARE = 0.4
# a table's seed ensemble: tabular suite mean AUROC +0.14 over three training seeds, 20 kept-out
# tasks +0.21 (docs/experiments.md, "Eleventh session")
TABLE_MEMBERS = 3


@dataclass(frozen=True)
class DataOptions:
    dataset: str = "mnist"  # mnist | digits | path to .npy / .csv of normal samples
    normal_class: int | None = 0  # one-vs-rest class for labelled data sets
    data_dir: str | None = None
    cal_fraction: float = 0.1
    val_fraction: float = 0.1
    split_seed: int = 0
    fetch: bool = True
    # a user's table (detector.schema): columns read as categories / as numbers / left out
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    delimiter: str | None = None
    # a user's images (.npy): "auto" (uint8 = 0-255, floats within [0, 1] = [0, 1]), "none" or
    # "LO,HI" (training.value_range)
    value_range: str = "auto"

    def table_options(self) -> TableOptions:
        return TableOptions(
            categorical=self.categorical,
            numeric=self.numeric,
            drop=self.drop,
            delimiter=self.delimiter,
        )


@dataclass(frozen=True)
class ModelOptions:
    # The MLP matches or beats the conv net on MNIST one-vs-rest (AUROC class 0: 0.995 vs 0.996,
    # class 2: 0.955 vs 0.933, class 8: 0.909 vs 0.889; same likelihood and epochs) at a third of
    # the training time and a seventh of the scoring time. conv stays available.
    architecture: str = "mlp"
    latent_dim: int = 8  # with the complexity-corrected score: 98.5 mean AUROC vs 98.2 at 16
    widths: tuple[int, ...] = ()
    # Gaussian with a fixed sigma = 0.1 beats the Bernoulli likelihood on MNIST class 0
    # (AUROC 0.996 vs 0.960, same net and epochs): the Bernoulli rates simple images such as 1s
    # as likely whatever the training class.
    likelihood: str = "gaussian"
    sigma: float | None = (
        0.1  # gaussian only (standardised units for real-valued data); None = learned
    )
    beta: float = 1.0
    # A seed ensemble of this many VAEs (detector.model); None = auto: TABLE_MEMBERS for rows of
    # features (a table's VAE trains in seconds and its seed moves a table's AUROC by up to a
    # point), 1 for images (docs/experiments.md, "Eleventh session")
    members: int | None = None

    def resolve_members(self, sample_shape: tuple[int, ...], score_kind: str = "elbo") -> int:
        if self.members is None:
            return TABLE_MEMBERS if len(sample_shape) == 1 and score_kind == "elbo" else 1
        if self.members > 1 and score_kind != "elbo":
            raise ConfigError(
                f"an ensemble (--members {self.members}) is scored by the elbo, not {score_kind}"
            )
        return self.members


@dataclass(frozen=True)
class CalibrationOptions:
    target_fpr: float = DEFAULT_TARGET_FPR
    score_kind: str = "elbo"
    score_samples: int = 1
    # Input-complexity correction (detector.complexity): score = -ELBO - weight * L(x).
    # None = auto: 1 (Serra et al.'s correction, both terms in nats) for data with a known value
    # range such as images, 0 for real-valued features.
    complexity_weight: float | None = None
    complexity_level: int = DEFAULT_LEVEL  # compression level of the complexity term
    complexity_codec: str = DEFAULT_CODEC  # its compressor (detector.complexity.CODECS)
    complexity_filter: str = DEFAULT_FILTER  # the image filter before it (PNG's Average)
    # The credit min(L(x), cap) stops at this quantile of the validation normals' L (None =
    # uncapped): on MNIST the capped term keeps the correction's gain, on Fashion-MNIST it no
    # longer hands complex anomalies a discount (docs/experiments.md).
    complexity_cap_quantile: float | None = DEFAULT_COMPLEXITY_CAP_QUANTILE
    # An input whose L(x) is below this quantile of the validation normals' pays one nat per nat
    # it falls short (None = no floor): simpler than nearly all normal data is evidence too (a 1
    # under an 8 model; docs/experiments.md).
    complexity_floor_quantile: float | None = DEFAULT_COMPLEXITY_FLOOR_QUANTILE
    # split: score the held-out calibration rows; cross-fit: K-fold out-of-fold scores of every
    # normal row; auto: cross-fit when the calibration split is too small (calibration_method).
    method: str = "auto"
    # The neighbour term (detector.neighbours): its robust spread on the validation
    # normals as a share of the likelihood term's; 0 = off.
    neighbour_share: float = DEFAULT_NEIGHBOUR_SHARE
    # Where its distances are measured: latent (posterior means), input (standardised features),
    # or auto: the input space for tables (1-D samples), the latent space for images
    # (detector.neighbours; docs/experiments.md, "Sixth session").
    neighbour_space: str = "auto"
    # What the reconstruction counts for against the KL term (1 = the -ELBO). None = auto:
    # TABLE_RECONSTRUCTION_WEIGHT for tables (1-D samples) scored by the ELBO, else 1.
    reconstruction_weight: float | None = None
    # The transformation head (detector.transforms): the spread of log(its surprise + offset) on the
    # validation normals as a share of the rest of the score's; 0 = no head. None = auto:
    # IMAGE_TRANSFORMATION_SHARE for square images, 0 for tables and other shapes
    # (docs/experiments.md, "Eighth session").
    transformation_share: float | None = None

    def resolve_transformation_share(self, sample_shape: tuple[int, ...]) -> float:
        """Checked before any training: a refused share costs no time."""
        share = self.transformation_share
        if share is None:
            return IMAGE_TRANSFORMATION_SHARE if head_supports(sample_shape) else 0.0
        if not (math.isfinite(share) and share >= 0):
            raise ConfigError(f"transformation share must be a finite number >= 0, got {share}")
        if share > 0 and not head_supports(sample_shape):
            raise ConfigError(
                "the transformation head needs square images ((H, W) or (C, H, W), side 8-1024); "
                f"the data's samples are shaped {tuple(sample_shape)}: use "
                "--transformation-share 0"
            )
        return float(share)

    def resolve_reconstruction_weight(self, sample_shape: tuple[int, ...]) -> float:
        """Checked before any training: a refused weight costs no time."""
        w = self.reconstruction_weight
        if w is None:
            table = len(sample_shape) == 1 and self.score_kind == "elbo"
            return TABLE_RECONSTRUCTION_WEIGHT if table else 1.0
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"reconstruction weight must be a finite number > 0, got {w}")
        if w != 1 and self.score_kind != "elbo":
            raise ConfigError(
                f"a reconstruction weight other than 1 needs --score elbo; the {self.score_kind} "
                "score is scored whole"
            )
        return float(w)

    def resolve_neighbour_space(self, sample_shape: tuple[int, ...]) -> str:
        if self.neighbour_space == "auto":
            return "input" if len(sample_shape) == 1 else "latent"
        return check_space(self.neighbour_space)

    def resolve_complexity_weight(self, value_range: tuple[float, float] | None) -> float:
        if self.complexity_weight is None:
            return 1.0 if value_range is not None else 0.0
        if self.complexity_weight < 0:
            raise ConfigError(f"complexity weight must be >= 0, got {self.complexity_weight}")
        if self.complexity_weight > 0 and value_range is None:
            raise ConfigError(
                "the complexity correction needs data with a known value range (images in [0, 1]); "
                "use --complexity-weight 0 for real-valued features"
            )
        return float(self.complexity_weight)
