"""The HTTP service: ``create_app(settings)`` builds a FastAPI app around one model artifact.

Routes: ``POST /score``, ``GET /healthz``, ``GET /readyz``, ``GET /metadata``, ``GET /metrics``,
``POST /admin/reload`` (off unless enabled), and FastAPI's ``/docs``. Every error is a JSON body
``{"error", "detail", "request_id"}`` with a 4xx status; an internal error is logged with its
request id and answered with a generic 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import math
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import parse_qsl

import numpy as np
import numpy.typing as npt
import orjson
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from detector.detector import DetectionResult, Detector
from detector.errors import ArtifactError, InputError, VAEAnomalyError
from detector.spec import validate_samples
from detector.threshold import Calibration
from serving.batcher import MicroBatcher
from serving.errors import (
    BadRequest,
    InvalidParameter,
    MethodNotAllowed,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    status_for,
)
from serving.metrics import ROUTES, Metrics
from serving.schemas import document_score_route
from serving.settings import Settings

log = logging.getLogger("vae_anomaly.serving")
access_log = logging.getLogger("vae_anomaly.access")

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- model state ----------------------------------------------------------------------------------
class ModelHolder:
    """The detector being served; swapped whole on reload, never half-updated."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.detector: Detector | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()

    def current(self) -> Detector:
        if self.detector is None:
            raise ModelNotReady(self.error or "the model is still loading")
        return self.detector

    def install(self, det: Detector) -> None:
        previous = self.detector.model_version if self.detector else None
        self.detector = det
        self.error = None
        _calibration_for.cache_clear()
        assert det.calibration is not None  # Detector.load always has one
        self.metrics.set_model(det.model_version, det.calibration, previous)

    async def load(self, path: str) -> Detector:
        """Load and verify an artifact off the event loop; on failure keep what is served."""
        async with self._lock:
            try:
                det = await asyncio.to_thread(
                    Detector.load,
                    path,
                    device=self.settings.device,
                    batch_size=max(512, self.settings.max_batch_size),
                )
            except VAEAnomalyError as e:
                self.metrics.reloads.labels("failure").inc()
                log.error("model load from %s failed: %s", path, e)
                if self.detector is None:
                    self.error = f"model failed to load: {e}"
                raise
            if self.detector is not None:
                self.metrics.reloads.labels("success").inc()
            self.install(det)
            log.info("serving model %s from %s", det.model_version, path)
            return det


@lru_cache(maxsize=64)
def _calibration_for(cal: Calibration, target_fpr: float) -> Calibration:
    return cal.with_fpr(target_fpr)


