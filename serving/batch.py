"""Offline batch scoring of files: NPY, CSV and Parquet in, CSV or Parquet out, streamed in chunks.

``score_files(detector, inputs, output, options)`` reads each input in chunks of rows, scores each
chunk and appends it to the output, so peak memory depends on the chunk size, not on the files'
sizes. The output (and the rejects file and the JSON summary beside it) is written to a temporary
file and renamed into place only when the run completes: an interrupted or failed run leaves no
file at the output path.

Rows are numbered from 0 within their file (the header line of a CSV file does not count; blank
lines are skipped). Errors name the file and its line (CSV: 1-based line of the file, header
included) or row (NPY, Parquet). A malformed row stops the run, unless ``on_error="skip"``: then it
goes to the rejects file (source, line or row, reason) and the run goes on.

The feature columns of a CSV or Parquet file: every column except the id column and the
pass-through columns. A file with exactly one column more than the model's features (the common
MNIST layout ``label, pixel0..pixel783``) has its first column passed through as its label.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from detector._io import atomic_output, write_json
from detector.detector import DetectionResult, Detector
from detector.errors import DataError, InputError
from detector.spec import RANGE_TOLERANCE, InputSpec, check_batch_shape

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".npy", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".csv", ".parquet")
RESULT_COLUMNS = DetectionResult.COLUMNS
DEFAULT_CHUNK_ROWS = 8192
CSV_BLOCK_BYTES = 8 << 20  # bytes of CSV text parsed at once (about 4,500 MNIST rows)


@dataclass(frozen=True)
class BatchOptions:
    """How to read the inputs and what to do with bad rows."""

    scale: float = 1.0  # inputs are divided by this (255 for 8-bit pixels)
    id_column: str | None = None  # a CSV / Parquet column copied to the output as the row's id
    passthrough: tuple[str, ...] = ()  # columns copied to the output unchanged (e.g. a label)
    header: str = "auto"  # CSV: auto (a first line that is not all numbers is a header), yes, no
    on_error: str = "stop"  # stop: a malformed row ends the run; skip: it goes to the rejects file
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False

    def validate(self) -> None:
        if not self.scale > 0 or not math.isfinite(self.scale):
            raise InputError(f"scale must be a positive number, got {self.scale}")
        if self.header not in ("auto", "yes", "no"):
            raise InputError(f"header must be auto, yes or no, got {self.header!r}")
        if self.on_error not in ("stop", "skip"):
            raise InputError(f"on_error must be stop or skip, got {self.on_error!r}")
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

    def lines(self) -> list[str]:
        out = [
            f"scored {self.rows:,} rows from {len(self.inputs)} file(s) in {self.seconds:.1f}s "
            f"({self.rows_per_second:,.0f} rows/s, peak memory {self.peak_rss_mb:,.0f} MB)",
            f"anomalies: {self.anomalies:,} ({self.anomaly_rate:.2%}; the threshold "
            f"{self.threshold:.3f} targets {self.target_fpr:.2%} on normal data)",
        ]
        if self.rejected:
            out.append(f"rejected: {self.rejected:,} malformed rows, see {self.rejects_file}")
        out.append(f"wrote {self.output}")
        return out


class RowError(DataError):
    """A malformed row, named by file and line or row."""


# -- paths --------------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs (``data/*.csv``) -> existing files, in the order given (globs sorted)."""
    import glob

    files: list[Path] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?[") and not Path(pat).exists():
            matches = sorted(glob.glob(pat, recursive=True))
            if not matches:
                raise InputError(f"{pat}: no file matches")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(pat))
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: no such file")
        if f.suffix.lower() not in INPUT_SUFFIXES:
            raise InputError(
                f"{f}: unsupported input type {f.suffix or '(none)'}; use .npy, .csv or .parquet"
            )
    if not files:
        raise InputError("no input files")
    return files


