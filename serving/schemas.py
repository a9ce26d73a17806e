"""The OpenAPI description of ``POST /score``.

The route is a plain ASGI endpoint (``serving.app.score.ScoreEndpoint``), outside FastAPI's router, so
FastAPI cannot derive its schema from a function signature; it is written here and merged into
the app's OpenAPI document, so ``/docs`` shows it like every other route.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def document_score_route(app: FastAPI) -> None:
    """Add ``POST /score`` (served by ``ScoreEndpoint``) to the app's OpenAPI document."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            schema["paths"]["/score"] = {"post": SCORE_OPENAPI}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail", "request_id"],
    "properties": {
        "error": {"type": "string"},
        "detail": {"type": "string"},
        "request_id": {"type": "string"},
    },
}
SCORE_OPENAPI: dict[str, Any] = {
    "tags": ["model"],
    "summary": "Score instances: -ELBO, higher = more anomalous",
    "description": (
        'Body: JSON `{"instances": [...]}` (each a flat vector or a nested image matching the '
        "model's input shape), or an NPY array of instances (`application/x-npy`). Values outside "
        "the model's input range are rejected (422) unless `clip=true`. Returns one result per "
        "instance: score, reconstruction, kl, complexity, neighbour, p_value, is_anomaly."
    ),
    "operationId": "score",
    "parameters": [
        _query_param(
            "explain",
            {"type": "boolean", "default": False},
            "also return the per-feature squared reconstruction error",
        ),
        _query_param(
            "clip",
            {"type": "boolean", "default": False},
            "clip values into the model's input range instead of rejecting them",
        ),
        _query_param(
            "target_fpr",
            {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "threshold for this target FPR instead of the calibrated one",
        ),
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {
                        "instances": {"type": "array", "minItems": 1, "items": {"type": "array"}}
                    },
                }
            },
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "One result per instance, with the threshold and model version",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "model_version": {"type": "string"},
                            "threshold": {"type": "number"},
                            "target_fpr": {"type": "number"},
                            "score_definition": {"type": "string"},
                            "results": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "score": {"type": "number"},
                                        "reconstruction": {"type": "number"},
                                        "kl": {"type": "number"},
                                        "complexity": {"type": "number"},
                                        "neighbour": {"type": "number"},
                                        "p_value": {"type": "number"},
                                        "is_anomaly": {"type": "boolean"},
                                        "feature_errors": {
                                            "type": "array",
                                            "items": {"type": "number"},
                                        },
                                    },
                                },
                            },
                        },
                    }
                }
            },
        },
        **{
            str(code): {
                "description": what,
                "content": {"application/json": {"schema": _ERROR_SCHEMA}},
            }
            for code, what in (
                (400, "Malformed body"),
                (401, "Missing or wrong API key"),
                (413, "Body or instance count over the limit"),
                (415, "Unsupported content type"),
                (422, "Invalid instances or query parameter"),
                (503, "No model loaded yet"),
            )
        },
    },
}
