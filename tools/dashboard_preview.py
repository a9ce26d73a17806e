"""Render a picture of what the Grafana dashboard shows, from the real service's metrics.

Grafana cannot be installed on the machine this project is built on, so this script starts the
service, sends traffic in three phases (normal digits; a burst of other digits, as an incident
would; normal again), scrapes ``/metrics`` every second, computes what the dashboard's queries
compute (rates, latency quantiles, anomaly share, batch sizes, the score distribution) and draws
the panels with matplotlib.

    python tools/dashboard_preview.py --model runs/mnist-0 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

from detector.artifact import load as load_artifact
from training.data import load_mnist
from vae_anomaly.bench.process import ServerProcess


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def hist_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if np.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return buckets[-2][0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=int, default=90, help="length of the traffic (three phases)")
    args = ap.parse_args()

    art = load_artifact(args.model)
    c = art.config["data"].get("normal_class", 0)
    ds = load_mnist()
    assert ds.x_test is not None and ds.y_test is not None
    normal, other = ds.x_test[ds.y_test == c], ds.x_test[ds.y_test != c]
    server = ServerProcess(args.model, "--log-level", "warning")
    url = server.url
    try:
        server.wait_ready()
        stop = threading.Event()
        phase = {"p": 0}
        rng = np.random.default_rng(0)

        def client() -> None:
            while not stop.is_set():
                burst = phase["p"] == 1
                pool = other if burst and rng.random() < 0.6 else normal
                n = int(rng.integers(1, 8))
                x = pool[rng.integers(0, len(pool), n)].reshape(n, -1).round(3).tolist()
                if rng.random() < 0.03:  # a few malformed requests
                    x = [[0.0] * 10]
                req = urllib.request.Request(
                    url + "/score",
                    data=json.dumps({"instances": x}).encode(),
                    headers={"content-type": "application/json"},
                )
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(req, timeout=5).read()
                time.sleep(float(rng.uniform(0.0, 0.01)))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        samples: list[tuple[float, dict[str, float]]] = []
        t0 = time.time()
        while (elapsed := time.time() - t0) < args.seconds:
            phase["p"] = 1 if args.seconds / 3 <= elapsed < 2 * args.seconds / 3 else 0
            samples.append((elapsed, scrape(url)))
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.stop()
    draw(samples, Path(args.out), art.model_version, args.seconds)


def _series(samples: list[tuple[float, dict[str, float]]], prefix: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for _, m in samples:
        for k, v in m.items():
            if k.startswith(prefix):
                out[k].append(v)
    return out


def draw(
    samples: list[tuple[float, dict[str, float]]], out: Path, version: str, seconds: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = 10  # rate window, seconds (samples are 1 s apart)
    ts = np.array([t for t, _ in samples])
    last = samples[-1][1]

    def get(key: str) -> np.ndarray:
        return np.array([m.get(key, 0.0) for _, m in samples])

    def rate(a: np.ndarray) -> np.ndarray:
        r = np.full_like(a, np.nan)
        r[w:] = (a[w:] - a[:-w]) / (ts[w:] - ts[:-w])
        return r

    def buckets(name: str, extra: str = "") -> tuple[list[float], np.ndarray]:
        keys = [k for k in last if k.startswith(name + "_bucket{") and extra in k]
        les = [float(k.split('le="')[1].split('"')[0]) for k in keys]
        order = np.argsort(les)
        return [les[i] for i in order], np.stack([get(keys[i]) for i in order], axis=1)

    def quantile_series(q: float, les: list[float], cum: np.ndarray) -> np.ndarray:
        out = np.full(len(ts), np.nan)
        for i in range(w, len(ts)):
            d = cum[i] - cum[i - w]
            if d[-1] > 0:
                out[i] = hist_quantile(q, list(zip(les, d, strict=True)))
        return out

    fig, axes = plt.subplots(3, 2, figsize=(13, 10.5))
    fig.suptitle(
        f"vae-anomaly dashboard (rendered from the live service's metrics)   model {version}",
        fontsize=12,
    )
    burst = (seconds / 3, 2 * seconds / 3)
    for ax in axes.flat:
        ax.axvspan(*burst, color="0.93", zorder=0)
        ax.set_xlabel("time (s); shaded: burst of other digits")
        ax.grid(alpha=0.3)

    ax = axes[0, 0]
    for status in ("200", "422"):
        key = f'vae_anomaly_requests_total{{method="POST",route="/score",status="{status}"}}'
        ax.plot(ts, rate(get(key)), label=status)
    ax.set_title("Requests per second by status (POST /score)")
    ax.set_ylabel("req/s")
    ax.legend()

    ax = axes[0, 1]
    les, cum = buckets("vae_anomaly_request_duration_seconds", 'route="/score"')
    for q in (0.5, 0.9, 0.99):
        ax.plot(ts, 1000 * quantile_series(q, les, cum), label=f"p{int(q * 100)}")
    ax.set_title("Latency of POST /score")
    ax.set_ylabel("ms")
    ax.legend()

    ax = axes[1, 0]
    share = rate(get("vae_anomaly_anomalies_total")) / rate(get("vae_anomaly_scored_samples_total"))
    target = last["vae_anomaly_target_fpr"]
    ax.plot(ts, 100 * share, label="flagged share")
    ax.axhline(100 * target, color="green", ls="--", label=f"target FPR {target:.0%}")
    ax.axhline(500 * target, color="red", ls=":", label="alert level (5x target)")
    ax.set_title("Anomaly rate vs calibrated target FPR")
    ax.set_ylabel("%")
    ax.legend()

    ax = axes[1, 1]
    mean_batch = rate(get("vae_anomaly_batch_size_sum")) / rate(get("vae_anomaly_batch_size_count"))
    ax.plot(ts, mean_batch)
    ax.set_title("Mean rows per forward pass (micro-batching)")
    ax.set_ylabel("rows")

    ax = axes[2, 0]
    les, cum = buckets("vae_anomaly_score")
    finite = [i for i, le in enumerate(les) if np.isfinite(le)]
    per_bucket = np.diff(np.concatenate([np.zeros((len(ts), 1)), cum[:, finite]], axis=1), axis=1)
    inc = np.zeros_like(per_bucket)
    inc[w:] = per_bucket[w:] - per_bucket[:-w]
    edges = [les[i] for i in finite]
    ax.imshow(
        inc.T, aspect="auto", origin="lower", cmap="Oranges", extent=(ts[0], ts[-1], 0, len(edges))
    )
    thr = last["vae_anomaly_threshold"]
    thr_pos = int(np.searchsorted(edges, thr)) + 0.5
    ax.axhline(thr_pos, color="red", lw=1.5, label=f"threshold {thr:.1f}")
    step = max(1, len(edges) // 8)
    ax.set_yticks(np.arange(0, len(edges), step) + 0.5, [f"{e:.0f}" for e in edges[::step]])
    ax.set_title("Score distribution over time (bucket counts per 10 s)")
    ax.set_ylabel("score bucket (le, nats)")
    ax.legend(loc="upper left")

    ax = axes[2, 1]
    les, cum = buckets("vae_anomaly_score")
    ax.plot(ts, quantile_series(0.5, les, cum), label="served median")
    for q, style in (("0.5", "--"), ("0.9", ":")):
        ax.axhline(
            last[f'vae_anomaly_calibration_score_quantile{{quantile="{q}"}}'],
            ls=style,
            color="gray",
            label=f"calibration q{q}",
        )
    ax.axhline(thr, color="red", lw=1, label="threshold")
    ax.set_title("Median score vs calibration quantiles")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
