"""The readers: NPY, Parquet and CSV files to blocks of screened rows, with the row checks
every reader shares and the rejects file of ``on_error="skip"``."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from detector.errors import DataError, InputError
from detector.schema import Encoded
from detector.spec import InputSpec, check_batch_shape, screen_rows
from serving.batch.options import BatchOptions, Block, RowError

log = logging.getLogger(__name__)


# -- row checks shared by every reader ----------------------------------------------------------
def bad_rows(
    x: npt.NDArray[np.float32], spec: InputSpec, scale: float = 1.0
) -> tuple[npt.NDArray[np.bool_], list[str]]:
    """Rows that are not finite or lie outside the model's input range, and why."""
    screen = screen_rows(x, spec)
    reasons = []
    for i in np.flatnonzero(screen.bad).tolist():
        eight_bit = (
            screen.outside[i]
            and scale == 1.0
            and spec.value_range is not None
            and spec.value_range[1] <= 1.0
            and x[i].max() > 1.0
        )
        hint = " (8-bit values? pass --scale 255)" if eight_bit else ""
        reasons.append(screen.reason(x, i, spec, hint))
    return screen.bad, reasons


class Rejects:
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
class Columns:
    """Which columns of a CSV / Parquet file are features, id and pass-through."""

    def __init__(self, names: list[str], spec: InputSpec, opts: BatchOptions, source: str) -> None:
        missing = [c for c in [opts.id_column, *opts.passthrough] if c and c not in names]
        if missing:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise InputError(f"{source}: no column {missing[0]!r} (columns: {shown})")
        named = {opts.id_column, *opts.passthrough}
        self.extra = [c for c in [opts.id_column, *opts.passthrough] if c]
        self.names = names
        self.source = source
        self._kinds_checked = False
        self.schema = spec.schema
        if spec.schema is not None:  # a table model: its columns by name (or by position)
            self.features = spec.schema.match(names, source, others=self.extra)
            return
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

    def encode(self, columns: list[pa.ChunkedArray | pa.Array]) -> Encoded:
        """A table model's rows from its feature columns (in ``features`` order); the file's
        first rows are checked for retyped columns first."""
        assert self.schema is not None
        if not self._kinds_checked:
            self.schema.check_kinds(columns, self.source)
            self._kinds_checked = True
        return self.schema.encode(columns)


def read_npy(
    path: Path,
    spec: InputSpec,
    opts: BatchOptions,
    rejects: Rejects,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Block]:
    """Rows ``start:stop`` of an NPY file, in chunks read with plain reads (not a memory map,
    whose touched pages would count as the process's resident memory)."""
    with open(path, "rb") as f:
        magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    if magic != np.lib.format.MAGIC_PREFIX:
        hint = " (a .npz archive? save one array with numpy.save)" if magic[:2] == b"PK" else ""
        raise DataError(f"{path} is not a .npy array: it does not start with the NPY magic{hint}")
    try:  # a memory map only to read the header: shape, dtype, layout and data offset
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError:
        raise
    except Exception as e:  # numpy parses the header as Python literals: any failure is the file's
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
    rejects: Rejects,
    where: Callable[[int], str],
    scale: float = 1.0,
) -> Block:
    bad, reasons = bad_rows(block.x, spec, scale)
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
    path: Path, spec: InputSpec, opts: BatchOptions, rejects: Rejects
) -> Iterator[Block]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    cols = Columns(pf.schema_arrow.names, spec, opts, str(path))
    start = 0
    for batch in pf.iter_batches(batch_size=opts.chunk_rows):
        n = batch.num_rows
        rows = np.arange(start, start + n, dtype=np.int64)
        extra = {c: batch.column(c) for c in cols.extra}
        if cols.schema is not None:
            enc = cols.encode([batch.column(c) for c in cols.features])
            for i in np.flatnonzero(enc.bad).tolist():
                rejects.add(str(path), f"row {int(rows[i])}", enc.reasons[i])
            keep = ~enc.bad
            yield Block(
                str(path),
                rows[keep],
                enc.x[keep],
                {k: v.filter(pa.array(keep)) for k, v in extra.items()},
            )
            start += n
            continue
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
        yield _screen(
            Block(str(path), rows, x, extra), spec, rejects, lambda r: f"row {r}", opts.scale
        )
        start += n


def read_blocks(
    path: Path, spec: InputSpec, opts: BatchOptions, rejects: Rejects
) -> Iterator[Block]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path, spec, opts, rejects)
    if suffix == ".parquet":
        return _read_parquet(path, spec, opts, rejects)
    from serving.batch.csv_reader import CSVReader  # it builds on this module's row checks

    return CSVReader(path, spec, opts, rejects).blocks()
