"""Load benchmark of the HTTP service on loopback: latency percentiles and throughput.

Starts ``vae-anomaly serve`` in a subprocess, then drives it from this process with a lean
asyncio HTTP/1.1 client (keep-alive connections, one request in flight per client), so the
client's own overhead stays small next to the server's. Scenarios: single-instance JSON requests
at several concurrency levels, through ``POST /score`` and the Open Inference Protocol's infer,
and large NPY requests. With peers, the bare 20-line endpoint of ``vae_anomaly.bench.peer`` runs
beside it (1 and 2 workers), each scenario measured on every server in turn, and the report gives
the ratios.

This is a benchmark command that prints figures, not a test.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.artifact import load as load_artifact
from vae_anomaly.bench.process import ServerProcess, check_cpus, cpu_affinity


@dataclass
class Result:
    server: str
    round: int
    scenario: str
    concurrency: int
    instances_per_request: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    instances_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_ms_per_request: float | None  # user + system CPU of the server's processes
    client_cpu_ms_per_request: float  # this load generator's own CPU
    # how the clients' connections fell on the server's workers, most loaded first ("5+3"); None
    # for a server that does not say which worker answered (the bare endpoint)
    connections_per_worker: str | None = None


def _request(port: int, body: bytes, content_type: str, path: str = "/score") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


class _ClientProtocol(asyncio.Protocol):
    """One keep-alive connection sending ``payload`` back to back, one request in flight.

    A bare protocol (no stream reader) so the client's own CPU per request stays small: on this
    2-core machine the client shares the cores with the server it measures.
    """

    def __init__(self, payload: bytes, stop_at: float, lat: list[float], errors: list[int]) -> None:
        self.payload = payload
        self.stop_at = stop_at
        self.lat = lat
        self.errors = errors
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.need = -1  # bytes of the whole response, once its head is read
        self.t0 = 0.0
        self.worker: str | None = None  # which server worker holds this connection, if it says

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.t0 = time.perf_counter()
        self.transport.write(self.payload)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.buf[9:12])  # "HTTP/1.1 200 OK"
            self.need = end + 4 + _content_length(self.buf[:end])
            if self.worker is None:
                self.worker = _worker_of(self.buf[:end])
        if len(self.buf) < self.need:
            return
        now = time.perf_counter()
        self.lat.append(now - self.t0)
        if self.status != 200:
            self.errors.append(self.status)
        self.buf = self.buf[self.need :]
        self.need = -1
        if now < self.stop_at:
            self._send()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None and time.perf_counter() >= self.stop_at:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc or ConnectionError("the server closed the connection"))


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in a response head, or None."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _worker_of(head: bytes) -> str | None:
    """The worker that answered, from the response's request id (``serving.app.asgi``: a
    per-process prefix of 8 hex digits, then a counter); None without one."""
    rid = _header(head, b"x-request-id")
    return rid[:8].decode("latin-1") if rid is not None and len(rid) == 16 else None


def _content_length(head: bytes) -> int:
    value = _header(head, b"content-length")
    return 0 if value is None else int(value)


async def _client(
    port: int, payload: bytes, stop_at: float, lat: list[float], errors: list[int]
) -> str | None:
    """One client until ``stop_at``; returns the server worker that held its connection."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: _ClientProtocol(payload, stop_at, lat, errors), "127.0.0.1", port
    )
    await proto.done
    return proto.worker


@dataclass
class _Measured:
    latencies: list[float]
    errors: list[int]
    seconds: float
    server_cpu: float | None
    client_cpu: float
    workers: list[str | None]  # each client's server worker


