"""The OpenAPI description of ``POST /score``.

The route is a plain ASGI endpoint (``serving.app.score.ScoreEndpoint``), outside FastAPI's router, so
FastAPI cannot derive its schema from a function signature; it is written here and merged into
the app's OpenAPI document, so ``/docs`` shows it like every other route.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from detector.spec import InputSpec


def document_score_route(
    app: FastAPI,
    served: Callable[[], tuple[str, InputSpec, int] | None] = lambda: None,
    max_instances: int | None = None,
) -> None:
    """Add ``POST /score`` (served by ``ScoreEndpoint``) to the app's OpenAPI document.

    ``served`` gives the model now served (its version, input spec and number of calibration
    scores): the document then says exactly which instances it takes (how many numbers, in which
    nesting, in which range) and the smallest target FPR its calibration supports (1/n), and is
    rebuilt when a reload changes the model.
    """
    base = app.openapi
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        now = served()
        key = now[0] if now else None
        if app.openapi_schema is None or built.get("key") != key:
            schema = base()
            route = copy.deepcopy(SCORE_OPENAPI)
            body = route["requestBody"]["content"]["application/json"]["schema"]
            body["properties"]["instances"] = instances_schema(
                now[1] if now else None, max_instances
            )
            if now:
                for param in route["parameters"]:
                    if param["name"] == "target_fpr":  # below 1/n the calibration cannot go
                        param["schema"] = {
                            "type": "number",
                            "minimum": 1.0 / now[2],
                            "exclusiveMaximum": 1,
                        }
            schema["paths"]["/score"] = {"post": route}
            app.openapi_schema, built["key"] = schema, key
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def instances_schema(spec: InputSpec | None, max_instances: int | None) -> dict[str, Any]:
    """The JSON schema of ``instances`` for a model's input spec (any arrays without one)."""
    out: dict[str, Any] = {"type": "array", "minItems": 1}
    if max_instances:
        out["maxItems"] = max_instances
    if spec is None:
        out["items"] = {"type": "array"}
        return out
    if spec.schema is not None:  # a table: records by column name, or encoded rows
        record = {
            "type": "object",
            "required": spec.schema.names,
            "additionalProperties": False,
            "properties": {
                c.name: (
                    {"type": ["string", "number", "null"]}
                    if c.kind == "categorical"
                    else {"type": ["number", "null"]}
                )
                for c in spec.schema.columns
            },
        }
        return {**out, "items": record}
    number: dict[str, Any] = {"type": "number"}
    if spec.value_range is not None:
        number["minimum"], number["maximum"] = spec.value_range

    def nested(shape: tuple[int, ...]) -> dict[str, Any]:
        item = number
        for d in reversed(shape):
            item = {"type": "array", "minItems": d, "maxItems": d, "items": item}
        return item

    shapes = [(spec.n_features,), tuple(spec.shape), tuple(d for d in spec.shape if d != 1)]
    unique = [s for i, s in enumerate(shapes) if s and s not in shapes[:i]]
    # one form for the whole request (flat vectors, or images nested one way): numpy needs a
    # rectangular array
    forms = [{**out, "items": nested(s)} for s in unique]
    return forms[0] if len(forms) == 1 else {"oneOf": forms}


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
        "model's input shape; for a model trained on a table, a record of column: value, null "
        "for a missing value), or an NPY array of instances (`application/x-npy`). Values outside "
        "the model's input range are rejected (422) unless `clip=true`. Returns one result per "
        "instance: score, reconstruction, kl, complexity, neighbour, transformation, p_value, "
        "is_anomaly."
    ),
    "operationId": "score",
    "parameters": [
        _query_param(
            "explain",
            {"type": "boolean", "default": False},
            "also return the per-feature squared reconstruction error (a table model: each "
            "column's contribution in nats and the top columns)",
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
                                        "transformation": {"type": "number"},
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
