"""Balanced accepting across workers that share a socket (``serving.listen``): the shared table of
open connections, a worker holding more than another leaving new connections to it (but taking
one nobody took), one connection per wake-up, and a pause instead of a spin when out of
descriptors."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving import listen
from serving.metrics import WorkerConnections


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


def _listening() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


async def _talk(port: int, text: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(text)
    await writer.drain()
    got = await reader.readexactly(len(text))
    writer.close()
    return got


def _run_on_our_loop(coro: Coroutine[Any, Any, None]) -> None:
    loop = listen.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


def test_a_shared_socket_is_served_one_connection_per_wake_up() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, port = _listening()
        server: Any = await loop.create_server(Echo, sock=sock, backlog=16)
        assert isinstance(server, listen.Balanced)
        # every connection works
        talks = asyncio.gather(*(_talk(port, b"ping %d" % i) for i in range(5)))
        assert await asyncio.wait_for(talks, 10) == [b"PING %d" % i for i in range(5)]
        # three connections waiting: one readiness callback takes exactly one of them
        loop.remove_reader(sock.fileno())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        await asyncio.sleep(0.05)
        before = len(server.tasks) + 0
        server._accept()
        assert len(server.tasks) == before + 1
        server._accept()
        server._accept()
        server._accept()  # nothing left: returns quietly
        assert len(server.tasks) <= before + 3
        server.closed = True  # (its reader was removed above)
        await server.wait_closed()
        await asyncio.sleep(0.05)
        for c in clients:
            c.close()
        sock.close()

    _run_on_our_loop(main())


def test_a_server_of_its_own_is_the_stock_one() -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
        try:
            assert not isinstance(server, listen.Balanced)
            port = server.sockets[0].getsockname()[1]
            assert await asyncio.wait_for(_talk(port, b"x"), 10) == b"X"
        finally:
            server.close()

    _run_on_our_loop(main())


def test_out_of_descriptors_pauses_accepting(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE: stop watching the socket and look again after RETRY_SECONDS, rather than spin
    on a socket that stays readable; other errors are not swallowed; close stops for good."""
    monkeypatch.setattr(listen, "RETRY_SECONDS", 0.05)

    class Failing:
        def __init__(self, sock: socket.socket, err: int) -> None:
            self.sock, self.err, self.calls = sock, err, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.sock, name)

        def accept(self) -> Any:
            self.calls += 1
            raise OSError(self.err, "simulated")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, port = _listening()
        server: Any = await loop.create_server(Echo, sock=sock, backlog=16)
        failing = Failing(sock, errno.EMFILE)
        server.sock = failing
        client = socket.create_connection(("127.0.0.1", port))
        await asyncio.sleep(0.02)
        assert failing.calls == 1  # paused after the first failure, not spinning
        await asyncio.sleep(0.1)
        assert 2 <= failing.calls <= 4  # looked again after the pause
        server.sock = Failing(sock, errno.EBADF)
        with pytest.raises(OSError):
            server._accept()
        server.sock = sock
        server.close()
        server.close()  # twice is fine
        client.close()
        sock.close()

    _run_on_our_loop(main())


_WORKER = """
import sys
from serving.listen import ConnectionTable
table = ConnectionTable(sys.argv[1])
slot = table.claim()
print(slot, flush=True)
for line in sys.stdin:  # each line: a change of this worker's connection count
    table.add(slot, int(line))
    print(table.count(slot), flush=True)
"""


