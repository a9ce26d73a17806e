"""Reading a user's table (CSV or Parquet) with pyarrow: the layout rules every command shares.

``sniff_csv`` decides, from a file's first lines, what batch scoring's block reader and
``read_table`` (training, evaluation) both apply: a UTF-8 byte-order mark is skipped, leading
blank lines too; the delimiter is ``,`` unless another of ``; \\t |`` splits the first lines into
more, equal columns (or ``delimiter`` is given); the first line is a header unless every cell of
it is a number (or ``header`` says yes / no). A headerless file's columns are named ``0``,
``1``, ... and a model trained on one takes its columns by position.

Empty cells and the usual spellings of "not available" (``NA``, ``NaN``, ``null``...) are missing
values; text columns stay text (the schema makes them categorical: ``detector.schema``).
"""

from __future__ import annotations

import codecs
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from detector.errors import DataError, InputError

DELIMITERS = (",", ";", "\t", "|")
SNIFF_BYTES = 64 << 10
MAX_HEADER_BYTES = 64 << 20  # a first line (the header) may be this long
TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class CsvLayout:
    """How a CSV file is laid out: its delimiter, header and column names."""

    delimiter: str
    header: bool
    names: list[str]
    skip_lines: int  # lines before the data: blank lines and the header
    bom: bool


def is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def sniff_csv(path: Path, *, header: str = "auto", delimiter: str | None = None) -> CsvLayout:
    """The layout of the CSV file at ``path`` (see the module's rules)."""
    if header not in ("auto", "yes", "no"):
        raise InputError(f"header must be auto, yes or no, got {header!r}")
    if delimiter is not None and len(delimiter) != 1:
        raise InputError(f"the delimiter must be one character, got {delimiter!r}")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        while b"\n" not in head.lstrip(b"\r\n") and len(head) < MAX_HEADER_BYTES:
            more = f.read(SNIFF_BYTES)  # a first line longer than the sniffed bytes
            if not more:
                break
            head += more
    bom = head.startswith(codecs.BOM_UTF8)
    if bom:
        head = head[len(codecs.BOM_UTF8) :]
    lines = head.split(b"\n")
    if len(head) == SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    skip = 0
    while lines and not lines[0].strip():
        lines.pop(0)
        skip += 1
    if not lines:
        raise DataError(f"{path} is empty")
    text = [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines[:20] if ln.strip()]
    if delimiter is None:
        delimiter = _sniff_delimiter(text)
    try:
        cells = next(csv.reader([text[0]], delimiter=delimiter))
    except csv.Error as e:
        raise DataError(f"{path}: cannot read the first line: {e}") from None
    has_header = header == "yes" or (
        header == "auto" and not all(is_number(c) for c in cells if c.strip())
    )
    names = [c.strip() for c in cells] if has_header else [str(i) for i in range(len(cells))]
    if has_header:
        if any(not n for n in names):
            i = names.index("")
            raise DataError(f"{path}: the header's column {i + 1} has no name")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError(f"{path}: the header names column {dup!r} twice")
    return CsvLayout(delimiter, has_header, names, skip + int(has_header), bom)


def _sniff_delimiter(lines: list[str]) -> str:
    """The delimiter that splits every sampled line into the same number (> 1) of cells, the
    comma first; a comma when none does."""
    found = {}
    for d in DELIMITERS:
        try:
            counts = {len(next(csv.reader([ln], delimiter=d))) for ln in lines}
        except csv.Error:  # a "cell" beyond the csv module's field limit: not this delimiter
            continue
        if len(counts) == 1 and (n := counts.pop()) > 1:
            found[d] = n
    if "," in found or not found:
        return ","
    return max(found, key=lambda d: found[d])


def read_table(
    path: str | Path,
    *,
    header: str = "auto",
    delimiter: str | None = None,
    drop: Sequence[str] = (),
    text_columns: Sequence[str] = (),
) -> tuple[pa.Table, bool]:
    """A whole CSV or Parquet file as an Arrow table, and whether its columns have names.

    ``drop``: columns to leave out (an id, a label). ``text_columns``: columns read as text
    whatever they hold (categorical codes)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p} is not a readable Parquet file: {e}") from e
        by_name, first_line = True, 0
    elif suffix == ".csv":
        layout = sniff_csv(p, header=header, delimiter=delimiter)
        types = {c: pa.string() for c in text_columns if c in layout.names}
        try:
            table = pacsv.read_csv(
                p,
                read_options=pacsv.ReadOptions(
                    column_names=layout.names, skip_rows=layout.skip_lines
                ),
                parse_options=pacsv.ParseOptions(delimiter=layout.delimiter),
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{p}: cannot parse CSV: {first}") from e
        by_name, first_line = layout.header, layout.skip_lines + 1
    else:
        raise DataError(f"{p}: unsupported file type {suffix or '(none)'}; use .csv or .parquet")
    unknown = [c for c in drop if c not in table.column_names]
    if unknown:
        raise InputError(f"{p}: --drop names no column {unknown[0]!r}")
    table = table.drop_columns(list(drop)) if drop else table
    if table.num_rows == 0:
        raise DataError(f"{p} holds no rows")
    if table.num_columns == 0:
        raise DataError(f"{p} holds no feature columns")
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            if name not in text_columns:
                _refuse_stray_text(p, name, col, first_line)
        elif pa.types.is_binary(col.type):
            raise DataError(f"{p}: column {name!r} is not UTF-8 text")
        elif not (
            pa.types.is_integer(col.type)
            or pa.types.is_floating(col.type)
            or pa.types.is_boolean(col.type)
            or pa.types.is_null(col.type)
        ):
            table = table.set_column(
                table.column_names.index(name), name, pc.cast(col, pa.string())
            )
    return table, by_name


def _refuse_stray_text(path: Path, name: str, col: pa.ChunkedArray, first_line: int) -> None:
    """A column of numbers with a few stray words is a typo, not a category: name the cell."""
    values = col.to_pylist()
    present = [(i, v) for i, v in enumerate(values) if v is not None]
    words = [(i, v) for i, v in present if not is_number(v)]
    if present and 0 < len(words) <= max(1, math.floor(0.05 * len(present))):
        i, v = words[0]
        shown = v if len(v) <= 20 else v[:20] + "..."
        where = f"line {first_line + i}" if first_line else f"row {i}"
        raise DataError(
            f"{path}, {where}, column {name!r}: {shown!r} is not a number (the column's other "
            f"values are; {len(words)} such cell(s)); fix it, or pass --categorical {name} to "
            "treat the column as categories"
        )


def numeric_rows(table: pa.Table) -> np.ndarray:
    """A table of numbers as a float32 (N, columns) array (missing cells NaN)."""
    return np.column_stack(
        [
            np.asarray(c.cast(pa.float32()).to_numpy(zero_copy_only=False), np.float32)
            for c in table.columns
        ]
    )
