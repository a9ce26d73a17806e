"""uvicorn's httptools protocol with bounds on a request's head: its size and its time.

uvicorn bounds nothing before the app sees a request when it parses with httptools (its h11
parser has ``h11_max_incomplete_event_size``; httptools' has no setting): a client that keeps
sending one header line is buffered whole, and a worker answered ``GET /healthz`` after taking a
143 MB header in 20 s, its memory 228 MB larger (measured 2026-12-06). Nor is there a time limit
before a request's headers are complete: 5,000 connections that had sent half a head were all
still open 70 s later (a "slowloris" holds a server's connections that way). The body has its
own limit in the app (``--max-body-bytes``); this bounds the request line and headers.

``BoundedHttpToolsProtocol`` counts the bytes of a head still being read, chunk by chunk as the
socket delivers them, and past ``MAX_HEAD_BYTES`` answers 431 with the service's JSON error body
and closes the connection. It hooks ``data_received``, two parser callbacks and the
connection's start and end, and adds a few comparisons a socket read: the request path keeps
httptools' speed. A chunk in which a new request
begins is not counted (part of it may be the previous request's body), so a head is cut off at
most one socket read (256 KB with uvloop) past the bound: memory stays bounded, and a pipelined
request's large body never counts against the next request's head.

The head must also be complete within ``head_timeout_s`` (``--header-timeout``, 60 s by default
as nginx's ``client_header_timeout``) of the connection opening or, on a kept-alive connection,
of the request's first bytes (the clock starts when a socket read leaves the head incomplete, so
a head that arrives in one read, as nearly all do, costs no timer); after it the client gets a
408 and the connection is closed. An idle kept-alive connection is uvicorn's to close
(``timeout_keep_alive``, 5 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import ENV_PREFIX, Settings

log = logging.getLogger("vae_anomaly.serving")

# nginx's large_client_header_buffers default is 4 x 8 KB; gunicorn's limit is 8 KB a line
MAX_HEAD_BYTES = 64 * 1024


def _timeout_from_env() -> float:
    """``VAE_ANOMALY_HEADER_TIMEOUT`` as ``Settings`` reads it (a worker of several builds its
    settings from the environment); the default without it."""
    raw = os.environ.get(ENV_PREFIX + "HEADER_TIMEOUT")
    if not raw:
        return Settings.header_timeout
    return Settings.from_env({ENV_PREFIX + "HEADER_TIMEOUT": raw}).header_timeout


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request line and headers over
    ``MAX_HEAD_BYTES`` with a 431, or not complete within ``head_timeout_s`` with a 408
    (``serve`` passes it as uvicorn's ``http``)."""

    head_timeout_s = _timeout_from_env()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False
        self._head_bytes = 0
        self._began = False  # a request began in the chunk being parsed
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._began = True, 0, True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # a head left incomplete by this chunk: its clock starts now (a head that arrives in
        # one chunk, as nearly all do, costs no timer)
        self._arm()
        if self._began:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def _refuse_head(self) -> None:
        self._refuse(
            b"431 Request Header Fields Too Large",
            "headers_too_large",
            f"the request line and headers are larger than the limit of {MAX_HEAD_BYTES} bytes",
        )

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(
                b"408 Request Timeout",
                "request_timeout",
                f"the request line and headers did not arrive within {self.head_timeout_s:g} s",
            )

    def _refuse(self, status: bytes, code: str, detail: str) -> None:
        """Answer with the service's JSON error body and close the connection."""
        log.warning("refused a request from %s: %s", self.client, detail)
        body = orjson.dumps({"error": code, "detail": detail, "request_id": None})
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
        self._in_head = False
        self._disarm()
