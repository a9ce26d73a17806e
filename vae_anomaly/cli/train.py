"""``vae-anomaly train``: fit a VAE on normal data, calibrate, write the artifact."""

from __future__ import annotations

import argparse
from typing import Any

from vae_anomaly.cli._common import (
    HelpFormatter,
    add_model_args,
    auto_share_arg,
    cap_quantile,
    column_list,
    echo,
    model_options,
    positive_int,
    share_arg,
    train_config,
    value_range,
    weight_arg,
)


def register(sub: Any, fmt: type[HelpFormatter]) -> None:
    """Register the train command on ``sub``."""
    from detector.neighbours import NEIGHBOUR_SPACES
    from training.calibrate import DEFAULT_TARGET_FPR
    from training.data import ENV_DATA_DIR
    from training.pipeline import CalibrationOptions, DataOptions, ModelOptions
    from training.train import TrainConfig

    tc, mo, do, co = TrainConfig(), ModelOptions(), DataOptions(), CalibrationOptions()

    # -- train --------------------------------------------------------------------------------
    tr = sub.add_parser(
        "train",
        help="train a VAE on normal data, calibrate, write the artifact",
        description="Fit a VAE on normal data only, calibrate the anomaly threshold on held-out "
        "normal data (conformal quantile of the -ELBO for --target-fpr) and write one model "
        "artifact directory. With a labelled data set (mnist, digits) the normal data is the "
        "training split of --normal-class (one-vs-rest).",
        formatter_class=fmt,
    )
    g = tr.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=do.dataset,
        help="mnist, fashion-mnist, digits (scikit-learn 8x8), or a file of normal samples: a "
        "table (.csv, .parquet, or a 2-D .npy; its columns, kinds and categories are saved in "
        "the artifact) or images (.npy shaped N x ...)",
    )
    g.add_argument(
        "--normal-class",
        type=int,
        default=do.normal_class,
        help="normal class (labelled data sets)",
    )
    g.add_argument(
        "--data-dir", help=f"folder with MNIST IDX files (default: ${ENV_DATA_DIR} or user cache)"
    )
    g.add_argument(
        "--no-fetch", action="store_true", help="fail instead of fetching MNIST when absent"
    )
    g.add_argument(
        "--cal-fraction",
        type=float,
        default=do.cal_fraction,
        help="normal data held out for calibration (never trained on)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=do.val_fraction,
        help="normal data held out for early stopping",
    )
    g.add_argument(
        "--split-seed", type=int, default=do.split_seed, help="seed of the train/val/cal split"
    )
    g.add_argument(
        "--value-range",
        type=value_range,
        default=do.value_range,
        help="images in a .npy: the range their pixels live in, LO,HI (e.g. 0,255), or 'auto' "
        "(uint8 and uint16 by their type; floats within [0, 1] as [0, 1]; whole numbers within "
        "0-255 as 8-bit), or 'none'. A known range gives your images what the built-in sets get: "
        "the model sees them mapped onto [0, 1] and the score its complexity term",
    )
    g = tr.add_argument_group("tables (.csv / .parquet)")
    g.add_argument(
        "--categorical",
        type=column_list,
        default=(),
        help="comma-separated columns read as categories even if they hold numbers (codes); "
        "text columns are categorical anyway",
    )
    g.add_argument(
        "--numeric",
        type=column_list,
        default=(),
        help="comma-separated columns that must be numbers (a text cell is then an error)",
    )
    g.add_argument(
        "--drop",
        type=column_list,
        default=(),
        help="comma-separated columns left out of the model, e.g. an id or a label",
    )
    g.add_argument(
        "--delimiter", help="CSV delimiter (default: sniffed from the first lines among , ; tab |)"
    )
    add_model_args(tr, mo, tc)
    g = tr.add_argument_group("calibration")
    g.add_argument(
        "--target-fpr",
        type=float,
        default=DEFAULT_TARGET_FPR,
        help="false-positive rate the threshold aims at on normal data",
    )
    g.add_argument(
        "--score",
        choices=["elbo", "iwae"],
        default="elbo",
        help="score kind: -ELBO, or the importance-weighted bound",
    )
    g.add_argument("--score-samples", type=positive_int, default=1, help="K for --score iwae")
    g.add_argument(
        "--complexity-weight",
        type=float,
        help="subtract this times the input's DEFLATE code length (nats) from the -ELBO (Serra et al. "
        "2020); default: 1 for data with a value range (images), 0 otherwise",
    )
    g.add_argument(
        "--reconstruction-weight",
        type=weight_arg,
        default="auto",
        metavar="auto|W",
        help="score = W * reconstruction + kl (+ the other terms): what the reconstruction counts "
        "for against the KL term; auto: 0.25 for tables (their per-column surprises otherwise "
        "drown the other evidence), 1 (the -ELBO) for images",
    )
    g.add_argument(
        "--complexity-cap",
        type=cap_quantile,
        default=co.complexity_cap_quantile,
        help="the complexity credit stops at this quantile of the validation images' complexity "
        "(0.5 = their median), so inputs more complex than the normal data gain nothing from it; "
        "'none' = uncapped",
    )
    g.add_argument(
        "--complexity-floor",
        type=cap_quantile,
        default=co.complexity_floor_quantile,
        help="an image simpler than this quantile of the validation images' complexity pays one "
        "nat for each nat it falls short (simpler than nearly all normal data is evidence of an "
        "anomaly); 'none' = no floor",
    )
    g.add_argument(
        "--neighbour-share",
        type=share_arg,
        default=co.neighbour_share,
        help="weight of the neighbour term (how far a row lies from its nearest training rows): "
        "its spread on the validation rows as a share of the likelihood term's (0 = off)",
    )
    g.add_argument(
        "--transformation-share",
        type=auto_share_arg,
        default="auto",
        metavar="auto|S",
        help="weight of the transformation head (a small classifier trained to tell rotations "
        "and shifts of the normal images apart; its surprise on an image is evidence): the "
        "spread of its term on the validation images as a share of the rest of the score's; "
        "auto: 0.4 for square images, 0 (no head) for tables and other shapes",
    )
    g.add_argument(
        "--neighbour-space",
        choices=["auto", *NEIGHBOUR_SPACES],
        default=co.neighbour_space,
        help="where the neighbour term measures distance: latent (the encoder's posterior "
        "means), input (the features, each in units of its spread over the training rows); "
        "auto: input for tables, latent for images",
    )
    g.add_argument(
        "--calibration",
        choices=["auto", "split", "cross-fit"],
        default="auto",
        help="split: score the held-out calibration rows; cross-fit: 5 extra models, each scoring "
        "the fifth of the normal rows it never saw, so every row is a calibration point; auto: "
        "cross-fit when the calibration split has fewer than 2 / target FPR rows",
    )
    g = tr.add_argument_group("output")
    g.add_argument("--out", required=True, help="artifact directory to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from training.pipeline import CalibrationOptions, DataOptions, train_detector

    outcome = train_detector(
        DataOptions(
            dataset=args.dataset,
            normal_class=args.normal_class,
            data_dir=args.data_dir,
            cal_fraction=args.cal_fraction,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            fetch=not args.no_fetch,
            categorical=args.categorical,
            numeric=args.numeric,
            drop=args.drop,
            delimiter=args.delimiter,
            value_range=args.value_range,
        ),
        model_options(args),
        train_config(args),
        CalibrationOptions(
            target_fpr=args.target_fpr,
            score_kind=args.score,
            score_samples=args.score_samples,
            reconstruction_weight=args.reconstruction_weight,
            complexity_weight=args.complexity_weight,
            complexity_cap_quantile=args.complexity_cap,
            complexity_floor_quantile=args.complexity_floor,
            neighbour_share=args.neighbour_share,
            transformation_share=args.transformation_share,
            neighbour_space=args.neighbour_space,
            method=args.calibration,
        ),
        out=args.out,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    m, det = outcome.metrics, outcome.detector
    s = m["split"]
    echo(
        f"trained on {s['n_train']} normal samples ({s['n_val']} validation, {s['n_cal']} "
        f"calibration) in {m['train_seconds']:.1f}s; best epoch {m['best_epoch']} of "
        f"{len(m['history'])}{' (early stop)' if m['stopped_early'] else ''}, "
        f"validation -ELBO {m['best_val_loss']:.2f} nats"
    )
    if det.head is not None:
        echo(
            f"transformation head ({det.head.config.n_transforms} rotations and shifts) trained "
            f"in {m['head_seconds']:.1f}s"
        )
    schema = det.input_spec.schema
    if schema is not None:
        echo(f"table: {schema.kinds_summary()}")
    elif args.dataset.lower().endswith(".npy"):  # a user's images
        echo(f"images {det.input_spec.shape}: {det.input_spec.preprocessing}")
    cal = det.calibration
    assert cal is not None
    how = (
        f"{s['n_cal']} held-out rows"
        if cal.protocol == "split"
        else f"all {cal.n} rows, each scored by one of 5 models that never saw it (cross-fit: "
        "too few rows to hold out enough for the target)"
    )
    echo(f"threshold {det.threshold:.3f} for target FPR {cal.target_fpr:.2%}, calibrated on {how}")
    echo(f"artifact {outcome.path} (model version {det.model_version})")
    return 0
