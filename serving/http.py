"""uvicorn's httptools protocol with bounds on how a client sends a request: the size of its head,
and how long the service waits for it.

uvicorn bounds nothing before the app sees a request when it parses with httptools (its h11
parser has ``h11_max_incomplete_event_size``; httptools' has no setting): a client that keeps
sending one header line is buffered whole, and a worker answered ``GET /healthz`` after taking a
143 MB header in 20 s, its memory 228 MB larger (measured 2026-12-06). Nor is there a time limit
on a client that stops sending: 5,000 connections that had sent half a head were all still open
70 s later (a "slowloris" holds a server's connections that way; a body that stops half-way holds
a request, too). The body's size has its own limit in the app (``--max-body-bytes``).

``BoundedHttpToolsProtocol`` counts the bytes of a head still being read, socket read by socket
read, and past ``MAX_HEAD_BYTES`` answers 431 with the service's JSON error body and closes the
connection. A read in which a new request begins is not counted (part of it may be the previous
request's body), so a head is cut off at most one socket read (256 KB with uvloop) past the
bound: memory stays bounded, and a pipelined request's large body never counts against the next
request's head.

It waits ``client_timeout_s`` (``--client-timeout``, 60 s by default, as nginx's
``client_header_timeout`` and ``client_body_timeout``) for a head to be complete, from the
connection opening or, on a kept-alive connection, from the request's first bytes; and as long
for the next part of a body that has stopped coming (the gap between two reads, not the whole
body: a large body on a slow link is fine while it moves). After it the client gets a 408 and the
connection is closed. The clocks start only when a socket read leaves a head or a body
incomplete: a request that arrives in one read, as nearly all do, costs no timer. A body held
back by the service itself (uvicorn stops reading while the app has not taken what arrived) is
not the client's delay. An idle kept-alive connection is uvicorn's to close
(``timeout_keep_alive``, 5 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import ENV_PREFIX, Settings

log = logging.getLogger("vae_anomaly.serving")

# nginx's large_client_header_buffers default is 4 x 8 KB; gunicorn's limit is 8 KB a line
MAX_HEAD_BYTES = 64 * 1024


def _timeout_from_env() -> float:
    """``VAE_ANOMALY_CLIENT_TIMEOUT`` as ``Settings`` reads it (a worker of several builds its
    settings from the environment); the default without it."""
    raw = os.environ.get(ENV_PREFIX + "CLIENT_TIMEOUT")
    if not raw:
        return Settings.client_timeout
    return Settings.from_env({ENV_PREFIX + "CLIENT_TIMEOUT": raw}).client_timeout


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request line and headers over
    ``MAX_HEAD_BYTES`` with a 431, and a head or a body that stops coming for
    ``client_timeout_s`` with a 408 (``serve`` passes it as uvicorn's ``http``)."""

    client_timeout_s = _timeout_from_env()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False
        self._in_body = False
        self._head_bytes = 0
        self._began = False  # a request began in the socket read being parsed
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the connection and the parser's events ---------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._head_too_slow)  # a connection that sends nothing at all

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._began = True, 0, True

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body = False, True
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_body:  # a body left incomplete by this read: wait for the next part
            self._last_read = self.loop.time()
            self._arm(self._body_too_slow)
        elif self._in_head:  # a head left incomplete by this read: its clock starts now
            self._arm(self._head_too_slow)
            if not self._began:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse(
                        b"431 Request Header Fields Too Large",
                        "headers_too_large",
                        "the request line and headers are larger than the limit of "
                        f"{MAX_HEAD_BYTES} bytes",
                    )

    # -- the clock --------------------------------------------------------------------------------
    def _arm(self, callback: Callable[[], None], delay: float | None = None) -> None:
        if self._timer is None:
            delay = self.client_timeout_s if delay is None else delay
            self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self._refuse(
                b"408 Request Timeout",
                "request_timeout",
                f"the request line and headers did not arrive within {self.client_timeout_s:g} s",
            )

    def _body_too_slow(self) -> None:
        self._timer = None
        if not self._in_body or self.transport.is_closing():
            return
        quiet = self.loop.time() - self._last_read
        if self.flow.read_paused or quiet < self.client_timeout_s:
            # the service is not reading (the app has yet to take what came), or a part came
            # since the clock started: wait on from the last part
            wait = self.client_timeout_s - (0.0 if self.flow.read_paused else quiet)
            self._arm(self._body_too_slow, wait)
            return
        if self.cycle is not None and self.cycle.response_complete:
            self.transport.close()  # answered already (e.g. a 413 while the body streamed in)
            return
        self._refuse(
            b"408 Request Timeout",
            "request_timeout",
            f"the request body stopped arriving for {self.client_timeout_s:g} s",
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
        self._in_head = self._in_body = False
        self._disarm()
