"""ASGI middleware: the request-body limit (enforced while the body streams in) and
observability (request ids, access log, Prometheus metrics)."""

from __future__ import annotations

import logging
import time

import orjson

from serving.app.asgi import (
    CLIENT_CLOSED,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    clipped,
    error_response,
    header_value,
    request_id_of,
    send_json,
)
from serving.errors import (
    PayloadTooLarge,
)
from serving.metrics import Metrics, route_label

access_log = logging.getLogger("vae_anomaly.access")


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
                    status, body = error_response(PayloadTooLarge(too_large(self.max_bytes)), rid)
                    await send_json(send, status, body)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


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
        rid = request_id_of(header_value(scope, b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        route = route_label(path)
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
                            "path": clipped(path),
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "client": (scope.get("client") or ("", 0))[0],
                        }
                    ).decode()
                )