# -- ASGI middleware ------------------------------------------------------------------------------
class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with 413, from Content-Length or while the body streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    rid = scope.get("state", {}).get("request_id")
                    status, body = error_response(PayloadTooLarge(_too_large(self.max_bytes)), rid)
                    await _send_json(send, status, body)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(_too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


# -- error bodies: every error is {"error", "detail", "request_id"} ----------------------------------
def error_body(code: str, detail: Any, rid: str | None) -> dict[str, Any]:
    return {"error": code, "detail": detail, "request_id": rid}


def error_response(exc: VAEAnomalyError, rid: str | None) -> tuple[int, dict[str, Any]]:
    """Status and body for an exception of the vae-anomaly tree (``status_for``)."""
    status, code = status_for(exc)
    return status, error_body(code, " ".join(str(exc).split()), rid)


def internal_error_body(rid: str | None) -> dict[str, Any]:
    """Log the exception being handled with its request id; a body that reveals nothing of it."""
    log.exception("internal error handling request %s", rid)
    return error_body(
        "internal_error", f"internal error; quote request id {rid} when reporting it", rid
    )


def check_api_key(settings: Settings, provided: str | None) -> None:
    """With an API key configured, the request must carry it in X-API-Key."""
    if settings.api_key and provided != settings.api_key:
        raise Unauthorized("missing or wrong API key: send header X-API-Key")


async def _send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await _send_bytes(send, status, orjson.dumps(body), headers)


async def _send_bytes(
    send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """One complete JSON response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class Observability:
    """Request id, in-flight gauge, request counter and latency, one JSON access-log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _header(scope, b"x-request-id") or _new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        method = scope.get("method", "GET")
        # Until a response starts: 500 if the app fails, 499 (nginx's "client closed request") if
        # it returns without answering because the client went away, so a disconnect does not
        # count as a server error on the dashboards.
        status = CLIENT_CLOSED
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if status == CLIENT_CLOSED:
                status = 500
            raise
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - t0
            self.metrics.request_done(route, method, status, elapsed)
            if self.access:
                access_log.info(
                    orjson.dumps(
                        {
                            "request_id": rid,
                            "method": method,
                            "path": path,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "client": (scope.get("client") or ("", 0))[0],
                        }
                    ).decode()
                )


CLIENT_CLOSED = 499


# Request ids: a random per-process prefix and a counter (16 hex digits). Unique across workers
# and restarts for all practical purposes, and far cheaper than a uuid4 per request.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return str(v.decode("latin-1"))
    return None


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

    The work of a single-instance request is small (parse ~40 µs, validate ~20 µs, a shared
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
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("Method Not Allowed: use POST")
            payload = await self._score(scope, receive)
            if payload is None:
                return  # the client went away
        except VAEAnomalyError as e:
            status, body = error_response(e, rid)
            extra = [(b"allow", b"POST")] if status == 405 else []
            await _send_json(send, status, body, extra)
            return
        except Exception:
            await _send_json(send, 500, internal_error_body(rid))
            return
        await _send_bytes(send, 200, payload)

    async def _score(self, scope: Scope, receive: Receive) -> bytes | None:
        state = self.state
        settings: Settings = state.settings
        headers = dict(scope["headers"])
        key = headers.get(b"x-api-key")
        check_api_key(settings, key.decode("latin-1") if key is not None else None)
        det = state.holder.current()
        opts = ScoreOptions.from_query(scope.get("query_string", b""))
        body = await _read_body(receive)
        if body is None:
            return None
        if not body:
            raise BadRequest('empty body: send JSON {"instances": [...]} or an NPY array')
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        arr = parse_instances(body, content_type, settings.max_instances)
        spec = det.input_spec
        if opts.clip and spec.value_range is not None:
            arr = np.clip(arr.astype(np.float32), spec.value_range[0], spec.value_range[1])
        x = validate_samples(arr, spec, name="instances")
        parts, used = await state.batcher.submit(x)
        cal = used.calibration
        assert cal is not None  # a served detector is always calibrated
        if opts.target_fpr is not None:
            cal = _calibration_for(cal, opts.target_fpr)
        decided = DetectionResult.from_parts(parts, cal)
        state.metrics.observe_scores(decided.score, decided.is_anomaly)
        columns = {k: v.tolist() for k, v in decided.columns().items()}
        results: list[dict[str, Any]] = [
            dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
        ]
        if opts.explain:
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


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# -- dependencies ---------------------------------------------------------------------------------
# Both are ``async def`` on purpose: FastAPI hands a plain ``def`` dependency to a worker thread,
# and these two do no I/O, so the event loop runs them directly.
async def require_key(request: Request) -> None:
    check_api_key(request.app.state.settings, request.headers.get("x-api-key"))


async def current_detector(request: Request) -> Detector:
    holder: ModelHolder = request.app.state.holder
    return holder.current()


Auth = Annotated[None, Depends(require_key)]
CurrentDetector = Annotated[Detector, Depends(current_detector)]


# -- the app --------------------------------------------------------------------------------------
def create_app(
    settings: Settings | None = None,
    *,
    detector: Detector | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the service. ``detector`` serves an in-memory model (tests); otherwise the artifact at
    ``settings.model_dir`` is loaded and verified at start-up (``/readyz`` is 503 until then)."""
    settings = settings or Settings.from_env()
    metrics = Metrics(registry)
    holder = ModelHolder(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.threads)
        supervised = detector is None and bool(settings.model_dir) and settings.workers > 1
        if supervised:
            # One of several workers: it starts serving only once its model is loaded, and a
            # model that fails to load fails its start-up. uvicorn's rolling restart on SIGHUP
            # waits for each new worker to be ready before retiring an old one, so a new artifact
            # is in service before the old model leaves, and a bad one aborts the restart while
            # the old workers keep serving.
            await holder.load(settings.model_dir)
        batcher = MicroBatcher(
            holder.current,
            max_batch_size=settings.max_batch_size,
            max_wait=settings.max_wait_ms / 1000.0,
            on_batch=_on_batch,
            threads=settings.threads,
        )
        batcher.start()
        app.state.batcher = batcher
        loader: asyncio.Task[Any] | None = None
        if detector is not None:
            holder.install(detector)
        elif settings.model_dir and not supervised:
            loader = asyncio.create_task(_initial_load())
        else:
            holder.error = "no model configured: set VAE_ANOMALY_MODEL_DIR or pass --model"
        _install_sighup()
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            await batcher.stop()
            metrics.process_exiting()

    async def _initial_load() -> None:
        with contextlib.suppress(VAEAnomalyError):
            await holder.load(settings.model_dir)

    def _install_sighup() -> None:
        def reload() -> None:
            task = asyncio.get_running_loop().create_task(holder.load(settings.model_dir))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)

    def _on_batch(rows: int, seconds: float) -> None:
        metrics.batch_size.observe(rows)
        metrics.inference_latency.observe(seconds)

    app = FastAPI(
        title="vae-anomaly",
        summary="Anomaly scores from a Variational Autoencoder: -ELBO, higher = more anomalous.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.settings = settings

    # -- errors: the one mapping from exceptions to HTTP ------------------------------------------
    def _rid(request: Request) -> str | None:
        return getattr(request.state, "request_id", None) or request.scope.get("state", {}).get(
            "request_id"
        )

    def _error(request: Request, status: int, code: str, detail: Any) -> JSONResponse:
        return JSONResponse(error_body(code, detail, _rid(request)), status_code=status)

    @app.exception_handler(VAEAnomalyError)
    async def _domain_error(request: Request, exc: VAEAnomalyError) -> JSONResponse:
        status, body = error_response(exc, _rid(request))
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _param_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        ]
        return _error(request, 422, "invalid_parameter", "; ".join(errs))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(request, exc.status_code, code, exc.detail)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(internal_error_body(_rid(request)), status_code=500)

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="A verified model is loaded (503 before)")
    async def readyz() -> JSONResponse:
        if holder.detector is None:
            return JSONResponse(
                {"status": "not_ready", "detail": holder.error or "the model is still loading"},
                status_code=503,
            )
        return JSONResponse({"status": "ready", "model_version": holder.detector.model_version})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    @app.get(
        "/metadata", tags=["model"], summary="Model version, input spec, threshold, provenance"
    )
    async def metadata(_: Auth, det: CurrentDetector) -> dict[str, Any]:
        d = det.describe()
        d["serving"] = {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_instances": settings.max_instances,
            "max_body_bytes": settings.max_body_bytes,
            "torch_threads": torch.get_num_threads(),
            "out_of_range": "rejected with 422 unless clip=true",
        }
        return d

    @app.post(
        "/admin/reload", tags=["operations"], summary="Load and verify an artifact, then swap it in"
    )
    async def reload_model(request: Request, _: Auth) -> dict[str, Any]:
        if not settings.enable_admin:
            raise NotFound("the admin endpoint is disabled (set VAE_ANOMALY_ENABLE_ADMIN=true)")
        body = await request.body()
        path = settings.model_dir
        if body:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise BadRequest(f"malformed JSON: {e}") from None
            if not isinstance(doc, dict):
                raise BadRequest('body must be a JSON object like {"model_dir": "/path"}')
            path = str(doc.get("model_dir") or path)
        if not path:
            raise BadRequest('no model_dir: send {"model_dir": "/path/to/artifact"}')
        previous = holder.detector.model_version if holder.detector else None
        try:
            det = await holder.load(path)
        except ArtifactError as e:
            raise ArtifactError(f"reload refused, still serving {previous}: {e}") from e
        return {
            "status": "reloaded",
            "model_version": det.model_version,
            "previous_version": previous,
        }

    document_score_route(app)

    # Middleware, innermost first: POST /score answered before FastAPI's router; the body limit
    # around it (its 413 is raised while the body streams in); observability outermost so every
    # response, 413s included, is counted and logged.
    app.add_middleware(ScoreEndpoint, state=app.state)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Observability, metrics=metrics, access=settings.access_log)
    return app


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vae-anomaly")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory serving.app:create_app_from_env`` (one per worker)."""
    return create_app(Settings.from_env())


__all__ = ["create_app", "create_app_from_env", "parse_instances"]
