"""ASGI plumbing shared by the endpoint and the middleware: types, content types, JSON error
bodies (every error is ``{"error", "detail", "request_id"}``), the API-key check, request ids."""

from __future__ import annotations

import hmac
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from detector.errors import VAEAnomalyError
from serving.errors import (
    Unauthorized,
    status_for,
)
from serving.settings import Settings

log = logging.getLogger("vae_anomaly.serving")


JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
    if settings.api_key and not hmac.compare_digest(
        (provided or "").encode("utf-8", "surrogateescape"),
        settings.api_key.encode("utf-8", "surrogateescape"),
    ):
        raise Unauthorized("missing or wrong API key: send header X-API-Key")


async def send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_bytes(send, status, orjson.dumps(body), headers)


async def send_bytes(
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


CLIENT_CLOSED = 499


# Request ids: a random per-process prefix and a counter (16 hex digits). Unique across workers
# and restarts for all practical purposes, and far cheaper than a uuid4 per request.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


MAX_CLIENT_ID = 128
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+=@")


def request_id_of(sent: str | None) -> str:
    """The client's X-Request-Id when it is one (1-128 letters, digits and ``-_.:/+=@``: a
    UUID, a trace id, a load balancer's id); otherwise a new id. The id is echoed in a header
    and written to every log line of the request, so a kilobyte of arbitrary text is not kept."""
    if sent and len(sent) <= MAX_CLIENT_ID and _ID_CHARS.issuperset(sent):
        return sent
    return new_request_id()


def clipped(text: str, limit: int = 256) -> str:
    """``text`` for a log line or an error message: at most ``limit`` characters of it, and how
    long it was (a request's path or a name in it can be kilobytes long)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def header_value(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return str(v.decode("latin-1"))
    return None
