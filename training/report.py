"""A visual report of a trained detector: what it learned and why it flagged what it flagged.

``build(detector, x, ...)`` scores ``x`` once and writes, into one directory, PNG figures made with
matplotlib and an ``index.html`` page that shows them with the numbers behind them:

- training curves (total, reconstruction and KL per epoch, train vs validation);
- the score distribution with the threshold, the ROC and precision-recall curves;
- the most anomalous and the most normal samples, each beside its reconstruction and its
  per-feature squared reconstruction error (a heat map for images), with score, reconstruction
  and KL; the false positives and false negatives at the calibrated threshold;
- the latent space (posterior means, PCA to 2-D when the latent has more dimensions), samples
  decoded from the prior and a walk through the latent space between two test samples;
- the AUROC of the normal class against each other class.

Without labels the page shows what needs none: training curves, the score distribution, the most
anomalous and most normal samples, the latent space and the prior samples.

The directory is written atomically: a failed run leaves no half-written report.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from detector._io import OutputExistsError, atomic_directory
from detector.detector import Detector
from detector.errors import DataError, InputError
from detector.spec import validate_samples
from training.evaluate import auroc_per_class, detection_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from training.figures import (
    DPI,
    FigureContext,
    Skip,
    count_of,
    false_negatives,
    false_positives,
    gallery,
    interpolation,
    labels_array,
    latent_space,
    prior_samples,
    roc_pr,
    score_distribution,
    training_curves,
)

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What ``build`` wrote: the page, the figures, and the figures it left out and why."""

    path: Path
    figures: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Section:
    title: str
    text: str
    figure: str | None = None
    table: str = ""


_Plan = tuple[str, str, str, "Callable[[FigureContext], Figure | None]"]


