"""Per-sample detection results: score parts made into p-values and flags.

Score direction, as everywhere: **higher score = more anomalous**.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detector.threshold import Calibration


@dataclass(frozen=True)
class DetectionResult:
    """Per-sample results, each an array of length N.

    ``score``: -ELBO in nats, minus ``complexity_weight * min(complexity, cap)`` when the
    input-complexity correction is on (``complexity`` is 0 when it is off), plus
    ``neighbour_weight * neighbour`` (the distance to the training rows; 0 when off), plus
    ``transformation_weight * log(transformation + transformation_offset)`` (the transformation
    head's surprise, images; 0 without a head); higher = more anomalous. ``p_value``: conformal
    p-value, small = anomalous. ``is_anomaly``: score > threshold.
    """

    score: npt.NDArray[np.float64]
    reconstruction: npt.NDArray[np.float64]
    kl: npt.NDArray[np.float64]
    complexity: npt.NDArray[np.float64]
    neighbour: npt.NDArray[np.float64]
    transformation: npt.NDArray[np.float64]
    p_value: npt.NDArray[np.float64]
    is_anomaly: npt.NDArray[np.bool_]
    threshold: float

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "score",
        "reconstruction",
        "kl",
        "complexity",
        "neighbour",
        "transformation",
        "p_value",
        "is_anomaly",
    )  # the per-sample results, in the order of every response and output file

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @classmethod
    def from_parts(
        cls, parts: dict[str, npt.NDArray[np.float64]], calibration: Calibration
    ) -> DetectionResult:
        """Score parts (``Detector.score_parts``) made into decisions: the one place where
        scores become p-values and flags, for the facade, the service and batch scoring."""
        score = parts["score"]
        return cls(
            score=score,
            reconstruction=parts["reconstruction"],
            kl=parts["kl"],
            complexity=parts["complexity"],
            neighbour=parts["neighbour"],
            transformation=parts["transformation"],
            p_value=calibration.p_values(score),
            is_anomaly=calibration.flags(score),
            threshold=calibration.threshold,
        )

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        return {name: getattr(self, name) for name in self.COLUMNS}
