"""vae-anomaly's core library: the VAE, its anomaly score, thresholds and the model artifact.

Usable on its own from a notebook::

    from detector import Detector
    det = Detector.load("runs/mnist-0")
    result = det.score(x)          # x: (N, 784) or (N, 1, 28, 28), values in [0, 1]
    result.score                   # -ELBO, corrected (see README), higher = more anomalous
    result.is_anomaly              # score > calibrated threshold

No web, pandas or command-line code lives here.
"""

from __future__ import annotations

from detector.artifact import Artifact, load, save
from detector.detector import DetectionResult, Detector, resolve_device
from detector.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ConfigError,
    DataError,
    FPRError,
    InputError,
    NotCalibratedError,
    VAEAnomalyError,
)
from detector.model import VAE, VAEConfig
from detector.score import SCORE_DEFINITION, ScoreParts, elbo_score, iwae_score, score_batch
from detector.spec import InputSpec, validate_samples
from detector.threshold import Calibration, conformal_threshold, p_values, validate_fpr

__all__ = [
    "SCORE_DEFINITION",
    "VAE",
    "Artifact",
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactNotFoundError",
    "Calibration",
    "ConfigError",
    "DataError",
    "DetectionResult",
    "Detector",
    "FPRError",
    "InputError",
    "InputSpec",
    "NotCalibratedError",
    "ScoreParts",
    "VAEAnomalyError",
    "VAEConfig",
    "conformal_threshold",
    "elbo_score",
    "iwae_score",
    "load",
    "p_values",
    "resolve_device",
    "save",
    "score_batch",
    "validate_fpr",
    "validate_samples",
]