class OtherWorker:
    """Another process holding a slot of the table, its count set through stdin."""

    def __init__(self, table: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(table)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.slot = int(self.proc.stdout.readline())

    def add(self, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@contextmanager
def other_worker(table: Path) -> Iterator[OtherWorker]:
    w = OtherWorker(table)
    try:
        yield w
    finally:
        w.kill()


def test_the_table_counts_each_workers_connections(tmp_path: Path) -> None:
    path = tmp_path / "connections"
    listen.ConnectionTable.create(path)
    table = listen.ConnectionTable(path)
    mine = table.claim()
    assert mine == 0 and table.claim() == 0  # one slot per process
    assert table.least_loaded(mine) is None  # nobody else
    with other_worker(path) as other:
        assert other.slot == 1
        other.add(3)
        table.add(mine, 2)
        assert table.count(mine) == 2 and table.least_loaded(mine) == (3, 1)
        assert table.workers() == [(os.getpid(), 2), (other.proc.pid, 3)]
        # what /metrics reports of it (several workers)
        registry = CollectorRegistry()
        registry.register(WorkerConnections(table))
        text = generate_latest(registry).decode()
        assert f'vae_anomaly_worker_connections{{pid="{os.getpid()}"}} 2.0' in text
        assert f'vae_anomaly_worker_connections{{pid="{other.proc.pid}"}} 3.0' in text
        other.add(-3)
        assert table.least_loaded(mine) == (0, 1)
        assert not table.forget_if_gone(other.slot)  # alive: kept
        other.kill()
        assert table.forget_if_gone(other.slot)  # killed without leaving: freed
        assert table.least_loaded(mine) is None
    with other_worker(path) as again:
        again.add(1)
        again.kill()  # its slot is left behind ...
        with other_worker(path) as third:
            assert third.slot == 1  # ... and reused
    table.release(mine)
    assert table.count(mine) == 0
    table.close()
    (tmp_path / "short").write_bytes(bytes(16))
    with pytest.raises(ValueError, match="not a connection table"):
        listen.ConnectionTable(tmp_path / "short")


def test_a_worker_holding_more_connections_leaves_new_ones_to_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "connections"
    listen.ConnectionTable.create(path)
    monkeypatch.setenv(listen.TABLE_ENV, str(path))
    monkeypatch.setattr(listen, "MAX_DEFER_SECONDS", 0.3)

    async def accepted(server: Any, n: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if server.table.count(server.slot) == n:
                return True
            await asyncio.sleep(0.005)
        return server.table.count(server.slot) == n

    async def main(other: OtherWorker) -> None:
        loop = asyncio.get_running_loop()
        sock, port = _listening()
        server: Any = await loop.create_server(Echo, sock=sock, backlog=16)
        clients: list[Any] = []
        try:
            await scenario(server, port, other, clients)
        finally:  # a failed check must not leave the loop with open connections
            for c in clients:
                c.close()
            server.close()
            sock.close()

    async def scenario(server: Any, port: int, other: OtherWorker, clients: list[Any]) -> None:
        assert server.table is not None and server.slot not in (None, other.slot)
        # level with the other worker (0 and 0): this one takes a connection at once
        clients.append(socket.create_connection(("127.0.0.1", port)))
        assert await accepted(server, 1, 2.0)
        # one more than the other: the next connection waits for it, and the other takes it
        clients.append(socket.create_connection(("127.0.0.1", port)))
        assert not await accepted(server, 2, 0.15)
        taken, _ = server.sock.accept()  # (as the other worker would)
        clients.append(taken)
        await asyncio.sleep(listen.WAIT_GAP_SECONDS + 0.02)
        assert server.table.count(server.slot) == 1
        # a connection the other never takes is taken here after MAX_DEFER_SECONDS
        clients.append(socket.create_connection(("127.0.0.1", port)))
        assert not await accepted(server, 2, 0.15)
        assert await accepted(server, 2, 2.0)
        # the other worker holds more: a new connection is taken at once
        other.add(5)
        clients.append(socket.create_connection(("127.0.0.1", port)))
        assert await accepted(server, 3, 0.15)
        # connections that close leave the count
        for c in clients:
            c.close()
        assert await accepted(server, 0, 2.0)
        server.close()
        assert server.slot is None  # left the table: the others no longer wait for it

    with other_worker(path) as other:
        _run_on_our_loop(main(other))


def test_without_a_table_connections_are_taken_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(listen.TABLE_ENV, raising=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, port = _listening()
        server: Any = await loop.create_server(Echo, sock=sock, backlog=16)
        assert server.table is None
        talks = asyncio.gather(*(_talk(port, b"x%d" % i) for i in range(4)))
        assert await asyncio.wait_for(talks, 10) == [b"X%d" % i for i in range(4)]
        server.close()
        sock.close()

    _run_on_our_loop(main())
