"""Batch scoring's options, its unit of work (a block of rows) and its run summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from detector.detector import DetectionResult
from detector.drift import DEFAULT_ALPHA
from detector.errors import DataError, InputError

INPUT_SUFFIXES = (".npy", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".csv", ".parquet")
RESULT_COLUMNS = DetectionResult.COLUMNS
TABLE_COLUMNS = ("n_missing", "n_unseen")  # a table model's output: cells missing, unseen
DEFAULT_CHUNK_ROWS = 8192
CSV_BLOCK_BYTES = 8 << 20  # bytes of CSV text parsed at once (about 4,500 MNIST rows)


@dataclass(frozen=True)
class BatchOptions:
    """How to read the inputs and what to do with bad rows."""

    scale: float = 1.0  # inputs are divided by this (255 for 8-bit pixels)
    id_column: str | None = None  # a CSV / Parquet column copied to the output as the row's id
    passthrough: tuple[str, ...] = ()  # columns copied to the output unchanged (e.g. a label)
    header: str = "auto"  # CSV: auto (a first line that is not all numbers is a header), yes, no
    delimiter: str | None = None  # CSV: None = sniffed from the first lines (detector.tables)
    on_error: str = "stop"  # stop: a malformed row ends the run; skip: it goes to the rejects file
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False
    explain: bool = False  # a table model's per-column contributions and top columns
    drift_alpha: float = DEFAULT_ALPHA  # the drift test's false-alarm bound (detector.drift)

    def validate(self) -> None:
        if not self.scale > 0 or not math.isfinite(self.scale):
            raise InputError(f"scale must be a positive number, got {self.scale}")
        if self.header not in ("auto", "yes", "no"):
            raise InputError(f"header must be auto, yes or no, got {self.header!r}")
        if self.on_error not in ("stop", "skip"):
            raise InputError(f"on_error must be stop or skip, got {self.on_error!r}")
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise InputError(f"the delimiter must be one character, got {self.delimiter!r}")
        if not 0.0 < self.drift_alpha < 1.0:
            raise InputError(f"the drift alpha must be in (0, 1), got {self.drift_alpha}")
        if self.chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        named = [*([self.id_column] if self.id_column else []), *self.passthrough]
        if len(set(named)) != len(named):
            raise InputError(
                f"a column is named twice among the id and pass-through columns: {named}"
            )


@dataclass
class Block:
    """Rows of one input, validated and scaled: ready to score."""

    source: str
    rows: npt.NDArray[np.int64]  # 0-based row numbers within the file
    x: npt.NDArray[np.float32]  # (n, features)
    extra: dict[str, pa.Array] = field(default_factory=dict)  # id and pass-through columns


@dataclass
class Summary:
    inputs: list[str]
    output: str
    rows: int
    rejected: int
    anomalies: int
    anomaly_rate: float
    target_fpr: float
    threshold: float
    model_version: str
    seconds: float
    rows_per_second: float
    peak_rss_mb: float
    rejects_file: str | None
    engine: str = "local"
    drift: dict[str, Any] = field(default_factory=dict)  # detector.drift.DriftTest.summary()
    columns: str = ""  # a table model: how the files' columns were matched

    def lines(self) -> list[str]:
        out = [
            f"scored {self.rows:,} rows from {len(self.inputs)} file(s) in {self.seconds:.1f}s "
            f"({self.rows_per_second:,.0f} rows/s, peak memory {self.peak_rss_mb:,.0f} MB)",
            f"anomalies: {self.anomalies:,} ({self.anomaly_rate:.2%}; the threshold "
            f"{self.threshold:.3f} targets {self.target_fpr:.2%} on normal data)",
        ]
        if self.rejected:
            out.append(f"rejected: {self.rejected:,} malformed rows, see {self.rejects_file}")
        if self.columns:
            out.append(self.columns)
        if self.drift:
            out.append(drift_line(self.drift))
        out.append(f"wrote {self.output}")
        return out


def drift_line(d: dict[str, Any]) -> str:
    """The drift test's verdict in one line (``detector.drift``)."""
    ks = f"KS statistic {d['ks_statistic']:.3f} (p = {d['ks_p_value']:.2g})"
    if d["alarm"]:
        return (
            f"drift: the rows stop looking like the calibration data from about row "
            f"{d['first_alarm_at_row']:,} (test martingale past 1/alpha = {1 / d['alpha']:g}; "
            f"false-alarm probability <= {d['alpha']:g}); {ks}"
        )
    return (
        f"drift: none detected (test martingale at most e^{d['log_martingale_max']:.2f}, alarm "
        f"at 1/alpha = {1 / d['alpha']:g}); {ks}"
    )


class RowError(DataError):
    """A malformed row, named by file and line or row."""
