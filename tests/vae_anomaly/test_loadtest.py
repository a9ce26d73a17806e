"""The load benchmark's own measuring parts: the HTTP client and the CPU accounting."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from detector.errors import ConfigError
from vae_anomaly.bench.loadtest import (
    _client,
    _content_length,
    _worker_of,
    placement,
    process_tree_cpu,
    spread,
)
from vae_anomaly.bench.process import ServerProcess, check_cpus, cpu_affinity
from vae_anomaly.cli._common import cpu_list

linux_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's"
)


def test_content_length_is_read_from_any_header_position() -> None:
    head = b"HTTP/1.1 200 OK\r\ndate: x\r\nContent-Length: 17\r\nx-request-id: a"
    assert _content_length(head) == 17
    assert _content_length(b"HTTP/1.1 204 No Content\r\nserver: x") == 0


def test_the_worker_is_read_from_the_request_id() -> None:
    """Our request ids start with their worker's 8-hex-digit prefix: the load test counts the
    connections each worker holds; a server without them (the bare endpoint) says nothing."""
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nX-Request-Id: 1f2e3d4c00000007"
    assert _worker_of(head) == "1f2e3d4c"
    assert _worker_of(b"HTTP/1.1 200 OK\r\nx-request-id: my-own-id") is None
    assert _worker_of(b"HTTP/1.1 200 OK\r\ncontent-length: 3") is None
    assert spread(["a", "b", "a", "a", "b", "a"]) == "4+2"
    assert spread(["a"] * 8) == "8"
    assert spread(["a", None]) is None and spread([]) is None


def test_client_counts_responses_split_across_packets() -> None:
    """A server that answers in small pieces: every response is read whole, statuses kept."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(5)  # the request body
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            served += 1
            status = b"200 OK" if served % 3 else b"422 Unprocessable"
            body = b'{"results": [' + b"1, " * 200 + b"1]}"
            response = (
                b"HTTP/1.1 " + status + b"\r\ncontent-length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body
            )  # fmt: skip
            for i in range(0, len(response), 97):  # many small writes
                writer.write(response[i : i + 97])
                await writer.drain()
        writer.close()

    async def main() -> tuple[list[float], list[int]]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = b"POST /score HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
        lat: list[float] = []
        errors: list[int] = []
        await _client(port, request, time.perf_counter() + 0.3, lat, errors)
        server.close()
        await server.wait_closed()
        return lat, errors

    lat, errors = asyncio.run(main())
    assert len(lat) == served > 3
    assert errors == [422] * (served // 3)
    assert all(t > 0 for t in lat)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_tree_cpu_counts_grandchildren() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"
    spawn = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", spawn], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        cpu = process_tree_cpu(parent.pid)
        while (cpu or 0.0) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.1)
            cpu = process_tree_cpu(parent.pid)
        assert cpu is not None and cpu >= 0.4  # the grandchild's busy loop is in the total
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the grandchild is in the same process group
        parent.wait()
    assert process_tree_cpu(parent.pid) is None  # gone


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    assert cpu_list("0-2,5") == (0, 1, 2, 5)
    assert cpu_list("3") == (3,)
    for bad in ("", "a", "-1", "2-0"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)


@linux_affinity
def test_cpu_sets_are_checked_and_inherited_by_the_server_only() -> None:
    """A server started on a CPU set keeps it (its workers would inherit it); the load
    generator's thread is back on all its CPUs afterwards; a CPU this process may not use is
    refused by name before anything starts."""
    allowed = os.sched_getaffinity(0)
    one = min(allowed)
    with pytest.raises(ConfigError, match=f"CPU {max(allowed) + 1} is not one"):
        check_cpus([one, max(allowed) + 1], "server CPUs")
    with pytest.raises(ConfigError, match="no CPUs"):
        check_cpus([], "client CPUs")
    assert check_cpus([one], "server CPUs") == {one}
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    server = ServerProcess("unused", command=sleeper, cpus={one})
    try:
        assert os.sched_getaffinity(server.proc.pid) == {one}
        assert os.sched_getaffinity(0) == allowed  # restored here
        with cpu_affinity({one}):
            assert os.sched_getaffinity(0) == {one}
        assert os.sched_getaffinity(0) == allowed
    finally:
        server.stop()


def test_placement_says_whether_the_client_shares_the_servers_cpus() -> None:
    assert placement({"server_cpus": [0, 1], "client_cpus": [2]}) == (
        "servers on CPUs 0,1, load generator on CPU 2"
    )
    assert "they share CPUs" in placement({"server_cpus": [0, 1], "client_cpus": [1]})
    assert "they share CPUs" in placement({"server_cpus": None, "client_cpus": None})


@pytest.mark.slow
def test_loadtest_measures_both_protocols_and_the_bare_endpoint(trained) -> None:  # type: ignore[no-untyped-def]
    from vae_anomaly.bench.loadtest import markdown, run_loadtest

    linux = hasattr(os, "sched_setaffinity")

    report = run_loadtest(
        str(trained.path),
        concurrency=(2,),
        npy_instances=50,
        npy_concurrency=(1,),
        seconds=0.4,
        warmup=0.1,
        peers=(1,),
        server_cpus=tuple(sorted(os.sched_getaffinity(0))) if linux else None,
        client_cpus=(min(os.sched_getaffinity(0)),) if linux else None,
    )
    if linux:
        assert report["client_cpus"] == [min(os.sched_getaffinity(0))]
        assert report["server_cpus"] == sorted(os.sched_getaffinity(0))
    rows = {(r["server"], r["scenario"]) for r in report["results"]}
    assert rows == {
        ("vae-anomaly", "json, 1 instance"),
        ("vae-anomaly", "v2 json, 1 instance"),
        ("vae-anomaly", "npy, 50 instances"),
        ("bare endpoint, 1 worker", "json, 1 instance"),
    }
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in report["results"])
    assert {(r["scenario"], r["peer"]) for r in report["ratios"]} == {
        ("json, 1 instance", "bare endpoint, 1 worker"),
        ("v2 json, 1 instance", "bare endpoint, 1 worker"),
    }
    assert all(r["requests_per_s_ratio"] > 0 for r in report["ratios"])
    assert "| bare endpoint, 1 worker | json, 1 instance | 2 |" in markdown(report)
    ours = [r for r in report["results"] if r["server"] == "vae-anomaly" and r["concurrency"] == 2]
    assert ours and all(r["connections_per_worker"] == "2" for r in ours)  # one worker holds both
