"""``vae-anomaly benchmark``, ``batch-benchmark`` and ``loadtest``: the measuring commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vae_anomaly.cli._common import (
    EXIT_FAILURE,
    PROG,
    HelpFormatter,
    add_model_args,
    auto_share_arg,
    class_list,
    cpu_list,
    echo,
    int_list,
    model_options,
    positive_int,
    share_arg,
    train_config,
    weight_arg,
)


def register(sub: Any, fmt: type[HelpFormatter]) -> None:
    """Register the benchmark, batch-benchmark and loadtest commands on ``sub``."""
    from detector.neighbours import NEIGHBOUR_SPACES
    from training.calibrate import DEFAULT_TARGET_FPR
    from training.pipeline import CalibrationOptions, ModelOptions
    from training.train import TrainConfig

    tc, mo, co = TrainConfig(), ModelOptions(), CalibrationOptions()

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
        "tables (breast-cancer, wine, spam, musk, ticdata, income: 60 % of the normal rows to "
        "train, the rest plus every anomaly to test, 3 split seeds) and writes suite.json / "
        "suite.md with mean AUROC and average ranks.",
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
        type=positive_int,
        default=250,
        help="small-data suite: normal rows per draw",
    )
    bm.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="small-data suite: random draws per data set",
    )
    bm.add_argument(
        "--classes",
        type=class_list,
        default=tuple(range(10)),
        help="normal classes, e.g. 0-9 or 2,5,8",
    )
    bm.add_argument(
        "--seeds", type=positive_int, default=1, help="training seeds per class (0..N-1)"
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
        "--reconstruction-weight",
        type=weight_arg,
        default="auto",
        metavar="auto|W",
        help="what the reconstruction counts for against the KL term; see train --help",
    )
    bm.add_argument(
        "--neighbour-share",
        type=share_arg,
        default=co.neighbour_share,
        help="weight of the neighbour term (0 = off); see train --help",
    )
    bm.add_argument(
        "--transformation-share",
        type=auto_share_arg,
        default="auto",
        metavar="auto|S",
        help="weight of the transformation head (0 = off); see train --help",
    )
    bm.add_argument(
        "--neighbour-space",
        choices=["auto", *NEIGHBOUR_SPACES],
        default=co.neighbour_space,
        help="where the neighbour term measures distance; see train --help",
    )
    bm.add_argument(
        "--quick", action="store_true", help="smoke test: classes 0,1, 5 epochs, vae and pca only"
    )
    bm.add_argument(
        "--min-auroc", type=float, help="exit 1 if any class's AUROC of our detector is below this"
    )
    bm.add_argument("--out", required=True, help="output folder (also the cache)")
    add_model_args(bm, mo, tc)

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
    bb.add_argument("--npy-rows", type=positive_int, default=1_000_000)
    bb.add_argument("--csv-rows", type=positive_int, default=200_000)
    bb.add_argument("--chunk-rows", type=positive_int, default=8192)
    bb.add_argument("--batch-size", type=positive_int, default=2048)
    bb.add_argument("--engine", choices=["local", "ray"], default="local")
    bb.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="runs of each measurement; the best counts, the range is shown",
    )

    # -- loadtest -----------------------------------------------------------------------------
    lt = sub.add_parser(
        "loadtest",
        help="benchmark the HTTP service on loopback: latency and throughput",
        description="Start 'vae-anomaly serve' on a free loopback port and measure latency "
        "percentiles and throughput for single-instance JSON requests at each --concurrency "
        "(through POST /score and the Open Inference Protocol's infer, --protocols), and for "
        "NPY requests of --npy-instances instances. --peer also starts the bare 20-line FastAPI "
        "endpoint around Detector.score (vae_anomaly/bench/peer.py) with 1 and 2 workers and "
        "measures it on the same requests, each scenario on every server in turn, --rounds "
        "times; the report ends with the ratios. Each row of ours also says how the clients' "
        "connections fell on the server's workers (e.g. 5+3): with several workers, a round where "
        "one worker holds most of them is slower. Prints a table; --out writes JSON and Markdown.",
        formatter_class=fmt,
    )
    lt.add_argument("--model", required=True, help="artifact directory")
    lt.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario")
    lt.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each scenario"
    )
    lt.add_argument(
        "--concurrency",
        type=int_list,
        default=(1, 8, 32),
        help="client counts for the JSON scenarios, comma-separated",
    )
    lt.add_argument(
        "--npy-instances", type=positive_int, default=1000, help="instances per NPY request"
    )
    lt.add_argument(
        "--npy-concurrency",
        type=int_list,
        default=(1, 4),
        help="client counts for the NPY scenarios, comma-separated",
    )
    lt.add_argument("--workers", type=positive_int, default=1, help="server worker processes")
    lt.add_argument("--max-wait-ms", type=float, help="server micro-batch wait")
    lt.add_argument(
        "--data",
        help="samples to send: 'mnist' (test images) or a .npy file in the model's input space; "
        "default: uniform noise over the input range (the slowest case for the complexity term)",
    )
    lt.add_argument(
        "--protocols",
        type=lambda v: tuple(p for p in v.split(",") if p),
        default=("score", "v2"),
        help="single-instance JSON through score (POST /score), v2 (the Open Inference "
        "Protocol's infer) or both, comma-separated",
    )
    lt.add_argument(
        "--peer",
        action="store_true",
        help="measure the bare endpoint (1 and 2 workers) beside the service, and the ratios",
    )
    lt.add_argument(
        "--rounds", type=positive_int, default=1, help="times every scenario is measured"
    )
    lt.add_argument(
        "--server-cpus",
        type=cpu_list,
        help="CPUs the servers (and their workers) may run on, e.g. 0-3 or 0,2 (Linux); "
        "default: any",
    )
    lt.add_argument(
        "--client-cpus",
        type=cpu_list,
        help="CPUs this load generator runs on (Linux); default: any. With --server-cpus, "
        "disjoint sets keep the client's own CPU time out of the server's latencies, as a load "
        "generator on another machine would: e.g. --workers 2 --server-cpus 0,1 --client-cpus 2",
    )
    lt.add_argument("--out", help="write the report as JSON here (and Markdown beside it)")

    # -- drift-benchmark ----------------------------------------------------------------------
    db = sub.add_parser(
        "drift-benchmark",
        help="the drift test's false alarms on normal traffic and delay on shifted traffic",
        description="Train the default detector on one class of --dataset less --held-out of "
        "its training images, then stream those (fresh normal traffic, in random orders) "
        "through the real service (one instance per request, the test restarted by a reload "
        "per stream) and through batch scoring: how often the drift test alarms. Shifted "
        "streams replace rows after --clean by other classes at 5 %, 20 %, 50 % or a ramp "
        "to 50 %: how many rows until the alarm. Also the class's test images (other "
        "writers). Writes drift_benchmark.json and .md to --out.",
        formatter_class=fmt,
    )
    db.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or digits")
    db.add_argument("--normal-class", type=int, default=0, help="the normal class")
    db.add_argument(
        "--held-out", type=positive_int, default=1000, help="training images kept as traffic"
    )
    db.add_argument("--out", required=True, help="folder for the report")
    db.add_argument("--runs", type=positive_int, default=40, help="normal streams")
    db.add_argument("--shifted-runs", type=positive_int, default=10, help="streams per shift")
    db.add_argument("--clean", type=positive_int, default=200, help="normal rows before a shift")
    db.add_argument("--alpha", type=float, default=0.01, help="the test's false-alarm bound")
    db.add_argument("--seed", type=int, default=0, help="seed of the streams")
    db.add_argument(
        "--no-service", action="store_true", help="batch scoring only (no HTTP service)"
    )
    db.set_defaults(handler=run_drift_benchmark)
    bm.set_defaults(handler=run_benchmark)
    bb.set_defaults(handler=run_batch_benchmark)
    lt.set_defaults(handler=run_loadtest)


def run_benchmark(args: argparse.Namespace) -> int:
    from training.pipeline import CalibrationOptions
    from vae_anomaly.bench.suites import BenchmarkConfig, run_benchmark

    classes, methods, train = (
        args.classes,
        tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        train_config(args),
    )
    if args.quick:
        classes, methods, train = (0, 1), ("vae", "pca"), train_config(args, epochs=5, min_steps=0)
    calibration = CalibrationOptions(
        target_fpr=args.target_fpr,
        complexity_weight=args.complexity_weight,
        reconstruction_weight=args.reconstruction_weight,
        neighbour_share=args.neighbour_share,
        transformation_share=args.transformation_share,
        neighbour_space=args.neighbour_space,
    )
    if args.suite == "small-data":
        from vae_anomaly.bench.suites import SmallDataConfig, run_small_data, small_data_markdown

        small = run_small_data(
            SmallDataConfig(
                n_rows=args.rows,
                repeats=args.repeats,
                model=model_options(args),
                train=train,
                calibration=calibration,
            ),
            args.out,
            echo=echo,
        )
        echo("")
        echo(small_data_markdown(small))
        echo(f"results in {args.out}/small_data.json, small_data.md")
        return 0
    if args.suite:
        from vae_anomaly.bench.suites import SuiteConfig, run_suite, suite_markdown

        suite = run_suite(
            SuiteConfig(
                suite=args.suite,
                seeds=tuple(range(args.seeds)),
                classes=classes,
                methods=methods,
                model=model_options(args),
                train=train,
                calibration=calibration,
                data_dir=args.data_dir,
            ),
            args.out,
            echo=echo,
        )
        echo("")
        echo(suite_markdown(suite))
        echo(f"results in {args.out}/suite.json, suite.md")
        return 0
    cfg = BenchmarkConfig(
        dataset=args.dataset,
        classes=classes,
        seeds=tuple(range(args.seeds)),
        methods=methods,
        model=model_options(args),
        train=train,
        calibration=calibration,
        data_dir=args.data_dir,
    )
    report = run_benchmark(cfg, args.out, echo=echo)
    from vae_anomaly.bench.suites import markdown

    echo("")
    echo(markdown(report))
    echo(f"results in {args.out}/results.json, results.md, roc_curves.png")
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


def run_batch_benchmark(args: argparse.Namespace) -> int:
    from vae_anomaly.bench.batch import BatchBenchConfig, run

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
        echo=echo,
    )
    return 0


def run_loadtest(args: argparse.Namespace) -> int:
    from detector._io import atomic_output, write_json
    from detector.errors import ConfigError
    from vae_anomaly.bench.loadtest import markdown, placement, ratio_markdown, run_loadtest

    unknown = set(args.protocols) - {"score", "v2"}
    if unknown or not args.protocols:
        raise ConfigError(f"--protocols takes score and v2, got {','.join(args.protocols)}")

    server_args = ["--workers", str(args.workers)]
    if args.max_wait_ms is not None:
        server_args += ["--max-wait-ms", str(args.max_wait_ms)]
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
        log=echo,
        protocols=args.protocols,
        peers=(1, 2) if args.peer else (),
        rounds=args.rounds,
        server_cpus=args.server_cpus,
        client_cpus=args.client_cpus,
    )
    m = report["machine"]
    echo(
        f"machine: {m['cpu']}, {m['cpus_usable']} usable CPUs; server {' '.join(server_args)}; "
        f"{placement(report)}"
    )
    if report["ratios"]:
        echo("")
        echo(ratio_markdown(report["ratios"]))
    if args.out:
        write_json(args.out, report)
        md = Path(args.out).with_suffix(".md")
        with atomic_output(md, "w") as f:
            f.write(markdown(report) + "\n")
        echo(f"report written to {args.out} and {md}")
    return 0


def run_drift_benchmark(args: argparse.Namespace) -> int:
    from vae_anomaly.bench.drift import drift_markdown, run_drift_benchmark

    report = run_drift_benchmark(
        args.out,
        dataset=args.dataset,
        normal_class=args.normal_class,
        held_out=args.held_out,
        runs=args.runs,
        shifted_runs=args.shifted_runs,
        clean=args.clean,
        alpha=args.alpha,
        seed=args.seed,
        service=not args.no_service,
        echo=echo,
    )
    echo("")
    echo(drift_markdown(report))
    echo(f"results in {args.out}/drift_benchmark.json, drift_benchmark.md")
    return 0
