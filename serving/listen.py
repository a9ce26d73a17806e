"""Accepting connections fairly across worker processes that share one listening socket.

With several workers, uvicorn binds one socket and every worker listens on it. uvloop and
asyncio accept every connection waiting on a socket when it becomes readable, so the worker that
wakes first takes a whole burst: measured with ``vae-anomaly loadtest``, all 8 keep-alive
connections on one of two workers in some rounds, which then ran out of CPU (2,315 requests/s)
while the other idled (5+3 splits: 3,439-3,556). ``OneAtATime`` takes one connection per wake-up
of its worker's loop and leaves the rest to whichever worker comes back to its loop first, so a
busy worker takes fewer (nginx's ``multi_accept off``).

It plugs in through uvicorn's documented custom event loop (``--loop module:factory``):
``new_event_loop`` is uvloop's loop (asyncio's where uvloop is missing) whose ``create_server``
on an already-bound socket returns a ``OneAtATime``; everything else is the stock loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("uvicorn.error")

RETRY_SECONDS = 1.0  # out of file descriptors or memory: stop accepting for this long (asyncio's)
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class OneAtATime:
    """Accept on ``sock`` one connection per readiness callback and hand it to the loop as an
    accepted socket. Offers what uvicorn uses of an ``asyncio.Server``: ``close`` and
    ``wait_closed``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ssl: Any,
        backlog: int,
    ) -> None:
        self.loop, self.sock = loop, sock
        self.protocol_factory, self.ssl = protocol_factory, ssl
        self.closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up meanwhile
        except OSError as e:
            if e.errno not in _RESOURCE_ERRORS:
                raise
            log.error("accepting a connection failed (%s): pausing for %.0f s", e, RETRY_SECONDS)
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(RETRY_SECONDS, self._resume)
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self.loop.create_task(self._serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn, ssl=self.ssl)
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError:  # a TLS handshake that failed, a reset
            conn.close()
        except Exception:  # one connection's failure must not stop the others
            log.exception("setting up an accepted connection failed")
            conn.close()

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (the socket itself is the caller's to close)."""
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        return None


def _balanced(base: type[asyncio.AbstractEventLoop]) -> type[asyncio.AbstractEventLoop]:
    class BalancedLoop(base):  # type: ignore[valid-type, misc]
        async def create_server(
            self,
            protocol_factory: Callable[[], asyncio.BaseProtocol],
            host: Any = None,
            port: Any = None,
            *,
            sock: socket.socket | None = None,
            backlog: int = 100,
            ssl: Any = None,
            **kwargs: Any,
        ) -> Any:
            if sock is None or kwargs:  # a host and port of its own: the stock server
                return await super().create_server(
                    protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs
                )
            return OneAtATime(self, sock, protocol_factory, ssl, backlog)

    return BalancedLoop


def _base() -> type[asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.SelectorEventLoop
    return uvloop.Loop


BalancedLoop = _balanced(_base())


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's custom loop factory (``loop="serving.listen:new_event_loop"``)."""
    return BalancedLoop()
