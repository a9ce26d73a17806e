"""Balancing connections across worker processes that share one listening socket.

With several workers, uvicorn binds one socket and every worker accepts on it. uvloop (as asyncio)
accepts every connection waiting on the socket when it becomes readable, so the worker that wakes
first takes a whole burst: keep-alive clients that connect together can all land on one worker,
which runs out of CPU while the other idles (``vae-anomaly loadtest``: all 8 connections on one
of two workers in some rounds, 2,315 requests/s against 3,439-3,556 with 5+3).

``Balanced`` accepts as Envoy's exact connection balancer does: the workers count their open
connections in a small shared table (``ConnectionTable``, one memory-mapped file, a slot per
worker), and a worker takes a waiting connection only while it holds no more than the least
loaded of the others. Otherwise it stops watching the socket for ``DEFER_SECONDS`` and leaves the
connection to them (every worker is woken by a new connection); one no other worker takes within
``MAX_DEFER_SECONDS`` (all busy) it takes anyway, so balancing never delays a connection longer.
It takes one connection per wake-up, so a burst is shared out. Without a table (a worker started
by hand) it only takes one connection per wake-up.

It plugs in through uvicorn's documented custom event loop (``loop="serving.listen:new_event_loop"``):
uvloop's loop (asyncio's where uvloop is missing) whose ``create_server`` on an already-bound
socket returns a ``Balanced``; everything else is the stock loop. ``serving.server`` creates the
table for a multi-worker run and names it in ``TABLE_ENV``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector._io import process_alive

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: slots are claimed without a lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("uvicorn.error")

TABLE_ENV = "VAE_ANOMALY_CONNECTION_TABLE"  # the table's file, set for the workers
SLOTS = 64  # workers the table can count (more are served, unbalanced)
DEFER_SECONDS = 0.0005  # a worker holding more connections than another looks again after this
MAX_DEFER_SECONDS = 0.005  # ... and takes a connection no other worker took in this time
WAIT_GAP_SECONDS = 0.05  # looks further apart than this belong to different waits
RETRY_SECONDS = 1.0  # out of file descriptors or memory: stop accepting for this long (asyncio's)
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ConnectionTable:
    """Open connections per worker, shared through a memory-mapped file of ``SLOTS`` pairs of
    int32 (process id, connections). A worker writes only its own slot; reads of the others may be
    a moment stale, which only makes a choice of worker slightly less even."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "r+b") as f:
            self._fd = os.dup(f.fileno())
            if os.fstat(self._fd).st_size != SLOTS * 8:
                os.close(self._fd)
                raise ValueError(f"{path} is not a connection table of {SLOTS} slots")
            self._map = mmap.mmap(self._fd, SLOTS * 8)
        self._ints = memoryview(self._map).cast("i")

    @staticmethod
    def create(path: str | Path) -> None:
        """An empty table at ``path`` (replaced if present)."""
        Path(path).write_bytes(bytes(SLOTS * 8))

    def claim(self) -> int | None:
        """A free slot for this process (one whose process is gone counts as free); None if
        every slot is held."""
        pid = os.getpid()
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for slot in range(SLOTS):
                holder = self._ints[2 * slot]
                if holder in (0, pid) or not process_alive(holder):
                    self._ints[2 * slot], self._ints[2 * slot + 1] = pid, 0
                    return slot
            return None
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self, slot: int) -> None:
        self._ints[2 * slot + 1] = 0
        self._ints[2 * slot] = 0

    def add(self, slot: int, n: int) -> None:
        self._ints[2 * slot + 1] += n

    def count(self, slot: int) -> int:
        return self._ints[2 * slot + 1]

    def _held(self) -> list[tuple[int, int, int]]:
        """(slot, process id, connections) of every held slot, read at once."""
        ints = self._ints.tolist()
        return [(i, ints[2 * i], ints[2 * i + 1]) for i in range(SLOTS) if ints[2 * i]]

    def least_loaded(self, slot: int) -> tuple[int, int] | None:
        """(connections, slot) of the least loaded other worker; None if there is none."""
        return min(((n, i) for i, _, n in self._held() if i != slot), default=None)

    def workers(self) -> list[tuple[int, int]]:
        """(process id, open connections) of every worker in the table."""
        return [(pid, n) for _, pid, n in self._held()]

    def forget_if_gone(self, slot: int) -> bool:
        """Free ``slot`` if its process is gone (killed without releasing it); True if freed."""
        holder = self._ints[2 * slot]
        if holder and not process_alive(holder):
            self.release(slot)
            return True
        return False

    def close(self) -> None:
        self._ints.release()
        self._map.close()
        os.close(self._fd)


