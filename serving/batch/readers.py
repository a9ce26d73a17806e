"""The readers: NPY, Parquet and CSV files to blocks of screened rows, with the row checks
every reader shares and the rejects file of ``on_error="skip"``."""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from detector.errors import DataError, InputError
from detector.spec import InputSpec, check_batch_shape, screen_rows
from serving.batch.options import CSV_BLOCK_BYTES, BatchOptions, Block, RowError

log = logging.getLogger(__name__)


# -- row checks shared by every reader ----------------------------------------------------------
def _bad_rows(
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
    path: Path, spec: InputSpec, opts: BatchOptions, rejects: Rejects
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

    def __init__(self, path: Path, spec: InputSpec, opts: BatchOptions, rejects: Rejects) -> None:
        self.path, self.spec, self.opts, self.rejects = path, spec, opts, rejects
        self.source = str(path)

    def blocks(self) -> Iterator[Block]:
        with open(self.path, "rb") as f:
            first = f.readline()
            if first.startswith(codecs.BOM_UTF8):  # a byte-order mark is not data, nor a name
                first = first[len(codecs.BOM_UTF8) :]
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
        block = self._fast(text, first_row, nonblank) if nonblank else None
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
        if any(pa.types.is_binary(t) for t in table.schema.types):  # text that is not UTF-8
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
        lines = _decode_lines(text)
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


def _decode_lines(text: bytes) -> list[str]:
    """Lines of CSV text: UTF-8, and a line that is not valid UTF-8 read as Latin-1 (every byte
    is a character there), so an id or a label in a legacy encoding is kept, not mangled."""
    try:
        return text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        out = []
        for raw in text.splitlines():
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw.decode("latin-1"))
        return out


def _infer(values: list[str]) -> pa.DataType:
    for t in (pa.int64(), pa.float64()):
        try:
            pa.array(values, pa.string()).cast(t)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return t
    return pa.string()


def read_blocks(
    path: Path, spec: InputSpec, opts: BatchOptions, rejects: Rejects
) -> Iterator[Block]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path, spec, opts, rejects)
    if suffix == ".parquet":
        return _read_parquet(path, spec, opts, rejects)
    return _CSVReader(path, spec, opts, rejects).blocks()
