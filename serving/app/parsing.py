"""Request bodies to arrays: JSON ``{"instances": [...]}`` or an NPY array, with their limits."""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from detector.errors import InputError
from detector.schema import CATEGORICAL, Column, TableSchema
from serving.app.asgi import (
    JSON_TYPES,
    NPY_TYPES,
)
from serving.errors import (
    BadRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)


# -- request parsing ------------------------------------------------------------------------------
def parse_instances(
    body: bytes, content_type: str, max_instances: int, schema: TableSchema | None = None
) -> npt.NDArray[Any]:
    """The body's instances as an array (N, ...); raises a 4xx error saying what is wrong.

    A table model (``schema``) also takes records, ``{"column": value, ...}`` per instance,
    matched by name; ``null`` is a missing value, text a category."""
    ctype = content_type.split(";")[0].strip().lower() or "application/json"
    if ctype in NPY_TYPES:
        arr = _load_npy(body, max_instances)
        if arr.ndim < 2:
            raise InputError(
                f"NPY body has shape {arr.shape}: expected an array of instances (N, ...)"
            )
    elif ctype in JSON_TYPES:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as first:
            # NaN / Infinity literals: accepted by the standard parser, so validation can name
            # them. Anything orjson refused for its depth or its numbers' size stays refused.
            if not _NON_FINITE.search(body):
                raise BadRequest(f"malformed JSON: {first}") from None
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"malformed JSON: {e}") from None
            except (RecursionError, ValueError):  # nesting or an integer too long to convert
                raise BadRequest(f"malformed JSON: {first}") from None
        if not isinstance(doc, dict) or "instances" not in doc:
            raise InputError('JSON body must be an object with an "instances" list')
        inst = doc["instances"]
        if not isinstance(inst, list):
            raise InputError(f'"instances" must be a list, got {type(inst).__name__}')
        if not inst:
            raise InputError('"instances" is empty: send at least one instance')
        if len(inst) > max_instances:
            raise PayloadTooLarge(
                f"{len(inst)} instances in one request; the limit is {max_instances}"
            )
        if schema is not None and isinstance(inst[0], dict):
            return records_to_rows(inst, schema)
        if (b"true" in body or b"false" in body) and _holds_bool(inst):
            raise InputError("instances must hold numbers only (got true / false)")
        try:
            arr = np.asarray(inst)
        except (ValueError, TypeError, RecursionError):
            raise InputError(
                '"instances" must all have the same shape (ragged nested lists)'
            ) from None
        if arr.ndim < 2:
            raise InputError(
                "each instance must be a list of numbers (a flat vector or a nested image), not a scalar"
            )
    else:
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not supported; send application/json or application/x-npy"
        )
    if (
        arr.dtype == np.bool_
        or not np.issubdtype(arr.dtype, np.number)
        or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise InputError(f"instances must hold numbers only (got {arr.dtype.name} values)")
    if arr.shape[0] > max_instances:
        raise PayloadTooLarge(
            f"{arr.shape[0]} instances in one request; the limit is {max_instances}"
        )
    return arr


def records_to_rows(instances: list[Any], schema: TableSchema) -> npt.NDArray[np.float32]:
    """Records (one object of column: value per instance) encoded for a table model."""
    names = schema.names
    known = set(names)
    columns: list[list[Any]] = [[] for _ in names]
    for k, rec in enumerate(instances):
        if not isinstance(rec, dict):
            raise InputError(f"instance {k}: expected an object of column: value, like the first")
        absent = [n for n in names if n not in rec]
        if absent:
            raise InputError(
                f"instance {k}: no column {absent[0]!r}"
                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                + "; send null for a missing value"
            )
        unknown = [c for c in rec if c not in known]
        if unknown:
            raise InputError(f"instance {k}: unknown column {unknown[0]!r}, not a model feature")
        for j, col in enumerate(schema.columns):
            columns[j].append(cell(col, rec[col.name], f"instance {k}"))
    return encode_checked(columns, schema)


def cell(col: Column, v: Any, where: str) -> str | float | None:
    """One JSON value of a table column as the schema's encoder takes it: text (or None) for a
    categorical column, a float (NaN when missing) for a numeric one; refused naming ``where``
    and the column otherwise."""
    if isinstance(v, bool | dict | list):
        raise InputError(
            f"{where}, column {col.name!r}: expected a number, text or null, got {type(v).__name__}"
        )
    if col.kind == CATEGORICAL:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return None if v is None else str(v)
    if v is None:
        return math.nan
    if isinstance(v, int | float):
        return float(v)
    shown = v if len(v) <= 20 else v[:20] + "..."
    raise InputError(f"{where}, column {col.name!r}: {shown!r} is not a number")


def encode_checked(columns: list[list[Any]], schema: TableSchema) -> npt.NDArray[np.float32]:
    """Columns of cells (``cell``) encoded for the model; the first row that cannot be scored
    (an absurd number, an infinity) is refused naming it."""
    enc = schema.encode(columns)
    if enc.bad.any():
        i = int(np.flatnonzero(enc.bad)[0])
        raise InputError(f"instance {i}: {enc.reasons[i]}")
    return enc.x


# NaN, Infinity or -Infinity as JSON literals (outside strings is all that matters: a string
# value is refused later anyway)
_NON_FINITE = re.compile(rb"NaN|Infinity")


def _holds_bool(value: Any) -> bool:
    """Whether a parsed JSON value holds true or false anywhere (they are not numbers here,
    though Python and numpy would take them as 1 and 0)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            return True
        if isinstance(v, list):
            stack.extend(v)
    return False


def _load_npy(body: bytes, max_instances: int) -> npt.NDArray[Any]:
    """An NPY body as an array, its header checked against the body before anything is
    allocated: a header may declare any shape, the body holds what it holds."""
    if not body.startswith(np.lib.format.MAGIC_PREFIX):
        hint = " (a .npz archive? send one .npy array)" if body.startswith(b"PK") else ""
        raise BadRequest(
            f"body is not a valid NPY array: it does not start with the NPY magic{hint}"
        )
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"NPY format version {version} is not supported (1.0 or 2.0)")
    except Exception as e:  # numpy parses the header as Python literals: any failure is the body's
        raise BadRequest(f"body is not a valid NPY array: {type(e).__name__}: {e}") from None
    if dtype.hasobject:
        raise BadRequest("body is not a valid NPY array: arrays of Python objects are not accepted")
    if shape and shape[0] > max_instances:
        raise PayloadTooLarge(f"{shape[0]} instances in one request; the limit is {max_instances}")
    declared = math.prod(shape) * dtype.itemsize
    available = len(body) - f.tell()
    if declared != available:
        raise BadRequest(
            f"NPY header declares shape {shape} of {dtype} ({declared} bytes), but the body "
            f"holds {available} bytes of data"
        )
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # the header was checked; whatever else numpy refuses is the body's
        raise BadRequest(f"body is not a valid NPY array: {type(e).__name__}: {e}") from None
