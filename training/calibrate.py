"""Calibration: score held-out normal data, set the conformal threshold for a target FPR."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detector.complexity import DEFAULT_CODEC
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
    complexity_codec: str = DEFAULT_CODEC,
    device: str = "cpu",
) -> Calibration:
    """Threshold = conformal quantile of the held-out normal scores (higher = more anomalous)."""
    validate_fpr(target_fpr, int(x_cal.shape[0]))  # fail before spending time scoring
    scores = Detector(model, None, input_spec, device=device).score_parts(
        x_cal,
        kind=score_kind,
        samples=score_samples,
        complexity_weight=complexity_weight,
        complexity_level=complexity_level,
        complexity_codec=complexity_codec,
    )["score"]
    return Calibration.fit(
        scores,
        target_fpr,
        score_kind=score_kind,
        score_samples=score_samples,
        complexity_weight=complexity_weight,
        complexity_level=complexity_level,
        complexity_codec=complexity_codec,
    )
