"""Evaluation on labelled data: AUROC, average precision, observed FPR / TPR at the threshold."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

from detector.detector import Detector
from detector.errors import DataError


def detection_metrics(
    scores: npt.ArrayLike, is_anomaly: npt.ArrayLike, threshold: float | None = None
) -> dict[str, float]:
    """AUROC and average precision (anomaly = positive); FPR / TPR of ``score > threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly).astype(bool)
    if s.shape != y.shape:
        raise DataError(f"{s.size} scores but {y.size} labels")
    if y.all() or not y.any():
        raise DataError("evaluation needs both normal (0) and anomalous (1) samples")
    out = {
        "auroc": float(roc_auc_score(y, s)),
        "average_precision": float(average_precision_score(y, s)),
    }
    if threshold is not None:
        flagged = s > threshold
        out["observed_fpr"] = float(flagged[~y].mean())
        out["tpr"] = float(flagged[y].mean())
    return out


def evaluate(
    detector: Detector,
    x: npt.NDArray[np.float32],
    is_anomaly: npt.ArrayLike,
    *,
    labels: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Score ``x`` and compare with ``is_anomaly`` (1 = anomalous). Higher score = more anomalous.

    With class ``labels``, also the AUROC of the normal samples against each other class alone.
    """
    y = np.asarray(is_anomaly).astype(bool)
    t0 = time.perf_counter()
    result = detector.score(x)
    seconds = time.perf_counter() - t0
    cal = detector.calibration
    assert cal is not None  # detector.score raised otherwise
    out: dict[str, Any] = {
        "model_version": detector.model_version,
        "n": int(y.size),
        "n_normal": int((~y).sum()),
        "n_anomalous": int(y.sum()),
        "threshold": cal.threshold,
        "target_fpr": cal.target_fpr,
        **detection_metrics(result.score, y, cal.threshold),
        "scoring_seconds": seconds,
        "samples_per_second": y.size / seconds if seconds > 0 else float("inf"),
        "mean_score_normal": float(result.score[~y].mean()),
        "mean_score_anomalous": float(result.score[y].mean()),
    }
    if labels is not None:
        out["auroc_vs_class"] = auroc_per_class(result.score, y, labels)
    return out


def auroc_per_class(
    scores: npt.ArrayLike, is_anomaly: npt.ArrayLike, labels: npt.ArrayLike
) -> dict[str, float]:
    """AUROC of the normal samples against the anomalies of each class alone."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly).astype(bool)
    lab = np.asarray(labels)
    out = {}
    for c in sorted(np.unique(lab[y]).tolist()):
        mask = ~y | (lab == c)
        out[str(c)] = float(roc_auc_score(y[mask], s[mask]))
    return out


def format_report(res: dict[str, Any]) -> str:
    """A small text table of an evaluation."""
    rows = [
        ("samples", f"{res['n']} ({res['n_normal']} normal, {res['n_anomalous']} anomalous)"),
        ("AUROC", f"{res['auroc']:.4f}"),
        ("average precision", f"{res['average_precision']:.4f}"),
        ("threshold", f"{res['threshold']:.3f} nats (target FPR {res['target_fpr']:.2%})"),
        ("observed FPR", f"{res['observed_fpr']:.2%}  (normal samples flagged)"),
        ("TPR", f"{res['tpr']:.2%}  (anomalies flagged)"),
        ("scoring", f"{res['samples_per_second']:,.0f} samples/s"),
    ]
    if "auroc_vs_class" in res:
        rows.append(
            ("AUROC vs class", "  ".join(f"{c}:{v:.3f}" for c, v in res["auroc_vs_class"].items()))
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
