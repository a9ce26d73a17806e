"""A table's column schema: names, kinds, categories, and how a row becomes the model's input.

A model trained on a table (CSV or Parquet) keeps the table's schema in its ``config.json``:

- each feature column's **name**, **kind** (``numeric`` or ``categorical``), and for a categorical
  column the categories seen in training (in order of first appearance);
- for a numeric column the training mean and standard deviation, which standardise it in the
  model and bound what a value may be (:data:`MAX_STANDARD_DEVIATIONS`).

The encoded row the network reads is the columns in schema order: a numeric column is one value
(NaN when the cell is empty: a *missing* value), a categorical column is a one-hot block over its
categories (all NaN when missing, all zero for a category never seen in training: *unseen*).
The model's likelihood counts observed cells only (:mod:`detector.model`), so a missing value is
neither an anomaly nor a zero, and an unseen category costs ``log(n_train_rows + 1)`` nats: the
surprise of a value that none of the training rows had (Laplace's rule of succession).

Columns are matched **by name** when the training file had a header, whatever their order in the
file to score; a model trained on a headerless file (or on an array) takes its columns by
position. Cf. scikit-learn's ``feature_names_in_`` check and ``OneHotEncoder(handle_unknown=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detector.errors import ConfigError, InputError
from detector.tables import is_number

NUMERIC = "numeric"
CATEGORICAL = "categorical"
KINDS: tuple[str, ...] = (NUMERIC, CATEGORICAL)
# A standardised value beyond this many standard deviations is not a measurement but an error
# (a unit slip, a sentinel like 1e30): the row is refused, naming the column, instead of scoring
# an infinite or meaningless number.
MAX_STANDARD_DEVIATIONS = 1e6
MAX_CATEGORIES = 1000  # per column: more distinct values than this is an id or free text
MAX_ENCODED = 1_000_000  # features of the encoded row, checked before anything is allocated


@dataclass(frozen=True)
class Column:
    """One feature column of a table."""

    name: str
    kind: str = NUMERIC
    categories: tuple[str, ...] = ()  # categorical: the values seen in training
    mean: float = 0.0  # numeric: training mean (missing cells ignored)
    std: float = 1.0  # numeric: training standard deviation (1 for a constant column)

    @property
    def width(self) -> int:
        """Features of the encoded row this column takes."""
        return len(self.categories) if self.kind == CATEGORICAL else 1

    def to_dict(self) -> dict[str, Any]:
        if self.kind == CATEGORICAL:
            return {"name": self.name, "kind": self.kind, "categories": list(self.categories)}
        return {"name": self.name, "kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Column:
        kind = str(d.get("kind", NUMERIC))
        if kind not in KINDS:
            raise ConfigError(f"column {d.get('name')!r}: unknown kind {kind!r}")
        cats = d.get("categories") or []
        if not isinstance(cats, list) or len(cats) > MAX_CATEGORIES:
            raise ConfigError(f"column {d.get('name')!r}: categories must be a list of strings")
        col = cls(
            name=str(d["name"]),
            kind=kind,
            categories=tuple(str(c) for c in cats),
            mean=float(d.get("mean", 0.0)),
            std=float(d.get("std", 1.0)),
        )
        if kind == CATEGORICAL and (not col.categories or len(set(col.categories)) != len(cats)):
            raise ConfigError(f"column {col.name!r}: categories must be distinct and non-empty")
        if not (math.isfinite(col.mean) and math.isfinite(col.std) and col.std > 0):
            raise ConfigError(f"column {col.name!r}: mean and std must be finite, std > 0")
        return col


@dataclass(frozen=True)
class Encoded:
    """Rows encoded for the model, and which of them cannot be scored."""

    schema: TableSchema
    x: npt.NDArray[np.float32]  # (N, n_encoded), NaN where a cell is missing
    bad: npt.NDArray[np.bool_]  # (N,) rows that cannot be scored
    reasons: dict[int, str]  # row -> why it cannot be scored

    @property
    def missing(self) -> npt.NDArray[np.int64]:
        """(N,) missing cells per row."""
        return self.schema.cell_counts(self.x)[0]

    @property
    def unseen(self) -> npt.NDArray[np.int64]:
        """(N,) categorical cells per row with a category unseen in training."""
        return self.schema.cell_counts(self.x)[1]


@dataclass(frozen=True)
class TableSchema:
    """The feature columns of a table model, in the order the network reads them."""

    columns: tuple[Column, ...]
    by_name: bool = True  # False: a headerless file or an array; columns by position
    n_train_rows: int = 0

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if not names:
            raise ConfigError("a table schema needs at least one column")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"the table schema names column {dup!r} twice")
        if self.n_encoded > MAX_ENCODED:
            raise ConfigError(f"the table schema encodes {self.n_encoded} features: too many")

    # -- layout -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def n_encoded(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def offsets(self) -> list[int]:
        """Where each column starts in the encoded row."""
        return [int(o) for o in np.cumsum([0, *(c.width for c in self.columns)])[:-1]]

    @property
    def categorical_groups(self) -> tuple[tuple[int, int], ...]:
        """(start, size) of every categorical block in the encoded row."""
        return tuple(
            (o, c.width)
            for o, c in zip(self.offsets, self.columns, strict=True)
            if c.kind == CATEGORICAL
        )

    @property
    def unseen_nats(self) -> float:
        """What an unseen category costs: -log(1 / (n_train_rows + 1)), in nats."""
        return math.log(self.n_train_rows + 1)

    def kinds_summary(self) -> str:
        n_cat = sum(c.kind == CATEGORICAL for c in self.columns)
        return (
            f"{len(self.columns)} columns ({len(self.columns) - n_cat} numeric, {n_cat} "
            f"categorical), {'matched by name' if self.by_name else 'taken by position'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_name": self.by_name,
            "n_train_rows": self.n_train_rows,
            "columns": [c.to_dict() for c in self.columns],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableSchema:
        cols = d.get("columns")
        if not isinstance(cols, list) or len(cols) > MAX_ENCODED:
            raise ConfigError("the table schema's columns must be a list")
        return cls(
            columns=tuple(Column.from_dict(c) for c in cols),
            by_name=bool(d.get("by_name", True)),
            n_train_rows=int(d.get("n_train_rows", 0)),
        )

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def infer(
        cls,
        table: pa.Table,
        *,
        by_name: bool = True,
        categorical: Sequence[str] = (),
        numeric: Sequence[str] = (),
        source: str = "the training data",
    ) -> TableSchema:
        """The schema of a training table: text columns are categorical, number columns numeric,
        unless named in ``categorical`` / ``numeric``."""
        names = table.column_names
        for flag, asked in (("--categorical", categorical), ("--numeric", numeric)):
            unknown = [c for c in asked if c not in names]
            if unknown:
                raise InputError(f"{source}: {flag} names no column {unknown[0]!r}")
        both = set(categorical) & set(numeric)
        if both:
            raise InputError(f"column {sorted(both)[0]!r} is named both categorical and numeric")
        columns = []
        for name in names:
            col = table.column(name)
            numbers = _is_numeric_type(col.type)
            if name in categorical or (not numbers and name not in numeric):
                columns.append(_categorical(name, col, source))
            else:
                columns.append(_numeric(name, col, source))
        return cls(tuple(columns), by_name=by_name, n_train_rows=table.num_rows)

    # -- using ------------------------------------------------------------------------------
    def match(self, names: Sequence[str], source: str, *, others: Sequence[str] = ()) -> list[str]:
        """Check a file's columns against the schema; returns the file's names of the schema's
        columns, in schema order. ``others`` are id / pass-through columns the file may have."""
        if not self.by_name:
            features = [n for n in names if n not in set(others)]
            if len(features) != len(self.columns):
                raise InputError(
                    f"{source}: {len(features)} feature columns, but the model takes "
                    f"{len(self.columns)} (by position: it was trained on a file without a "
                    "header); name the other columns with --id-column / --passthrough"
                )
            return features
        present = set(names)
        missing = [c.name for c in self.columns if c.name not in present]
        if missing:
            raise InputError(
                f"{source}: missing column{'s' if len(missing) > 1 else ''} "
                f"{_listed(missing)} that the model was trained on"
            )
        known = set(self.names) | set(others)
        extra = [n for n in names if n not in known]
        if extra:
            raise InputError(
                f"{source}: unknown column{'s' if len(extra) > 1 else ''} {_listed(extra)} "
                "(not a feature of the model); pass it through with --passthrough or drop it"
            )
        return self.names

    def arrow_types(self, file_names: Sequence[str]) -> dict[str, pa.DataType]:
        """The type to read each feature column as, keyed by the file's names for the schema's
        columns (``match``'s result)."""
        return {
            n: (pa.string() if c.kind == CATEGORICAL else pa.float64())
            for n, c in zip(file_names, self.columns, strict=True)
        }

    def check_kinds(
        self, data: Sequence[pa.Array | pa.ChunkedArray], source: str, *, min_values: int = 5
    ) -> None:
        """Refuse a file whose categorical column now holds only numbers where the model learnt
        words (a column retyped, or columns swapped under the same names): every value would
        otherwise score as an unseen category. Called on a file's first rows."""
        for col, values in zip(self.columns, data, strict=True):
            if col.kind != CATEGORICAL or any(is_number(c) for c in col.categories):
                continue
            text = [v for v in _as_text(values).to_pylist() if v is not None]
            if len(text) >= min_values and all(is_number(v) for v in text):
                shown = ", ".join(repr(c) for c in col.categories[:3])
                raise InputError(
                    f"{source}: column {col.name!r} holds numbers, but the model learnt it as "
                    f"categories ({shown}, ...); was it retyped?"
                )

    def cell_counts(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per encoded row: how many cells are missing, and how many categories unseen."""
        missing = np.zeros(x.shape[0], np.int64)
        unseen = np.zeros(x.shape[0], np.int64)
        for o, col in zip(self.offsets, self.columns, strict=True):
            v = x[:, o : o + col.width]
            missing += np.isnan(v[:, 0])
            if col.kind == CATEGORICAL:
                unseen += (v == 0).all(axis=1)
        return missing, unseen

    def encode(self, data: Sequence[pa.Array | pa.ChunkedArray | npt.ArrayLike]) -> Encoded:
        """Encode columns (one per schema column, in schema order) into the model's rows."""
        if len(data) != len(self.columns):
            raise InputError(f"expected {len(self.columns)} columns, got {len(data)}")
        n = len(data[0]) if data else 0  # type: ignore[arg-type]
        x = np.empty((n, self.n_encoded), np.float32)
        for o, col, values in zip(self.offsets, self.columns, data, strict=True):
            if col.kind == CATEGORICAL:
                idx, absent = _category_index(values, col)
                block = x[:, o : o + col.width]
                block.fill(0.0)
                seen = idx >= 0
                block[np.flatnonzero(seen), idx[seen]] = 1.0
                block[absent] = np.nan
            else:
                with np.errstate(over="ignore"):  # beyond float32: infinite, a refused row
                    x[:, o] = _as_float(values, col.name)
        bad, reasons = self.screen(x, blocks=False)  # the blocks written above are well-formed
        return Encoded(self, x, bad, reasons)

    def screen(
        self, x: npt.NDArray[np.float32], *, blocks: bool = True
    ) -> tuple[npt.NDArray[np.bool_], dict[int, str]]:
        """Rows of an encoded (N, n_encoded) array that cannot be scored, and why: infinities,
        values absurdly far from the training data, and (``blocks``) broken one-hot blocks."""
        bad = np.zeros(x.shape[0], np.bool_)
        reasons: dict[int, str] = {}
        for o, col in zip(self.offsets, self.columns, strict=True):
            v = x[:, o : o + col.width]
            if col.kind == CATEGORICAL:
                if not blocks:
                    continue
                nan = np.isnan(v)
                ok = (nan.all(axis=1)) | (
                    ~nan.any(axis=1) & np.isin(v, (0.0, 1.0)).all(axis=1) & (v.sum(axis=1) <= 1)
                )
                for i in np.flatnonzero(~ok & ~bad).tolist():
                    reasons[i] = (
                        f"column {col.name!r}: a categorical block must be one-hot, all zero "
                        "(unseen) or all NaN (missing)"
                    )
            else:
                value = v[:, 0]
                with np.errstate(invalid="ignore", over="ignore"):
                    ok = ~(np.abs(value - col.mean) > MAX_STANDARD_DEVIATIONS * col.std)
                ok &= ~np.isinf(value)
                for i in np.flatnonzero(~ok & ~bad).tolist():
                    reasons[i] = (
                        f"column {col.name!r}: {float(value[i]):g} is more than "
                        f"{MAX_STANDARD_DEVIATIONS:g} standard deviations from the training mean "
                        f"({col.mean:g} +- {col.std:g})"
                    )
            bad |= ~ok
        return bad, reasons

    def column_contributions(self, per_feature: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
        """Per-feature terms (N, n_encoded) summed per column: (N, n_columns)."""
        return np.add.reduceat(per_feature, self.offsets, axis=1)


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_numeric_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))


def _as_float(values: Any, name: str) -> npt.NDArray[np.float64]:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        try:
            values = values.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"column {name!r} must hold numbers: {e}") from e
        return np.asarray(values.to_numpy(zero_copy_only=False), np.float64)
    try:
        return np.asarray(values, np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InputError(f"column {name!r} must hold numbers: {e}") from e


def _as_text(values: Any) -> pa.Array | pa.ChunkedArray:
    if not isinstance(values, pa.ChunkedArray | pa.Array):
        values = pa.array([None if v is None else str(v) for v in np.asarray(values, object)])
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return values


def _category_index(values: Any, col: Column) -> tuple[npt.NDArray[np.int64], Any]:
    """Index of each value among the column's categories (-1: unseen), and which are missing."""
    text = _as_text(values)
    absent = np.asarray(text.is_null().to_numpy(zero_copy_only=False), np.bool_)
    idx = pc.index_in(text, value_set=pa.array(col.categories, pa.string()))
    return np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), np.int64), absent