def side_files(output: Path) -> tuple[Path, Path]:
    """The rejects file and the JSON summary written beside ``output``."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.rejects.csv"), output.with_name(f"{stem}.summary.json")


def check_output(output: Path, overwrite: bool) -> None:
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"{output}: unsupported output type; use .csv or .parquet")
    if output.exists() and not overwrite:
        raise InputError(f"{output} already exists; pass --overwrite to replace it")
    if output.exists() and output.is_dir():
        raise InputError(f"{output} is a directory")


# -- row checks shared by every reader ----------------------------------------------------------
def _bad_rows(
    x: npt.NDArray[np.float32], spec: InputSpec, scale: float = 1.0
) -> tuple[npt.NDArray[np.bool_], list[str]]:
    """Rows that are not finite or lie outside the model's input range, and why."""
    finite = np.isfinite(x)
    bad: npt.NDArray[np.bool_] = np.asarray(~finite.all(axis=1))
    if spec.value_range is not None:
        lo, hi = spec.value_range
        with np.errstate(invalid="ignore"):
            outside = ((x < lo - RANGE_TOLERANCE) | (x > hi + RANGE_TOLERANCE)).any(axis=1)
        outside &= ~bad
        bad |= outside
    reasons = []
    for i in np.flatnonzero(bad).tolist():
        if not finite[i].all():
            j = int(np.flatnonzero(~finite[i])[0])
            reasons.append(f"{_value_name(x[i, j])} in feature {j}")
        else:
            lo, hi = spec.value_range  # type: ignore[misc]
            v = x[i]
            hint = (
                " (8-bit values? pass --scale 255)"
                if scale == 1.0 and hi <= 1.0 and v.max() > 1.0
                else ""
            )
            reasons.append(
                f"values outside the model's input range [{lo:g}, {hi:g}] (min {float(v.min()):g}, "
                f"max {float(v.max()):g}){hint}"
            )
    return bad, reasons


def _value_name(v: float) -> str:
    return "NaN" if math.isnan(v) else ("infinity" if v > 0 else "-infinity")


class _Rejects:
    """Collects rejected rows (skip mode) or raises at the first one (stop mode)."""

    def __init__(self, on_error: str, sink: IO[str] | None) -> None:
        self.on_error = on_error
        self.count = 0
        self._writer = csv.writer(sink, lineterminator="\n") if sink is not None else None
        if self._writer is not None:
            self._writer.writerow(["source", "where", "reason"])

    def add(self, source: str, where: str, reason: str) -> None:
        if self.on_error == "stop":
            raise RowError(
                f"{source}, {where}: {reason} (pass --on-error skip to set such rows aside)"
            )
        self.count += 1
        if self._writer is not None:
            self._writer.writerow([source, where, reason])


# -- readers ------------------------------------------------------------------------------------
class _Columns:
    """Which columns of a CSV / Parquet file are features, id and pass-through."""

    def __init__(self, names: list[str], spec: InputSpec, opts: BatchOptions, source: str) -> None:
        missing = [c for c in [opts.id_column, *opts.passthrough] if c and c not in names]
        if missing:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise InputError(f"{source}: no column {missing[0]!r} (columns: {shown})")
        named = {opts.id_column, *opts.passthrough}
        self.extra = [c for c in [opts.id_column, *opts.passthrough] if c]
        self.features = [c for c in names if c not in named]
        n = spec.n_features
        if len(self.features) == n + 1:  # label, pixel0..pixel783: the label rides along
            label = self.features.pop(0)
            self.extra.append(label)
            log.info("%s: first column %r passed through as the label", source, label)
        if len(self.features) != n:
            raise InputError(
                f"{source}: {len(self.features)} feature columns (after the id and pass-through "
                f"columns), but the model takes {n} features; name the other columns with "
                "--id-column / --passthrough"
            )
        self.names = names


