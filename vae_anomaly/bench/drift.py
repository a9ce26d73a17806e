"""The drift test's benchmark: false alarms on normal traffic, and how soon it sees a shift.

The benchmark trains its own model (the defaults; MNIST one-vs-rest by default) on the normal
class's training images *less* ``held_out`` of them, drawn at random first: those are fresh
normal traffic, exchangeable with the model's calibration images (same source, never seen). A
stream is the held-out images in a random order; a shifted stream keeps its first ``clean`` rows
normal, then replaces each later row by another class's test image with probability q (5 %, 20
%, 50 %), or with a probability that ramps from 0 to 50 % over the rest of the stream. One more
scenario streams the normal class's *test* images: other writers (MNIST's test split was
written by different people than its training split), normal for a user but not exchangeable
with the calibration data.

Each stream goes through the real service (``vae-anomaly serve`` as a child process, one
instance per request, in order; ``POST /admin/reload`` of the same artifact before each stream
restarts the test) and, as a CSV file, through ``vae-anomaly score``'s batch path; the first row
at which the test alarms is read from ``/metadata`` and from the run summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv

from detector._io import atomic_output, write_json
from detector.detector import Detector
from detector.errors import ConfigError

SCENARIOS: tuple[tuple[str, float | str], ...] = (
    ("normal", 0.0),
    ("5 % other classes", 0.05),
    ("20 % other classes", 0.2),
    ("50 % other classes", 0.5),
    ("ramp 0 -> 50 %", "ramp"),
    ("test split, same class", "test"),
)
API_KEY = "drift-benchmark"


def streams(
    normal: npt.NDArray[np.float32],
    other: npt.NDArray[np.float32],
    mix: float | str,
    clean: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """One stream: the normal images in a random order, rows after ``clean`` replaced by other
    digits with probability ``mix`` (or a ramp to 50 %)."""
    x = normal[rng.permutation(len(normal))].copy()
    n = len(x)
    k = np.arange(n)
    if mix == "ramp":
        q = np.where(k < clean, 0.0, 0.5 * (k - clean) / max(n - clean, 1))
    else:
        q = np.where(k < clean, 0.0, float(mix))
    swap = rng.random(n) < q
    x[swap] = other[rng.integers(0, len(other), int(swap.sum()))]
    return x


def run_drift_benchmark(
    out: str | Path,
    *,
    dataset: str = "mnist",
    normal_class: int = 0,
    held_out: int = 1000,
    runs: int = 40,
    shifted_runs: int = 10,
    clean: int = 200,
    alpha: float = 0.01,
    seed: int = 0,
    service: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    from serving.batch import BatchOptions, score_files
    from training.data import load_dataset, split_normal
    from training.pipeline import DataOptions, train_detector

    ds = load_dataset(dataset)
    if ds.y_train is None or ds.x_test is None or ds.y_test is None:
        raise ConfigError(f"{dataset} has no classes: the drift benchmark needs mnist-like data")
    pool = ds.x_train[ds.y_train == normal_class]
    if len(pool) < held_out + 500:
        raise ConfigError(f"class {normal_class} has {len(pool)} training rows: too few")
    perm = np.random.default_rng(seed).permutation(len(pool))
    fresh = pool[perm[:held_out]].reshape(held_out, -1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    echo(
        f"training the default detector on {len(pool) - held_out} images of class "
        f"{normal_class}, {held_out} held out as fresh normal traffic"
    )
    train_detector(
        DataOptions(dataset=dataset, normal_class=normal_class, split_seed=seed),
        dataset=ds,
        split=split_normal(pool[np.sort(perm[held_out:])], seed=seed),
        out=model_dir,
        overwrite=True,
        progress=False,
    )
    det = Detector.load(model_dir)
    x_test = ds.x_test.reshape(len(ds.x_test), -1)
    other = x_test[ds.y_test != normal_class]
    test_normal = x_test[ds.y_test == normal_class]
    results: dict[str, dict[str, list[int | None]]] = {}
    server = _Service(model_dir, alpha) if service else None
    try:
        for label, mix in SCENARIOS:
            n_runs = runs if mix == 0.0 else shifted_runs
            found: dict[str, list[int | None]] = {"service": [], "batch CSV": []}
            for r in range(n_runs):
                rng = np.random.default_rng(seed * 1000 + r)
                if mix == "test":
                    stream = test_normal[rng.permutation(len(test_normal))]
                else:
                    stream = streams(fresh, other, mix, clean, rng)
                if server is not None:
                    found["service"].append(server.first_alarm(stream))
                src = out / "stream.csv"  # a CSV through batch scoring, as a user's file
                pacsv.write_csv(
                    pa.table({f"pixel{j}": stream[:, j] for j in range(stream.shape[1])}), src
                )
                s = score_files(
                    det,
                    [src],
                    out / "stream_scores.parquet",
                    BatchOptions(overwrite=True, drift_alpha=alpha),
                    progress=False,
                )
                found["batch CSV"].append(s.drift["first_alarm_at_row"])
            results[label] = found
            echo(_line(label, found, 0 if mix in (0.0, "test") else clean, len(stream)))
    finally:
        if server is not None:
            server.stop()
        for leftover in ("stream.csv", "stream_scores.parquet", "stream_scores.summary.json"):
            (out / leftover).unlink(missing_ok=True)
    report = {
        "dataset": dataset,
        "normal_class": normal_class,
        "model": str(model_dir),
        "alpha": alpha,
        "stream_rows": held_out,
        "test_rows": len(test_normal),
        "clean_rows": clean,
        "runs": runs,
        "shifted_runs": shifted_runs,
        "results": results,
        "summary": {
            label: _summary(found, 0 if label in ("normal", "test split, same class") else clean)
            for label, found in results.items()
        },
    }
    write_json(out / "drift_benchmark.json", report)
    with atomic_output(out / "drift_benchmark.md", "w") as f:
        f.write(drift_markdown(report))
    return report


def _summary(found: dict[str, list[int | None]], clean: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, alarms in found.items():
        if not alarms:
            continue
        hits = [a for a in alarms if a is not None]
        delays = [a - clean for a in hits]
        out[path] = {
            "runs": len(alarms),
            "alarm_rate": len(hits) / len(alarms),
            "early_alarms": sum(d <= 0 for d in delays),  # before the shift started
            "median_rows_after_shift": float(np.median(delays)) if delays else None,
            "range_rows_after_shift": [min(delays), max(delays)] if delays else None,
        }
    return out


def _line(label: str, found: dict[str, list[int | None]], clean: int, n: int) -> str:
    parts = []
    for path, s in _summary(found, clean).items():
        if clean == 0:
            parts.append(f"{path}: alarms in {s['alarm_rate']:.1%} of {s['runs']} streams")
        else:
            med = s["median_rows_after_shift"]
            parts.append(
                f"{path}: alarm in {s['alarm_rate']:.0%} of {s['runs']}, median "
                + (f"{med:.0f} rows after the shift" if med is not None else "-")
            )
    return f"{label:<18} ({n} rows) " + "; ".join(parts)


def drift_markdown(report: dict[str, Any]) -> str:
    a, clean = report["alpha"], report["clean_rows"]
    lines = [
        f"Drift test on {report['dataset']} class {report['normal_class']} traffic "
        f"({report['stream_rows']} held-out training images a stream, the shift from row "
        f"{clean + 1}; the test split's {report['test_rows']} images; alpha = {a})",
        "",
        "| traffic | path | streams | alarms | alarms before the shift | rows after the shift "
        "until the alarm, median (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for label, by_path in report["summary"].items():
        for path, s in by_path.items():
            rng = s["range_rows_after_shift"]
            delay = (
                "-"
                if label in ("normal", "test split, same class")
                or s["median_rows_after_shift"] is None
                else f"{s['median_rows_after_shift']:.0f} ({rng[0]}-{rng[1]})"
            )
            lines.append(
                f"| {label} | {path} | {s['runs']} | {s['alarm_rate']:.1%} | "
                f"{s['early_alarms']} | {delay} |"
            )
    return "\n".join(lines) + "\n"


class _Service:
    """The real service in a child process, its drift test restarted per stream by a reload."""

    def __init__(self, model_dir: str | Path, alpha: float) -> None:
        import httpx

        from vae_anomaly.bench.process import ServerProcess

        self.model_dir = str(Path(model_dir).resolve())
        self.proc = ServerProcess(
            self.model_dir,
            "--workers",
            "1",
            "--enable-admin",
            "--drift-alpha",
            str(alpha),
            env={"VAE_ANOMALY_API_KEY": API_KEY, "VAE_ANOMALY_ACCESS_LOG": "false"},
        )
        self.proc.__enter__()
        self.client = httpx.Client(base_url=self.proc.url, headers={"x-api-key": API_KEY})

    def first_alarm(self, stream: npt.NDArray[np.float32]) -> int | None:
        r = self.client.post("/admin/reload", json={"model_dir": self.model_dir}, timeout=60)
        r.raise_for_status()
        for row in stream.tolist():
            r = self.client.post(
                "/score",
                content=json.dumps({"instances": [row]}),
                headers={"content-type": "application/json"},
            )
            r.raise_for_status()
        drift = self.client.get("/metadata").json()["drift"]
        if drift["rows"] != len(stream):
            raise RuntimeError(f"the service saw {drift['rows']} rows of {len(stream)}")
        return drift["first_alarm_at_row"]

    def stop(self) -> None:
        self.client.close()
        self.proc.stop()
        time.sleep(0)
