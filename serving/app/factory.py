"""``create_app(settings)``: the FastAPI app around one model artifact, its routes, dependencies
and lifespan; ``create_app_from_env`` for uvicorn's ``--factory``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import orjson
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from detector.detector import Detector
from detector.drift import alarm_level
from detector.errors import ArtifactError, VAEAnomalyError
from serving.app.asgi import (
    check_api_key,
    error_body,
    error_response,
    internal_error_body,
)
from serving.app.holder import ModelHolder
from serving.app.middleware import BodySizeLimit, Observability
from serving.app.score import ScoreEndpoint
from serving.app.v2 import InferEndpoint, document_infer_route
from serving.app.v2 import register as register_v2
from serving.batcher import MicroBatcher
from serving.errors import (
    BadRequest,
    Forbidden,
    NotFound,
)
from serving.metrics import Metrics, forget_dead_workers
from serving.schemas import document_score_route
from serving.settings import Settings


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
    metrics = Metrics(
        registry, drift_alpha=settings.drift_alpha, drift_window=settings.drift_window
    )
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
    app.state.active = 0  # scoring requests in flight (POST /score and infer): see MicroBatcher

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
        response = _error(request, exc.status_code, code, exc.detail)
        response.headers.update(exc.headers or {})  # 405 keeps its Allow header
        return response

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

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain; version=0.0.4": {}}}},
    )
    async def prometheus_metrics() -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    @app.get(
        "/metadata", tags=["model"], summary="Model version, input spec, threshold, provenance"
    )
    async def metadata(_: Auth, det: CurrentDetector) -> dict[str, Any]:
        d = _without_paths(det.describe())
        d["serving"] = {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_instances": settings.max_instances,
            "max_body_bytes": settings.max_body_bytes,
            "torch_threads": torch.get_num_threads(),
            "out_of_range": "rejected with 422 unless clip=true",
        }
        metrics.flush_drift()
        drift = metrics.drift
        d["drift"] = {
            "test": "a conformal test martingale (Vovk et al.'s Simple Jumper) over the online "
            "smoothed p-values of this worker's served scores against the calibration scores, "
            "since the model was loaded; reset when a model is loaded",
            "alpha": settings.drift_alpha,
            "alarm_level": alarm_level(settings.drift_alpha),
            "meaning": "vae_anomaly_drift_log_martingale_max >= alarm_level: the traffic has "
            "stopped looking like the calibration data; served rows exchangeable with it reach "
            "the level with probability at most alpha (Ville's inequality); with W workers the "
            "alert uses log(W / alpha)",
            "log_martingale": drift.test.martingale.log_value if drift else 0.0,
            "log_martingale_max": drift.test.martingale.log_max if drift else 0.0,
            "rows": drift.test.martingale.n if drift else 0,
            "first_alarm_at_row": drift.test.martingale.first_crossing if drift else None,
            "ks_statistic": drift.ks if drift else 0.0,
            "ks_window": settings.drift_window,
        }
        return d

    @app.post(
        "/admin/reload",
        tags=["operations"],
        summary="Load and verify an artifact, then swap it in",
        responses={
            400: {"description": "Malformed body or model_dir"},
            401: {"description": "Missing or wrong API key"},
            403: {"description": "model_dir outside the model root"},
            404: {"description": "The admin endpoint is disabled"},
            409: {"description": "The artifact was refused; the old model keeps serving"},
        },
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
        path = _inside_model_root(path, settings)
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

    document_score_route(
        app,
        lambda: (
            (
                holder.detector.model_version,
                holder.detector.input_spec,
                holder.detector.require_calibration().n,
            )
            if holder.detector
            else None
        ),
        settings.max_instances,
    )

    register_v2(app, _version())
    document_infer_route(app)

    # Middleware, innermost first: POST /score and the Open Inference Protocol's infer answered
    # before FastAPI's router; the body limit
    # around it (its 413 is raised while the body streams in); observability outermost so every
    # response, 413s included, is counted and logged.
    app.add_middleware(ScoreEndpoint, state=app.state)
    app.add_middleware(InferEndpoint, state=app.state)
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
    forget_dead_workers()  # a worker that replaces a killed one clears its gauges
    return create_app(Settings.from_env())


MAX_PATH_CHARS = 4096


def _inside_model_root(path: str, settings: Settings) -> str:
    """The artifact directory a reload asks for, if it lies inside the model root (symlinks
    resolved); refused otherwise, without saying what exists on the server."""
    if len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise BadRequest(f"model_dir must be a path of at most {MAX_PATH_CHARS} characters")
    root = settings.reload_root
    if root is None:
        raise Forbidden("reloads need a model root: set VAE_ANOMALY_MODEL_ROOT")
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        raise BadRequest("model_dir is not a usable path") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise Forbidden("model_dir must be an artifact directory inside the model root")
    return str(resolved)


def _without_paths(value: Any) -> Any:
    """The same metadata with every absolute path cut to its last part: the service does not
    tell its clients where the training machine kept its data or caches."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")) and len(value) > 1:
        return "…/" + Path(value).name
    return value
