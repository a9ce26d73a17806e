"""The training pipeline, end to end: data -> split -> fit -> calibrate -> artifact.

The command line's ``train`` and the benchmark call :func:`train_detector`; a notebook can too.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from detector import artifact
from detector.detector import Detector, resolve_device
from detector.errors import ArtifactError, ConfigError, DataError, FPRError
from detector.model import VAEConfig
from detector.schema import TableSchema
from detector.score import ScoreConfig
from detector.spec import InputSpec
from detector.threshold import validate_fpr
from training.calibrate import calibrate, complexity_bounds
from training.data import (
    Dataset,
    Split,
    load_dataset,
    one_vs_rest,
    split_normal,
)
from training.fitting import (
    CROSS_FIT_FOLDS,
    cross_fit_calibration,
    fit_model,
    fit_score_terms,
    flat,
    model_range,
)
from training.options import (  # importing the options from here keeps working
    CALIBRATION_METHODS,
    CalibrationOptions,
    DataOptions,
    ModelOptions,
)
from training.train import TrainConfig
from training.value_range import parse_value_range

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    detector: Detector
    split: Split
    dataset: Dataset
    path: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


def build_model_config(
    sample_shape: tuple[int, ...],
    in_unit_range: bool,
    opts: ModelOptions,
    schema: TableSchema | None = None,
    score_kind: str = "elbo",
) -> VAEConfig:
    """Resolve the ``auto`` choices against the data and build the model config."""
    members = opts.resolve_members(sample_shape, score_kind)
    arch = opts.architecture
    likelihood = opts.likelihood
    if schema is not None:
        if arch != "mlp" or likelihood != "gaussian":
            raise ConfigError(
                "a table trains with --arch mlp and --likelihood gaussian (its numeric columns "
                "Gaussian, its categorical columns a softmax over their categories)"
            )
        return VAEConfig(
            input_shape=(schema.n_encoded,),
            architecture="mlp",
            latent_dim=opts.latent_dim,
            widths=opts.widths,
            likelihood="gaussian",
            sigma=opts.sigma,
            beta=opts.beta,
            categorical=schema.categorical_groups,
            masked=True,
            unseen_nats=schema.unseen_nats,
            members=members,
        )
    if likelihood == "bernoulli" and not in_unit_range:
        raise ConfigError(
            "the bernoulli likelihood needs data in [0, 1], but the training data leaves that "
            "range; scale it, or use --likelihood gaussian"
        )
    input_shape = sample_shape if arch == "conv" else (int(np.prod(sample_shape)),)
    return VAEConfig(
        input_shape=input_shape,
        architecture=arch,  # type: ignore[arg-type]
        latent_dim=opts.latent_dim,
        widths=opts.widths,
        likelihood=likelihood,  # type: ignore[arg-type]
        sigma=opts.sigma,
        beta=opts.beta,
        members=members,
    )


def make_split(ds: Dataset, opts: DataOptions) -> Split:
    if ds.y_train is not None and opts.normal_class is not None:
        return one_vs_rest(
            ds,
            opts.normal_class,
            cal_fraction=opts.cal_fraction,
            val_fraction=opts.val_fraction,
            seed=opts.split_seed,
        )
    if ds.y_train is not None:
        raise DataError(f"data set {ds.name} is labelled: name the normal class (--normal-class)")
    return split_normal(
        ds.x_train,
        cal_fraction=opts.cal_fraction,
        val_fraction=opts.val_fraction,
        seed=opts.split_seed,
    )


def train_detector(
    data: DataOptions | None = None,
    model: ModelOptions | None = None,
    train: TrainConfig | None = None,
    calibration: CalibrationOptions | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    dataset: Dataset | None = None,
    split: Split | None = None,
) -> TrainOutcome:
    """Fit a VAE on normal data, calibrate its threshold, and write the artifact to ``out``.

    ``dataset`` skips loading; ``split`` (with ``dataset``) skips splitting, so several runs can
    share one split (the benchmark does).
    """
    data = data or DataOptions()
    model_opts = model or ModelOptions()
    train = train or TrainConfig()
    cal_opts = calibration or CalibrationOptions()
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise ArtifactError(f"output {out_path} already exists; pass --overwrite to replace it")
    device = resolve_device(train.device)  # fail fast on a bad --device

    ds = (
        dataset
        if dataset is not None
        else load_dataset(
            data.dataset,
            data.data_dir,
            fetch=data.fetch,
            table=data.table_options(),
            value_range=parse_value_range(data.value_range),
        )
    )
    if split is None:
        split = make_split(ds, data)
    in_unit = ds.schema is None and bool(split.x_train.min() >= 0.0 and split.x_train.max() <= 1.0)
    cfg = build_model_config(ds.sample_shape, in_unit, model_opts, ds.schema, cal_opts.score_kind)
    spec = InputSpec(
        shape=ds.sample_shape,
        value_range=(0.0, 1.0) if cfg.likelihood == "bernoulli" else ds.value_range,
        preprocessing=ds.preprocessing,
        schema=ds.schema,
    )
    complexity_weight = cal_opts.resolve_complexity_weight(spec.value_range)
    neighbour_space = cal_opts.resolve_neighbour_space(ds.sample_shape)
    reconstruction_weight = cal_opts.resolve_reconstruction_weight(ds.sample_shape)
    transformation_share = cal_opts.resolve_transformation_share(ds.sample_shape)
    method = calibration_method(cal_opts, split.x_cal.shape[0])
    if method == "cross-fit":
        split = cross_fit_split(split, data.val_fraction, seed=data.split_seed)
        n = split.x_cal.shape[0]
        if 0 < cal_opts.target_fpr < 1 and cal_opts.target_fpr * n < 1:
            raise FPRError(
                f"target FPR {cal_opts.target_fpr} needs at least "
                f"{math.ceil(1 / cal_opts.target_fpr)} normal rows, even with every row a "
                f"calibration point (cross-fit); the data has {n}: bring more normal rows or "
                f"raise the target FPR to at least {1 / n:.4g}"
            )
    validate_fpr(cal_opts.target_fpr, split.x_cal.shape[0])  # before spending time training

    x_train = flat(split.x_train, cfg)
    log.info("training %s VAE on %d normal samples (%s)", cfg.architecture, len(x_train), device)
    result = fit_model(
        cfg,
        x_train,
        flat(split.x_val, cfg),
        train,
        in_unit,
        progress,
        "training",
        sample_shape=ds.sample_shape,
        value_range=model_range(cfg, spec),
    )
    cap, floor = (
        complexity_bounds(
            split.x_val,
            spec,
            cal_opts.complexity_cap_quantile,
            cal_opts.complexity_floor_quantile,
            level=cal_opts.complexity_level,
            codec=cal_opts.complexity_codec,
            image_filter=cal_opts.complexity_filter,
        )
        if complexity_weight
        else (None, None)
    )
    likelihood = ScoreConfig(
        kind=cal_opts.score_kind,
        samples=cal_opts.score_samples,
        reconstruction_weight=reconstruction_weight,
        complexity_weight=complexity_weight,
        complexity_level=cal_opts.complexity_level,
        complexity_codec=cal_opts.complexity_codec,
        complexity_filter=cal_opts.complexity_filter,
        complexity_cap=cap,
        complexity_floor=floor,
        neighbour_space=neighbour_space,
    )  # the score without its neighbour term, whose weight is fitted against it
    terms = fit_score_terms(
        result.model,
        split.x_train,
        split.x_val,
        spec,
        likelihood,
        cal_opts.neighbour_share,
        transformation_share,
        device=str(device),
        seed=train.seed,
        progress=progress,
    )
    reference, head, final = terms.reference, terms.head, terms.config
    if method == "cross-fit":
        cal = cross_fit_calibration(
            split,
            cfg,
            spec,
            train,
            in_unit,
            cal_opts,
            likelihood,
            progress,
            str(device),
            data.split_seed,
            transformation_share,
        )
        cal = replace(
            cal,
            score_config=final,
            n_reference=0 if reference is None else len(reference),
        )
    else:
        cal = calibrate(
            result.model,
            split.x_cal,
            spec,
            target_fpr=cal_opts.target_fpr,
            config=final,
            reference=reference,
            device=str(device),
            head=head,
        )
    metrics = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "stopped_early": result.stopped_early,
        "train_seconds": result.seconds,
        "head_seconds": terms.head_seconds,
        "split": split.info,
        "calibration": {
            "method": method,
            "n": cal.n,
            "threshold": cal.threshold,
            "target_fpr": cal.target_fpr,
            "score_mean": float(np.mean(cal.scores)),
            "score_median": float(np.median(cal.scores)),
        },
    }
    training_record = {
        **train.to_dict(),
        "model_options": asdict(model_opts),
        "data_options": asdict(data),
        "calibration_options": asdict(cal_opts),
    }
    provenance = {
        **ds.provenance,
        "normal_class": data.normal_class if ds.y_train is not None else None,
        "split": split.info,
    }
    detector = Detector(result.model, cal, spec, device=device, reference=reference, head=head)
    if out_path is not None:
        artifact.save(
            out_path,
            result.model,
            cal,
            spec,
            training=training_record,
            data=provenance,
            metrics=metrics,
            overwrite=overwrite,
            reference=reference,
            head=head,
        )
        detector = Detector.load(out_path, device=device)
    return TrainOutcome(detector=detector, split=split, dataset=ds, path=out_path, metrics=metrics)


def calibration_method(opts: CalibrationOptions, n_cal: int) -> str:
    """``split`` (score the held-out calibration rows) or ``cross-fit`` (every normal row is
    scored once by a model that never saw it). ``auto``: cross-fit when the calibration split
    holds fewer than 2 / target_fpr rows (200 for 1 %), so small data calibrates at the target
    it asked for."""
    if opts.method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"unknown calibration method {opts.method!r}; choose one of {CALIBRATION_METHODS}"
        )
    if opts.method != "auto":
        return opts.method
    return "cross-fit" if n_cal * opts.target_fpr < 2.0 else "split"


def cross_fit_split(split: Split, val_fraction: float, *, seed: int) -> Split:
    """Pool train, validation and calibration rows; the final model trains on all but a
    validation share, and every pooled row becomes a calibration row (scored out of fold)."""
    pool = np.concatenate([split.x_train, split.x_val, split.x_cal])
    n = pool.shape[0]
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 2 * CROSS_FIT_FOLDS:
        raise DataError(f"only {n} normal samples: too few for {CROSS_FIT_FOLDS}-fold calibration")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    info = {
        **split.info,
        "calibration": "cross-fit",
        "folds": CROSS_FIT_FOLDS,
        "n_train": int(train.size),
        "n_val": int(val.size),
        "n_cal": int(n),
    }
    return Split(
        x_train=pool[train],
        x_val=pool[val],
        x_cal=pool,
        x_test=split.x_test,
        y_test=split.y_test,
        labels_test=split.labels_test,
        info=info,
    )
