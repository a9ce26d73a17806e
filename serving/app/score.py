"""``POST /score``: a plain ASGI endpoint in front of FastAPI's router (documented in the same
OpenAPI schema, ``serving.schemas``)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import numpy.typing as npt
import orjson

from detector.detector import DetectionResult, Detector
from detector.errors import InputError, VAEAnomalyError
from detector.explain import explain_rows
from detector.spec import validate_samples
from detector.threshold import Calibration
from serving.app.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    check_api_key,
    error_response,
    internal_error_body,
    send_bytes,
    send_json,
)
from serving.app.holder import calibration_for
from serving.app.parsing import parse_instances
from serving.errors import (
    BadRequest,
    InvalidParameter,
    MethodNotAllowed,
)
from serving.settings import Settings

# -- POST /score ----------------------------------------------------------------------------------
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


@dataclass(frozen=True)
class ScoreOptions:
    """The query parameters of ``POST /score``."""

    explain: bool = False
    clip: bool = False
    target_fpr: float | None = None

    @classmethod
    def from_query(cls, query: bytes) -> ScoreOptions:
        values = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        opts: dict[str, Any] = {}
        for name in ("explain", "clip"):
            if name in values:
                v = values[name].strip().lower()
                if v not in _TRUE and v not in _FALSE:
                    raise InvalidParameter(f"{name}: expected true or false, got {values[name]!r}")
                opts[name] = v in _TRUE
        if "target_fpr" in values:
            raw = values["target_fpr"]
            try:
                fpr = float(raw)
            except ValueError:
                fpr = math.nan
            if not 0.0 < fpr < 1.0:  # NaN fails too
                raise InvalidParameter(
                    f"target_fpr: expected a number between 0 and 1 (exclusive), got {raw!r}"
                )
            opts["target_fpr"] = fpr
        return cls(**opts)


class ScoreEndpoint:
    """``POST /score`` as a plain ASGI endpoint, answered before FastAPI's router.

    The work of a single-instance request is small (parse ~35 µs, validate ~7 µs, a shared
    forward pass), and FastAPI's per-request machinery (routing, dependency solving, pydantic
    validation of the query, Request and Response objects) cost about as much CPU again. So this
    one hot route skips it; every other route is FastAPI's. Errors follow the service's contract
    (``status_for``; a JSON body with the request id; an internal error is logged and answered
    with a generic 500). Its OpenAPI entry is ``serving.schemas.SCORE_OPENAPI``.
    """

    path = "/score"

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: settings, holder, metrics, batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        rid = scope.get("state", {}).get("request_id")
        self.state.active += 1
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("Method Not Allowed: use POST")
            payload = await self._score(scope, receive)
            if payload is None:
                return  # the client went away
        except VAEAnomalyError as e:
            status, body = error_response(e, rid)
            extra = [(b"allow", b"POST")] if status == 405 else []
            await send_json(send, status, body, extra)
            return
        except Exception:
            await send_json(send, 500, internal_error_body(rid))
            return
        finally:
            self.state.active -= 1
        await send_bytes(send, 200, payload)

    async def _score(self, scope: Scope, receive: Receive) -> bytes | None:
        state = self.state
        settings: Settings = state.settings
        headers = dict(scope["headers"])
        key = headers.get(b"x-api-key")
        check_api_key(settings, key.decode("latin-1") if key is not None else None)
        det = state.holder.current()
        opts = ScoreOptions.from_query(scope.get("query_string", b""))
        body = await read_body(receive)
        if body is None:
            return None
        if not body:
            raise BadRequest('empty body: send JSON {"instances": [...]} or an NPY array')
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        spec = det.input_spec
        arr = parse_instances(body, content_type, settings.max_instances, spec.schema)
        if opts.clip and spec.value_range is not None:
            arr = np.clip(arr.astype(np.float32), spec.value_range[0], spec.value_range[1])
        x = validate_samples(arr, spec, name="instances")
        decided, used, cal = await score_rows(state, x, opts.target_fpr, scope.get("client"))
        columns = {k: v.tolist() for k, v in decided.columns().items()}
        results: list[dict[str, Any]] = [
            dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
        ]
        if spec.schema is not None:  # a table's rows: missing cells and unseen categories
            missing, unseen = spec.schema.cell_counts(x.reshape(len(x), -1))
            for r, m, u in zip(results, missing.tolist(), unseen.tolist(), strict=True):
                r["n_missing"], r["n_unseen"] = m, u
        if opts.explain and spec.schema is not None:
            why = await asyncio.to_thread(explain_rows, used, x)
            for r, contributions, top in zip(results, why.records(), why.top(), strict=True):
                r["top_columns"], r["contributions"] = top, contributions
        elif opts.explain:
            recon = await asyncio.to_thread(used.reconstruct, x)
            err = ((x - recon) ** 2).reshape(len(x), -1)
            for r, row in zip(results, err.tolist(), strict=True):
                r["feature_errors"] = row
        return orjson.dumps(
            {
                "model_version": used.model_version,
                "threshold": cal.threshold,
                "target_fpr": cal.target_fpr,
                "score_definition": used.score_definition,
                "results": results,
            }
        )


async def score_rows(
    state: Any, x: npt.NDArray[np.float32], target_fpr: float | None, source: object = None
) -> tuple[DetectionResult, Detector, Calibration]:
    """Validated rows scored through the micro-batcher and decided, counted in the metrics and
    the drift test: the one path of ``POST /score`` and the Open Inference Protocol's infer.
    ``source``: the request's connection (``MicroBatcher.submit``). Returns the results, the
    detector that scored them and the calibration that decided."""
    parts, used = await state.batcher.submit(x, alone=state.active == 1, source=source)
    infinite = np.flatnonzero(~np.isfinite(parts["score"]))
    if infinite.size:  # never answer inf or null: the input is beyond the model's numbers
        raise InputError(
            f"instance {int(infinite[0])}: the score is not a finite number: the values are "
            "too far outside the training data"
        )
    cal = used.calibration
    assert cal is not None  # a served detector is always calibrated
    if target_fpr is not None:
        cal = calibration_for(cal, target_fpr)
    decided = DetectionResult.from_parts(parts, cal)
    state.metrics.observe_scores(decided.score, decided.is_anomaly)
    return decided, used, cal


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