def _read_npy(
    path: Path,
    spec: InputSpec,
    opts: BatchOptions,
    rejects: _Rejects,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Block]:
    """Rows ``start:stop`` of an NPY file, in chunks read with plain reads (not a memory map,
    whose touched pages would count as the process's resident memory)."""
    try:  # a memory map only to read the header: shape, dtype, layout and data offset
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy array: {e}") from e
    shape, dtype = header.shape, header.dtype
    fortran = header.ndim > 1 and not header.flags.c_contiguous
    offset = int(getattr(header, "offset", 0))
    del header
    if (
        len(shape) < 1
        or dtype.hasobject
        or not (np.issubdtype(dtype, np.number) or dtype == np.bool_)
    ):
        raise InputError(f"{path} must hold numbers, got dtype {dtype}")
    check_batch_shape(tuple(shape), spec, name=str(path))
    if opts.id_column or opts.passthrough:
        raise InputError(
            f"{path}: .npy files have no columns; --id-column / --passthrough need CSV or Parquet"
        )
    row_items = math.prod(shape[1:])
    n = shape[0] if stop is None else min(stop, shape[0])
    expected = offset + shape[0] * row_items * dtype.itemsize
    if path.stat().st_size < expected:
        raise DataError(
            f"{path} is truncated: {path.stat().st_size} bytes, its header needs {expected}"
        )
    mapped = np.load(path, mmap_mode="r", allow_pickle=False) if fortran else None
    with open(path, "rb") as f:
        for begin in range(start, n, opts.chunk_rows):
            count = min(n, begin + opts.chunk_rows) - begin
            if mapped is not None:  # Fortran order: rows are not contiguous on disk
                raw = np.array(mapped[begin : begin + count])
            else:
                f.seek(offset + begin * row_items * dtype.itemsize)
                raw = np.fromfile(f, dtype=dtype, count=count * row_items)
            x = raw.reshape(count, row_items).astype(np.float32, copy=False)
            if opts.scale != 1.0:
                x = x / np.float32(opts.scale)
            rows = np.arange(begin, begin + count, dtype=np.int64)
            yield _screen(
                Block(str(path), rows, x), spec, rejects, lambda r: f"row {r}", opts.scale
            )


def _screen(
    block: Block,
    spec: InputSpec,
    rejects: _Rejects,
    where: Callable[[int], str],
    scale: float = 1.0,
) -> Block:
    bad, reasons = _bad_rows(block.x, spec, scale)
    if not bad.any():
        return block
    for i, reason in zip(np.flatnonzero(bad).tolist(), reasons, strict=True):
        rejects.add(block.source, where(int(block.rows[i])), reason)
    keep = ~bad
    return Block(
        block.source,
        block.rows[keep],
        block.x[keep],
        {k: v.filter(pa.array(keep)) for k, v in block.extra.items()},
    )


def _read_parquet(
    path: Path, spec: InputSpec, opts: BatchOptions, rejects: _Rejects
) -> Iterator[Block]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    cols = _Columns(pf.schema_arrow.names, spec, opts, str(path))
    start = 0
    for batch in pf.iter_batches(batch_size=opts.chunk_rows):
        n = batch.num_rows
        rows = np.arange(start, start + n, dtype=np.int64)
        feats = []
        for c in cols.features:
            col = batch.column(c)
            if not (
                pa.types.is_integer(col.type)
                or pa.types.is_floating(col.type)
                or pa.types.is_boolean(col.type)
            ):
                raise InputError(f"{path}: column {c!r} has type {col.type}, not numbers")
            feats.append(col.cast(pa.float32()).to_numpy(zero_copy_only=False))
        x = np.column_stack(feats).astype(np.float32, copy=False)  # nulls became NaN
        if opts.scale != 1.0:
            x = x / np.float32(opts.scale)
        extra = {c: batch.column(c) for c in cols.extra}
        yield _screen(
            Block(str(path), rows, x, extra), spec, rejects, lambda r: f"row {r}", opts.scale
        )
        start += n


