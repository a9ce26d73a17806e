"""The model the service answers with: loaded, verified, swapped in on reload."""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache

from detector.detector import Detector
from detector.errors import VAEAnomalyError
from detector.threshold import Calibration
from serving.errors import (
    ModelNotReady,
)
from serving.metrics import Metrics
from serving.settings import Settings

log = logging.getLogger("vae_anomaly.serving")


# -- model state ----------------------------------------------------------------------------------
class ModelHolder:
    """The detector being served; swapped whole on reload, never half-updated."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.detector: Detector | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()

    def current(self) -> Detector:
        if self.detector is None:
            raise ModelNotReady(self.error or "the model is still loading")
        return self.detector

    def install(self, det: Detector) -> None:
        previous = self.detector.model_version if self.detector else None
        self.detector = det
        self.error = None
        calibration_for.cache_clear()
        assert det.calibration is not None  # Detector.load always has one
        self.metrics.set_model(det.model_version, det.calibration, previous)

    async def load(self, path: str) -> Detector:
        """Load and verify an artifact off the event loop; on failure keep what is served."""
        async with self._lock:
            try:
                det = await asyncio.to_thread(
                    Detector.load,
                    path,
                    device=self.settings.device,
                    batch_size=max(512, self.settings.max_batch_size),
                    runtime=self.settings.runtime,
                )
            except VAEAnomalyError as e:
                self.metrics.reloads.labels("failure").inc()
                log.error("model load from %s failed: %s", path, e)
                if self.detector is None:
                    self.error = f"model failed to load: {e}"
                raise
            if self.detector is not None:
                self.metrics.reloads.labels("success").inc()
            self.install(det)
            log.info("serving model %s from %s", det.model_version, path)
            return det


@lru_cache(maxsize=64)
def calibration_for(cal: Calibration, target_fpr: float) -> Calibration:
    return cal.with_fpr(target_fpr)
