"""The Open Inference Protocol (KServe v2 REST), beside ``POST /score`` on the same port.

What KServe, Seldon Core 2, Triton and MLServer clients expect::

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200, or 503 before a model is loaded
    GET  /v2/models/{name}[/versions/{v}]      model metadata: inputs, outputs, versions
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

``infer`` shares ``POST /score``'s path (``serving.app.score.score_rows``): the same validation,
micro-batcher, metrics, drift test and API key; tensors are parsed by ``serving.app.v2_tensors``
(JSON, or the binary tensor data extension that tritonclient uses by default). Errors are the
protocol's ``{"error": "..."}`` with the status ``POST /score`` would answer. The model is named
``settings.model_name`` (``vae-anomaly``); its version is the artifact's model version.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from detector.detector import Detector
from detector.errors import VAEAnomalyError
from detector.spec import validate_samples
from serving.app.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    check_api_key,
    clipped,
    internal_error_body,
    send_bytes,
)
from serving.app.score import read_body, score_rows
from serving.app.v2_tensors import infer_response, input_metadata, output_types, parse_infer
from serving.errors import BadRequest, MethodNotAllowed, ModelNotReady, NotFound, status_for

INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
EXTENSIONS = ["binary_tensor_data"]


def _error(exc: VAEAnomalyError) -> tuple[int, bytes]:
    status, _ = status_for(exc)
    return status, orjson.dumps({"error": " ".join(str(exc).split())})


def check_model(state: Any, name: str, version: str | None) -> Detector:
    """The served detector, if ``name`` (and ``version``, when given) are the served model's."""
    served = state.settings.model_name
    if name != served:
        raise NotFound(f"unknown model {clipped(name, 80)!r}; this server serves {served!r}")
    det: Detector = state.holder.current()
    if version is not None and version != det.model_version:
        raise NotFound(
            f"model {name!r} has no version {clipped(version, 80)!r}; it serves version "
            f"{det.model_version}"
        )
    return det


class InferEndpoint:
    """``POST /v2/models/{name}[/versions/{v}]/infer`` as a plain ASGI endpoint, answered before
    FastAPI's router like ``POST /score`` (``serving.app.score.ScoreEndpoint``)."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        self.state.active += 1
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("Method Not Allowed: use POST")
            answer = await self._infer(scope, receive, match.group(1), match.group(2))
            if answer is None:
                return  # the client went away
        except VAEAnomalyError as e:
            status, body = _error(e)
            extra = [(b"allow", b"POST")] if status == 405 else []
            await send_bytes(send, status, body, extra)
            return
        except Exception:
            detail = internal_error_body(scope.get("state", {}).get("request_id"))["detail"]
            await send_bytes(send, 500, orjson.dumps({"error": detail}))
            return
        finally:
            self.state.active -= 1
        payload, header_length = answer
        if header_length is None:
            await send_bytes(send, 200, payload)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"inference-header-content-length", str(header_length).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _infer(
        self, scope: Scope, receive: Receive, name: str, version: str | None
    ) -> tuple[bytes, int | None] | None:
        state = self.state
        headers = dict(scope["headers"])
        key = headers.get(b"x-api-key")
        check_api_key(state.settings, key.decode("latin-1") if key is not None else None)
        det = check_model(state, name, version)
        raw_length = headers.get(b"inference-header-content-length")
        header_length = None
        if raw_length is not None:
            try:
                header_length = int(raw_length)
            except ValueError:
                raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        body = await read_body(receive)
        if body is None:
            return None
        if not body:
            raise BadRequest('empty body: send {"inputs": [...]}')
        spec = det.input_spec
        req = parse_infer(body, header_length, spec, state.settings.max_instances)
        x = validate_samples(req.x, spec, name="input")
        decided, used, cal = await score_rows(state, x, req.target_fpr, scope.get("client"))
        counts = spec.schema.cell_counts(x.reshape(len(x), -1)) if spec.schema else None
        head = {
            "model_name": name,
            "model_version": used.model_version,
            "parameters": {
                "threshold": cal.threshold,
                "target_fpr": cal.target_fpr,
                "score_definition": used.score_definition,
            },
        }
        return infer_response(req, decided, counts, head)


def model_metadata(det: Detector, name: str) -> dict[str, Any]:
    spec = det.input_spec
    return {
        "name": name,
        "versions": [det.model_version],
        "platform": f"vae-anomaly_{det.runtime}",
        "inputs": input_metadata(spec),
        "outputs": [
            {"name": n, "datatype": t, "shape": [-1]} for n, t in output_types(spec).items()
        ],
    }


def register(app: FastAPI, version: str) -> None:
    """Add the protocol's GET routes to ``app`` (infer is ``InferEndpoint``)."""
    state = app.state

    def answer(exc: VAEAnomalyError) -> Response:
        status, body = _error(exc)
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/v2", tags=["open inference protocol"], summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "vae-anomaly", "version": version, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", tags=["open inference protocol"], summary="The server is live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        tags=["open inference protocol"],
        summary="A verified model is loaded (503 before)",
        responses={503: {"description": "No model loaded yet"}},
    )
    async def ready() -> JSONResponse:
        is_ready = state.holder.detector is not None
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def metadata(request: Request, name: str, version: str | None = None) -> Response:
        try:
            check_api_key(state.settings, request.headers.get("x-api-key"))
            det = check_model(state, name, version)
        except VAEAnomalyError as e:
            return answer(e)
        return JSONResponse(model_metadata(det, name))

    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            check_model(state, name, version)
        except ModelNotReady:
            return JSONResponse({"name": name, "ready": False}, status_code=503)
        except VAEAnomalyError as e:
            return answer(e)
        return JSONResponse({"name": name, "ready": True})

    tags: list[str | Any] = ["open inference protocol"]
    unknown: dict[int | str, dict[str, Any]] = {
        404: {"description": "Unknown model name or version: {'error': message}"},
        503: {"description": "No model loaded yet"},
    }
    for path in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(
            path,
            metadata,
            methods=["GET"],
            tags=tags,
            summary="Model metadata",
            responses={**unknown, 401: {"description": "Missing or wrong API key"}},
        )
        app.add_api_route(
            path + "/ready",
            model_ready,
            methods=["GET"],
            tags=tags,
            summary="The model is ready",
            responses=unknown,
        )