class _CSVReader:
    """CSV in blocks of whole lines: a fast path through pyarrow, and line by line where a block
    holds a malformed row (to name its line, or set it aside)."""

    def __init__(self, path: Path, spec: InputSpec, opts: BatchOptions, rejects: _Rejects) -> None:
        self.path, self.spec, self.opts, self.rejects = path, spec, opts, rejects
        self.source = str(path)

    def blocks(self) -> Iterator[Block]:
        with open(self.path, "rb") as f:
            first = f.readline()
            line_no = 1
            while first and not first.strip():  # leading blank lines
                first = f.readline()
                line_no += 1
            if not first:
                raise DataError(f"{self.path} is empty")
            cells = next(csv.reader([first.decode("utf-8", errors="replace")]))
            has_header = self.opts.header == "yes" or (
                self.opts.header == "auto" and not all(_is_number(c) for c in cells)
            )
            names = (
                [c.strip() for c in cells] if has_header else [str(i) for i in range(len(cells))]
            )
            if len(set(names)) != len(names):
                raise DataError(f"{self.path}: the header names a column twice")
            self.cols = _Columns(names, self.spec, self.opts, self.source)
            self.types: dict[str, pa.DataType] = {}
            pending = b"" if has_header else first
            next_line = line_no + 1 if has_header else line_no  # line number of pending's start
            row = 0
            while True:
                chunk = f.read(CSV_BLOCK_BYTES)
                data = pending + chunk
                if not chunk:
                    if data.strip():
                        yield from self._chunks(self._parse(data, next_line, row)[0])
                    return
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no full line yet
                    pending = data
                    continue
                text, pending = data[:cut], data[cut:]
                block, consumed = self._parse(text, next_line, row)
                yield from self._chunks(block)
                row += consumed
                next_line += text.count(b"\n")

    def _parse(self, text: bytes, first_line: int, first_row: int) -> tuple[Block, int]:
        """The good rows of ``text`` (whole lines from line ``first_line``), and how many rows
        (good or rejected) it held."""
        # lines pyarrow reads as rows: all but the empty ones (whitespace-only lines fail the fast
        # path, and the slow path skips them too)
        if b"\n\n" in text or b"\n\r\n" in text or text[:1] in (b"\n", b"\r"):
            nonblank = sum(1 for ln in text.splitlines() if ln)  # rare: empty lines
        else:
            nonblank = text.count(b"\n") + (0 if text.endswith(b"\n") else 1)
        block = self._fast(text, first_row, nonblank)
        if block is None:
            block, consumed = self._slow(text, first_line, first_row)
        else:
            consumed = len(block.rows)
        return block, consumed

    def _chunks(self, block: Block) -> Iterator[Block]:
        for s in range(0, len(block.rows), self.opts.chunk_rows):
            part = slice(s, s + self.opts.chunk_rows)
            yield Block(
                block.source,
                block.rows[part],
                block.x[part],
                {k: v[part] for k, v in block.extra.items()},
            )

    def _fast(self, text: bytes, first_row: int, nonblank: int) -> Block | None:
        types = {c: pa.float32() for c in self.cols.features}
        types.update(self.types)
        try:
            table = pacsv.read_csv(
                io.BytesIO(text),
                read_options=pacsv.ReadOptions(column_names=self.cols.names, use_threads=True),
                convert_options=pacsv.ConvertOptions(column_types=types),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        if table.num_rows != nonblank:
            return None
        feats = [table.column(c) for c in self.cols.features]
        if any(col.null_count for col in feats):
            return None
        x = np.vstack(  # row-major straight from Arrow (4x faster than stacking columns)
            [
                np.asarray(b.to_tensor(row_major=True))
                for b in table.select(self.cols.features).to_batches()
            ]
        )
        if self.opts.scale != 1.0:
            x = x / np.float32(self.opts.scale)
        if _bad_rows(x, self.spec, self.opts.scale)[0].any():
            return None
        extra = {c: table.column(c).combine_chunks() for c in self.cols.extra}
        for c, v in extra.items():
            self.types.setdefault(c, v.type)  # later blocks keep the first block's types
        rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
        return Block(self.source, rows, x.astype(np.float32, copy=False), extra)

    def _slow(self, text: bytes, first_line: int, first_row: int) -> tuple[Block, int]:
        width = len(self.cols.names)
        index = {c: i for i, c in enumerate(self.cols.names)}
        fidx = [index[c] for c in self.cols.features]
        xs: list[list[float]] = []
        rows: list[int] = []
        extras: dict[str, list[str]] = {c: [] for c in self.cols.extra}
        row = first_row
        lines = text.decode("utf-8", errors="replace").splitlines()
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"line {first_line + k}"
            this_row = row
            row += 1
            cells = next(csv.reader([line]))
            if len(cells) != width:
                self.rejects.add(self.source, where, f"expected {width} columns, got {len(cells)}")
                continue
            values = []
            for i in fidx:
                try:
                    values.append(float(cells[i]))
                except ValueError:
                    shown = cells[i] if len(cells[i]) <= 20 else cells[i][:20] + "..."
                    self.rejects.add(
                        self.source,
                        where,
                        f"column {self.cols.names[i]!r}: {shown!r} is not a number",
                    )
                    break
            else:
                v = np.asarray(values, dtype=np.float32)[None, :] / np.float32(self.opts.scale)
                bad, reasons = _bad_rows(v, self.spec, self.opts.scale)
                if bad[0]:
                    self.rejects.add(self.source, where, reasons[0])
                    continue
                xs.append(values)
                rows.append(this_row)
                for c in self.cols.extra:
                    extras[c].append(cells[index[c]])
        x = np.asarray(xs, dtype=np.float32).reshape(-1, len(fidx))
        if self.opts.scale != 1.0:
            x = x / np.float32(self.opts.scale)
        extra = {}
        for c, vals in extras.items():
            arr = pa.array(vals, pa.string())
            target = self.types.get(c)
            if target is None:
                target = _infer(vals)
                self.types[c] = target
            try:
                extra[c] = arr.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                extra[c] = arr  # mixed values: keep the text
                self.types[c] = pa.string()
        return Block(self.source, np.asarray(rows, dtype=np.int64), x, extra), row - first_row


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _infer(values: list[str]) -> pa.DataType:
    for t in (pa.int64(), pa.float64()):
        try:
            pa.array(values, pa.string()).cast(t)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return t
    return pa.string()


def read_blocks(
    path: Path, spec: InputSpec, opts: BatchOptions, rejects: _Rejects
) -> Iterator[Block]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, spec, opts, rejects)
    if suffix == ".parquet":
        return _read_parquet(path, spec, opts, rejects)
    return _CSVReader(path, spec, opts, rejects).blocks()


