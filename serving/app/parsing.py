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
def parse_instances(body: bytes, content_type: str, max_instances: int) -> npt.NDArray[Any]:
    """The body's instances as an array (N, ...); raises a 4xx error saying what is wrong."""
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
