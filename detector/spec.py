"""What a model accepts: the input spec saved in ``config.json`` and the checks on samples.

Public scoring entry points call :func:`validate_samples`; every message names what is wrong,
what was expected and what was received (cf. scikit-learn's "X has 10 features, but ... is
expecting 784").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from detector.errors import InputError
from detector.schema import TableSchema

RANGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class InputSpec:
    """Shape of one sample, dtype, allowed value range and how raw data was preprocessed."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None  # None: any finite real value
    preprocessing: str = ""  # human-readable: what the training data went through
    schema: TableSchema | None = None  # a table's columns (detector.schema); None for images

    @property
    def n_features(self) -> int:
        return math.prod(self.shape)

    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "n_features": self.n_features,
            "dtype": self.dtype,
            "value_range": list(self.value_range) if self.value_range else None,
            "preprocessing": self.preprocessing,
            **({"schema": self.schema.to_dict()} if self.schema else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        vr = d.get("value_range")
        return cls(
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d.get("dtype", "float32")),
            value_range=(float(vr[0]), float(vr[1])) if vr else None,
            preprocessing=str(d.get("preprocessing", "")),
            schema=TableSchema.from_dict(d["schema"]) if d.get("schema") else None,
        )

    def __post_init__(self) -> None:
        if self.schema is not None and self.schema.n_encoded != self.n_features:
            raise InputError(
                f"the table schema encodes {self.schema.n_encoded} features, but the input shape "
                f"{self.shape_str()} holds {self.n_features}"
            )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without its size-1 axes: (28, 28) and (1, 28, 28) are the same image."""
    return tuple(d for d in shape if d != 1)


def check_batch_shape(shape: tuple[int, ...], spec: InputSpec, name: str = "X") -> None:
    """Raise InputError unless ``shape`` is a non-empty batch of samples the model takes."""
    expected = f"(N, {spec.n_features})" + (
        f" or (N, {', '.join(map(str, spec.shape))})" if len(spec.shape) > 1 else ""
    )
    if len(shape) < 2:
        raise InputError(
            f"{name} has shape {shape}: expected a batch shaped {expected}; "
            "wrap a single sample as x[None]"
        )
    if shape[0] == 0:
        raise InputError(f"{name} is empty: no samples to score")
    features = math.prod(shape[1:])
    if features != spec.n_features:
        raise InputError(
            f"{name} has {features} features per sample (shape {shape}), but the model is "
            f"expecting {spec.n_features} (input shape {spec.shape_str()})"
        )
    if len(shape) > 2 and _squeezed(shape[1:]) != _squeezed(spec.shape):
        raise InputError(
            f"{name} has sample shape {tuple(shape[1:])}, but the model is expecting "
            f"{spec.shape} (size-1 axes optional) or a flat vector of {spec.n_features}"
        )


def validate_samples(x: Any, spec: InputSpec, name: str = "X") -> npt.NDArray[np.float32]:
    """Return ``x`` as a float32 array shaped (N, *spec.shape), or raise InputError."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged lists
        raise InputError(f"{name} is not a rectangular array of numbers: {e}") from e
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise InputError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    check_batch_shape(arr.shape, spec, name)
    n = arr.shape[0]
    # writable too (a copy only of a read-only input, e.g. a memory-mapped .npy), so every runtime
    # wraps it with torch.from_numpy
    out = np.require(arr.reshape(n, *spec.shape), np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
    flat = out.reshape(n, -1)
    if spec.schema is None and spec.value_range is not None:
        # the common case in two reductions: every value inside the range (NaN fails the test,
        # an infinity is outside it); otherwise screen the rows to say which and why
        lo, hi = spec.value_range
        if lo - RANGE_TOLERANCE <= flat.min() and flat.max() <= hi + RANGE_TOLERANCE:
            return out
    screen = screen_rows(flat, spec)
    if screen.nonfinite.any():
        bad = np.flatnonzero(screen.nonfinite)
        i = int(bad[0])
        if spec.schema is not None:
            raise InputError(
                f"{name} cannot be scored in {bad.size} sample(s), first at index {i}: "
                f"{screen.notes[i]}"
            )
        raise InputError(
            f"{name} contains NaN or infinite values in {bad.size} sample(s), first at index {i}"
        )
    if screen.outside.any():
        assert spec.value_range is not None
        lo, hi = spec.value_range
        i = int(np.flatnonzero(screen.outside)[0])
        hint = " (8-bit pixels? divide by 255)" if hi <= 1.0 and out.max() > 1.0 else ""
        raise InputError(
            f"{name} has values outside the model's input range [{lo:g}, {hi:g}] in "
            f"{int(screen.outside.sum())} sample(s), first at index {i} "
            f"(min {float(flat[i].min()):g}, max {float(flat[i].max()):g}){hint}"
        )
    return out


@dataclass(frozen=True)
class RowScreen:
    """Which rows of a (N, features) batch the model cannot score, and why: the one row check
    that the facade, the service and batch scoring share."""

    nonfinite: npt.NDArray[np.bool_]  # a NaN or an infinity somewhere in the row
    outside: npt.NDArray[np.bool_]  # finite, but outside the model's input range
    # tables: why a row cannot be scored (NaN is a missing cell there, not an error)
    notes: dict[int, str] = field(default_factory=dict)

    @property
    def bad(self) -> npt.NDArray[np.bool_]:
        return self.nonfinite | self.outside

    def reason(self, x: npt.NDArray[np.float32], i: int, spec: InputSpec, hint: str = "") -> str:
        """Why row ``i`` of ``x`` was refused, in words."""
        row = x[i]
        if i in self.notes:
            return self.notes[i]
        if self.nonfinite[i]:
            j = int(np.flatnonzero(~np.isfinite(row))[0])
            v = float(row[j])
            what = "NaN" if math.isnan(v) else ("infinity" if v > 0 else "-infinity")
            return f"{what} in feature {j}"
        assert spec.value_range is not None
        lo, hi = spec.value_range
        return (
            f"values outside the model's input range [{lo:g}, {hi:g}] (min {float(row.min()):g}, "
            f"max {float(row.max()):g}){hint}"
        )


def screen_rows(x: npt.NDArray[np.float32], spec: InputSpec) -> RowScreen:
    """Screen the rows of ``x`` (N, features) against ``spec``'s value range (a table's rows:
    against its schema, where NaN is a missing cell)."""
    if spec.schema is not None:
        bad, notes = spec.schema.screen(x)
        return RowScreen(bad, np.zeros_like(bad), notes)
    nonfinite = np.asarray(~np.isfinite(x).all(axis=1))
    if spec.value_range is None:
        return RowScreen(nonfinite, np.zeros_like(nonfinite))
    lo, hi = spec.value_range
    with np.errstate(invalid="ignore"):
        outside = ((x < lo - RANGE_TOLERANCE) | (x > hi + RANGE_TOLERANCE)).any(axis=1)
    return RowScreen(nonfinite, np.asarray(outside & ~nonfinite))
