"""The bulk histogram update equals observing values one by one."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from detector.drift import ks_distance
from serving.metrics import observe_many


def _histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("h", "test", buckets=(-5.0, 0.0, 1.5, 10.0), registry=registry)


def test_observe_many_equals_one_by_one() -> None:
    values = np.concatenate(
        [np.random.default_rng(0).normal(0, 5, 1000), [-5.0, 0.0, 1.5, 10.0, 1e9, -1e9]]
    )
    one, bulk = CollectorRegistry(), CollectorRegistry()
    h1, h2 = _histogram(one), _histogram(bulk)
    for v in values.tolist():
        h1.observe(v)
    observe_many(h2, values[:500])
    observe_many(h2, values[500:])
    observe_many(h2, np.array([]))
    text1, text2 = generate_latest(one).decode(), generate_latest(bulk).decode()

    def counts(text: str) -> list[str]:
        return [x for x in text.splitlines() if x.startswith(("h_bucket", "h_count"))]

    assert counts(text1) == counts(text2)
    assert 'h_bucket{le="+Inf"} 1006.0' in counts(text2)
    assert f'h_bucket{{le="0.0"}} {float((values <= 0).sum())}' in counts(text2)
    # (the exposition omits _sum when a bucket is negative; read the stored sums)
    assert abs(h1._sum.get() - h2._sum.get()) < 1e-6 * max(1.0, abs(h1._sum.get()))


def test_a_killed_workers_live_gauges_are_dropped(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess

    from serving.metrics import forget_dead_workers

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs, as a SIGKILLed worker's
    me = os.getpid()
    for name in (
        f"gauge_livesum_{gone.pid}.db",  # its in-flight requests: must go
        f"gauge_livemax_{gone.pid}.db",
        f"counter_{gone.pid}.db",  # what it counted stays counted
        f"gauge_livesum_{me}.db",  # a worker that runs keeps its gauges
    ):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert forget_dead_workers() == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"gauge_livesum_{me}.db"]
    )


def _gauge(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def test_drift_gauges_stay_low_on_normal_traffic_and_rise_on_a_shift(  # type: ignore[no-untyped-def]
    client, trained
) -> None:
    """The service's drift test: normal test images keep the martingale below its alarm level;
    the other digits push it past it; /metadata says what the numbers mean."""
    x = trained.split.x_test.reshape(len(trained.split.x_test), -1)
    y = trained.split.y_test
    normal, anomalous = x[y == 0], x[y == 1]
    for start in range(0, len(normal), 16):
        r = client.post("/score", json={"instances": normal[start : start + 16].tolist()})
        assert r.status_code == 200
    text = client.get("/metrics").text
    level = _gauge(text, "vae_anomaly_drift_alarm_level")
    assert abs(level - np.log(100)) < 1e-9
    assert _gauge(text, "vae_anomaly_drift_log_martingale_max") < level
    assert _gauge(text, "vae_anomaly_drift_window_size") == len(normal)
    client.post("/score", json={"instances": anomalous[:300].tolist()})
    text = client.get("/metrics").text
    assert _gauge(text, "vae_anomaly_drift_log_martingale_max") >= level
    assert _gauge(text, "vae_anomaly_drift_ks") > 0.3
    meta = client.get("/metadata").json()["drift"]
    assert meta["alpha"] == 0.01 and meta["rows"] == len(normal) + 300


def test_deferred_drift_blocks_equal_row_by_row() -> None:
    """Scores queued a request at a time and flushed in blocks give the martingale, the window
    and the KS statistic that updating row by row gives (same seed: the same uniforms)."""
    from detector.threshold import Calibration
    from serving.metrics import DriftMonitor

    rng = np.random.default_rng(7)
    cal = Calibration.fit(rng.normal(size=500), target_fpr=0.01)
    stream = np.concatenate([rng.normal(size=700), rng.normal(1.5, 1.0, size=300)])
    one, blocks = DriftMonitor(cal, 0.01, 400), DriftMonitor(cal, 0.01, 400)
    for v in stream:
        one.update(np.array([v]))
        if blocks.add(np.array([v])):
            blocks.flush()
    assert blocks.pending_rows == len(stream) % DriftMonitor.FLUSH_ROWS
    assert blocks.flush() and not blocks.flush()
    a, b = one.test.martingale, blocks.test.martingale
    assert b.n == a.n == len(stream)
    assert b.log_value == pytest.approx(a.log_value, rel=1e-9)
    assert b.log_max == pytest.approx(a.log_max, rel=1e-9) and b.log_max > np.log(100)
    assert list(blocks.window) == list(one.window)
    # the KS statistic is taken every KS_EVERY rows (row by row: also at the first): the
    # blocks' last one at row 768, of the 400 before it
    assert blocks.ks == pytest.approx(ks_distance(stream[368:768], one.cal), abs=1e-12)
    assert one.ks == pytest.approx(ks_distance(stream[369:769], one.cal), abs=1e-12)


def test_served_scores_reach_the_drift_gauges_within_the_flush_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A few scores, fewer than a block: the loop's timer runs them through the test after
    FLUSH_SECONDS, with no scrape to force it; the gauges then count them."""
    import asyncio

    from detector.threshold import Calibration
    from serving.metrics import DriftMonitor, Metrics

    monkeypatch.setattr(DriftMonitor, "FLUSH_SECONDS", 0.02)
    rng = np.random.default_rng(8)
    metrics = Metrics(CollectorRegistry())
    metrics.set_model("v1", Calibration.fit(rng.normal(size=300), target_fpr=0.01))

    async def main() -> tuple[int, int, float]:
        for _ in range(5):
            metrics.observe_scores(rng.normal(size=2), np.zeros(2, bool))
        assert metrics.drift is not None
        waiting = metrics.drift.pending_rows
        await asyncio.sleep(0.1)
        text = generate_latest(metrics.registry).decode()  # (not exposition(): it would flush)
        return (
            waiting,
            metrics.drift.test.martingale.n,
            _gauge(text, "vae_anomaly_drift_window_size"),
        )

    waiting, tested, window = asyncio.run(main())
    assert waiting == 10  # queued, not yet tested
    assert tested == 10 and window == 10.0  # the timer flushed them