def open_table() -> ConnectionTable | None:
    """The table named in ``TABLE_ENV``; None without one (or if it cannot be read)."""
    path = os.environ.get(TABLE_ENV)
    if not path:
        return None
    try:
        return ConnectionTable(path)
    except (OSError, ValueError) as e:
        log.warning("connections are not balanced across workers: %s", e)
        return None


def _readable(sock: socket.socket) -> bool:
    """Whether a connection waits on the listening ``sock`` (poll: any descriptor number)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])  # pragma: no cover - Windows


class Balanced:
    """Accept on ``sock`` at most one connection per readiness callback, when this worker's turn
    (above), and hand it to the loop as an accepted socket. Offers what uvicorn uses of an
    ``asyncio.Server``: ``close`` and ``wait_closed``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ssl: Any,
        backlog: int,
        table: ConnectionTable | None = None,
    ) -> None:
        self.loop, self.sock = loop, sock
        self.protocol_factory, self.ssl = protocol_factory, ssl
        self.closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.table = table
        self.slot = table.claim() if table is not None else None
        self._deferred_since: float | None = None  # this wait for another worker began then
        self._deferred_last = 0.0  # ... and last looked at the socket then
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    def _my_turn(self) -> bool:
        """Take a waiting connection: this worker holds no more than the least loaded other."""
        if self.table is None or self.slot is None:
            return True
        least = self.table.least_loaded(self.slot)
        if least is None or self.table.count(self.slot) <= least[0]:
            return True
        if self.table.forget_if_gone(least[1]):  # a worker killed without releasing its slot
            return self._my_turn()
        now = self.loop.time()
        # a new wait, unless this one follows the last look (another worker may have taken the
        # connection the last wait was for, after the socket was last seen readable)
        if self._deferred_since is None or now - self._deferred_last > WAIT_GAP_SECONDS:
            self._deferred_since = now
        self._deferred_last = now
        return now - self._deferred_since >= MAX_DEFER_SECONDS  # nobody took it: take it

    def _accept(self) -> None:
        if not self._my_turn():
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(DEFER_SECONDS, self._look_again)
            return
        self._deferred_since = None
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
        self._count(+1)
        task = self.loop.create_task(self._serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _count(self, n: int) -> None:
        if self.table is not None and self.slot is not None:
            self.table.add(self.slot, n)

    async def _serve(self, conn: socket.socket) -> None:
        counted = True

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._count(-1)

        def factory() -> asyncio.BaseProtocol:
            protocol = self.protocol_factory()
            lost = protocol.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                uncount()
                lost(exc)

            protocol.connection_lost = connection_lost  # type: ignore[method-assign]
            return protocol

        served = False
        try:
            await self.loop.connect_accepted_socket(factory, conn, ssl=self.ssl)
            served = True
        except OSError:  # a TLS handshake that failed, a reset
            pass
        except Exception:  # one connection's failure must not stop the others
            log.exception("setting up an accepted connection failed")
        finally:  # (cancelled too)
            if not served:
                conn.close()
                uncount()

    def _look_again(self) -> None:
        """After a deferral: watch the socket again; if nothing waits (another worker took the
        connection), the wait is over."""
        if self.closed:
            return
        if not _readable(self.sock):
            self._deferred_since = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (the socket itself is the caller's to close) and leave the table: the
        other workers no longer wait for this one."""
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            if self.table is not None and self.slot is not None:
                self.table.release(self.slot)
                self.slot = None

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
            return Balanced(self, sock, protocol_factory, ssl, backlog, open_table())

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
