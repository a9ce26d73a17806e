"""Request bodies to arrays: JSON ``{"instances": [...]}`` or an NPY array, with their limits."""

from __future__ import annotations

import io
import json
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
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadRequest(f"body is not a valid NPY array: {e}") from None
        if arr.ndim < 2:
            raise InputError(
                f"NPY body has shape {arr.shape}: expected an array of instances (N, ...)"
            )
    elif ctype in JSON_TYPES:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            try:  # NaN / Infinity literals: accepted here so validation can name them
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"malformed JSON: {e}") from None
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
        try:
            arr = np.asarray(inst)
        except ValueError:
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