def _categorical(name: str, col: pa.ChunkedArray, source: str) -> Column:
    text = _as_text(col)
    cats = [c for c in pc.unique(text).to_pylist() if c is not None]
    if not cats:
        raise InputError(f"{source}: column {name!r} is empty: no value to learn from")
    if len(cats) > MAX_CATEGORIES:
        raise InputError(
            f"{source}: column {name!r} has {len(cats):,} distinct values (at most "
            f"{MAX_CATEGORIES} for a categorical column): an id or free text? drop it with "
            "--drop, or read it as numbers with --numeric"
        )
    return Column(name, CATEGORICAL, tuple(str(c) for c in cats))


def _numeric(name: str, col: pa.ChunkedArray, source: str) -> Column:
    v = _as_float(col, name)
    if np.isinf(v).any():
        raise InputError(f"{source}: column {name!r} holds an infinite value")
    observed = v[~np.isnan(v)]
    if observed.size == 0:
        raise InputError(f"{source}: column {name!r} is empty: no value to learn from")
    mean = float(observed.mean())
    std = float(observed.std())
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise InputError(f"{source}: column {name!r} holds values too large to standardise")
    return Column(name, NUMERIC, mean=mean, std=std if std > 1e-8 * max(1.0, abs(mean)) else 1.0)