def build(
    detector: Detector,
    x: npt.ArrayLike,
    out: str | Path,
    *,
    is_anomaly: npt.ArrayLike | None = None,
    labels: npt.ArrayLike | None = None,
    source: str = "",
    examples: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> Report:
    """Score ``x`` with ``detector`` and write the report directory ``out``.

    Args:
        detector: a calibrated detector (``Detector.load(path)``).
        x: samples shaped (N, features) or (N, *input shape), as for ``Detector.score``.
        out: the report directory (``index.html`` and the PNGs); refused if it exists unless
            ``overwrite``.
        is_anomaly: optional ground truth, 1 = anomalous; enables the ROC / PR curves and the
            false positives / negatives.
        labels: optional class labels (e.g. digits): colour the latent space by class and, with
            ``is_anomaly``, give the AUROC against each class.
        source: where ``x`` came from, printed on the page.
        examples: samples per gallery (most anomalous, most normal, ...).
        seed: seed of the prior samples and of the subsample of the latent plot.
    """
    if examples < 1:
        raise InputError(f"examples must be >= 1, got {examples}")
    cal = detector.require_calibration()
    arr = validate_samples(x, detector.input_spec, name="report data")
    n = arr.shape[0]
    if n < 2:
        raise DataError(f"report data has {n} sample(s); a report needs at least 2")
    y = labels_array(is_anomaly, n, "is_anomaly", binary=True)
    classes = labels_array(labels, n, "labels", binary=False)
    if y is not None and (y.all() or not y.any()):
        log.warning("the labels hold only one kind of sample; ROC and error galleries skipped")
        y = None

    t0 = time.perf_counter()
    result = detector.score(arr, name="report data")
    recon = detector.reconstruct(arr)
    latent = detector.encode(arr)
    log.info("scored %d samples in %.1fs", n, time.perf_counter() - t0)

    summary: dict[str, Any] = {
        "model_version": detector.model_version,
        "score_definition": detector.score_definition,
        "threshold": cal.threshold,
        "target_fpr": cal.target_fpr,
        "n": n,
        "flagged": int(result.is_anomaly.sum()),
        "source": source,
    }
    if y is not None:
        summary.update(detection_metrics(result.score, y, cal.threshold))
        summary["n_normal"], summary["n_anomalous"] = int((y == 0).sum()), int(y.sum())
    per_class = (
        auroc_per_class(result.score, y, classes) if y is not None and classes is not None else None
    )

    rng = np.random.default_rng(seed)
    ctx = FigureContext(detector, arr, result, recon, latent, y, classes, examples, rng)
    plans: list[_Plan] = [
        (
            "training_curves.png",
            "Training",
            "Loss per epoch on the training data and on the held-out validation data (normal "
            "samples only): total = reconstruction + KL, in nats per sample.",
            training_curves,
        ),
        (
            "score_distribution.png",
            "Score distribution",
            "Scores of the report data, higher = more anomalous; the dashed line is the "
            "calibrated threshold, the grey outline the held-out normal data it was calibrated "
            "on.",
            score_distribution,
        ),
        (
            "roc_pr.png",
            "ROC and precision-recall",
            "Anomalies are the positive class; the dot is the calibrated threshold.",
            roc_pr,
        ),
        (
            "most_anomalous.png",
            "Most anomalous samples",
            "The highest scores: each sample (top), its reconstruction (middle) and the squared "
            "reconstruction error of each feature (bottom, one colour scale for the whole figure).",
            lambda c: gallery(c, np.argsort(-c.result.score), "Most anomalous samples"),
        ),
        (
            "most_normal.png",
            "Most normal samples",
            "The lowest scores, shown the same way.",
            lambda c: gallery(c, np.argsort(c.result.score), "Most normal samples"),
        ),
        (
            "false_positives.png",
            "False positives",
            "Normal samples flagged at the calibrated threshold, highest score first.",
            false_positives,
        ),
        (
            "false_negatives.png",
            "False negatives",
            "Anomalies the threshold let through, lowest score first: what the model finds easy "
            "to explain.",
            false_negatives,
        ),
        (
            "latent_space.png",
            "Latent space",
            "Posterior means E[z | x] of the report data"
            + (" projected to 2-D by PCA." if latent.shape[1] > 2 else "."),
            latent_space,
        ),
        (
            "prior_samples.png",
            "Samples from the prior",
            "Decoded from z ~ N(0, I): what the model thinks typical data looks like.",
            prior_samples,
        ),
        (
            "latent_interpolation.png",
            "A walk through the latent space",
            "Decoded from points on the straight line between the latent codes of two samples "
            "(the originals at both ends), with the score of each decoded image. A model trained "
            "on normal data only can draw only normal-looking samples: an anomaly's code decodes "
            "to something normal, and the distance between the two is its reconstruction error.",
            interpolation,
        ),
    ]
    if detector.input_spec.schema is not None:
        plans = _table_plans(plans)
    figures: list[Path] = []
    skipped: dict[str, str] = {}
    sections: list[_Section] = []
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for name, title, text, draw in plans:
                try:
                    fig = draw(ctx)
                except Skip as why:
                    skipped[name] = str(why)
                    sections.append(_Section(title, f"Not shown: {why}."))
                    continue
                assert fig is not None
                fig.savefig(tmp / name, dpi=DPI)
                figures.append(Path(out) / name)
                sections.append(_Section(title, text, figure=name))
            if per_class is not None:
                sections.append(
                    _Section(
                        "AUROC against each class",
                        "AUROC of the normal samples against the samples of one other class.",
                        table=_table(
                            ["class", "samples", "AUROC"],
                            [
                                [str(c), str(count_of(classes, int(c))), f"{v:.4f}"]
                                for c, v in per_class.items()
                            ],
                        ),
                    )
                )
            (tmp / "index.html").write_text(_page(summary, sections), encoding="utf-8")
    except OutputExistsError as e:
        raise InputError(str(e)) from None
    summary["auroc_vs_class"] = per_class
    return Report(Path(out) / "index.html", figures, skipped, summary)


def _table_plans(plans: list[_Plan]) -> list[_Plan]:
    """A table model's report: the same sections, drawn for columns instead of pixels."""
    from training import table_figures as tf

    text = (
        "Each row's columns, coloured by their contribution to the row's likelihood term (nats "
        "above the cell's best case: 0.5 z^2 for a numeric cell z sigmas off, the surprise of "
        "a category; log colour scale); the columns that contribute most to these rows."
    )
    replace_by: dict[str, tuple[str, Callable[[FigureContext], Figure | None]]] = {
        "score_distribution.png": (
            "Scores of the report data on a symmetric-log axis (a table's scores span orders of "
            "magnitude); the dashed line is the calibrated threshold, the outline the held-out "
            "normal rows it was calibrated on.",
            tf.score_distribution,
        ),
        "most_anomalous.png": (
            "The highest scores. " + text,
            lambda c: tf.contributions(c, np.argsort(-c.result.score), "Most anomalous rows"),
        ),
        "most_normal.png": (
            "The lowest scores, shown the same way.",
            lambda c: tf.contributions(c, np.argsort(c.result.score), "Most normal rows"),
        ),
        "false_positives.png": ("Normal rows flagged, highest score first.", tf.false_positives),
        "false_negatives.png": ("Anomalies let through, lowest first.", tf.false_negatives),
        "prior_samples.png": ("", tf.not_for_tables),
        "latent_interpolation.png": ("", tf.not_for_tables),
    }
    out = []
    for name, title, text_, draw in plans:
        if name in replace_by:
            new_text, new_draw = replace_by[name]
            out.append((name, title, new_text or text_, new_draw))
        else:
            out.append((name, title, text_, draw))
    return out


# -- the page ---------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(summary: dict[str, Any], sections: list[_Section]) -> str:
    rows = [
        ["model version", summary["model_version"]],
        ["score", summary["score_definition"]],
        ["threshold", f"{summary['threshold']:.3f} nats (target FPR {summary['target_fpr']:.2%})"],
        [
            "data",
            f"{summary['n']} samples" + (f" from {summary['source']}" if summary["source"] else ""),
        ],
        ["flagged", f"{summary['flagged']} ({summary['flagged'] / summary['n']:.2%})"],
    ]
    if "auroc" in summary:
        rows += [
            ["normal / anomalous", f"{summary['n_normal']} / {summary['n_anomalous']}"],
            ["AUROC", f"{summary['auroc']:.4f}"],
            ["average precision", f"{summary['average_precision']:.4f}"],
            ["observed FPR", f"{summary['observed_fpr']:.2%} (normal samples flagged)"],
            ["TPR", f"{summary['tpr']:.2%} (anomalies flagged)"],
        ]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vae-anomaly report: {html.escape(summary['model_version'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
        "padding:0 1em;color:#222}img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:left}th{background:#f3f3f3}p.note{color:#555}</style>",
        "</head><body>",
        f"<h1>vae-anomaly report: {html.escape(summary['model_version'])}</h1>",
        _table(["", ""], rows),
    ]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.append(f'<p class="note">{html.escape(sec.text)}</p>')
        if sec.figure:
            parts.append(f'<img src="{html.escape(sec.figure)}" alt="{html.escape(sec.title)}">')
        if sec.table:
            parts.append(sec.table)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
