"""``vae-anomaly evaluate`` and ``report``: a trained artifact on labelled (or unlabelled) data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from detector.errors import DataError, InputError
from vae_anomaly.cli._common import (
    HelpFormatter,
    add_scored_data_args,
    echo,
    positive_int,
)


def register(sub: Any, fmt: type[HelpFormatter]) -> None:
    """Register the evaluate and report commands on ``sub``."""

    # -- evaluate -----------------------------------------------------------------------------
    ev = sub.add_parser(
        "evaluate",
        help="AUROC, average precision, FPR/TPR at the threshold on labelled data",
        description="Score labelled test data with an artifact and report AUROC, average "
        "precision and the observed FPR / TPR at the calibrated threshold. Test data is a "
        "built-in data set's test split (one-vs-rest on the artifact's normal class), or --data "
        "with --labels (1 = anomalous, 0 = normal; or class labels with --normal-class).",
        formatter_class=fmt,
    )
    add_scored_data_args(ev, labels_help=".npy / .csv labels for --data")
    ev.add_argument("--out", help="JSON report path (default: <model>.evaluation.json)")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")

    # -- report -------------------------------------------------------------------------------
    rp = sub.add_parser(
        "report",
        help="an HTML page of figures: what the model learned, why it flagged what it flagged",
        description="Score data with an artifact and write a self-contained report directory: "
        "index.html and PNG figures (training curves; score distribution with the threshold; ROC "
        "and precision-recall curves; the most anomalous / most normal samples, false positives "
        "and false negatives beside their reconstructions and per-pixel error heat maps; the "
        "latent space; samples from the prior; a latent interpolation; AUROC per class). Data "
        "as for evaluate; --data without --labels gives the figures that need no labels.",
        formatter_class=fmt,
    )
    add_scored_data_args(
        rp, labels_help="optional labels for --data (0/1, or classes with --normal-class)"
    )
    rp.add_argument("--examples", type=positive_int, default=8, help="samples per gallery")
    rp.add_argument("--seed", type=int, default=0, help="seed of the prior samples")
    rp.add_argument("--out", help="report directory (default: <model>.report)")
    rp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    rp.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ev.set_defaults(handler=run_evaluate)
    rp.set_defaults(handler=run_report)


def _load_labels(path: str, n: int) -> np.ndarray:
    from training.data import load_array

    p = Path(path)
    if p.suffix.lower() == ".npy" and p.is_file():
        try:
            y = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{p} is not a readable .npy array: {e}") from e
    else:
        y = load_array(p)
    y = np.asarray(y).reshape(-1)
    if y.size != n:
        raise DataError(f"{p} has {y.size} labels for {n} samples")
    return y


def _labelled_data(
    args: argparse.Namespace, det: Any, *, need_labels: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]:
    """The data of ``evaluate`` and ``report``: (x, is_anomaly, class labels, description).

    A built-in data set's test split, one-vs-rest on the artifact's normal class (the default), or
    ``--data`` with ``--labels`` (0/1, or class labels with ``--normal-class``); ``report`` also
    takes ``--data`` alone.
    """
    from training.data import load_array, load_dataset, load_table_rows

    provenance = det.metadata.get("config", {}).get("data", {})
    if args.label_column and (args.labels or det.input_spec.schema is None or not args.data):
        raise InputError(
            "--label-column names a column of a table model's --data, not with --labels"
        )
    if args.data:
        if args.dataset:
            raise InputError("give --dataset or --data, not both")
        column_labels = None
        if det.input_spec.schema is not None:
            x, column_labels = load_table_rows(
                Path(args.data), det.input_spec.schema, label_column=args.label_column
            )
        else:
            x = load_array(args.data)
        if not args.labels and column_labels is None:
            if need_labels:
                raise InputError(
                    "--data needs --labels (1 = anomalous, 0 = normal), or --label-column"
                )
            return x, None, None, args.data
        y = column_labels if column_labels is not None else _load_labels(args.labels, len(x))
        labels = None
        if args.normal_class is not None:
            labels = y.astype(np.int64)
            y = (labels != args.normal_class).astype(np.int64)
        elif not np.isin(y, (0, 1)).all():
            raise DataError(
                f"{args.labels}: labels must be 0 (normal) or 1 (anomalous); for class labels pass --normal-class"
            )
        return x, y, labels, args.data
    name = args.dataset or provenance.get("dataset")
    if name not in ("mnist", "fashion-mnist", "digits"):
        raise InputError(
            "this artifact was not trained on a built-in data set: pass --data"
            + (" and --labels" if need_labels else "")
        )
    c = args.normal_class if args.normal_class is not None else provenance.get("normal_class")
    if c is None:
        raise InputError("no normal class: pass --normal-class")
    ds = load_dataset(name, args.data_dir)
    assert ds.x_test is not None and ds.y_test is not None and ds.y_train is not None
    if c not in ds.classes:
        raise DataError(
            f"normal class {c} is not a class of {name} (classes {ds.classes[0]}-{ds.classes[-1]})"
        )
    labels = ds.y_test
    return ds.x_test, (labels != c).astype(np.int64), labels, f"{name} test split, normal class {c}"


def run_evaluate(args: argparse.Namespace) -> int:
    from detector._io import write_json
    from detector.detector import Detector
    from training.evaluate import evaluate, format_report

    det = Detector.load(args.model, device=args.device)
    out = Path(args.out) if args.out else Path(str(Path(args.model)) + ".evaluation.json")
    if args.target_fpr is not None:
        det = det.with_target_fpr(args.target_fpr)
    x, y, labels, source = _labelled_data(args, det, need_labels=True)
    assert y is not None
    res = evaluate(det, x, y, labels=labels)
    res["data"] = source
    echo(f"evaluation of {args.model} on {source}")
    echo(format_report(res))
    write_json(out, res)
    echo(f"report written to {out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from detector.detector import Detector
    from training.report import build

    det = Detector.load(args.model, device=args.device)
    out = Path(args.out) if args.out else Path(str(Path(args.model)) + ".report")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out} already exists; pass --overwrite to replace it")
    if args.target_fpr is not None:
        det = det.with_target_fpr(args.target_fpr)
    x, y, labels, source = _labelled_data(args, det, need_labels=False)
    rep = build(
        det,
        x,
        out,
        is_anomaly=y,
        labels=labels,
        source=source,
        examples=args.examples,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    echo(f"report of {args.model} on {source}: {len(rep.figures)} figures")
    for name, why in rep.skipped.items():
        echo(f"  not drawn: {name} ({why})")
    echo(f"open {rep.path}")
    return 0
