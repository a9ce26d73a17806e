"""Calibration: score held-out normal data, set the conformal threshold for a target FPR."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detector.detector import Detector
from detector.model import VAE
from detector.spec import InputSpec
from detector.threshold import Calibration, validate_fpr

DEFAULT_TARGET_FPR = 0.01


def calibrate(
    model: VAE,
    x_cal: npt.NDArray[np.float32],
    input_spec: InputSpec,
    *,
    target_fpr: float = DEFAULT_TARGET_FPR,
    score_kind: str = "elbo",
    score_samples: int = 1,
    complexity_weight: float = 0.0,
    complexity_level: int = 1,
    device: str = "cpu",
) -> Calibration:
    """Threshold = conformal quantile of the held-out normal scores (higher = more anomalous)."""
    validate_fpr(target_fpr, int(x_cal.shape[0]))  # fail before spending time scoring
    # An uncalibrated stand-in that carries the score's settings; the threshold is fitted below.
    provisional = Calibration(
        target_fpr=target_fpr,
        threshold=float("inf"),
        scores=(0.0,),
        score_kind=score_kind,
        score_samples=score_samples,
        complexity_weight=complexity_weight,
        complexity_level=complexity_level,
    )
    scores = Detector(model, provisional, input_spec, device=device).score_parts(x_cal)["score"]
    return Calibration.fit(
        scores,
        target_fpr,
        score_kind=score_kind,
        score_samples=score_samples,
        complexity_weight=complexity_weight,
        complexity_level=complexity_level,
    )
