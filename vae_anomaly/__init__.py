"""vae-anomaly: what stands above the core library and its two sides.

``detector`` is the core (model, score, threshold, artifact), ``training`` fits and calibrates,
``serving`` scores over HTTP and in files. This package holds what uses them together: the
``vae-anomaly`` command (``vae_anomaly.cli``) and the benchmark harnesses (``vae_anomaly.bench``).
Nothing in ``detector``, ``training`` or ``serving`` imports it.

``from vae_anomaly import Detector`` gives the scoring facade; it is imported on first use, so the
command line can set its thread policy before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detector import DetectionResult, Detector

__all__ = ["DetectionResult", "Detector"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'vae_anomaly' has no attribute {name!r}")
