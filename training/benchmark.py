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
from dataclasses import asdict, dataclass, field
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

# Published mean AUROC on this protocol, for the README's comparison (percent).
PUBLISHED: dict[str, dict[str, Any]] = {
    "VAE (-ELBO), Abati et al. 2019": {
        "per_class": [99.8, 99.9, 96.2, 94.7, 96.5, 96.3, 99.5, 97.4, 90.5, 97.8],
        "mean": 96.9,
    },
    "LSA, Abati et al. 2019": {"mean": 97.5},
    "OCGAN, Perera et al. 2019": {"mean": 97.5},
    "OC-SVM (reported by Ruff et al. 2018)": {"mean": 95.1},
    "Deep SVDD, Ruff et al. 2018": {"mean": 94.8},
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
    make: Callable[[int], Any],
    score: Callable[[Any, npt.NDArray[np.float32]], npt.NDArray[np.float64]],
) -> Method:
    def run(split: Split, seed: int, ds: Dataset) -> MethodRun:
        assert split.x_test is not None
        x_fit = _flat(np.concatenate([split.x_train, split.x_val]))  # same data budget as the VAE
        t0 = time.perf_counter()
        est = make(seed).fit(x_fit)
        t1 = time.perf_counter()
        test = score(est, _flat(split.x_test))
        t2 = time.perf_counter()
        return MethodRun(
            np.asarray(test, np.float64),
            np.asarray(score(est, _flat(split.x_cal)), np.float64),
            t1 - t0,
            t2 - t1,
        )

    return Method(name, label, uses_seed, params, run)


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
            "PCA, 32 components, reconstruction error",
            False,
            {"n_components": 32},
            lambda seed: PCA(n_components=32, random_state=0),
            pca_error,
        ),
        "iforest": _sk_method(
            "iforest",
            "IsolationForest, 200 trees",
            True,
            {"n_estimators": 200},
            lambda seed: IsolationForest(n_estimators=200, random_state=seed),
            lambda e, x: -e.score_samples(x),
        ),
        "ocsvm": _sk_method(
            "ocsvm",
            "OC-SVM, RBF, nu = 0.1, gamma = scale",
            False,
            {"nu": 0.1, "gamma": "scale"},
            lambda seed: OneClassSVM(kernel="rbf", nu=0.1, gamma="scale"),
            lambda e, x: -e.decision_function(x),
        ),
    }
    try:
        from pyod.models.vae import VAE as PyODVAE
    except ImportError:
        return methods

    def make_pyod(seed: int) -> Any:
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
        outcome = train_detector(
            DataOptions(dataset=ds.name, normal_class=split.info.get("normal_class")),
            model,
            cfg,
            calibration,
            progress=False,
            dataset=ds,
            split=split,
        )
        t0 = time.perf_counter()
        parts = outcome.detector.score_parts(split.x_test)
        seconds = time.perf_counter() - t0
        test = parts["score"]
        cal = outcome.detector.score_parts(split.x_cal)["score"]
        assert split.y_test is not None
        plain = parts["reconstruction"] + parts["kl"]  # the -ELBO alone, without the correction
        extra = {
            "auroc_plain_elbo": detection_metrics(plain, split.y_test)["auroc"],
            "best_epoch": outcome.metrics["best_epoch"],
            "epochs_run": len(outcome.metrics["history"]),
        }
        return MethodRun(test, cal, outcome.metrics["train_seconds"], seconds, extra)

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


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_benchmark(
    cfg: BenchmarkConfig, out: str | Path, *, echo: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Run (or resume) the benchmark; write results.json, results.md and roc_curves.png to ``out``."""
    out = Path(out)
    methods = {"vae": vae_method(cfg.model, cfg.train, cfg.calibration), **baseline_methods()}
    unknown = [m for m in cfg.methods if m not in methods and m != "pyod-vae"]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {sorted(methods)}")
    chosen = [methods[m] for m in cfg.methods if m in methods]
    if "pyod-vae" in cfg.methods and "pyod-vae" not in methods:
        echo("pyod is not installed: skipping the PyOD VAE baseline (pip install -e '.[bench]')")
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
        for m in chosen:
            for seed in cfg.seeds:
                key = _key(
                    {
                        "method": m.name,
                        "params": m.params,
                        "dataset": cfg.dataset,
                        "split": split.info,
                        "seed": seed if m.uses_seed else None,
                    }
                )
                cache = out / "cache" / m.name / key
                rec, test_scores = _load_cached(cache, c, seed if m.uses_seed else 0)
                if rec is None:
                    r = m.run(split, seed, ds)
                    cal = Calibration.fit(r.cal_scores, cfg.calibration.target_fpr)
                    rec = {
                        "method": m.name,
                        "class": c,
                        "seed": seed,
                        **detection_metrics(r.test_scores, split.y_test, cal.threshold),
                        "threshold": cal.threshold,
                        "train_seconds": r.train_seconds,
                        "score_seconds": r.score_seconds,
                        **r.extra,
                    }
                    _save_cached(cache, c, seed if m.uses_seed else 0, rec, r.test_scores)
                    test_scores = r.test_scores
                    echo(
                        f"class {c} seed {seed} {m.name:<9} AUROC {rec['auroc']:.4f}  FPR {rec['observed_fpr']:.2%}  train {rec['train_seconds']:.1f}s"
                    )
                rec = {**rec, "seed": seed}
                runs.append(rec)
                assert test_scores is not None
                scores[(m.name, c, seed)] = test_scores
    report = _aggregate(cfg, chosen, runs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    with atomic_output(out / "results.md", "w") as f:
        f.write(markdown(report))
    _roc_figure(out / "roc_curves.png", cfg, chosen, scores, labels)
    return report


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
        "protocol": "MNIST one-vs-rest: train on class c training images only; test on all 10,000 test images, c normal",
        "dataset": cfg.dataset,
        "classes": list(cfg.classes),
        "seeds": list(cfg.seeds),
        "target_fpr": cfg.calibration.target_fpr,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "methods": table,
        "published_mean_auroc": {k: v["mean"] for k, v in PUBLISHED.items()},
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
                "| ↳ same models, plain -ELBO (no complexity correction) | "
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
    fig.suptitle(f"MNIST one-vs-rest ROC curves (seed {seed}); legend: AUROC", fontsize=11)
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
