"""Fair accepting across workers that share a socket (``serving.listen``): one connection per
wake-up, a working connection for each, and a pause instead of a spin when out of descriptors."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

from serving import listen


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


def test_a_shared_socket_is_served_one_connection_per_wake_up() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, port = _listening()
        server: Any = await loop.create_server(Echo, sock=sock, backlog=16)
        assert isinstance(server, listen.OneAtATime)
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

    loop = listen.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_server_of_its_own_is_the_stock_one() -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
        try:
            assert not isinstance(server, listen.OneAtATime)
            port = server.sockets[0].getsockname()[1]
            assert await asyncio.wait_for(_talk(port, b"x"), 10) == b"X"
        finally:
            server.close()

    loop = listen.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


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

    loop = listen.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