INFER_OPENAPI: dict[str, Any] = {
    "tags": ["open inference protocol"],
    "summary": "Score tensors (Open Inference Protocol infer)",
    "description": "Inputs as the model metadata lists them (one FP32 tensor 'input' for images "
    "and arrays; one tensor per column for a table: FP64 numbers, BYTES categories), data "
    "row-major, flat or nested, or as binary data (Inference-Header-Content-Length). Outputs: "
    "score (higher = more anomalous), reconstruction, kl, complexity, neighbour, transformation, "
    "p_value, is_anomaly (and n_missing, n_unseen for a table), shape [N]; all unless 'outputs' names "
    "some. parameters.target_fpr re-thresholds one request. Errors: {'error': message}.",
    "parameters": [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "target_fpr": {
                                    "type": "number",
                                    "exclusiveMinimum": 0,
                                    "exclusiveMaximum": 1,
                                },
                                "binary_data_output": {"type": "boolean"},
                            },
                        },
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            }
        },
    },
    "responses": {
        "200": {"description": "Output tensors, with the threshold used in 'parameters'"},
        "400": {"description": "Malformed request"},
        "401": {"description": "Missing or wrong API key"},
        "404": {"description": "Unknown model name or version"},
        "413": {"description": "Too many instances or too large a body"},
        "422": {"description": "Tensors that do not fit the model"},
        "503": {"description": "No model loaded yet"},
    },
}


def document_infer_route(app: FastAPI) -> None:
    """Add the infer routes (served by ``InferEndpoint``) to the app's OpenAPI document."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base()
        paths = schema["paths"]
        if "/v2/models/{name}/infer" not in paths:
            paths["/v2/models/{name}/infer"] = {"post": INFER_OPENAPI}
            versioned = dict(INFER_OPENAPI)
            versioned["parameters"] = [
                *INFER_OPENAPI["parameters"],
                {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
            ]
            paths["/v2/models/{name}/versions/{version}/infer"] = {"post": versioned}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
