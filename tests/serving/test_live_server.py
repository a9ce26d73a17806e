"""The real server under uvicorn on a loopback port: concurrency, batching, reload under load,
several workers, and a real Prometheus server scraping it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from detector import artifact
from tests.serving.live import LiveServer, free_port
from training.pipeline import TrainOutcome

pytestmark = pytest.mark.slow


def _metric(text: str, name: str) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not in metrics"
    return total


def test_concurrent_clients_are_batched_and_scores_match(trained: TrainOutcome) -> None:
    assert trained.path is not None and trained.split.x_test is not None
    x = trained.split.x_test[:160]
    ref = trained.detector.score(x).score
    with LiveServer(trained.path, "--max-wait-ms", "5") as srv:

        def client(worker: int) -> list[tuple[int, float]]:
            out = []
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                for i in range(worker, len(x), 16):
                    r = c.post("/score", json={"instances": x[i : i + 1].tolist()})
                    assert r.status_code == 200, r.text
                    out.append((i, r.json()["results"][0]["score"]))
            return out

        with ThreadPoolExecutor(16) as pool:
            got = dict(pair for chunk in pool.map(client, range(16)) for pair in chunk)
        scores = np.array([got[i] for i in range(len(x))])
        # the score sums terms of hundreds of nats, each float32 (about 1e-6 relative)
        np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-3)
        text = httpx.get(srv.url + "/metrics").text
        batches = _metric(text, "vae_anomaly_batch_size_count")
        rows = _metric(text, "vae_anomaly_batch_size_sum")
        assert rows == len(x) and batches < len(x), (rows, batches)  # mean batch size > 1
        assert _metric(text, "vae_anomaly_scored_samples_total") == len(x)
        assert 'vae_anomaly_requests_total{method="POST",route="/score",status="200"} 160.0' in text
    assert '"path":"/score","status":200' in srv.log()  # JSON access log


def test_reload_under_load_no_failed_request(trained: TrainOutcome, tmp_path: Path) -> None:
    assert trained.path is not None
    det = trained.detector
    v2_dir = tmp_path / "v2"
    artifact.save(
        v2_dir,
        det.model,
        det.calibration.with_fpr(0.2),
        det.input_spec,
        reference=det.reference,
        head=det.head,
    )  # type: ignore[union-attr]
    bad_dir = tmp_path / "bad"
    shutil.copytree(trained.path, bad_dir)
    (bad_dir / "calibration.json").write_text("{}")
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    root = os.path.commonpath([trained.path, tmp_path])
    env = {"VAE_ANOMALY_API_KEY": "k", "VAE_ANOMALY_MODEL_ROOT": root}
    key = {"x-api-key": "k"}
    with LiveServer(trained.path, "--enable-admin", env=env) as srv:

        def hammer() -> None:
            with httpx.Client(base_url=srv.url, timeout=10, headers=key) as c:
                while not stop.is_set():
                    r = c.post("/score", json={"instances": [[0.2] * 64]})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.append(r.json()["model_version"])

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        r = httpx.post(
            srv.url + "/admin/reload", json={"model_dir": str(v2_dir)}, timeout=30, headers=key
        )
        assert r.status_code == 200, r.text
        v2 = r.json()["model_version"]
        time.sleep(0.5)
        r = httpx.post(
            srv.url + "/admin/reload", json={"model_dir": str(bad_dir)}, timeout=30, headers=key
        )
        assert r.status_code == 409 and "calibration.json" in r.json()["detail"]
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert httpx.get(srv.url + "/readyz", headers=key).json()["model_version"] == v2
    assert statuses and set(statuses) == {200}, f"failed requests during reload: {set(statuses)}"
    assert versions[0] == det.model_version and versions[-1] == v2
    assert "model load from" in srv.log() and "failed" in srv.log()


def test_several_workers_report_all_metrics(trained: TrainOutcome) -> None:
    assert trained.path is not None
    with LiveServer(trained.path, "--workers", "2") as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            # wait until both workers have their model: 20 fresh connections in a row ready
            ready, deadline = 0, time.monotonic() + 60
            while ready < 20 and time.monotonic() < deadline:
                with httpx.Client(base_url=srv.url, timeout=10) as fresh:
                    ready = ready + 1 if fresh.get("/readyz").status_code == 200 else 0
            assert ready == 20, "the workers did not all become ready"
            n = 0
            for _ in range(40):
                with httpx.Client(
                    base_url=srv.url, timeout=10
                ) as fresh:  # new connections spread load
                    assert (
                        fresh.post("/score", json={"instances": [[0.3] * 64] * 2}).status_code
                        == 200
                    )
                n += 2
            text = c.get("/metrics").text
        assert _metric(text, "vae_anomaly_scored_samples_total") == n
        assert (
            _metric(text, 'vae_anomaly_requests_total{method="POST",route="/score",status="200"}')
            == 40
        )


def test_several_workers_share_a_burst_of_connections(trained: TrainOutcome) -> None:
    """Keep-alive connections opened together spread over the workers (serving.listen): without
    the shared count, the worker that woke first could take all of them."""
    assert trained.path is not None
    with LiveServer(trained.path, "--workers", "2") as srv:
        ready, deadline = 0, time.monotonic() + 60
        while ready < 20 and time.monotonic() < deadline:  # both workers up (see above)
            with httpx.Client(base_url=srv.url, timeout=10) as fresh:
                ready = ready + 1 if fresh.get("/readyz").status_code == 200 else 0
        assert ready == 20, "the workers did not all become ready"
        splits = []
        for _ in range(3):
            start = threading.Barrier(8)
            clients = [httpx.Client(base_url=srv.url, timeout=10) for _ in range(8)]

            def first_request(c: httpx.Client, start: threading.Barrier = start) -> str:
                start.wait()
                return c.get("/readyz").headers["x-request-id"][:8]  # the worker's prefix

            with ThreadPoolExecutor(8) as pool:
                workers = list(pool.map(first_request, clients))
            splits.append(sorted(workers.count(w) for w in set(workers)))
            # /metrics (on one of the 8) counts each worker's open connections: 8 in all
            text = clients[0].get("/metrics").text
            assert _metric(text, "vae_anomaly_worker_connections") == 8
            for c in clients:
                c.close()
            time.sleep(0.2)  # the workers see the connections close
    assert all(split in ([4, 4], [3, 5]) for split in splits), splits


def _post_fresh(url: str, retried: list[str]) -> httpx.Response:
    """POST /score on a fresh connection (so any worker may answer), retried once on a transport
    error, as a load balancer retries an idempotent request: a worker that is shutting down closes
    a connection it accepted but has not read a request from yet (uvicorn's graceful shutdown)."""
    try:
        return httpx.post(url + "/score", json={"instances": [[0.2] * 64]}, timeout=10)
    except httpx.TransportError as e:
        retried.append(repr(e))
        return httpx.post(url + "/score", json={"instances": [[0.2] * 64]}, timeout=10)


def _versions_now(url: str, retried: list[str], n: int = 20) -> set[str]:
    """Model versions answering ``n`` requests, each on a fresh connection."""
    seen = set()
    for _ in range(n):
        r = _post_fresh(url, retried)
        assert r.status_code == 200, r.text
        seen.add(r.json()["model_version"])
    return seen


def test_sighup_rolls_several_workers_onto_a_new_artifact(
    trained: TrainOutcome, tmp_path: Path
) -> None:
    """With several workers, SIGHUP restarts them one at a time on the artifact now at the model
    path, with no failed request; a corrupted artifact aborts the restart and the workers on the
    previous model keep serving."""
    assert trained.path is not None
    det = trained.detector
    model = tmp_path / "model"
    shutil.copytree(trained.path, model)
    v2_dir = tmp_path / "v2"
    artifact.save(
        v2_dir,
        det.model,
        det.calibration.with_fpr(0.2),
        det.input_spec,
        reference=det.reference,
        head=det.head,
    )  # type: ignore[union-attr]
    v2 = artifact.load(v2_dir).model_version
    bad_dir = tmp_path / "bad"
    shutil.copytree(v2_dir, bad_dir)
    weights = bad_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))

    def swap_in(new: Path, keep_as: str) -> None:
        model.rename(tmp_path / keep_as)
        new.rename(model)

    failures: list[str] = []
    retried: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    with LiveServer(model, "--workers", "2") as srv:
        assert _versions_now(srv.url, retried) == {det.model_version}

        def hammer() -> None:
            while not stop.is_set():
                try:
                    r = _post_fresh(srv.url, retried)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    versions.append(r.json()["model_version"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            swap_in(v2_dir, "v1")
            os.kill(srv.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 90
            while _versions_now(srv.url, retried) != {v2}:
                assert time.monotonic() < deadline, "the workers did not move to the new model"
                time.sleep(0.5)

            swap_in(bad_dir, "v2-kept")
            os.kill(srv.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 90
            while "aborting the restart" not in srv.log():
                assert time.monotonic() < deadline, (
                    "the restart onto a bad artifact was not aborted"
                )
                time.sleep(0.5)
            assert _versions_now(srv.url, retried) == {v2}
        finally:
            stop.set()
            for t in threads:
                t.join()
        text = httpx.get(srv.url + "/metrics").text
    assert failures == [], failures[:5]  # no error status, and no request failed twice
    assert len(retried) <= max(2, len(versions) // 100), retried[:5]  # the rare closed connection
    assert versions[0] == det.model_version and versions[-1] == v2
    assert "weights.safetensors does not match its SHA-256" in srv.log()
    # replaced workers dropped their gauges: only the model now served is reported
    assert f'vae_anomaly_model_info{{model_version="{v2}"}} 1.0' in text
    assert det.model_version not in text
    # the refused artifact is counted (the alert VAEAnomalyModelReloadFailed reads this)
    assert 'vae_anomaly_model_reloads_total{result="failure"} 1.0' in text


def test_admin_endpoint_refuses_several_workers(trained: TrainOutcome) -> None:
    assert trained.path is not None
    proc = subprocess.run(
        [sys.executable, "-m", "vae_anomaly", "serve", "--model", str(trained.path),
         "--workers", "2", "--enable-admin", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "enable_admin needs workers = 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shutdown_is_graceful(trained: TrainOutcome) -> None:
    assert trained.path is not None
    srv = LiveServer(trained.path)
    srv.wait_ready()
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status says why it stopped
    assert srv.stop() in (0, -15)
    log = srv.log()
    assert "Application shutdown complete" in log and "Finished server process" in log


def test_prometheus_scrapes_the_service(trained: TrainOutcome, tmp_path: Path) -> None:
    prom = shutil.which("prometheus")
    if prom is None:
        if os.environ.get("VAE_ANOMALY_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("prometheus is not installed (apt-get install prometheus)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    assert trained.path is not None
    with LiveServer(trained.path) as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for _ in range(7):
                assert c.post("/score", json={"instances": [[0.4] * 64] * 3}).status_code == 200
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: vae-anomaly\n    static_configs:\n      - targets: ['127.0.0.1:{srv.port}']\n"
        )
        web_port = free_port()
        data_dir = Path(tempfile.mkdtemp(dir=tmp_path))
        prom_log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                prom,
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
        try:
            api = f"http://127.0.0.1:{web_port}/api/v1/query"
            deadline = time.monotonic() + 60
            value = None
            while time.monotonic() < deadline:
                try:
                    r = httpx.get(
                        api,
                        params={"query": 'vae_anomaly_scored_samples_total{job="vae-anomaly"}'},
                        timeout=2,
                    )
                    result = r.json()["data"]["result"] if r.status_code == 200 else []
                    if result:
                        value = float(result[0]["value"][1])
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert value == 21.0
            up = httpx.get(api, params={"query": 'up{job="vae-anomaly"}'}).json()["data"]["result"]
            assert up[0]["value"][1] == "1"
            thr = httpx.get(api, params={"query": "vae_anomaly_threshold"}).json()["data"]["result"]
            assert float(thr[0]["value"][1]) == pytest.approx(trained.detector.threshold)
        finally:
            proc.terminate()
            proc.wait(30)
            prom_log.close()


def test_the_running_service_keeps_to_its_openapi_document(
    trained: TrainOutcome, tmp_path: Path
) -> None:
    """schemathesis, every check but one, against the real server: no 500, no undocumented
    status code, no response off its schema, no schema-valid request refused. Left out:
    negative_data_rejection, because clip=true accepts values outside the documented input
    range on purpose (it clips them)."""
    st = Path(sys.executable).with_name("schemathesis")
    assert trained.path is not None
    with LiveServer(trained.path) as srv:
        done = subprocess.run(
            [str(st), "run", srv.url + "/openapi.json", "--checks", "all",
             "--exclude-checks", "negative_data_rejection", "--max-examples", "40",
             "--seed", "1", "--generation-database", "none"],
            capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    assert "Traceback" not in srv.log()


def _exchange(port: int, data: bytes, *, until: bytes, chunk: int = 1 << 16) -> bytes:
    """Send ``data`` a chunk at a time (stopping if the server closes) and read until ``until``
    has arrived or the connection ends."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            for start in range(0, len(data), chunk):
                s.sendall(data[start : start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the end: read what it said
        return _read_until(s, until)


def _read_until(s: socket.socket, until: bytes) -> bytes:
    got = b""
    while until not in got:
        try:
            more = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not more:
            break
        got += more
    return got


def test_request_heads_are_bounded(trained: TrainOutcome) -> None:
    """uvicorn's httptools parser buffers any header (a 143 MB one was taken whole): the service
    answers a head over 64 KB with a 431 and closes; a 60 KB head, and a pipelined request after
    a large body, are served as before."""
    assert trained.path is not None and trained.split.x_test is not None
    with LiveServer(trained.path) as srv:
        endless = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (4 << 20)
        got = _exchange(srv.port, endless, until=b"}")
        assert got.startswith(b"HTTP/1.1 431 ") and b'"error":"headers_too_large"' in got
        big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(58))
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"
        assert _exchange(srv.port, head, until=b"}").startswith(b"HTTP/1.1 200 ")
        rows = np.repeat(trained.split.x_test[:1], 800, axis=0).tolist()
        body = json.dumps({"instances": rows}).encode()
        assert len(body) > 256 * 1024  # more than one socket read ahead of the next head
        post = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        post += b"Content-Length: %d\r\n\r\n" % len(body) + body
        got = _exchange(
            srv.port, post + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", until=b'"ok"}'
        )
        assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"HTTP/1.1 200 OK") == 2
    assert "refused a request" in srv.log()


def test_a_client_that_stops_sending_gets_a_408(trained: TrainOutcome) -> None:
    """A connection that sends nothing, half a head, or half a body, is answered 408 and closed
    after --client-timeout (a "slowloris" otherwise holds connections for ever); a head, and a
    body, that arrive in pieces closer together than the timeout (the body taking longer than it
    in all), and a kept-alive connection's next request after an idle spell, are served."""
    assert trained.path is not None and trained.split.x_test is not None
    body = json.dumps({"instances": trained.split.x_test[:2].tolist()}).encode()
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with LiveServer(trained.path, "--client-timeout", "2") as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
        half = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
        stalled.sendall(head + body[:100])
        t0 = time.monotonic()
        for s, what in ((silent, b"headers"), (half, b"headers"), (stalled, b"body")):
            got = s.recv(4096)
            assert got.startswith(b"HTTP/1.1 408 ") and b'"error":"request_timeout"' in got
            assert what in got
            assert s.recv(4096) == b""  # closed
            s.close()
        assert 1.6 < time.monotonic() - t0 < 10
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                s.sendall(piece)
                time.sleep(0.4)  # 0.8 s from the first piece to the last
            assert _read_until(s, b"}").startswith(b"HTTP/1.1 200 ")
            time.sleep(2.5)  # idle on a kept-alive connection, past the timeout
            s.sendall(head)
            part = len(body) // 4 + 1
            for start in range(0, len(body), part):  # 4 parts 1.2 s apart: 4.8 s in all
                time.sleep(1.2)
                s.sendall(body[start : start + part])
            assert _read_until(s, b"}]}").startswith(b"HTTP/1.1 200 ")
