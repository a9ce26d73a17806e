"""Model reload (admin endpoint) and the micro-batcher."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from detector import artifact
from detector.detector import Detector
from serving.batcher import MicroBatcher
from training.pipeline import TrainOutcome


@pytest.fixture
def second_artifact(trained: TrainOutcome, tmp_path: Path) -> Path:
    """Same network, calibrated for another FPR: a different model version."""
    det = trained.detector
    out = tmp_path / "v2"
    artifact.save(
        out,
        det.model,
        det.calibration.with_fpr(0.2),
        det.input_spec,
        reference=det.reference,
        head=det.head,
    )  # type: ignore[union-attr]
    return out


@pytest.fixture
def corrupt_artifact(trained: TrainOutcome, tmp_path: Path) -> Path:
    assert trained.path is not None
    out = tmp_path / "bad"
    shutil.copytree(trained.path, out)
    p = out / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    return out


KEY = {"x-api-key": "k"}


def test_reload_swaps_a_good_artifact_and_refuses_a_bad_one(
    make_client,
    trained: TrainOutcome,
    second_artifact: Path,
    corrupt_artifact: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    c: TestClient = make_client(enable_admin=True, api_key="k", model_root=str(tmp_path))
    c.headers.update(KEY)
    x = {"instances": [[0.1] * 64]}
    v1 = trained.detector.model_version
    assert c.post("/score", json=x).json()["model_version"] == v1

    r = c.post("/admin/reload", json={"model_dir": str(corrupt_artifact)})
    assert r.status_code == 409
    assert f"reload refused, still serving {v1}" in r.json()["detail"]
    assert "weights.safetensors does not match its SHA-256" in r.json()["detail"]
    assert c.post("/score", json=x).json()["model_version"] == v1

    r = c.post("/admin/reload", json={"model_dir": str(second_artifact)})
    assert r.status_code == 200, r.text
    v2 = r.json()["model_version"]
    assert v2 != v1 and r.json()["previous_version"] == v1
    body = c.post("/score", json=x).json()
    assert body["model_version"] == v2 and body["target_fpr"] == 0.2
    assert c.get("/readyz").json()["model_version"] == v2

    text = c.get("/metrics").text
    assert 'vae_anomaly_model_reloads_total{result="failure"} 1.0' in text
    assert 'vae_anomaly_model_reloads_total{result="success"} 1.0' in text
    assert f'vae_anomaly_model_info{{model_version="{v2}"}} 1.0' in text
    assert f'vae_anomaly_model_info{{model_version="{v1}"}} 0.0' in text
    assert "vae_anomaly_target_fpr 0.2" in text

    _ = c.post("/admin/reload", content=b"{oops", headers={"content-type": "application/json"})
    assert _.status_code == 400 and "malformed JSON" in _.json()["detail"]


def test_reload_requires_the_api_key(make_client, second_artifact: Path) -> None:  # type: ignore[no-untyped-def]
    c: TestClient = make_client(
        enable_admin=True, api_key="k", model_root=str(second_artifact.parent)
    )
    assert c.post("/admin/reload", json={"model_dir": str(second_artifact)}).status_code == 401
    assert (
        c.post(
            "/admin/reload", json={"model_dir": str(second_artifact)}, headers={"x-api-key": "K"}
        ).status_code
        == 401
    )
    assert (
        c.post(
            "/admin/reload", json={"model_dir": str(second_artifact)}, headers={"x-api-key": "k"}
        ).status_code
        == 200
    )


def test_admin_needs_an_api_key() -> None:
    from detector.errors import ConfigError
    from serving.settings import Settings

    with pytest.raises(ConfigError, match="enable_admin needs an API key"):
        Settings(enable_admin=True)


def test_reload_only_loads_inside_the_model_root(
    make_client, second_artifact: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "models"
    root.mkdir()
    c: TestClient = make_client(enable_admin=True, api_key="k", model_root=str(root))
    c.headers.update(KEY)
    escape = root / "link"
    escape.symlink_to(second_artifact)  # a symlink inside the root pointing out of it
    for asked in ("/etc", str(second_artifact), str(escape), str(root / ".." / "v2"), str(root)):
        r = c.post("/admin/reload", json={"model_dir": asked})
        assert r.status_code == 403, (asked, r.text)
        assert r.json()["detail"] == "model_dir must be an artifact directory inside the model root"
    r = c.post("/admin/reload", json={"model_dir": "x" * 100_000})
    assert r.status_code == 400 and "at most 4096 characters" in r.json()["detail"]
    r = c.post("/admin/reload", json={"model_dir": str(root / "missing")})
    assert r.status_code == 409  # inside the root: refused by the artifact check, still serving
    shutil.copytree(second_artifact, root / "v2")
    assert c.post("/admin/reload", json={"model_dir": str(root / "v2")}).status_code == 200
    text = c.get("/metrics").text
    assert 'vae_anomaly_model_reloads_total{result="failure"} 1.0' in text


def test_batcher_gathers_concurrent_requests_and_keeps_results_apart(trained: TrainOutcome) -> None:
    det = trained.detector
    assert trained.split.x_test is not None
    xs = [
        trained.split.x_test[i : i + k]
        for i, k in zip(range(0, 60, 6), [1, 2, 3, 1, 5, 2, 1, 4, 1, 2], strict=True)
    ]
    batches: list[int] = []

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(
            lambda: det, max_batch_size=64, max_wait=0.05, on_batch=lambda n, s: batches.append(n)
        )
        b.start()
        try:
            results = await asyncio.gather(*(b.submit(x) for x in xs))
        finally:
            await b.stop()
        return [parts["score"] for parts, used in results]

    got = asyncio.run(main())
    assert sum(batches) == sum(len(x) for x in xs)
    assert max(batches) > 1 and len(batches) < len(xs)  # requests shared forward passes
    for x, s in zip(xs, got, strict=True):
        # the score is a sum of terms of hundreds of nats, each float32 (about 1e-6 relative)
        np.testing.assert_allclose(s, det.score(x).score, rtol=1e-5, atol=1e-3)


def test_batcher_caps_batch_size_and_reports_errors(trained: TrainOutcome) -> None:
    det = trained.detector
    x = trained.split.x_cal[:3]
    batches: list[int] = []

    class Broken(Detector):
        def score_validated(self, x: np.ndarray) -> dict[str, np.ndarray]:
            raise RuntimeError("kaboom")

    async def main() -> None:
        b = MicroBatcher(
            lambda: det, max_batch_size=4, max_wait=0.05, on_batch=lambda n, s: batches.append(n)
        )
        b.start()
        await asyncio.gather(*(b.submit(x) for _ in range(4)))
        await b.stop()
        broken = Broken(
            det.model, det.calibration, det.input_spec, reference=det.reference, head=det.head
        )
        b2 = MicroBatcher(lambda: broken, max_wait=0.0)
        b2.start()
        with pytest.raises(RuntimeError, match="kaboom"):
            await b2.submit(x)
        await b2.stop()

    asyncio.run(main())
    assert sum(batches) == 12 and max(batches) <= 6  # a batch stops growing once it reaches 4 rows


def _thread_spy(det: Detector, threads: list[str], seconds: float = 0.0) -> Detector:
    """``det``, noting in ``threads`` the name of the thread of every scoring call (which takes
    at least ``seconds``)."""
    import threading

    class Spy(Detector):
        def score_validated(self, x: np.ndarray) -> dict[str, np.ndarray]:
            threads.append(threading.current_thread().name)
            time.sleep(seconds)
            return super().score_validated(x)

    return Spy(det.model, det.calibration, det.input_spec, reference=det.reference, head=det.head)


def test_a_lone_small_request_is_scored_on_the_callers_thread(trained: TrainOutcome) -> None:
    """``alone=True`` (no other request in flight): a request of at most INLINE_ROWS rows is
    scored right away on the event loop's thread, with the queued path's results; a larger one,
    or one that is not alone, goes through the inference thread."""
    import threading

    from serving.batcher import INLINE_ROWS

    det = trained.detector
    assert trained.split.x_test is not None
    x = trained.split.x_test[:3]
    threads: list[str] = []
    spy = _thread_spy(det, threads)
    batches: list[int] = []

    async def main() -> list[dict[str, np.ndarray]]:
        b = MicroBatcher(lambda: spy, max_wait=0.0, on_batch=lambda n, s: batches.append(n))
        b.start()
        try:
            inline, _ = await b.submit(x, alone=True)
            queued, _ = await b.submit(x)
            big, _ = await b.submit(trained.split.x_test[: INLINE_ROWS + 1], alone=True)
        finally:
            await b.stop()
        return [inline, queued, big]

    inline, queued, big = asyncio.run(main())
    assert len(big["score"]) == INLINE_ROWS + 1
    main_thread = threading.main_thread().name
    assert threads[0] == main_thread and threads[1] != main_thread and threads[2] != main_thread
    np.testing.assert_array_equal(inline["score"], queued["score"])
    assert batches == [3, 3, INLINE_ROWS + 1]  # every path is counted in the batch metrics


def test_the_same_clients_next_request_stays_inline(trained: TrainOutcome) -> None:
    """Right after a request scored inline, another connection's request is taken for traffic
    the blocked loop could not see, and queued (batches still form); the same connection's
    next request cannot be such traffic (its client was waiting for the answer): inline."""
    import threading

    det = trained.detector
    assert trained.split.x_test is not None
    x = trained.split.x_test[:1]
    threads: list[str] = []
    # each scoring takes 50 ms, so back-to-back requests surely come within one scoring time
    # of the previous one's end, however busy the machine
    spy = _thread_spy(det, threads, seconds=0.05)
    a, b = ("127.0.0.1", 50001), ("127.0.0.1", 50002)

    async def main() -> None:
        batcher = MicroBatcher(lambda: spy, max_wait=0.0)
        batcher.start()
        try:
            for source in (a, a, a, b, None):
                await batcher.submit(x, alone=True, source=source)
        finally:
            await batcher.stop()

    asyncio.run(main())
    inline = [t == threading.main_thread().name for t in threads]
    # a (nothing before it); a again, and again; b hard on a's end: queued; then a request of
    # unknown connection hard on b's end: queued
    assert inline == [True, True, True, False, False]


def test_a_batch_gathers_requests_a_few_loop_turns_behind_it(trained: TrainOutcome) -> None:
    """With no wait on a clock (max_wait 0), a batch still takes in requests that reach the
    queue within GATHER_TURNS turns of the event loop (as a request whose bytes are already in
    its socket does); without those turns the first is scored as it comes."""
    from serving.batcher import GATHER_TURNS

    det = trained.detector
    assert trained.split.x_test is not None
    x = trained.split.x_test[:1]

    async def late(batcher: MicroBatcher, turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await batcher.submit(x)

    async def batches(gather_turns: int) -> list[int]:
        sizes: list[int] = []
        batcher = MicroBatcher(
            lambda: det,
            max_wait=0.0,
            gather_turns=gather_turns,
            on_batch=lambda n, s: sizes.append(n),
        )
        batcher.start()
        try:
            await asyncio.gather(late(batcher, 0), late(batcher, 2), late(batcher, GATHER_TURNS))
        finally:
            await batcher.stop()
        return sizes

    assert asyncio.run(batches(GATHER_TURNS)) == [3]
    # without: the first is scored alone (the others queue while it runs, and may pair up)
    without = asyncio.run(batches(0))
    assert without[0] == 1 and sum(without) == 3
