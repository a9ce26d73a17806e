"""The report's figures for a model trained on a table: scores on a logarithmic axis, and which
columns made the most anomalous rows anomalous (``detector.explain``), with column names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from detector.explain import explain_rows
from training.figures import (
    ANOMALY_COLOUR,
    NORMAL_COLOUR,
    FigureContext,
    Skip,
    errors_at_threshold,
    new_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_COLUMNS = 20  # columns shown per heat map: those that contribute most to its rows


def score_distribution(ctx: FigureContext) -> Figure:
    """Histogram on a symmetric-log axis: a table's scores span orders of magnitude (a cell
    1,000 sigmas off adds 500,000 nats), and a linear axis would show one bar and a tail."""
    s = ctx.result.score
    cal = np.asarray(ctx.detector.require_calibration().scores)
    both = np.concatenate([s, cal])
    scale = max(float(np.median(np.abs(cal - np.median(cal)))), 1.0)  # linear within +-scale
    lo, hi = float(both.min()), float(both.max())
    edges = scale * np.sinh(np.linspace(np.arcsinh(lo / scale), np.arcsinh(hi / scale), 70))
    fig = new_figure(8, 3.8)
    ax = fig.subplots()
    kw: dict[str, Any] = {"bins": edges.tolist(), "alpha": 0.6}
    if ctx.y is not None:
        for value, name, colour in ((0, "normal", NORMAL_COLOUR), (1, "anomalous", ANOMALY_COLOUR)):
            part = s[ctx.y == value]
            ax.hist(part, color=colour, label=f"{name} ({len(part)})", **kw)
    else:
        ax.hist(s, color="0.4", label=f"report data ({len(s)})", **kw)
    weights = np.full(len(cal), len(s) / max(len(cal), 1))  # on the report data's count scale
    ax.hist(
        cal,
        bins=edges.tolist(),
        weights=weights,
        histtype="step",
        color="0.3",
        lw=1.2,
        label=f"calibration normals ({len(cal)}, rescaled)",
    )
    fpr = ctx.detector.require_calibration().target_fpr
    ax.axvline(ctx.threshold, color="k", ls="--", lw=1.2, label=f"threshold (target FPR {fpr:.1%})")
    ax.set_xscale("symlog", linthresh=scale)
    ax.set_xlim(float(edges[0]), float(edges[-1]))
    ax.set_title("Score distribution (symmetric-log axis)")
    ax.set_xlabel("score (nats; higher = more anomalous)")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def contributions(ctx: FigureContext, order: npt.NDArray[np.integer[Any]], title: str) -> Figure:
    """A heat map: the chosen rows (top to bottom) against the columns contributing most to
    them, each cell the column's contribution in nats (log colour scale), with the row's score
    and top columns."""
    from matplotlib.colors import LogNorm

    idx = [int(i) for i in order[: max(ctx.examples, 10)]]
    if not idx:
        raise Skip("no such rows")
    why = explain_rows(ctx.detector, ctx.x[idx])
    c = why.contributions
    keep = np.argsort(-c.sum(axis=0), kind="stable")[: min(MAX_COLUMNS, c.shape[1])]
    shown = np.maximum(c[:, keep], 1e-3)
    fig = new_figure(max(6.0, 0.42 * len(keep) + 4.5), 1.2 + 0.36 * len(idx))
    ax = fig.subplots()
    mesh = ax.imshow(
        shown,
        aspect="auto",
        cmap="inferno",
        norm=LogNorm(vmin=max(float(shown.min()), 1e-3), vmax=max(float(shown.max()), 1e-2)),
        interpolation="nearest",
    )
    ax.set_xticks(range(len(keep)), [why.columns[j] for j in keep], rotation=60, ha="right")
    truth = (
        ["anomalous" if ctx.y[i] else "normal" for i in idx]
        if ctx.y is not None
        else [""] * len(idx)
    )
    ax.set_yticks(
        range(len(idx)),
        [f"row {i} {t} · score {ctx.result.score[i]:.4g}" for i, t in zip(idx, truth, strict=True)],
    )
    ax.tick_params(labelsize=7)
    fig.colorbar(mesh, ax=ax, label="contribution (nats)")
    fig.suptitle(title)
    return fig


def false_positives(ctx: FigureContext) -> Figure:
    fp = errors_at_threshold(ctx, "fp", what="row")
    return contributions(ctx, fp, f"False positives ({fp.size} flagged)")


def false_negatives(ctx: FigureContext) -> Figure:
    fn = errors_at_threshold(ctx, "fn")
    return contributions(ctx, fn, f"False negatives ({fn.size} missed)")


def not_for_tables(_ctx: FigureContext) -> Figure:
    raise Skip("decoded rows of a table are not pictures; see the column contributions above")
