"""Scored blocks to output rows, appended to one CSV or Parquet file."""

from __future__ import annotations

import contextlib
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from detector.detector import DetectionResult, Detector
from detector.errors import DataError
from detector.explain import explain_rows
from serving.batch.options import RESULT_COLUMNS, TABLE_COLUMNS, Block, RowError

OUTPUT_COLUMNS = (*RESULT_COLUMNS, *TABLE_COLUMNS)
INFINITE = "the score is not a finite number: the values are too far outside the training data"


def _drop_infinite(
    block: Block, parts: dict[str, np.ndarray], finite: np.ndarray, rejects: Any
) -> tuple[Block, dict[str, np.ndarray]]:
    bad = np.flatnonzero(~finite)
    if rejects is None:
        raise RowError(f"{block.source}, row {int(block.rows[bad[0]])}: {INFINITE}")
    for i in bad.tolist():
        rejects.add(block.source, f"row {int(block.rows[i])}", INFINITE)
    keep = pa.array(finite)
    kept = Block(
        block.source,
        block.rows[finite],
        block.x[finite],
        {k: v.filter(keep) for k, v in block.extra.items()},
    )
    return kept, {k: v[finite] for k, v in parts.items()}


# -- scoring and writing ------------------------------------------------------------------------
def score_block(
    detector: Detector, block: Block, *, explain: bool = False, rejects: Any = None
) -> pa.Table:
    """The output rows of one block: source, row, id / pass-through columns, score parts; for a
    table model the missing and unseen cells per row, and with ``explain`` the top columns and
    each column's contribution in nats (``detector.explain``).

    A row whose score is not a finite number (values so far outside the training data that the
    arithmetic overflows) is never written: it goes to ``rejects`` (``Rejects.add``), or ends the
    run with an error naming it."""
    cal = detector.require_calibration()
    n = len(block.rows)
    if n:
        parts = detector.score_validated(block.x.reshape(n, *detector.input_spec.shape))
        finite = np.isfinite(parts["score"])
        if not finite.all():
            block, parts = _drop_infinite(block, parts, finite, rejects)
            n = len(block.rows)
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
    schema = detector.input_spec.schema
    if schema is not None:  # a table's rows: how many cells were missing, categories unseen
        missing, unseen = schema.cell_counts(block.x.reshape(n, -1))
        columns[TABLE_COLUMNS[0]] = pa.array(missing, pa.int32())
        columns[TABLE_COLUMNS[1]] = pa.array(unseen, pa.int32())
        if explain:
            why = explain_rows(detector, block.x.reshape(n, -1))
            columns["top_columns"] = pa.array([";".join(t) for t in why.top()], pa.string())
            for j, name in enumerate(why.columns):
                columns[f"contribution.{name}"] = pa.array(why.contributions[:, j])
    return pa.table(columns)


class Writer:
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
                extra = [n for n in table.schema.names if n not in OUTPUT_COLUMNS][2:]
                first = [n for n in self.schema.names if n not in OUTPUT_COLUMNS][2:]
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
            w, self._w = self._w, None
            w.close()

    def abandon(self) -> None:
        """After a failed run: let go of the format writer before its file is closed and
        removed, so it does not try to finish the file later (at garbage collection)."""
        if self._w is not None:
            w, self._w = self._w, None
            with contextlib.suppress(Exception):
                w.close()
