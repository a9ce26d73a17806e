"""Prometheus metrics of the service, all under the ``vae_anomaly_`` prefix.

One ``Metrics`` object per app, bound to a registry (a fresh one per test; the default registry in
production). With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before start-up and
``/metrics`` aggregates every worker's files (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from detector._io import process_alive
from detector.drift import DEFAULT_ALPHA, DriftTest, alarm_level, ks_distance
from detector.threshold import Calibration
from serving.listen import ConnectionTable, open_table

PREFIX = "vae_anomaly"
ROUTES = ("/score", "/metadata", "/healthz", "/readyz", "/metrics", "/admin/reload")
# the Open Inference Protocol's routes, their model name and version folded into the label
V2_INFER = "/v2/models/{name}/infer"
V2_ROUTES = ("/v2", "/v2/health/live", "/v2/health/ready", V2_INFER, "/v2/models/{name}")


def route_label(path: str) -> str:
    """The ``route`` label of a request path: a known route, or ``other`` (bounded values)."""
    if path in ROUTES:
        return path
    if path.startswith("/v2"):
        if path.startswith("/v2/models/"):
            return V2_INFER if path.endswith("/infer") else "/v2/models/{name}"
        if path in V2_ROUTES:
            return path
    return "other"


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
CALIBRATION_QUANTILES = (0.5, 0.9, 0.99)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


_DB_PID = re.compile(r"_(\d+)\.db$")


def forget_dead_workers() -> list[int]:
    """Drop the live gauges of workers that no longer run (a SIGKILLed worker never marks
    itself dead): its in-flight requests would otherwise be reported for ever. Each worker does
    it at start and at every scrape; returns the process ids it dropped."""
    from prometheus_client import multiprocess

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return []
    pids = {int(m.group(1)) for p in Path(folder).glob("*.db") if (m := _DB_PID.search(p.name))}
    dead = [pid for pid in sorted(pids) if not process_alive(pid)]
    for pid in dead:
        multiprocess.mark_process_dead(pid, folder)
    return dead


def score_buckets(cal: Calibration) -> tuple[float, ...]:
    """Histogram buckets placed from the calibration scores: their quantiles up to the threshold,
    then steps above it where anomalies land."""
    s = np.asarray(cal.scores)
    qs = np.quantile(s, [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
    spread = max(float(np.quantile(s, 0.75) - np.quantile(s, 0.25)), 1e-6)
    above = [cal.threshold + k * spread for k in (0.5, 1, 2, 4, 8, 16, 32)]
    edges = sorted({round(float(v), 6) for v in [*qs, cal.threshold, *above]})
    return tuple(edges)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every v, in one pass: one increment per touched bucket.

    Observing 1,000 scores one by one costs ~5 ms in multiprocess mode (each ``inc`` writes to a
    memory-mapped file); counting them with numpy first costs a few microseconds. This reads
    prometheus_client's histogram fields (``_upper_bounds``, ``_buckets``, ``_sum``), stable
    since 0.4; a test checks the result equals observing one by one, and without those fields it
    falls back to that.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in np.asarray(values, dtype=np.float64).tolist():
            histogram.observe(v)
        return
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size <= 8:  # a few values: observing each is cheaper than the numpy pass
        for value in v.tolist():
            histogram.observe(value)
        return
    index = np.searchsorted(np.asarray(bounds), v, side="left")  # first bound >= v
    counts = np.bincount(index[index < len(bounds)], minlength=len(bounds))  # NaN: no bucket
    total.inc(float(v.sum()))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))


class WorkerConnections(Collector):
    """``vae_anomaly_worker_connections{pid}``: each worker's open HTTP connections, read at the
    scrape from the balanced listener's shared table (several workers; ``serving.listen``)."""

    def __init__(self, table: ConnectionTable) -> None:
        self.table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_worker_connections",
            "Open HTTP connections held by each worker process (several workers).",
            labels=["pid"],
        )
        for pid, connections in self.table.workers():
            family.add_metric([str(pid)], connections)
        yield family


