"""Thresholds and p-values from held-out normal scores (split conformal prediction).

Given n calibration scores s_1..s_n of normal samples the model never trained on, and a test score
s of a normal sample exchangeable with them:

- the threshold for a target false-positive rate ``fpr`` is the k-th smallest calibration score,
  k = ceil((n + 1) * (1 - fpr)); flagging ``score > threshold`` then has a false-positive rate of
  at most ``fpr`` on normal data (Vovk et al., "Algorithmic Learning in a Random World", 2005;
  Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021);
- the p-value of s is (1 + #{i : s_i >= s}) / (n + 1): small = unlike the normal data.

k <= n needs fpr >= 1 / (n + 1); we ask for fpr >= 1 / n so the threshold is never the largest
calibration score by accident of rounding. Scores: higher = more anomalous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from detector.errors import ConfigError, FPRError
from detector.neighbours import MAX_REFERENCE_ROWS
from detector.score import ScoreConfig

FloatArray = npt.NDArray[np.float64]
DEFAULT_TARGET_FPR = 0.01  # the false-alarm rate a threshold aims at unless told otherwise


def validate_fpr(fpr: float, n_calibration: int) -> None:
    """Refuse a target FPR the calibration set cannot support."""
    if not isinstance(fpr, int | float) or math.isnan(fpr):
        raise FPRError(f"target FPR must be a number, got {fpr!r}")
    if not 0.0 < fpr < 1.0:
        raise FPRError(f"target FPR must be strictly between 0 and 1, got {fpr}")
    if n_calibration < 1:
        raise FPRError("calibration needs at least one held-out normal score")
    if fpr < 1.0 / n_calibration:
        need = 1.0 / fpr  # may be infinite for a subnormal FPR
        rows = (
            f"{math.ceil(need)}"
            if need < 1e15
            else (f"{need:.3g}" if math.isfinite(need) else "more than 1e308")
        )
        raise FPRError(
            f"target FPR {fpr} is below 1/n = {1.0 / n_calibration:.6g} for n = {n_calibration} "
            f"calibration scores; hold out at least {rows} normal samples "
            "for calibration or raise the target FPR"
        )


def conformal_threshold(calibration_scores: npt.ArrayLike, fpr: float) -> float:
    """The k-th smallest calibration score, k = ceil((n + 1)(1 - fpr)). Higher = more anomalous."""
    scores = _as_scores(calibration_scores)
    n = scores.size
    validate_fpr(fpr, n)
    # Round away float noise before ceil: (n + 1) * (1 - fpr) can land a hair above an integer.
    k = math.ceil(round((n + 1) * (1.0 - fpr), 9))
    k = min(max(k, 1), n)
    return float(np.sort(scores)[k - 1])


def p_values(scores: npt.ArrayLike, calibration_scores: npt.ArrayLike) -> FloatArray:
    """(1 + #{cal >= s}) / (n + 1) for each score s; small p = anomalous."""
    cal = np.sort(_as_scores(calibration_scores))
    return _p_values_sorted(np.asarray(scores, dtype=np.float64), cal)


def _p_values_sorted(scores: FloatArray, sorted_calibration: FloatArray) -> FloatArray:
    n_ge = sorted_calibration.size - np.searchsorted(sorted_calibration, scores, side="left")
    return np.asarray((1.0 + n_ge) / (sorted_calibration.size + 1.0), dtype=np.float64)


def _as_scores(values: npt.ArrayLike) -> FloatArray:
    scores = np.asarray(values, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ConfigError("calibration needs at least one held-out normal score")
    if not np.all(np.isfinite(scores)):
        raise ConfigError("calibration scores contain NaN or infinity")
    return scores


PROTOCOLS: tuple[str, ...] = ("split", "cross-fit")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown calibration protocol {protocol!r}; choose one of {PROTOCOLS}")


@dataclass(frozen=True)
class Calibration:
    """A threshold, the calibration scores behind it and the score they were computed with
    (saved as ``calibration.json``)."""

    target_fpr: float
    threshold: float
    scores: tuple[float, ...] = field(repr=False)
    score_config: ScoreConfig = field(default_factory=ScoreConfig)
    # How the calibration scores were obtained: "split" (a held-out calibration split scored by
    # this model) or "cross-fit" (every normal row scored out of fold by a model of K that never
    # saw it; training.pipeline).
    protocol: str = "split"
    # Training rows' posterior means stored beside the weights for the neighbour term
    # (detector.neighbours); 0 when the term is off.
    n_reference: int = 0

    def __post_init__(self) -> None:
        _check_protocol(self.protocol)
        if not self.scores:
            raise ConfigError("a calibration needs at least one calibration score")
        if not all(math.isfinite(s) for s in self.scores) or not math.isfinite(self.threshold):
            raise ConfigError("calibration scores and threshold must be finite numbers")
        if not 0 < self.target_fpr < 1:
            raise ConfigError(f"target FPR must be between 0 and 1, got {self.target_fpr}")
        if not 0 <= self.n_reference <= MAX_REFERENCE_ROWS:
            raise ConfigError(
                f"n_reference must be between 0 and {MAX_REFERENCE_ROWS}, got {self.n_reference}"
            )
        if self.score_config.neighbour_weight > 0 and self.n_reference < 1:
            raise ConfigError("a neighbour weight > 0 needs reference rows (n_reference >= 1)")

    @classmethod
    def fit(
        cls,
        calibration_scores: npt.ArrayLike,
        target_fpr: float = DEFAULT_TARGET_FPR,
        *,
        score_config: ScoreConfig | None = None,
        protocol: str = "split",
        n_reference: int = 0,
    ) -> Calibration:
        scores = _as_scores(calibration_scores)
        threshold = conformal_threshold(scores, target_fpr)
        return cls(
            target_fpr=float(target_fpr),
            threshold=threshold,
            scores=tuple(float(s) for s in np.sort(scores)),
            score_config=score_config or ScoreConfig(),
            protocol=protocol,
            n_reference=int(n_reference),
        )

    @property
    def n(self) -> int:
        return len(self.scores)

    @cached_property
    def _sorted_scores(self) -> FloatArray:
        # Built once per calibration: p-values are asked for on every request served.
        return np.sort(_as_scores(self.scores))

    def p_values(self, scores: npt.ArrayLike) -> FloatArray:
        """(1 + #{calibration scores >= s}) / (n + 1) for each score s: small = anomalous."""
        return _p_values_sorted(np.asarray(scores, dtype=np.float64), self._sorted_scores)

    def flags(self, scores: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """True where score > threshold (anomalous)."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def with_fpr(self, target_fpr: float) -> Calibration:
        """The same calibration scores, thresholded for another target FPR."""
        threshold = conformal_threshold(self.scores, target_fpr)
        return replace(self, target_fpr=float(target_fpr), threshold=threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.score_config.to_dict(),
            "direction": "higher score = more anomalous; is_anomaly = score > threshold",
            "target_fpr": self.target_fpr,
            "threshold": self.threshold,
            "n_calibration": self.n,
            "protocol": self.protocol,
            "n_reference": self.n_reference,
            "method": "conformal: k-th smallest score, k = ceil((n + 1)(1 - target_fpr))",
            "scores": list(self.scores),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        cal = cls(
            target_fpr=float(d["target_fpr"]),
            threshold=float(d["threshold"]),
            scores=tuple(float(s) for s in d["scores"]),
            score_config=ScoreConfig.from_dict(d),
            protocol=str(d.get("protocol", "split")),
            n_reference=int(d.get("n_reference", 0)),
        )
        if cal.n != int(d.get("n_calibration", cal.n)):
            raise ConfigError("calibration.json: n_calibration does not match its scores")
        return cal
