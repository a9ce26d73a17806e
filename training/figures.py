"""The report's figures: one function per figure, each drawing from the scored data in a
``FigureContext`` and raising ``Skip`` (with the reason shown on the page) when it does not apply."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from detector.detector import DetectionResult, Detector
from detector.errors import DataError
from training.evaluate import detection_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 100
MAX_LATENT_POINTS = 5000  # a scatter of more points only hides itself
NORMAL_COLOUR, ANOMALY_COLOUR = "#1f77b4", "#d62728"


class Skip(Exception):
    """A figure that does not apply to this model or data (the reason is shown on the page)."""


@dataclass
class FigureContext:
    detector: Detector
    x: npt.NDArray[np.float32]
    result: DetectionResult
    recon: npt.NDArray[np.float32]
    latent: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64] | None
    classes: npt.NDArray[np.int64] | None
    examples: int
    rng: np.random.Generator

    @property
    def threshold(self) -> float:
        return self.result.threshold


def labels_array(
    v: npt.ArrayLike | None, n: int, name: str, *, binary: bool
) -> npt.NDArray[np.int64] | None:
    if v is None:
        return None
    a = np.asarray(v).reshape(-1)
    if a.size != n:
        raise DataError(f"{name} has {a.size} values for {n} samples")
    if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a.astype(np.float64)).all():
        raise DataError(f"{name} must be finite numbers")
    if binary and not np.isin(a, (0, 1)).all():
        raise DataError(f"{name} must be 0 (normal) or 1 (anomalous)")
    return a.astype(np.int64)


def count_of(a: npt.NDArray[np.int64] | None, value: int) -> int:
    return 0 if a is None else int(np.count_nonzero(a == value))


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def as_image(sample: npt.NDArray[Any]) -> npt.NDArray[Any] | None:
    """A sample as something imshow draws: (H, W) or (H, W, 3); None for flat feature vectors."""
    squeezed = np.squeeze(sample)
    if squeezed.ndim == 2:
        return squeezed
    if sample.ndim == 3 and sample.shape[0] == 3:
        return np.clip(np.moveaxis(sample, 0, -1), 0, 1)
    return None


def draw_sample(
    ax: Axes, sample: npt.NDArray[Any], *, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0
) -> Any:
    img = as_image(sample)
    if img is None:
        ax.plot(np.ravel(sample), lw=0.8, color="0.2")
        ax.set_xticks([])
        ax.tick_params(labelsize=6)
        return None
    ax.set_axis_off()
    return ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")


def value_range_of(ctx: FigureContext) -> tuple[float, float]:
    vr = ctx.detector.input_spec.value_range
    if vr is not None:
        return float(vr[0]), float(vr[1])
    return float(np.min(ctx.x)), float(np.max(ctx.x))


# -- figures ----------------------------------------------------------------------------------
def training_curves(ctx: FigureContext) -> Figure:
    history = ctx.detector.metadata.get("metrics", {}).get("history") or []
    if not history:
        raise Skip("the artifact has no training history")
    epochs = [h["epoch"] for h in history]
    best = ctx.detector.metadata.get("metrics", {}).get("best_epoch")
    fig = new_figure(11, 3.2)
    axes = fig.subplots(1, 3)
    for ax, part, title in zip(
        axes,
        ("loss", "reconstruction", "kl"),
        ("total (-ELBO)", "reconstruction", "KL divergence"),
        strict=True,
    ):
        ax.plot(epochs, [h[f"train_{part}"] for h in history], label="train", lw=1.4)
        ax.plot(epochs, [h[f"val_{part}"] for h in history], label="validation", lw=1.4)
        if best is not None:
            ax.axvline(best, color="0.6", ls=":", lw=1, label=f"best epoch ({best})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per sample")
        if part != "kl":
            low = min(min(h[f"train_{part}"], h[f"val_{part}"]) for h in history)
            high = np.percentile([h[f"val_{part}"] for h in history], 90)
            ax.set_ylim(low - 0.05 * abs(low) - 1, high + 0.1 * abs(high - low) + 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training curves")
    return fig


def score_distribution(ctx: FigureContext) -> Figure:
    s = ctx.result.score
    cal = np.asarray(ctx.detector.require_calibration().scores)
    lo, hi = np.percentile(np.concatenate([s, cal]), [0.5, 99.5])
    bins = np.linspace(lo, hi, 60).tolist()
    fig = new_figure(8, 3.8)
    ax = fig.subplots()
    if ctx.y is not None:
        for value, name, colour in ((0, "normal", NORMAL_COLOUR), (1, "anomalous", ANOMALY_COLOUR)):
            part = s[ctx.y == value]
            ax.hist(
                part,
                bins=bins,
                alpha=0.6,
                color=colour,
                density=True,
                label=f"{name} ({len(part)})",
            )
    else:
        ax.hist(s, bins=bins, alpha=0.7, color="0.4", density=True, label=f"report data ({len(s)})")
    ax.hist(
        cal,
        bins=bins,
        histtype="step",
        color="0.3",
        lw=1.2,
        density=True,
        label=f"calibration normals ({len(cal)})",
    )
    fpr = ctx.detector.require_calibration().target_fpr
    ax.axvline(
        ctx.threshold,
        color="k",
        ls="--",
        lw=1.2,
        label=f"threshold {ctx.threshold:.1f} (target FPR {fpr:.1%})",
    )
    beyond = int((s > hi).sum())
    ax.set_title(
        "Score distribution" + (f" ({beyond} scores beyond the right edge)" if beyond else "")
    )
    ax.set_xlabel("score (nats; higher = more anomalous)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def roc_pr(ctx: FigureContext) -> Figure:
    if ctx.y is None:
        raise Skip("no normal / anomalous labels")
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    s, y = ctx.result.score, ctx.y
    fpr, tpr, _ = roc_curve(y, s)
    prec, rec, _ = precision_recall_curve(y, s)
    flagged = s > ctx.threshold
    op_fpr, op_tpr = float(flagged[y == 0].mean()), float(flagged[y == 1].mean())
    op_prec = float(y[flagged].mean()) if flagged.any() else 1.0
    fig = new_figure(9, 4)
    a1, a2 = fig.subplots(1, 2)
    a1.plot(fpr, tpr, lw=1.5, label=f"AUROC {auc(fpr, tpr):.4f}")
    a1.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
    a1.plot(
        [op_fpr], [op_tpr], "o", color="k", label=f"threshold: FPR {op_fpr:.2%}, TPR {op_tpr:.2%}"
    )
    a1.set_xlabel("false-positive rate")
    a1.set_ylabel("true-positive rate")
    a1.set_title("ROC curve")
    zoom = a1.inset_axes((0.38, 0.3, 0.57, 0.45))  # where detectors differ: the first 10% FPR
    zoom.plot(fpr, tpr, lw=1.2)
    zoom.plot([op_fpr], [op_tpr], "o", color="k", ms=4)
    zoom.set_xlim(0, 0.1)
    zoom.set_ylim(max(0.0, float(np.interp(0.0, fpr, tpr)) - 0.05), 1.005)
    zoom.set_title("FPR 0-10%", fontsize=7)
    zoom.tick_params(labelsize=6)
    zoom.grid(alpha=0.3)
    a2.plot(
        rec,
        prec,
        lw=1.5,
        label=f"average precision {float(detection_metrics(s, y)['average_precision']):.4f}",
    )
    a2.axhline(float(y.mean()), color="0.7", ls="--", lw=0.8, label=f"base rate {y.mean():.2f}")
    a2.plot([op_tpr], [op_prec], "o", color="k", label="threshold")
    a2.set_xlabel("recall")
    a2.set_ylabel("precision")
    a2.set_title("Precision-recall curve")
    for ax in (a1, a2):
        ax.legend(fontsize=7.5, loc="lower right")
        ax.grid(alpha=0.3)
    return fig


def gallery(ctx: FigureContext, order: npt.NDArray[np.integer[Any]], title: str) -> Figure:
    idx = [int(i) for i in order[: ctx.examples]]
    if not idx:
        raise Skip("no such samples")
    lo, hi = value_range_of(ctx)
    err = (ctx.x[idx] - ctx.recon[idx]) ** 2
    emax = max(float(np.percentile(err, 99.5)), 1e-12)
    image = as_image(ctx.x[idx[0]]) is not None
    cols = len(idx)
    fig = new_figure(max(1.3 * cols + 1.3, 5.5), 5.9 if image else 5.3)
    axes = np.asarray(fig.subplots(3, cols, squeeze=False))
    mappable = None
    for j, i in enumerate(idx):
        draw_sample(axes[0, j], ctx.x[i], vmin=lo, vmax=hi)
        draw_sample(axes[1, j], ctx.recon[i], vmin=lo, vmax=hi)
        m = draw_sample(axes[2, j], err[j], cmap="inferno", vmin=0.0, vmax=emax)
        mappable = mappable or m
        truth = ""
        if ctx.y is not None:
            truth = "anomalous" if ctx.y[i] else "normal"
            if ctx.classes is not None:
                truth += f" ({ctx.classes[i]})"
            truth += "\n"
        complexity = ctx.result.complexity[i]
        near = ctx.result.neighbour[i]
        surprise = ctx.result.transformation[i]
        axes[0, j].set_title(
            f"{truth}score {ctx.result.score[i]:.1f}\nrec {ctx.result.reconstruction[i]:.1f}"
            f" · KL {ctx.result.kl[i]:.1f}"
            + (f"\ncomplexity {complexity:.1f}" if complexity else "")
            + ("\n" if near or surprise else "")
            + " · ".join(
                ([f"nbr {near:.2f}"] if near else [])
                + ([f"transf. {surprise:.2f}"] if surprise else [])
            ),
            fontsize=7,
        )
    for r, name in enumerate(("input", "reconstruction", "squared error")):
        axes[r, 0].text(
            -0.08,
            0.5,
            name,
            transform=axes[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=8,
        )
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes[2, :]), shrink=0.9, label="squared error")
    fig.suptitle(title)
    return fig


def errors_at_threshold(
    ctx: FigureContext, kind: str, what: str = "sample"
) -> npt.NDArray[np.intp]:
    """The false positives (``kind`` "fp": normal yet flagged, highest score first) or false
    negatives ("fn": anomalous yet not flagged, lowest first); Skip when there are none."""
    if ctx.y is None:
        raise Skip("no normal / anomalous labels")
    s = ctx.result.score
    if kind == "fp":
        rows = np.flatnonzero((ctx.y == 0) & (s > ctx.threshold))
        if rows.size == 0:
            raise Skip(f"no normal {what} is above the threshold")
        return rows[np.argsort(-s[rows])]
    rows = np.flatnonzero((ctx.y == 1) & (s <= ctx.threshold))
    if rows.size == 0:
        raise Skip("every anomaly is above the threshold")
    return rows[np.argsort(s[rows])]


def false_positives(ctx: FigureContext) -> Figure:
    fp = errors_at_threshold(ctx, "fp")
    return gallery(ctx, fp, f"False positives ({fp.size} normal samples flagged)")


def false_negatives(ctx: FigureContext) -> Figure:
    fn = errors_at_threshold(ctx, "fn")
    return gallery(ctx, fn, f"False negatives ({fn.size} anomalies not flagged)")


def latent_space(ctx: FigureContext) -> Figure:
    z = ctx.latent
    keep = np.arange(len(z))
    if len(z) > MAX_LATENT_POINTS:
        keep = np.sort(ctx.rng.choice(len(z), MAX_LATENT_POINTS, replace=False))
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=0).fit(z)
        xy = pca.transform(z[keep])
        ev = pca.explained_variance_ratio_
        axis = [f"PC1 ({ev[0]:.0%} of variance)", f"PC2 ({ev[1]:.0%})"]
    elif z.shape[1] == 2:
        xy, axis = z[keep], ["z1", "z2"]
    else:
        xy = np.column_stack([z[keep, 0], ctx.rng.uniform(-0.4, 0.4, len(keep))])
        axis = ["z1", "(jitter)"]
    two = ctx.y is not None or ctx.classes is not None
    fig = new_figure(11 if two else 6.2, 4.8)
    axes: list[Axes] = list(fig.subplots(1, 2, squeeze=True)) if two else [fig.subplots()]
    dot: dict[str, Any] = {"s": 5, "alpha": 0.6, "linewidths": 0}
    if ctx.y is not None:
        yk = ctx.y[keep]
        ax = axes.pop(0)
        ax.scatter(xy[yk == 1, 0], xy[yk == 1, 1], c=ANOMALY_COLOUR, label="anomalous", **dot)
        ax.scatter(xy[yk == 0, 0], xy[yk == 0, 1], c=NORMAL_COLOUR, label="normal (on top)", **dot)
        ax.legend(markerscale=3, fontsize=8)
        ax.set_title("normal vs anomalous")
    if ctx.classes is not None:
        ck = ctx.classes[keep]
        ax = axes.pop(0)
        for c in np.unique(ck):
            ax.scatter(xy[ck == c, 0], xy[ck == c, 1], label=str(c), **dot)
        ax.legend(markerscale=3, fontsize=7, ncol=2, title="class", title_fontsize=8)
        ax.set_title("by class")
    if axes:  # no labels at all: colour by score
        ax = axes.pop(0)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=ctx.result.score[keep], cmap="viridis", **dot)
        fig.colorbar(sc, ax=ax, label="score")
        ax.set_title("coloured by score")
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        ax.set_xlabel(axis[0])
        ax.set_ylabel(axis[1])
        ax.grid(alpha=0.3)
    shown = f"{len(keep)} of {len(z)}" if len(keep) < len(z) else f"{len(z)}"
    fig.suptitle(f"Latent space: posterior means of {shown} samples")
    return fig


def prior_samples(ctx: FigureContext) -> Figure:
    k = ctx.detector.model.config.code_dim
    rows, cols = 3, 10
    decoded = ctx.detector.decode(ctx.rng.standard_normal((rows * cols, k)))
    lo, hi = value_range_of(ctx)
    fig = new_figure(cols * 0.95, rows * 1.05 + 0.5)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax, sample in zip(axes.flat, decoded, strict=True):
        draw_sample(ax, sample, vmin=lo, vmax=hi)
    fig.suptitle("Samples decoded from the prior z ~ N(0, I)")
    return fig


def interpolation(ctx: FigureContext) -> Figure:
    s = ctx.result.score
    if ctx.y is not None:  # from the most typical normal sample to a clearly flagged anomaly
        normal = np.flatnonzero(ctx.y == 0)
        anomalous = np.flatnonzero(ctx.y == 1)
        a = int(normal[np.argmin(s[normal])])
        b = int(anomalous[np.argsort(s[anomalous])[len(anomalous) // 2]])  # the median anomaly
        ends = ("most normal normal sample", "median anomaly")
    else:
        a, b = int(np.argmin(s)), int(np.argmax(s))
        ends = ("lowest score", "highest score")
    steps = 8
    t = np.linspace(0.0, 1.0, steps)[:, None]
    z = (1 - t) * ctx.latent[a] + t * ctx.latent[b]
    lo, hi = value_range_of(ctx)
    decoded = np.clip(ctx.detector.decode(z), lo, hi)  # a Gaussian mean may overshoot the range
    walk_scores = ctx.detector.score(decoded).score
    fig = new_figure((steps + 2) * 1.05 + 0.4, 2.2)
    axes = fig.subplots(1, steps + 2)
    draw_sample(axes[0], ctx.x[a], vmin=lo, vmax=hi)
    axes[0].set_title(f"original\nscore {s[a]:.1f}", fontsize=7.5)
    for j in range(steps):
        draw_sample(axes[j + 1], decoded[j], vmin=lo, vmax=hi)
        axes[j + 1].set_title(f"t={t[j, 0]:.2f}\nscore {walk_scores[j]:.1f}", fontsize=7.5)
    draw_sample(axes[-1], ctx.x[b], vmin=lo, vmax=hi)
    axes[-1].set_title(f"original\nscore {s[b]:.1f}", fontsize=7.5)
    fig.suptitle(f"Latent walk: {ends[0]} to {ends[1]}", fontsize=10)
    return fig