class DriftMonitor:
    """This worker's drift test over the scores it serves (``detector.drift``): the conformal
    test martingale of their online p-values against the calibration scores, and the KS
    statistic of its last ``window`` scores. Reset when a model is loaded.

    Served scores wait in ``pending`` and join the test a block at a time (``flush``: when
    ``FLUSH_ROWS`` are waiting, ``FLUSH_SECONDS`` after the first of them, and before anything
    reads the test): ranking a block costs about what ranking one row does, so a single-instance
    request pays a list append instead of ~35 µs of small numpy calls. The p-values and the
    martingale are the same as row by row (``OnlineConformal`` ranks a block's rows in order)."""

    KS_EVERY = 256  # scores between two KS statistics (each costs a sort of the window)
    FLUSH_ROWS = 256
    FLUSH_SECONDS = 0.25

    def __init__(
        self,
        calibration: Calibration,
        alpha: float,
        window: int,
        background: Executor | None = None,
    ) -> None:
        """``background``: where the test's large merges of served scores run, off the event
        loop (``detector.drift.OnlineConformal``)."""
        self.cal = np.sort(np.asarray(calibration.scores, np.float64))
        self.test = DriftTest(self.cal, alpha=alpha, seed=os.getpid(), background=background)
        self.window: deque[float] = deque(maxlen=window)
        self.since_ks = 0
        self.ks = 0.0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def add(self, scores: np.ndarray) -> bool:
        """Queue served scores; True when enough wait that the caller should ``flush`` now."""
        self.pending.append(scores)
        self.pending_rows += len(scores)
        return self.pending_rows >= self.FLUSH_ROWS

    def flush(self) -> bool:
        """Run the waiting scores through the test; False if none were waiting."""
        if not self.pending:
            return False
        block = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.pending, self.pending_rows = [], 0
        self.update(block)
        return True

    def update(self, scores: np.ndarray) -> None:
        finite = np.asarray(scores, np.float64)
        finite = finite[np.isfinite(finite)]
        self.test.martingale.update(self.test.online.p_values(finite))
        self.window.extend(finite.tolist())
        self.since_ks += finite.size
        if self.since_ks >= self.KS_EVERY or (self.since_ks and not self.ks):
            self.ks = ks_distance(np.fromiter(self.window, np.float64), self.cal)
            self.since_ks = 0


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        drift_alpha: float = DEFAULT_ALPHA,
        drift_window: int = 1000,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.drift_alpha, self.drift_window = drift_alpha, drift_window
        self.drift: DriftMonitor | None = None
        # one thread for the drift test's large merges, so the event loop never sorts a large
        # bag (its counts of distinct rounded scores: ~10 ms at the most); started on first use
        self._drift_merges = ThreadPoolExecutor(1, thread_name_prefix="vae-anomaly-drift")
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "HTTP request latency by route.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Time of one batched forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Samples per forward pass (micro-batching).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.scored = Counter(f"{PREFIX}_scored_samples", "Samples scored.", registry=r)
        self.anomalies = Counter(f"{PREFIX}_anomalies", "Samples flagged as anomalous.", registry=r)
        self.score: Histogram | None = None  # buckets come from the first model's calibration
        self.threshold = Gauge(
            f"{PREFIX}_threshold",
            "Calibrated anomaly threshold (nats).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.target_fpr = Gauge(
            f"{PREFIX}_target_fpr",
            "Target false-positive rate of the threshold.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.calibration_quantile = Gauge(
            f"{PREFIX}_calibration_score_quantile",
            "Quantiles of the calibration scores (held-out normal data): the reference for score-shift alerts.",
            ["quantile"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The model served (value 1 for the current version).",
            ["model_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_requests",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            f"{PREFIX}_model_reloads", "Model reloads by result.", ["result"], registry=r
        )
        # the drift test, one per worker (pid label with several workers): see detector.drift
        self.drift_log_martingale = Gauge(
            f"{PREFIX}_drift_log_martingale",
            "Log of the conformal test martingale over this worker's served p-values since the "
            "model was loaded; past drift_alarm_level (log 1/alpha) the traffic has stopped "
            "looking like the calibration data, with false-alarm probability <= alpha.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.drift_log_martingale_max = Gauge(
            f"{PREFIX}_drift_log_martingale_max",
            "The largest log martingale since the model was loaded (what the alert compares).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.drift_alarm_level = Gauge(
            f"{PREFIX}_drift_alarm_level",
            "log(1 / alpha): the martingale's alarm level (alpha = the false-alarm bound).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_ks = Gauge(
            f"{PREFIX}_drift_ks",
            "Kolmogorov-Smirnov statistic of the last drift_window_size served scores against "
            "the calibration scores (0 = same distribution, 1 = disjoint).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_window_size = Gauge(
            f"{PREFIX}_drift_window_size",
            "Scores in the KS statistic's window.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._connections: ConnectionTable | None = None  # several workers: opened at a scrape
        for route in (*ROUTES, *V2_ROUTES):
            method = "POST" if route in ("/score", "/admin/reload", V2_INFER) else "GET"
            self.request_latency.labels(route, method)
        for result in ("success", "failure"):
            self.reloads.labels(result)

    def set_model(
        self, version: str, calibration: Calibration, previous: str | None = None
    ) -> None:
        if self.score is None:
            self.score = Histogram(
                f"{PREFIX}_score",
                "Anomaly scores (-ELBO, nats); buckets placed from the calibration scores.",
                buckets=score_buckets(calibration),
                registry=self.registry,
            )
        if previous is not None and previous != version:
            self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)
        self.threshold.set(calibration.threshold)
        self.target_fpr.set(calibration.target_fpr)
        self.drift = DriftMonitor(
            calibration, self.drift_alpha, self.drift_window, self._drift_merges
        )
        self.drift_alarm_level.set(alarm_level(self.drift_alpha))
        self._set_drift()
        for q in CALIBRATION_QUANTILES:
            self.calibration_quantile.labels(str(q)).set(float(np.quantile(calibration.scores, q)))

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and observe its latency (labelled children cached)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.request_latency.labels(route, method),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_scores(self, scores: np.ndarray, flags: np.ndarray) -> None:
        self.scored.inc(len(scores))
        self.anomalies.inc(int(flags.sum()))
        if self.score is not None:
            observe_many(self.score, scores)
        drift = self.drift
        if drift is None:
            return
        if drift.add(scores):
            self.flush_drift()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a test calling in directly): now
                self.flush_drift()
            else:
                self._flush_timer = loop.call_later(drift.FLUSH_SECONDS, self.flush_drift)

    def flush_drift(self) -> None:
        """Bring the drift test and its gauges up to date with every score served so far."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.drift is not None and self.drift.flush():
            self._set_drift()

    def _set_drift(self) -> None:
        d = self.drift
        if d is None:
            return
        m = d.test.martingale
        self.drift_log_martingale.set(m.log_value)
        self.drift_log_martingale_max.set(m.log_max)
        self.drift_ks.set(d.ks)
        self.drift_window_size.set(len(d.window))

    def process_exiting(self) -> None:
        """With several workers, drop this process's live gauges (model info, threshold, ...) from
        the shared metric files, so a worker replaced on reload stops reporting its old model."""
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def exposition(self) -> tuple[bytes, str]:
        self.flush_drift()
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            forget_dead_workers()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            if self._connections is None:
                self._connections = open_table()
            if self._connections is not None:
                registry.register(WorkerConnections(self._connections))
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
