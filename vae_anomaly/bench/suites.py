"""The MNIST one-vs-rest benchmark: our detector and baselines on the same splits.

Protocol (Ruff et al., Deep SVDD, 2018; Abati et al., LSA, 2019; Perera et al., OCGAN, 2019): for
each digit c, train on the training images of c only (a seeded 10 % held out for calibration and
10 % for early stopping, never trained on), score the full 10,000-image test set with c normal and
every other digit anomalous, and report AUROC per class and the mean. Every method is calibrated on
the same held-out class-c images for the same target FPR and scored on the same test set.

Results are cached per (method, configuration, class, seed), so an interrupted run resumes where it
stopped, and a second run with the same configuration only rebuilds the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from detector._io import atomic_output, write_json
from detector.errors import ConfigError
from detector.threshold import Calibration
from training.data import Dataset, Split, load_dataset, one_vs_rest
from training.evaluate import detection_metrics
from training.pipeline import CalibrationOptions, DataOptions, ModelOptions, train_detector
from training.train import TrainConfig

log = logging.getLogger(__name__)

# Published mean AUROC on this protocol, per data set, for the README's comparison (percent).
PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    "mnist": {
        "VAE (-ELBO), Abati et al. 2019": {
            "per_class": [99.8, 99.9, 96.2, 94.7, 96.5, 96.3, 99.5, 97.4, 90.5, 97.8],
            "mean": 96.9,
        },
        "LSA, Abati et al. 2019": {"mean": 97.5},
        "OCGAN, Perera et al. 2019": {"mean": 97.5},
        "OC-SVM (reported by Ruff et al. 2018)": {"mean": 95.1},
        "Deep SVDD, Ruff et al. 2018": {"mean": 94.8},
    },
    "fashion-mnist": {
        "GOAD, Bergman & Hoshen 2020": {"mean": 94.1},
        "GEOM (reported by Bergman & Hoshen 2020)": {"mean": 93.5},
        "Deep SVDD (reported by Bergman & Hoshen 2020)": {"mean": 92.8},
    },
}


@dataclass
class MethodRun:
    test_scores: npt.NDArray[np.float64]  # higher = more anomalous
    cal_scores: npt.NDArray[np.float64]
    train_seconds: float
    score_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    uses_seed: bool
    params: dict[str, Any]
    run: Callable[[Split, int, Dataset], MethodRun]


def _flat(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return x.reshape(x.shape[0], -1)


def _sk_method(
    name: str,
    label: str,
    uses_seed: bool,
    params: dict[str, Any],
    make: Callable[[int, int], Any],  # (seed, n_features) -> an unfitted estimator
    score: Callable[[Any, npt.NDArray[np.float32]], npt.NDArray[np.float64]],
) -> Method:
    def run(split: Split, seed: int, ds: Dataset) -> MethodRun:
        assert split.x_test is not None
        x_fit = _flat(np.concatenate([split.x_train, split.x_val]))  # same data budget as the VAE
        x_test, x_cal = _flat(split.x_test), _flat(split.x_cal)
        t0 = time.perf_counter()
        if ds.value_range is None:
            # Real-valued features (tables): a missing cell (NaN) takes its column's mean over
            # the fit rows (scikit-learn's SimpleImputer), then every column is standardised with
            # the fit data's statistics, as the VAE standardises its inputs. Images (a known
            # value range) are used as they are.
            fill = np.nan_to_num(np.nanmean(x_fit, axis=0)) if np.isnan(x_fit).any() else None
            if fill is not None:
                x_fit, x_test, x_cal = (
                    np.where(np.isnan(a), fill, a) for a in (x_fit, x_test, x_cal)
                )
            mean, std = x_fit.mean(axis=0), x_fit.std(axis=0)
            std = np.where(std > 1e-8, std, 1.0)
            x_fit, x_test, x_cal = ((a - mean) / std for a in (x_fit, x_test, x_cal))
        est = make(seed, x_fit.shape[1]).fit(x_fit)
        t1 = time.perf_counter()
        test = score(est, x_test)
        t2 = time.perf_counter()
        return MethodRun(
            np.asarray(test, np.float64),
            np.asarray(score(est, x_cal), np.float64),
            t1 - t0,
            t2 - t1,
        )

    return Method(name, label, uses_seed, params, run)


class ECOD:
    """ECOD (Li et al., "ECOD: Unsupervised Outlier Detection Using Empirical Cumulative
    Distribution Functions", TKDE 2022), fitted on the fit data only.

    PyOD's ``ECOD.decision_function`` recomputes the ECDFs over the training data *and* the rows
    being scored, so a test set with many anomalies shifts its own ECDFs; with one-vs-rest test
    sets larger than the training set that is not the method. Here each feature's left and right
    tail probabilities come from the fit rows alone, (1 + count) / (n + 1), and the score is the
    larger of the left, right and skewness-chosen sums of -log tail probabilities, as in the paper.
    """

    def fit(self, x: npt.NDArray[np.float32]) -> ECOD:
        from scipy.stats import skew

        self.sorted_ = np.sort(np.asarray(x, np.float64), axis=0)  # (n, d)
        self.left_skewed_ = np.asarray(skew(self.sorted_, axis=0) < 0)  # (d,)
        return self

    def score(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        n, d = self.sorted_.shape
        x = np.asarray(x, np.float64)
        le = np.empty_like(x)  # count of fit values <= x, per feature
        ge = np.empty_like(x)  # count of fit values >= x
        for j in range(d):
            col = self.sorted_[:, j]
            le[:, j] = np.searchsorted(col, x[:, j], side="right")
            ge[:, j] = n - np.searchsorted(col, x[:, j], side="left")
        left = -np.log((le + 1) / (n + 1))
        right = -np.log((ge + 1) / (n + 1))
        auto = np.where(self.left_skewed_, left, right)
        return np.asarray(np.maximum.reduce([left.sum(1), right.sum(1), auto.sum(1)]))


class KNN:
    """Distance to the k-th nearest fit sample (PyOD's KNN, method "largest")."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, x: npt.NDArray[np.float32]) -> KNN:
        from sklearn.neighbors import NearestNeighbors

        self.nn_ = NearestNeighbors(n_neighbors=self.k).fit(x)
        return self

    def score(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.asarray(self.nn_.kneighbors(x)[0][:, -1], np.float64)


def baseline_methods() -> dict[str, Method]:
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.svm import OneClassSVM

    def pca_error(est: Any, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        rec = est.inverse_transform(est.transform(x))
        return np.asarray(((x - rec) ** 2).sum(axis=1), np.float64)

    methods = {
        "pca": _sk_method(
            "pca",
            "PCA, 32 components (at most half the features), reconstruction error",
            False,
            {"n_components": 32},
            lambda seed, d: PCA(n_components=min(32, max(1, d // 2)), random_state=0),
            pca_error,
        ),
        "iforest": _sk_method(
            "iforest",
            "IsolationForest, 200 trees",
            True,
            {"n_estimators": 200},
            lambda seed, d: IsolationForest(n_estimators=200, random_state=seed),
            lambda e, x: -e.score_samples(x),
        ),
        "ocsvm": _sk_method(
            "ocsvm",
            "OC-SVM, RBF, nu = 0.1, gamma = scale",
            False,
            {"nu": 0.1, "gamma": "scale"},
            lambda seed, d: OneClassSVM(kernel="rbf", nu=0.1, gamma="scale"),
            lambda e, x: -e.decision_function(x),
        ),
        "knn": _sk_method(
            "knn",
            "kNN, distance to the 5th neighbour",
            False,
            {"k": 5},
            lambda seed, d: KNN(5),
            lambda e, x: e.score(x),
        ),
    }
    methods["ecod"] = _sk_method(
        "ecod",
        "ECOD (empirical-CDF outlier detection)",
        False,
        {"inductive": True},
        lambda seed, d: ECOD(),
        lambda e, x: e.score(x),
    )
    try:
        from pyod.models.vae import VAE as PyODVAE
    except ImportError:
        return methods

    def make_pyod(seed: int, d: int) -> Any:
        import torch

        torch.manual_seed(seed)
        return PyODVAE(random_state=seed, verbose=0)

    methods["pyod-vae"] = _sk_method(
        "pyod-vae",
        "PyOD VAE, its defaults",
        False,  # costly: one run (seed 0), reused for every seed
        {"pyod_defaults": True},
        make_pyod,
        lambda e, x: e.decision_function(x),
    )
    return methods


def vae_method(model: ModelOptions, train: TrainConfig, calibration: CalibrationOptions) -> Method:
    def run(split: Split, seed: int, ds: Dataset) -> MethodRun:
        assert split.x_test is not None
        cfg = TrainConfig(**{**train.to_dict(), "seed": seed})
        # Small tables hold out too few rows for the target FPR: the detector cross-fits its
        # calibration (every normal row scored out of fold), so it calibrates at the target, or
        # at 1/n when even all n normal rows cannot support it (wine: 71; recorded per run).
        n_pool = len(split.x_train) + len(split.x_val) + len(split.x_cal)
        fpr = effective_fpr(calibration.target_fpr, n_pool)
        outcome = train_detector(
            DataOptions(dataset=ds.name, normal_class=split.info.get("normal_class")),
            model,
            cfg,
            replace(calibration, target_fpr=fpr),
            progress=False,
            dataset=ds,
            split=split,
        )
        t0 = time.perf_counter()
        parts = outcome.detector.score_parts(split.x_test)
        seconds = time.perf_counter() - t0
        test = parts["score"]
        assert outcome.detector.calibration is not None
        cal = np.asarray(outcome.detector.calibration.scores)  # held-out or out-of-fold scores
        assert split.y_test is not None
        plain = parts["reconstruction"] + parts["kl"]  # the -ELBO alone, without the correction
        head_term = outcome.detector.score_config.transformation_term(parts["transformation"])
        head_seconds = float(outcome.metrics.get("head_seconds", 0.0))
        extra = {
            "auroc_plain_elbo": detection_metrics(plain, split.y_test)["auroc"],
            # the same detector's score without the transformation head's term
            "auroc_without_head": detection_metrics(test - head_term, split.y_test)["auroc"],
            "head_seconds": head_seconds,
            "best_epoch": outcome.metrics["best_epoch"],
            "epochs_run": len(outcome.metrics["history"]),
            "calibration_protocol": outcome.detector.calibration.protocol,
        }
        train_seconds = outcome.metrics["train_seconds"] + head_seconds
        return MethodRun(test, cal, train_seconds, seconds, extra)

    params = {
        "model": asdict(model),
        "train": {**train.to_dict(), "seed": None},
        "calibration": asdict(calibration),
    }
    return Method("vae", "vae-anomaly (ours)", True, params, run)


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str = "mnist"
    classes: tuple[int, ...] = tuple(range(10))
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("vae", "pca", "iforest", "ocsvm", "pyod-vae")
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    data_dir: str | None = None
    split_seed: int = 0


def effective_fpr(target_fpr: float, n_calibration: int) -> float:
    """The target FPR, or 1/n when n held-out rows cannot support it (small tables)."""
    return max(target_fpr, 1.0 / max(n_calibration, 1))


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


PYOD_METHODS = ("pyod-vae",)


def choose_methods(
    names: tuple[str, ...],
    model: ModelOptions,
    train: TrainConfig,
    calibration: CalibrationOptions,
    echo: Callable[[str], None],
) -> list[Method]:
    """The named methods; the PyOD ones are skipped with a note when pyod is missing."""
    methods = {"vae": vae_method(model, train, calibration), **baseline_methods()}
    unknown = [m for m in names if m not in methods and m not in PYOD_METHODS]
    if unknown:
        raise ConfigError(
            f"unknown method(s) {unknown}; choose from {sorted({*methods, *PYOD_METHODS})}"
        )
    missing = [m for m in names if m not in methods]
    if missing:
        echo(f"pyod is not installed: skipping {', '.join(missing)} (pip install -e '.[bench]')")
    return [methods[m] for m in names if m in methods]


def run_benchmark(
    cfg: BenchmarkConfig, out: str | Path, *, echo: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Run (or resume) the benchmark; write results.json, results.md and roc_curves.png to ``out``."""
    out = Path(out)
    chosen = choose_methods(cfg.methods, cfg.model, cfg.train, cfg.calibration, echo)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    bad = [c for c in cfg.classes if c not in ds.classes]
    if bad:
        raise ConfigError(
            f"classes {bad} are not classes of {cfg.dataset} ({ds.classes[0]}-{ds.classes[-1]})"
        )
    runs: list[dict[str, Any]] = []
    scores: dict[tuple[str, int, int], npt.NDArray[np.float64]] = {}
    labels: dict[int, npt.NDArray[np.int64]] = {}
    for c in cfg.classes:
        split = one_vs_rest(ds, c, seed=cfg.split_seed)
        assert split.y_test is not None
        labels[c] = split.y_test
        task_runs, task_scores = run_task(
            chosen, ds, split, c, cfg.seeds, cfg.calibration.target_fpr, out, echo
        )
        runs += task_runs
        scores.update({(m, c, seed): v for (m, seed), v in task_scores.items()})
    report = _aggregate(cfg, chosen, runs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    with atomic_output(out / "results.md", "w") as f:
        f.write(markdown(report))
    _roc_figure(out / "roc_curves.png", cfg, chosen, scores, labels)
    return report


def run_task(
    methods: list[Method],
    ds: Dataset,
    split: Split,
    task: int,
    seeds: tuple[int, ...],
    target_fpr: float,
    out: Path,
    echo: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], npt.NDArray[np.float64]]]:
    """Every method on one split (a normal class, or a table's split seed), cached per seed.

    Records carry ``class`` = ``task``; methods that ignore the seed run once and are reused.
    """
    assert split.y_test is not None
    runs: list[dict[str, Any]] = []
    scores: dict[tuple[str, int], npt.NDArray[np.float64]] = {}
    for m in methods:
        for seed in seeds:
            key = _key(
                {
                    "method": m.name,
                    "params": m.params,
                    "dataset": ds.name,
                    "split": split.info,
                    "seed": seed if m.uses_seed else None,
                }
            )
            cache = out / "cache" / m.name / key
            rec, test_scores = _load_cached(cache, task, seed if m.uses_seed else 0)
            if rec is None:
                r = m.run(split, seed, ds)
                # Baselines score the held-out calibration rows; on small tables those support
                # only 1/n, so they are thresholded there (recorded per run as target_fpr).
                fpr = effective_fpr(target_fpr, len(r.cal_scores))
                cal = Calibration.fit(r.cal_scores, fpr)
                rec = {
                    "method": m.name,
                    "dataset": ds.name,
                    "class": task,
                    "seed": seed,
                    "target_fpr": fpr,
                    **detection_metrics(r.test_scores, split.y_test, cal.threshold),
                    "threshold": cal.threshold,
                    "train_seconds": r.train_seconds,
                    "score_seconds": r.score_seconds,
                    **r.extra,
                }
                _save_cached(cache, task, seed if m.uses_seed else 0, rec, r.test_scores)
                test_scores = r.test_scores
                echo(
                    f"{ds.name} {task} seed {seed} {m.name:<9} AUROC {rec['auroc']:.4f}  FPR {rec['observed_fpr']:.2%}  train {rec['train_seconds']:.1f}s"
                )
            runs.append({**rec, "seed": seed})
            assert test_scores is not None
            scores[(m.name, seed)] = test_scores
    return runs, scores


def _load_cached(
    cache: Path, c: int, seed: int
) -> tuple[dict[str, Any] | None, npt.NDArray[np.float64] | None]:
    j, n = cache / f"class{c}-seed{seed}.json", cache / f"class{c}-seed{seed}.npy"
    if j.is_file() and n.is_file():
        try:
            return json.loads(j.read_text()), np.load(n, allow_pickle=False)
        except (ValueError, OSError):
            return None, None
    return None, None


def _save_cached(
    cache: Path, c: int, seed: int, rec: dict[str, Any], test_scores: npt.NDArray[np.float64]
) -> None:
    with atomic_output(cache / f"class{c}-seed{seed}.npy") as f:
        np.save(f, test_scores.astype(np.float32), allow_pickle=False)
    write_json(cache / f"class{c}-seed{seed}.json", rec)  # last: marks the entry complete


METRICS = ("auroc", "average_precision", "observed_fpr", "tpr", "train_seconds", "score_seconds")


def _aggregate(
    cfg: BenchmarkConfig, methods: list[Method], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m.name]
        per_class: dict[str, dict[str, float]] = {}
        for c in cfg.classes:
            rows = [r for r in mine if r["class"] == c]
            per_class[str(c)] = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
            per_class[str(c)]["auroc_std"] = float(np.std([r["auroc"] for r in rows]))
            if all("auroc_plain_elbo" in r for r in rows):
                per_class[str(c)]["auroc_plain_elbo"] = float(
                    np.mean([r["auroc_plain_elbo"] for r in rows])
                )
        seed_means = [
            float(np.mean([r["auroc"] for r in mine if r["seed"] == s])) for s in cfg.seeds
        ]
        table[m.name] = {
            "label": m.label,
            "params": m.params,
            "per_class": per_class,
            "mean": {
                k: float(np.mean([per_class[str(c)][k] for c in cfg.classes]))
                for k in (*METRICS, "auroc_plain_elbo")
                if all(k in per_class[str(c)] for c in cfg.classes)
            },
            "mean_auroc_per_seed": seed_means,
            "mean_auroc_std_over_seeds": float(np.std(seed_means)),
            "total_train_seconds": float(sum(r["train_seconds"] for r in mine)),
            "total_seconds": float(sum(r["train_seconds"] + r["score_seconds"] for r in mine)),
        }
    return {
        "protocol": (
            f"{cfg.dataset} one-vs-rest: train on class c's training images only; "
            "score the full test set, c normal"
        ),
        "dataset": cfg.dataset,
        "classes": list(cfg.classes),
        "seeds": list(cfg.seeds),
        "target_fpr": cfg.calibration.target_fpr,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "methods": table,
        "published_mean_auroc": {k: v["mean"] for k, v in PUBLISHED.get(cfg.dataset, {}).items()},
        "runs": runs,
    }


def markdown(report: dict[str, Any]) -> str:
    classes = report["classes"]
    head = "| method | " + " | ".join(str(c) for c in classes) + " | mean |"
    sep = "|---" * (len(classes) + 2) + "|"
    seeds = len(report["seeds"])
    lines = [
        f"AUROC % ({seeds} seed{'s' if seeds > 1 else ''}; mean ± std over seeds where > 1)",
        "",
        head,
        sep,
    ]
    for m in report["methods"].values():
        cells = [f"{m['per_class'][str(c)]['auroc'] * 100:.1f}" for c in classes]
        mean = f"**{m['mean']['auroc'] * 100:.2f}**" + (
            f" ± {m['mean_auroc_std_over_seeds'] * 100:.2f}" if seeds > 1 else ""
        )
        lines.append(f"| {m['label']} | " + " | ".join(cells) + f" | {mean} |")
        if "auroc_plain_elbo" in m["mean"]:
            cells = [f"{m['per_class'][str(c)]['auroc_plain_elbo'] * 100:.1f}" for c in classes]
            lines.append(
                "| ↳ same models, plain -ELBO (no complexity or neighbour term) | "
                + " | ".join(cells)
                + f" | {m['mean']['auroc_plain_elbo'] * 100:.2f} |"
            )
    lines += [
        "",
        f"At the calibrated threshold (target FPR {report['target_fpr']:.0%}), means over classes:",
        "",
        "| method | average precision | observed FPR | TPR | train s / class | score s / class |",
        "|---|---|---|---|---|---|",
    ]
    for m in report["methods"].values():
        mm = m["mean"]
        lines.append(
            f"| {m['label']} | {mm['average_precision']:.4f} | {mm['observed_fpr']:.2%} | {mm['tpr']:.2%} | {mm['train_seconds']:.1f} | {mm['score_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _roc_figure(
    path: Path,
    cfg: BenchmarkConfig,
    methods: list[Method],
    scores: dict[tuple[str, int, int], Any],
    labels: dict[int, Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    n = len(cfg.classes)
    cols = min(5, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    seed = cfg.seeds[0]
    for ax, c in zip(axes.flat, cfg.classes, strict=False):
        for m in methods:
            fpr, tpr, _ = roc_curve(labels[c], scores[(m.name, c, seed)])
            auc = float(np.trapezoid(tpr, fpr))
            ax.plot(fpr, tpr, lw=1.2, label=f"{m.name} {auc:.3f}")
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
        ax.set_title(f"normal class {c}", fontsize=10)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{cfg.dataset} one-vs-rest ROC curves (seed {seed}); legend: AUROC", fontsize=11)
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


# -- suites ----------------------------------------------------------------------------------------
SUITES: dict[str, tuple[str, ...]] = {
    "images": ("mnist", "fashion-mnist"),
    "tabular": ("breast-cancer", "wine", "spam", "musk", "ticdata", "income"),
}
TABULAR_SPLIT_SEEDS: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class SuiteConfig:
    suite: str = "images"
    seeds: tuple[int, ...] = (0,)  # training seeds (image sets; tables use one per split)
    split_seeds: tuple[int, ...] = TABULAR_SPLIT_SEEDS  # tables: 60 / 40 splits of the normal rows
    classes: tuple[int, ...] = tuple(range(10))  # image sets
    methods: tuple[str, ...] = ("vae", "pca", "iforest", "ocsvm", "knn", "ecod", "pyod-vae")
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    data_dir: str | None = None


def run_suite(
    cfg: SuiteConfig, out: str | Path, *, echo: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Every data set of a suite, every method on the same splits; suite.json and suite.md.

    Images: one-vs-rest per class, as :func:`run_benchmark` (its reports go to ``out/<set>``).
    Tables: per split seed, 60 % of the normal rows to train, the rest plus every anomaly to test.
    Ranks: per unit (an image class, or a table), 1 = best mean AUROC, ties averaged.
    """
    from training.tabular import TABULAR_SETS, load_tabular, tabular_split

    if cfg.suite not in SUITES:
        raise ConfigError(f"unknown suite {cfg.suite!r}; choose one of {', '.join(SUITES)}")
    out = Path(out)
    chosen = choose_methods(cfg.methods, cfg.model, cfg.train, cfg.calibration, echo)
    # unit -> method -> mean AUROC; unit is "set/class" (images) or "set" (tables)
    units: dict[str, dict[str, float]] = {}
    labels: dict[str, str] = {}
    details: dict[str, Any] = {}
    for name in SUITES[cfg.suite]:
        if cfg.suite == "images":
            bc = BenchmarkConfig(
                dataset=name,
                classes=cfg.classes,
                seeds=cfg.seeds,
                methods=cfg.methods,
                model=cfg.model,
                train=cfg.train,
                calibration=cfg.calibration,
                data_dir=cfg.data_dir,
            )
            rep = run_benchmark(bc, out / name, echo=echo)
            details[name] = {
                m: {"mean": v["mean"], "label": v["label"]} for m, v in rep["methods"].items()
            }
            for m, v in rep["methods"].items():
                labels[m] = v["label"]
                for c, pc in v["per_class"].items():
                    units.setdefault(f"{name}/{c}", {})[m] = pc["auroc"]
            continue
        ts = load_tabular(name)
        ds = Dataset(
            name=name,
            x_train=ts.x_normal,
            y_train=None,
            preprocessing=f"table: {ts.schema.kinds_summary()}" if ts.schema else "",
            provenance=ts.provenance,
            schema=ts.schema,
        )
        runs: list[dict[str, Any]] = []
        for s in cfg.split_seeds:
            split = tabular_split(ts, seed=s)
            task_runs, _ = run_task(
                chosen, ds, split, s, (s,), cfg.calibration.target_fpr, out / name, echo
            )
            runs += task_runs
        details[name] = {
            "rule": TABULAR_SETS[name].rule,
            "source": TABULAR_SETS[name].source,
            "n_normal": int(ts.x_normal.shape[0]),
            "n_anomalous": int(ts.x_anomalous.shape[0]),
            "n_features": ts.n_features,
            "methods": {
                m.name: {
                    k: float(np.mean([r[k] for r in runs if r["method"] == m.name]))
                    for k in ("auroc", "average_precision", "observed_fpr", "tpr", "target_fpr")
                }
                for m in chosen
            },
        }
        for m in chosen:
            labels[m.name] = m.label
            units.setdefault(name, {})[m.name] = details[name]["methods"][m.name]["auroc"]
    report = _suite_summary(cfg, units, labels, details)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "suite.json", report)
    with atomic_output(out / "suite.md", "w") as f:
        f.write(suite_markdown(report))
    return report


def _suite_summary(
    cfg: SuiteConfig,
    units: dict[str, dict[str, float]],
    labels: dict[str, str],
    details: dict[str, Any],
) -> dict[str, Any]:
    from scipy.stats import rankdata

    methods = [m for m in cfg.methods if all(m in u for u in units.values())]
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    for u in units.values():
        r = rankdata([-u[m] for m in methods])  # 1 = best
        for m, rank in zip(methods, r, strict=True):
            ranks[m].append(float(rank))
    summary: dict[str, Any] = {
        m: {
            "label": labels[m],
            "mean_auroc": float(np.mean([u[m] for u in units.values()])),
            "average_rank": float(np.mean(ranks[m])),
        }
        for m in methods
    }
    baselines = [m for m in methods if m != "vae"]
    if "vae" in methods and baselines:
        best = {k: max(u[m] for m in baselines) for k, u in units.items()}
        summary["vae"]["units_above_best_baseline"] = sum(units[k]["vae"] > best[k] for k in units)
    return {
        "suite": cfg.suite,
        "datasets": list(SUITES[cfg.suite]),
        "protocol": (
            "one-vs-rest per class: train on class c's training images, test on the full test set"
            if cfg.suite == "images"
            else "per split seed: 60 % of the normal rows to train (the detector splits them into "
            "train / validation / calibration), the other 40 % plus every anomaly to test"
        ),
        "seeds": list(cfg.seeds),
        "split_seeds": list(cfg.split_seeds) if cfg.suite == "tabular" else None,
        "target_fpr": cfg.calibration.target_fpr,
        "units": units,
        "methods": summary,
        "datasets_detail": details,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }


def suite_markdown(report: dict[str, Any]) -> str:
    units = list(report["units"])
    methods = report["methods"]
    head = "| method | " + " | ".join(units) + " | mean | average rank |"
    lines = [
        f"Suite {report['suite']}: AUROC % per "
        + ("data set / class" if report["suite"] == "images" else "data set (mean over splits)"),
        "",
        head,
        "|---" * (len(units) + 3) + "|",
    ]
    for m, v in methods.items():
        cells = [f"{report['units'][u][m] * 100:.1f}" for u in units]
        lines.append(
            f"| {v['label']} | "
            + " | ".join(cells)
            + f" | **{v['mean_auroc'] * 100:.2f}** | {v['average_rank']:.2f} |"
        )
    if "vae" in methods and "units_above_best_baseline" in methods["vae"]:
        lines += [
            "",
            f"ours above the best baseline on {methods['vae']['units_above_best_baseline']} of "
            f"{len(units)}",
        ]
    return "\n".join(lines) + "\n"


# -- small data ------------------------------------------------------------------------------------
SMALL_DATA_SETS: tuple[str, ...] = ("breast-cancer", "spam", "ticdata")


@dataclass(frozen=True)
class SmallDataConfig:
    """Repeated random draws of ``n_rows`` normal rows, each trained on with the defaults."""

    datasets: tuple[str, ...] = SMALL_DATA_SETS
    n_rows: int = 250
    repeats: int = 5
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)


def run_small_data(
    cfg: SmallDataConfig, out: str | Path, *, echo: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Does the false-alarm rate hold when a user brings only ``n_rows`` normal rows?

    Per data set and repeat r: a random draw (seed r) of ``n_rows`` normal rows is all the
    detector gets (it splits and calibrates them itself, with its defaults); every other normal
    row of the set is fresh normal data, on which the observed FPR is measured; AUROC is against
    every anomalous row. Cached per (configuration, set, repeat). Writes small_data.json / .md.
    """
    from training.tabular import load_tabular

    out = Path(out)
    params = {
        "n_rows": cfg.n_rows,
        "model": asdict(cfg.model),
        "train": cfg.train.to_dict(),
        "calibration": asdict(cfg.calibration),
    }
    per_set: dict[str, Any] = {}
    for name in cfg.datasets:
        ts = load_tabular(name)
        n = ts.x_normal.shape[0]
        if n <= cfg.n_rows:
            raise ConfigError(f"{name} has {n} normal rows: no fresh ones beyond {cfg.n_rows}")
        runs = []
        for r in range(cfg.repeats):
            cache = out / "cache" / _key({**params, "dataset": name, "repeat": r}) / "run.json"
            if cache.is_file():
                runs.append(json.loads(cache.read_text()))
                continue
            perm = np.random.default_rng(r).permutation(n)
            mine, fresh = ts.x_normal[np.sort(perm[: cfg.n_rows])], ts.x_normal[perm[cfg.n_rows :]]
            ds = Dataset(
                name=name, x_train=mine, y_train=None, provenance=ts.provenance, schema=ts.schema
            )
            t0 = time.perf_counter()
            outcome = train_detector(
                DataOptions(dataset=name, split_seed=r),
                cfg.model,
                replace(cfg.train, seed=r),
                cfg.calibration,
                progress=False,
                dataset=ds,
            )
            seconds = time.perf_counter() - t0
            det = outcome.detector
            cal = det.calibration
            assert cal is not None
            flags = det.score(fresh).is_anomaly
            x_test = np.concatenate([fresh, ts.x_anomalous])
            y_test = np.r_[np.zeros(len(fresh)), np.ones(len(ts.x_anomalous))]
            rec = {
                "dataset": name,
                "repeat": r,
                "protocol": cal.protocol,
                "n_calibration": cal.n,
                "target_fpr": cal.target_fpr,
                "n_fresh_normal": len(fresh),
                "observed_fpr": float(flags.mean()),
                "auroc": detection_metrics(det.score_parts(x_test)["score"], y_test)["auroc"],
                "seconds": seconds,
            }
            write_json(cache, rec)
            runs.append(rec)
            echo(
                f"{name} repeat {r}: {rec['protocol']} calibration on {rec['n_calibration']} rows, "
                f"observed FPR {rec['observed_fpr']:.2%} on {len(fresh)} fresh normal rows "
                f"(target {rec['target_fpr']:.0%}), AUROC {rec['auroc']:.3f}, {seconds:.0f}s"
            )
        fprs = [r["observed_fpr"] for r in runs]
        per_set[name] = {
            "runs": runs,
            "mean_observed_fpr": float(np.mean(fprs)),
            "min_observed_fpr": float(np.min(fprs)),
            "max_observed_fpr": float(np.max(fprs)),
            "mean_auroc": float(np.mean([r["auroc"] for r in runs])),
            "mean_seconds": float(np.mean([r["seconds"] for r in runs])),
        }
    report = {
        "protocol": f"{cfg.repeats} random draws of {cfg.n_rows} normal rows per set, trained and "
        "calibrated with the defaults; observed FPR on every other normal row of the set",
        "n_rows": cfg.n_rows,
        "target_fpr": cfg.calibration.target_fpr,
        "datasets": per_set,
        "mean_observed_fpr": float(np.mean([v["mean_observed_fpr"] for v in per_set.values()])),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "small_data.json", report)
    with atomic_output(out / "small_data.md", "w") as f:
        f.write(small_data_markdown(report))
    return report


def small_data_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Small data: {report['protocol']} (target FPR {report['target_fpr']:.0%})",
        "",
        "| set | observed FPR, mean (min-max) | AUROC % | train + calibrate s |",
        "|---|---|---|---|",
    ]
    for name, v in report["datasets"].items():
        lines.append(
            f"| {name} | {v['mean_observed_fpr']:.2%} ({v['min_observed_fpr']:.2%}-"
            f"{v['max_observed_fpr']:.2%}) | {v['mean_auroc'] * 100:.1f} | {v['mean_seconds']:.0f} |"
        )
    lines += ["", f"mean observed FPR over the sets: {report['mean_observed_fpr']:.2%}"]
    return "\n".join(lines) + "\n"
