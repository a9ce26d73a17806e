"""``vae-anomaly serve`` and ``info``: run the HTTP service; describe an artifact."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from vae_anomaly.cli._common import (
    HelpFormatter,
    echo,
    positive_int,
)

if TYPE_CHECKING:
    from detector.transforms import HeadConfig


def register(sub: Any, fmt: type[HelpFormatter]) -> None:
    """Register the serve and info commands on ``sub``."""
    from serving.settings import RUNTIMES, Settings

    st = Settings()

    # -- serve --------------------------------------------------------------------------------
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
    sv.add_argument("--workers", type=positive_int, help=f"worker processes (default {st.workers})")
    sv.add_argument(
        "--max-batch-size",
        type=positive_int,
        help=f"rows per forward pass (default {st.max_batch_size})",
    )
    sv.add_argument(
        "--max-wait-ms", type=float, help=f"micro-batch wait (default {st.max_wait_ms})"
    )
    sv.add_argument(
        "--max-instances",
        type=positive_int,
        help=f"instances per request (default {st.max_instances})",
    )
    sv.add_argument(
        "--max-body-bytes",
        type=positive_int,
        help=f"request body limit (default {st.max_body_bytes})",
    )
    sv.add_argument(
        "--client-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for a client sending a request: for its line and headers (from "
        "the connection, or the request's first bytes), and for the next part of a body that "
        f"stopped coming; after it: 408 and the connection closed (default "
        f"{st.client_timeout:g}, as nginx's client_header_timeout and client_body_timeout)",
    )
    sv.add_argument(
        "--torch-threads", type=int, help="torch threads per worker (default: CPU quota / workers)"
    )
    sv.add_argument(
        "--enable-admin",
        action="store_true",
        default=None,
        help="enable POST /admin/reload (needs VAE_ANOMALY_API_KEY)",
    )
    sv.add_argument(
        "--model-root",
        help="POST /admin/reload loads only artifacts inside this folder (default: the folder "
        "that holds --model)",
    )
    sv.add_argument("--device", help=f"cpu, cuda or auto (default {st.device})")
    sv.add_argument(
        "--model-name",
        help=f"the model's name in the Open Inference Protocol's /v2/models/NAME routes "
        f"(default {st.model_name})",
    )
    sv.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help=f"what runs the network (default {st.runtime}: ONNX Runtime on the CPU, faster there; "
        "torch on a GPU); the same scores to float32 precision",
    )
    sv.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help=f"(default {st.log_level})",
    )
    sv.add_argument(
        "--drift-alpha",
        type=float,
        help=f"false-alarm bound of the drift test on served scores (default {st.drift_alpha}; "
        "the vae_anomaly_drift_* metrics, VAEAnomalyDrift alert)",
    )
    sv.add_argument(
        "--drift-window",
        type=positive_int,
        help=f"served scores in the drift KS statistic (default {st.drift_window})",
    )

    # -- info ---------------------------------------------------------------------------------
    inf = sub.add_parser(
        "info",
        help="print an artifact's config, threshold and provenance",
        description="Verify an artifact's checksums and print what it is.",
        formatter_class=fmt,
    )
    inf.add_argument("--model", required=True, help="artifact directory")
    inf.add_argument("--json", action="store_true", help="print JSON")

    # -- export -------------------------------------------------------------------------------
    ex = sub.add_parser(
        "export",
        help="write an artifact's scoring graph as ONNX, for other runtimes",
        description="Write the network's scoring graph as one ONNX file (opset 18): input "
        "'input' shaped (N, *input shape), float32; outputs 'reconstruction', 'kl', 'neighbour', "
        "'transformation' and 'score' (higher = more anomalous) in nats, equal to vae-anomaly's to float32 "
        "precision. An image model's complexity credit (a DEFLATE code length) is not an ONNX "
        "operator: its file has 'score_before_complexity' instead of 'score', and its metadata "
        "(vae_anomaly.score_completion) says how to finish the score. The metadata also holds "
        "the calibration (threshold, target FPR, calibration scores for p-values), the input "
        "spec (a table's schema) and the model version.",
        formatter_class=fmt,
    )
    ex.add_argument("--model", required=True, help="artifact directory")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="(default onnx)")
    ex.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sv.set_defaults(handler=run_serve)
    inf.set_defaults(handler=run_info)
    ex.set_defaults(handler=run_export)


def run_serve(args: argparse.Namespace) -> int:
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
        client_timeout=args.client_timeout,
        torch_threads=args.torch_threads,
        enable_admin=args.enable_admin,
        model_root=args.model_root,
        device=args.device,
        runtime=args.runtime,
        model_name=args.model_name,
        log_level=args.log_level,
        drift_alpha=args.drift_alpha,
        drift_window=args.drift_window,
    )
    run(settings)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from detector.detector import Detector

    det = Detector.load(args.model, device="cpu")
    d = det.describe()
    if args.json:
        echo(json.dumps(d, indent=2))
        return 0
    m, inp, data = d["model"], d["input"], d["data"]
    rows: list[tuple[str, Any]] = [
        ("model version", d["model_version"]),
        ("created", d["created_at"]),
        (
            "model",
            f"{m['architecture']} VAE, latent {m['latent_dim']}, widths {m['widths']}, "
            f"{m['likelihood']} likelihood"
            + (f", an ensemble of {m['members']}" if m.get("members", 1) > 1 else ""),
        ),
        ("input", f"shape {inp['shape']}, range {inp['value_range']}, {inp['preprocessing']}"),
        ("head", "none" if det.head is None else _head_line(det.head.config)),
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
        echo(f"{k:<{width}}  {v}")
    return 0


def _head_line(h: HeadConfig) -> str:
    return (
        f"transformation head: {h.transforms} ({h.n_transforms} transformations), width "
        f"{h.width}, pooling {h.pool}"
    )


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detector.detector import Detector
    from detector.errors import ConfigError

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; name the .onnx file to write")
    try:
        from detector.export import export_onnx, score_output_name
    except ImportError as e:
        raise ConfigError(
            f"export needs the onnx package ({e.name} is not installed): pip install onnx"
        ) from None
    det = Detector.load(args.model, device="cpu")
    size = export_onnx(det, out)
    echo(f"wrote {out} ({size / 1e6:.1f} MB, model {det.model_version})")
    echo(
        f"outputs: {score_output_name(det)}, reconstruction, kl, neighbour, transformation (nats, "
        "higher = more anomalous)"
    )
    if det.score_config.complexity_weight:
        echo(
            "the complexity credit is not in the graph: see the metadata "
            "vae_anomaly.score_completion for how to finish the score"
        )
    return 0
