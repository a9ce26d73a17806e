"""uvicorn's httptools protocol with a bound on a request's head.

uvicorn bounds nothing before the app sees a request when it parses with httptools (its h11
parser has ``h11_max_incomplete_event_size``; httptools' has no setting): a client that keeps
sending one header line is buffered whole, and a worker answered ``GET /healthz`` after taking a
143 MB header in 20 s, its memory 228 MB larger (measured 2026-12-06). The body has its own limit
in the app (``--max-body-bytes``); this bounds the request line and headers.

``BoundedHttpToolsProtocol`` counts the bytes of a head still being read, chunk by chunk as the
socket delivers them, and past ``MAX_HEAD_BYTES`` answers 431 with the service's JSON error body
and closes the connection. It hooks only ``data_received`` and two parser callbacks, and adds a
comparison a chunk: the request path keeps httptools' speed. A chunk in which a new request
begins is not counted (part of it may be the previous request's body), so a head is cut off at
most one socket read (256 KB with uvloop) past the bound: memory stays bounded, and a pipelined
request's large body never counts against the next request's head.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("vae_anomaly.serving")

# nginx's large_client_header_buffers default is 4 x 8 KB; gunicorn's limit is 8 KB a line
MAX_HEAD_BYTES = 64 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request line and headers over
    ``MAX_HEAD_BYTES`` with a 431 (``serve`` passes it as uvicorn's ``http``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False
        self._head_bytes = 0
        self._began = False  # a request began in the chunk being parsed

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._began = True, 0, True

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if not self._in_head or self._began or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def _refuse_head(self) -> None:
        detail = f"the request line and headers are larger than the limit of {MAX_HEAD_BYTES} bytes"
        log.warning("refused a request from %s: %s", self.client, detail)
        body = orjson.dumps({"error": "headers_too_large", "detail": detail, "request_id": None})
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
        self._in_head = False