# -- scoring and writing ------------------------------------------------------------------------
def score_block(detector: Detector, block: Block) -> pa.Table:
    """The output rows of one block: source, row, id / pass-through columns, score parts."""
    cal = detector.require_calibration()
    n = len(block.rows)
    if n:
        parts = detector.score_validated(block.x.reshape(n, *detector.input_spec.shape))
        result = DetectionResult.from_parts(parts, cal).columns()
    else:
        result = {
            k: np.zeros(0, dtype=bool if k == "is_anomaly" else np.float64) for k in RESULT_COLUMNS
        }
    columns: dict[str, Any] = {
        "source": pa.array([block.source] * n, pa.string()),
        "row": pa.array(block.rows, pa.int64()),
        **block.extra,
        **{k: pa.array(v) for k, v in result.items()},
    }
    return pa.table(columns)


class _Writer:
    """Appends tables to a CSV or Parquet file object, fixing the schema at the first table."""

    def __init__(self, sink: IO[bytes], kind: str) -> None:
        self.sink, self.kind = sink, kind
        self.schema: pa.Schema | None = None
        self._w: Any = None

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
            if self.kind == ".parquet":
                self._w = pq.ParquetWriter(self.sink, self.schema, compression="zstd")
            else:
                self._w = pacsv.CSVWriter(self.sink, self.schema)
        elif table.schema != self.schema:
            if table.schema.names != self.schema.names:
                extra = [n for n in table.schema.names if n not in RESULT_COLUMNS][2:]
                first = [n for n in self.schema.names if n not in RESULT_COLUMNS][2:]
                raise DataError(
                    f"{table.column('source')[0]}: id / pass-through columns {extra} differ from "
                    f"the first file's {first}; score files of one layout per run"
                )
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise DataError(
                    f"the id / pass-through columns of {table.column('source')[0]} do not match the "
                    f"first file's types ({e})"
                ) from e
        self._w.write_table(table)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _progress(total: int | None, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    disable = (not enabled) if enabled is not None else (None if not os.environ.get("CI") else True)
    return tqdm(
        total=total,
        unit="rows",
        unit_scale=True,
        dynamic_ncols=True,
        disable=disable,
        desc="scoring",
        smoothing=0.1,
    )


def _known_rows(path: Path) -> int | None:
    """Rows of a file for the progress bar's ETA: exact for NPY and Parquet, estimated for CSV
    from the length of its first lines."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        if suffix == ".parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        lines = head.count(b"\n")
        size = path.stat().st_size
        return max(1, round(size * lines / len(head)) - 1) if lines else 1
    except Exception:  # the reader reports unreadable files properly
        return None


def score_files(
    detector: Detector,
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    options: BatchOptions | None = None,
    *,
    progress: bool | None = None,
    blocks: Callable[[list[Path], _Rejects], Iterator[pa.Table]] | None = None,
    engine: str = "local",
) -> Summary:
    """Score every row of ``inputs`` into ``output`` (.csv or .parquet); returns the summary.

    ``progress``: None = a bar on a terminal only (never when ``CI`` is set). ``blocks`` replaces
    the local read-and-score loop (the Ray engine passes its own); it yields output tables.
    """
    opts = options or BatchOptions()
    opts.validate()
    detector.require_calibration()
    files = [Path(p) for p in inputs]
    out = Path(output)
    check_output(out, opts.overwrite)
    rejects_path, summary_path = side_files(out)
    t0 = time.perf_counter()
    totals = [_known_rows(f) for f in files]
    total = sum(t for t in totals if t is not None) if all(t is not None for t in totals) else None
    rows = anomalies = 0
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(atomic_output(out))
        rsink = (
            stack.enter_context(atomic_output(rejects_path, "w"))
            if opts.on_error == "skip"
            else None
        )
        rejects = _Rejects(opts.on_error, rsink)
        writer = _Writer(sink, out.suffix.lower())
        bar = stack.enter_context(_progress(total, progress))
        tables = (
            blocks(files, rejects) if blocks is not None else _local(detector, files, opts, rejects)
        )
        for table in tables:
            writer.write(table)
            n = table.num_rows
            rows += n
            anomalies += int(pc.sum(table.column("is_anomaly")).as_py() or 0)
            bar.update(n)
        bar.total = bar.n  # the CSV row count was an estimate: end at 100 %
        bar.refresh()
        if writer.schema is None:  # no row at all: still a valid, empty output with a header
            writer.write(
                score_block(
                    detector,
                    Block(
                        str(files[0]),
                        np.zeros(0, np.int64),
                        np.zeros((0, detector.input_spec.n_features), np.float32),
                    ),
                )
            )
        writer.close()
        seconds = time.perf_counter() - t0
        cal = detector.require_calibration()
        summary = Summary(
            inputs=[str(f) for f in files],
            output=str(out),
            rows=rows,
            rejected=rejects.count,
            anomalies=anomalies,
            anomaly_rate=anomalies / rows if rows else 0.0,
            target_fpr=cal.target_fpr,
            threshold=cal.threshold,
            model_version=detector.model_version,
            seconds=seconds,
            rows_per_second=rows / seconds if seconds > 0 else 0.0,
            peak_rss_mb=peak_rss_mb(),
            rejects_file=str(rejects_path) if opts.on_error == "skip" else None,
            engine=engine,
        )
    write_json(summary_path, asdict(summary))  # once the output is in place
    return summary


def _local(
    detector: Detector, files: list[Path], opts: BatchOptions, rejects: _Rejects
) -> Iterator[pa.Table]:
    # Reading the next chunk in a thread while this one is scored was measured and dropped: on two
    # cores torch and pyarrow already use both, and it cost 5-10 % of the CSV rate and 100 MB.
    for f in files:
        for block in read_blocks(f, detector.input_spec, opts, rejects):
            if len(block.rows):
                yield score_block(detector, block)
