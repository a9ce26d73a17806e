"""``vae-anomaly score``: score files of any size into one output file, streaming."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from vae_anomaly.cli._common import (
    HelpFormatter,
    echo,
    positive_int,
)


def register(sub: Any, fmt: type[HelpFormatter]) -> None:
    """Register the score command on ``sub``."""
    from serving.settings import RUNTIMES

    # -- score --------------------------------------------------------------------------------
    sc = sub.add_parser(
        "score",
        help="score files (.npy, .csv, .parquet) into a .csv or .parquet file, streaming",
        description="Score every row of the input files with an artifact and write one output "
        "row per input row: source, row (0-based within its file), the id and pass-through "
        "columns, score (higher = more anomalous), reconstruction, kl, complexity, p_value, "
        "is_anomaly. Inputs are read and scored in chunks, so memory does not grow with their "
        "size. The output, a rejects file (--on-error skip) and a JSON summary beside it "
        "(OUTPUT stem + .summary.json) appear only when the run completes. A model trained on a "
        "table takes its columns by name, in any order: a missing or unknown column is refused "
        "(name extra columns with --id-column / --passthrough); empty cells are missing values, "
        "counted per row in n_missing, and categories never seen in training in n_unseen. An "
        "image model's CSV: header optional; a file with one column more than the model's "
        "features (MNIST layout: label, pixel0..pixel783) has its first column passed through "
        "as the label.",
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
        "--explain",
        action="store_true",
        help="table models: add top_columns (the 3 columns that added most to the row's score) "
        "and contribution.COLUMN (each column's share of the likelihood term, in nats)",
    )
    sc.add_argument(
        "--delimiter",
        help="CSV delimiter (default: sniffed from the first lines among , ; tab |)",
    )
    sc.add_argument(
        "--on-error",
        choices=["stop", "skip"],
        default="stop",
        help="a malformed row (wrong column count, not a number, NaN, out of range) stops the "
        "run, or with skip goes to OUTPUT stem + .rejects.csv with the reason",
    )
    sc.add_argument(
        "--chunk-rows", type=positive_int, default=8192, help="rows read and scored at once"
    )
    sc.add_argument("--batch-size", type=positive_int, default=2048, help="rows per forward pass")
    sc.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    sc.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the network (default auto: ONNX Runtime on the CPU, faster there; torch "
        "on a GPU); the same scores to float32 precision",
    )
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
    g.add_argument("--ray-actors", type=positive_int, default=2, help="scoring actors")
    g.add_argument(
        "--ray-cpus-per-actor", type=float, default=1.0, help="CPUs reserved by each actor"
    )
    sc.add_argument(
        "--drift-alpha",
        type=float,
        default=0.01,
        help="false-alarm bound of the drift test written to the summary (see `drift`)",
    )
    sc.set_defaults(handler=run_score)

    # -- drift --------------------------------------------------------------------------------
    dr = sub.add_parser(
        "drift",
        help="do these files still look like the calibration data? (a test with a known "
        "false-alarm rate)",
        description="Score the rows of the files in order, nothing written, and test whether "
        "they look exchangeable with the model's calibration data: a conformal test martingale "
        "over the rows' p-values (Vovk et al.'s Simple Jumper) raises the alarm when it reaches "
        "1/alpha, which rows exchangeable with the calibration data do with probability at most "
        "alpha, however many rows there are; and the Kolmogorov-Smirnov statistic of all their "
        "scores against the calibration scores. Exits 0 either way; --fail-on-drift exits 3 on "
        "an alarm. `score` writes the same test to its summary.",
        formatter_class=fmt,
    )
    dr.add_argument("--model", required=True, help="artifact directory")
    dr.add_argument("inputs", nargs="+", metavar="INPUT", help=".npy, .csv or .parquet files")
    dr.add_argument("--alpha", type=float, default=0.01, help="false-alarm bound of the test")
    dr.add_argument("--scale", type=float, default=1.0, help="divide inputs by this first")
    dr.add_argument("--header", choices=["auto", "yes", "no"], default="auto", help="CSV header")
    dr.add_argument("--delimiter", help="CSV delimiter (default: sniffed)")
    dr.add_argument(
        "--passthrough",
        type=lambda v: tuple(c for c in v.split(",") if c),
        default=(),
        help="comma-separated columns that are not features",
    )
    dr.add_argument("--json", action="store_true", help="print the result as JSON")
    dr.add_argument("--fail-on-drift", action="store_true", help="exit 3 when the test alarms")
    dr.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    dr.set_defaults(handler=run_drift)


def run_drift(args: argparse.Namespace) -> int:
    import json

    from detector.detector import Detector
    from serving.batch import BatchOptions, drift_files, expand_inputs
    from serving.batch.options import drift_line

    opts = BatchOptions(
        scale=args.scale,
        header=args.header,
        delimiter=args.delimiter,
        passthrough=args.passthrough,
        drift_alpha=args.alpha,
    )
    det = Detector.load(args.model, device=args.device)
    result = drift_files(det, expand_inputs(args.inputs), opts)
    if args.json:
        echo(json.dumps(result, indent=2))
    else:
        echo(
            f"{result['rows']:,} rows from {len(result['inputs'])} file(s)"
            + (f", {result['rejected']:,} malformed rows skipped" if result["rejected"] else "")
        )
        echo(drift_line(result))
    return 3 if args.fail_on_drift and result["alarm"] else 0


def run_score(args: argparse.Namespace) -> int:

    from detector.detector import Detector
    from serving.batch import BatchOptions, check_output, expand_inputs, score_files

    opts = BatchOptions(
        scale=args.scale,
        id_column=args.id_column,
        passthrough=args.passthrough,
        header=args.header,
        delimiter=args.delimiter,
        explain=args.explain,
        drift_alpha=args.drift_alpha,
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
        from serving.batch.ray_engine import score_files_ray

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
            runtime=args.runtime,
            progress=progress,
        )
    else:
        device = "cpu" if args.runtime == "onnxruntime" and args.device == "auto" else args.device
        det = Detector.load(
            args.model, device=device, batch_size=args.batch_size, runtime=args.runtime
        )
        summary = score_files(det, files, out, opts, progress=progress)
    for line in summary.lines():
        echo(line)
    return 0
