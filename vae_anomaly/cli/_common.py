"""What every command shares: the parser class, argument types, common option groups, output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

PROG = "vae-anomaly"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None, False, ()) that say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d is False or d == () or d is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


def column_list(value: str) -> tuple[str, ...]:
    """A comma-separated list of column names."""
    return tuple(c.strip() for c in value.split(",") if c.strip())


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _int_ranges(s: str, what: str) -> tuple[int, ...]:
    """'0-9', '0,2,5', '0-3,6' or '3' as the integers, in order, once each."""
    out: list[int] = []
    try:
        for part in s.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += range(int(a), int(b) + 1)
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} like 0-9 or 0,2,5, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no {what} in {s!r}")
    return tuple(dict.fromkeys(out))


def class_list(s: str) -> tuple[int, ...]:
    """'0-9', '0,2,5' or '3'."""
    return _int_ranges(s, "classes")


def cpu_list(s: str) -> tuple[int, ...]:
    """CPU numbers as taskset takes them: '0-3', '0,2' or '1'."""
    return _int_ranges(s, "CPUs")


def sigma_arg(s: str) -> float | None:
    if s == "learned":
        return None
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or 'learned', got {s}")
    return v


def share_arg(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def or_auto(parse: Callable[[str], T], expected: str) -> Callable[[str], T | None]:
    """An argument type: ``auto`` (None: the data decides), or what ``parse`` accepts."""

    def arg(s: str) -> T | None:
        if s.lower() == "auto":
            return None
        try:
            return parse(s)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be 'auto' or {expected}, got {s}") from None

    return arg


auto_count_arg = or_auto(positive_int, "a whole number >= 1")
auto_share_arg = or_auto(share_arg, "a number >= 0")


def weight_arg(s: str) -> float | None:
    """A weight > 0, or ``auto`` (None: the data decides)."""
    if s.lower() == "auto":
        return None
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number > 0, got {s}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number > 0, got {s}")
    return v


def cap_quantile(s: str) -> float | None:
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


def value_range(s: str) -> str:
    """``--value-range``: auto, none, or LO,HI (checked here, parsed by training.value_range)."""
    from detector.errors import DataError
    from training.value_range import parse_value_range

    try:
        parse_value_range(s)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def add_model_args(p: argparse.ArgumentParser, mo: Any, tc: Any) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        choices=["mlp", "conv"],
        default=mo.architecture,
        help="encoder/decoder body: mlp (any data) or conv (images, height and width divisible by 4)",
    )
    g.add_argument(
        "--latent-dim", type=positive_int, default=mo.latent_dim, help="size of the latent code z"
    )
    g.add_argument(
        "--widths",
        type=int_list,
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
        type=sigma_arg,
        default=mo.sigma,
        help="gaussian sigma, in data units for [0, 1] data and standardised units otherwise; or 'learned' (one per feature)",
    )
    g.add_argument("--beta", type=float, default=mo.beta, help="KL weight in the training loss")
    g.add_argument(
        "--members",
        type=auto_count_arg,
        default="auto" if mo.members is None else str(mo.members),
        metavar="auto|N",
        help="a seed ensemble of N VAEs trained side by side, their -ELBO parts averaged; auto: "
        "3 for tables (rows of features), 1 for images",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=positive_int,
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
    g.add_argument("--batch-size", type=positive_int, default=tc.batch_size)
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
    g.add_argument(
        "--augment",
        choices=["auto", "none", "shift"],
        default=tc.augment,
        help="shift: half of each training batch moved by up to one pixel (images); auto: shift "
        "for images, none for tables and flat features",
    )
    g.add_argument("--seed", type=int, default=tc.seed, help="seed of weights and batch order")
    g.add_argument("--device", default=tc.device, help="auto, cpu or cuda[:N]")


def add_scored_data_args(p: argparse.ArgumentParser, labels_help: str) -> None:
    """The model and data options shared by evaluate and report (see ``_labelled_data``)."""
    p.add_argument("--model", required=True, help="artifact directory")
    p.add_argument(
        "--dataset", help="mnist, fashion-mnist or digits (default: the artifact's own data set)"
    )
    p.add_argument(
        "--data",
        help=".npy / .csv / .parquet samples (instead of --dataset); a table model reads its "
        "columns by name",
    )
    p.add_argument("--labels", help=labels_help)
    p.add_argument(
        "--label-column",
        help="a table's column holding the labels (instead of --labels; 0/1, or classes with "
        "--normal-class)",
    )
    p.add_argument("--normal-class", type=int, help="normal class (default: the artifact's)")
    p.add_argument("--data-dir", help="folder with MNIST IDX files")
    p.add_argument("--target-fpr", type=float, help="re-threshold the calibration for this FPR")


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vae-anomaly")
    except metadata.PackageNotFoundError:
        return "unknown"


def echo(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def model_options(args: argparse.Namespace) -> Any:
    from training.pipeline import ModelOptions

    return ModelOptions(
        architecture=args.arch,
        latent_dim=args.latent_dim,
        widths=args.widths,
        likelihood=args.likelihood,
        sigma=args.sigma,
        beta=args.beta,
        members=args.members,
    )


def train_config(args: argparse.Namespace, **override: Any) -> Any:
    from training.train import TrainConfig

    values = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        min_steps=args.min_steps,
        kl_warmup_epochs=args.kl_warmup,
        augment=args.augment,
        seed=args.seed,
        device=args.device,
    )
    return TrainConfig(**{**values, **override})


def one_line(e: BaseException | str) -> str:
    """An error message on one line, whatever its newlines."""
    return " ".join(str(e).split())