async def _scenario(
    port: int, payload: bytes, concurrency: int, seconds: float, warmup: float, server_pid: int
) -> _Measured:
    if warmup > 0:
        await asyncio.gather(
            *(
                _client(port, payload, time.perf_counter() + warmup, [], [])
                for _ in range(concurrency)
            )
        )
    lat: list[float] = []
    errors: list[int] = []
    server0, client0 = process_tree_cpu(server_pid), time.process_time()
    t0 = time.perf_counter()
    workers = await asyncio.gather(
        *(_client(port, payload, t0 + seconds, lat, errors) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - t0
    server1, client1 = process_tree_cpu(server_pid), time.process_time()
    server = server1 - server0 if server0 is not None and server1 is not None else None
    return _Measured(lat, errors, elapsed, server, client1 - client0, list(workers))


def process_tree_cpu(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and all its descendants (Linux /proc; None elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if pid not in stats:
        return None
    total, frontier = 0.0, [pid]
    while frontier:
        p = frontier.pop()
        total += stats[p][1]
        frontier += [c for c, (parent, _) in stats.items() if parent == p]
    return total


def _summarise(server: str, round_: int, name: str, conc: int, n_inst: int, m: _Measured) -> Result:
    a = np.asarray(m.latencies or [0.0]) * 1000
    n = max(len(m.latencies), 1)
    return Result(
        server=server,
        round=round_,
        scenario=name,
        concurrency=conc,
        instances_per_request=n_inst,
        requests=len(m.latencies),
        errors=len(m.errors),
        seconds=m.seconds,
        requests_per_s=len(m.latencies) / m.seconds,
        instances_per_s=len(m.latencies) * n_inst / m.seconds,
        p50_ms=float(np.percentile(a, 50)),
        p90_ms=float(np.percentile(a, 90)),
        p99_ms=float(np.percentile(a, 99)),
        max_ms=float(a.max()),
        server_cpu_ms_per_request=None if m.server_cpu is None else m.server_cpu * 1000 / n,
        client_cpu_ms_per_request=m.client_cpu * 1000 / n,
        connections_per_worker=spread(m.workers),
    )


def spread(workers: list[str | None]) -> str | None:
    """Connections per server worker, most first ("6+2"); None if any did not say."""
    if not workers or any(w is None for w in workers):
        return None
    counts = sorted(Counter(workers).values(), reverse=True)
    return "+".join(map(str, counts))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from serving.cpus import cpu_quota

    return {
        "cpu": cpu,
        "cpus_usable": cpu_quota(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


OURS = "vae-anomaly"
V2_INFER = "/v2/models/vae-anomaly/infer"


def peer_name(workers: int) -> str:
    return f"bare endpoint, {workers} worker{'s' if workers > 1 else ''}"


def run_loadtest(
    model_dir: str,
    *,
    concurrency: tuple[int, ...] = (1, 8, 32),
    npy_instances: int = 1000,
    npy_concurrency: tuple[int, ...] = (1, 4),
    seconds: float = 5.0,
    warmup: float = 1.0,
    server_args: tuple[str, ...] = (),
    data: Any = None,
    log: Any = None,
    protocols: tuple[str, ...] = ("score", "v2"),
    peers: tuple[int, ...] = (),
    rounds: int = 1,
    server_cpus: tuple[int, ...] | None = None,
    client_cpus: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """``data``: samples to send (N, ...) in the model's input space; None = uniform noise.
    ``peers``: worker counts of bare endpoints to measure beside the service (``peer``).
    ``server_cpus`` / ``client_cpus``: the CPUs every server (its workers too) and this load
    generator run on (None: any); disjoint sets keep the client's CPU out of the servers'.
    ``log``: takes the table's header, once the arguments are checked, then each row."""
    servers_on = None if server_cpus is None else check_cpus(server_cpus, "server CPUs")
    client_on = None if client_cpus is None else check_cpus(client_cpus, "client CPUs")
    if log:
        log(HEADER)
    art = load_artifact(model_dir)  # verify before starting anything
    spec = art.input_spec
    if spec.schema is not None:  # a table's v2 inputs are its columns; /score takes its rows
        protocols = tuple(p for p in protocols if p != "v2")
    lo, hi = spec.value_range or (0.0, 1.0)
    payload = "uniform noise over the input range" if data is None else f"{len(data)} given samples"
    if data is None:
        rng = np.random.default_rng(0)
        data = rng.uniform(lo, hi, size=(max(npy_instances, 1), *spec.shape))
    data = np.asarray(data, dtype=np.float32).reshape(len(data), *spec.shape)
    one = data[:1].reshape(1, -1).round(4)
    json_body = json.dumps({"instances": one.tolist()}).encode()
    v2_body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, *spec.shape],
                    "datatype": "FP32",
                    "data": one.ravel().tolist(),
                }
            ]
        }
    ).encode()
    buf = io.BytesIO()
    np.save(buf, data[np.arange(npy_instances) % len(data)])
    npy_body = buf.getvalue()

    servers = {
        OURS: ServerProcess(
            model_dir,
            "--log-level",
            "warning",
            *server_args,
            env={"VAE_ANOMALY_ACCESS_LOG": "false"},
            cpus=servers_on,
        )
    }
    for w in peers:
        command = [sys.executable, "-m", "uvicorn", "vae_anomaly.bench.peer:app"]
        command += ["--port", "{port}", "--workers", str(w), "--log-level", "warning"]
        command += ["--no-access-log"]
        servers[peer_name(w)] = ServerProcess(
            model_dir, command=command, env={"PEER_MODEL_DIR": str(model_dir)}, cpus=servers_on
        )
    results: list[Result] = []
    try:
        for server in servers.values():
            server.wait_ready()
        loop_policy = _fast_loop()
        # (scenario, instances, body, content type, path, clients, servers that take it)
        scenarios: list[tuple[str, int, bytes, str, str, int, list[str]]] = []
        for c in concurrency:
            if "score" in protocols:
                scenarios.append(
                    ("json, 1 instance", 1, json_body, JSON, "/score", c, list(servers))
                )
            if "v2" in protocols:
                scenarios.append(("v2 json, 1 instance", 1, v2_body, JSON, V2_INFER, c, [OURS]))
        scenarios += [
            (f"npy, {npy_instances} instances", npy_instances, npy_body, NPY, "/score", c, [OURS])
            for c in npy_concurrency
        ]
        with cpu_affinity(client_on):
            for r in range(rounds):
                for name, n_inst, body, ctype, path, c, takers in scenarios:
                    for who in takers:  # every server in turn: side by side under the same load
                        server = servers[who]
                        request = _request(server.port, body, ctype, path)
                        measured = _run(
                            loop_policy,
                            _scenario(server.port, request, c, seconds, warmup, server.proc.pid),
                        )
                        results.append(_summarise(who, r, name, c, n_inst, measured))
                        if log:
                            log(_row(results[-1]))
    finally:
        for server in servers.values():
            server.stop()
    return {
        "machine": machine(),
        "payload": payload,
        "model_version": art.model_version,
        "input_shape": list(spec.shape),
        "server_args": list(server_args),
        "server_cpus": None if servers_on is None else sorted(servers_on),
        "client_cpus": None if client_on is None else sorted(client_on),
        "seconds_per_scenario": seconds,
        "rounds": rounds,
        "results": [asdict(r) for r in results],
        "ratios": ratios(results),
    }


JSON, NPY = "application/json", "application/x-npy"


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    """Ours against each bare endpoint, scenario by scenario and round by round: requests/s
    (ours / theirs), p99 latencies, server CPU per request."""
    theirs = {
        (r.server, r.round, r.concurrency): r
        for r in results
        if r.server != OURS and r.scenario == "json, 1 instance"
    }
    out = []
    for r in results:
        if r.server != OURS or r.instances_per_request != 1:
            continue
        for (peer, round_, c), p in theirs.items():
            if round_ != r.round or c != r.concurrency:
                continue
            cpu = (
                r.server_cpu_ms_per_request / p.server_cpu_ms_per_request
                if r.server_cpu_ms_per_request and p.server_cpu_ms_per_request
                else None
            )
            out.append(
                {
                    "scenario": r.scenario,
                    "concurrency": c,
                    "round": round_,
                    "peer": peer,
                    "requests_per_s_ratio": r.requests_per_s / max(p.requests_per_s, 1e-9),
                    "p99_ms": r.p99_ms,
                    "peer_p99_ms": p.p99_ms,
                    "server_cpu_ratio": cpu,
                }
            )
    return out


def _fast_loop() -> Any:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop


def _run(factory: Any, coro: Any) -> Any:
    loop = factory()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


HEADER = (
    f"{'server':<26}{'scenario':<24}{'clients':>8}{'requests':>10}{'req/s':>10}{'inst/s':>11}{'p50 ms':>9}"
    f"{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}{'server CPU ms/req':>19}{'conns/worker':>14}"
)


def _cpu(r: Result) -> str:
    return "n/a" if r.server_cpu_ms_per_request is None else f"{r.server_cpu_ms_per_request:.2f}"


def _row(r: Result) -> str:
    return (
        f"{r.server:<26}{r.scenario:<24}{r.concurrency:>8}{r.requests:>10}{r.requests_per_s:>10,.0f}{r.instances_per_s:>11,.0f}"
        f"{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>8}{_cpu(r):>19}"
        f"{r.connections_per_worker or '':>14}"
    )


def placement(report: dict[str, Any]) -> str:
    """Where the servers and the load generator ran, in words."""

    def on(cpus: list[int] | None) -> str:
        if cpus is None:
            return "on any CPU"
        return f"on CPU{'s' if len(cpus) > 1 else ''} {','.join(map(str, cpus))}"

    server, client = report.get("server_cpus"), report.get("client_cpus")
    text = f"servers {on(server)}, load generator {on(client)}"
    if server is None or client is None or set(server) & set(client):
        text += " (they share CPUs: the load generator's own work counts in the latencies)"
    return text


def markdown(report: dict[str, Any]) -> str:
    rows = [
        f"Servers: {' '.join(report.get('server_args', [])) or 'defaults'}; {placement(report)}.",
        "",
        "| server | scenario | clients | req/s | instances/s | p50 ms | p90 ms | p99 ms | errors | server CPU ms/request | connections per worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cpu = r.get("server_cpu_ms_per_request")
        rows.append(
            f"| {r.get('server', OURS)} | {r['scenario']} | {r['concurrency']} | {r['requests_per_s']:,.0f} | {r['instances_per_s']:,.0f} | "
            f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | "
            f"{'n/a' if cpu is None else f'{cpu:.2f}'} | {r.get('connections_per_worker') or 'n/a'} |"
        )
    if report.get("ratios"):
        rows += ["", ratio_markdown(report["ratios"])]
    return "\n".join(rows)


def ratio_markdown(rs: list[dict[str, Any]]) -> str:
    """Ratios grouped over rounds: min-max of requests/s (ours / the bare endpoint's), p99 and
    CPU per request."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rs:
        groups.setdefault((r["scenario"], r["concurrency"], r["peer"]), []).append(r)
    rows = [
        "| ours | clients | against | req/s ratio | our p99 ms | their p99 ms | CPU/request ratio |",
        "|---|---|---|---|---|---|---|",
    ]

    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"

    for (scenario, c, peer), g in groups.items():
        cpu = [x["server_cpu_ratio"] for x in g if x["server_cpu_ratio"] is not None]
        rows.append(
            f"| {scenario} | {c} | {peer} | {span([x['requests_per_s_ratio'] for x in g], '.2f')}x"
            f" | {span([x['p99_ms'] for x in g], '.2f')} | {span([x['peer_p99_ms'] for x in g], '.2f')}"
            f" | {span(cpu, '.2f') + 'x' if cpu else 'n/a'} |"
        )
    return "\n".join(rows)
