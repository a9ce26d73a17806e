"""Batch-scoring benchmark: file throughput and peak memory against the in-memory limit.

``vae-anomaly batch-benchmark --model DIR`` writes (once, into ``--work-dir``) a 1,000,000-row NPY
file and a 200,000-row CSV file in the MNIST layout (``label,pixel0..pixel783``, values 0-255),
both made of the real MNIST test images repeated, then:

1. scores each file with ``vae-anomaly score`` in a child process (so its peak resident memory is
   its own), and reads rows/s and peak memory from the run's summary;
2. times, in this process, the pure model forward on in-memory tensors (the ELBO graph, no
   complexity term, no I/O) and the full in-memory score (forward + complexity term), the limits a
   file pipeline can approach;
3. where PyOD is installed, times PyOD's VAE ``decision_function`` on the same rows, for reference.

It prints a table and writes ``batch_benchmark.json`` in the work dir.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector._io import atomic_output, write_json
from detector.detector import Detector


@dataclass(frozen=True)
class BatchBenchConfig:
    model: str
    work_dir: Path
    npy_rows: int = 1_000_000
    csv_rows: int = 200_000
    forward_rows: int = 100_000
    pyod_rows: int = 100_000
    chunk_rows: int = 8192
    batch_size: int = 2048
    engine: str = "local"


def _mnist_pixels() -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_mnist

    ds = load_mnist()
    assert ds.x_test is not None and ds.y_test is not None
    return np.rint(ds.x_test.reshape(len(ds.x_test), -1) * 255).astype(np.uint8), ds.y_test


def make_npy(path: Path, rows: int, pixels: np.ndarray) -> None:
    """(rows, 1, 28, 28) float32 in [0, 1], written block by block (no whole array in memory)."""
    if path.exists() and np.load(path, mmap_mode="r").shape[0] == rows:
        return
    with atomic_output(path) as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, 1, 28, 28)}
        np.lib.format.write_array_header_2_0(f, header)
        block = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        for start in range(0, rows, len(block)):
            f.write(block[: min(len(block), rows - start)].tobytes())


def make_csv(path: Path, rows: int, pixels: np.ndarray, labels: np.ndarray) -> None:
    """MNIST layout: label,pixel0..pixel783 with 0-255 values."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if path.exists() and sum(1 for _ in path.open("rb")) == rows + 1:
        return
    names = ["label", *(f"pixel{i}" for i in range(pixels.shape[1]))]
    with atomic_output(path) as f:
        writer = None
        for start in range(0, rows, len(pixels)):
            k = min(len(pixels), rows - start)
            cols = [pa.array(labels[:k].astype(np.int64))] + [
                pa.array(pixels[:k, j].astype(np.int64)) for j in range(pixels.shape[1])
            ]
            table = pa.table(cols, names=names)
            if writer is None:
                writer = pacsv.CSVWriter(
                    f, table.schema, write_options=pacsv.WriteOptions(quoting_style="none")
                )
            writer.write_table(table)
        assert writer is not None
        writer.close()


def _score_run(cfg: BatchBenchConfig, src: Path, scale: float) -> dict[str, Any]:
    out = cfg.work_dir / f"{src.stem}.scores.parquet"
    cmd = [
        sys.executable, "-m", "training.cli", "score", "--model", cfg.model, str(src),
        "--out", str(out), "--overwrite", "--no-progress", "--scale", str(scale),
        "--chunk-rows", str(cfg.chunk_rows), "--batch-size", str(cfg.batch_size),
        "--engine", cfg.engine,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"scoring {src} failed: {proc.stderr.strip().splitlines()[-1]}")
    summary = json.loads(out.with_name(f"{src.stem}.scores.summary.json").read_text())
    return {
        "file": src.name,
        "bytes": src.stat().st_size,
        "rows": summary["rows"],
        "seconds": summary["seconds"],
        "wall_seconds_with_startup": wall,
        "rows_per_second": summary["rows_per_second"],
        "peak_rss_mb": summary["peak_rss_mb"],
    }


def _in_memory(cfg: BatchBenchConfig, pixels: np.ndarray) -> dict[str, float]:
    import torch

    det = Detector.load(cfg.model, device="cpu", batch_size=cfg.batch_size)
    reps = -(-cfg.forward_rows // len(pixels))
    x = np.tile(pixels.astype(np.float32) / 255.0, (reps, 1))[: cfg.forward_rows]
    x = x.reshape(-1, *det.input_spec.shape)
    det._model_parts(x[: cfg.batch_size], "elbo", 1)  # trace and warm up
    chunks = [x[i : i + cfg.chunk_rows] for i in range(0, len(x), cfg.chunk_rows)]
    out = {"torch_threads": float(torch.get_num_threads())}
    t0 = time.perf_counter()
    for c in chunks:  # in the file pipeline's chunks, so both see the same cache behaviour
        det._model_parts(c, "elbo", 1)
    out["forward_rows_per_second"] = len(x) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for c in chunks:
        det.score_validated(c)
    out["score_rows_per_second"] = len(x) / (time.perf_counter() - t0)
    return out


def _parse_only(cfg: BatchBenchConfig, path: Path, scale: float) -> dict[str, float]:
    """Reading and checking the file's rows without scoring them: the parsing limit."""
    from serving.batch import BatchOptions, _Rejects, read_blocks

    det = Detector.load(cfg.model, device="cpu")
    opts = BatchOptions(scale=scale, chunk_rows=cfg.chunk_rows)
    t0 = time.perf_counter()
    rows = sum(len(b.rows) for b in read_blocks(path, det.input_spec, opts, _Rejects("stop", None)))
    return {"rows": float(rows), "rows_per_second": rows / (time.perf_counter() - t0)}


def _pyod(cfg: BatchBenchConfig, pixels: np.ndarray) -> dict[str, float] | None:
    try:
        from pyod.models.vae import VAE as PyODVAE
    except ImportError:
        return None
    from training.data import load_mnist

    ds = load_mnist()
    train = ds.x_train[ds.y_train == 0].reshape(-1, 784)
    model = PyODVAE(epoch_num=1, verbose=0, random_state=0)  # fitted briefly: speed is the point
    model.fit(train)
    reps = -(-cfg.pyod_rows // len(pixels))
    x = np.tile(pixels.astype(np.float32) / 255.0, (reps, 1))[: cfg.pyod_rows]
    model.decision_function(x[:1000])
    t0 = time.perf_counter()
    model.decision_function(x)
    return {"rows": float(len(x)), "rows_per_second": len(x) / (time.perf_counter() - t0)}


def run(cfg: BatchBenchConfig, echo: Any = print) -> dict[str, Any]:
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    pixels, labels = _mnist_pixels()
    npy, csv_path = cfg.work_dir / "mnist-1m.npy", cfg.work_dir / "mnist-200k.csv"
    echo(f"writing test files into {cfg.work_dir} (kept for reruns)")
    make_npy(npy, cfg.npy_rows, pixels)
    make_csv(csv_path, cfg.csv_rows, pixels, labels)
    echo(f"scoring {npy.name} ...")
    npy_run = _score_run(cfg, npy, 1.0)
    echo(f"scoring {csv_path.name} ...")
    csv_run = _score_run(cfg, csv_path, 255.0)
    echo("timing reading and parsing alone ...")
    npy_run["parse_rows_per_second"] = _parse_only(cfg, npy, 1.0)["rows_per_second"]
    csv_run["parse_rows_per_second"] = _parse_only(cfg, csv_path, 255.0)["rows_per_second"]
    echo("timing the in-memory forward pass ...")
    mem = _in_memory(cfg, pixels)
    echo("timing PyOD's VAE (if installed) ...")
    pyod = _pyod(cfg, pixels)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": cfg.model,
        "engine": cfg.engine,
        "chunk_rows": cfg.chunk_rows,
        "batch_size": cfg.batch_size,
        "npy": npy_run,
        "csv": csv_run,
        "in_memory": mem,
        "pyod_vae": pyod,
        "npy_vs_forward": npy_run["rows_per_second"] / mem["forward_rows_per_second"],
        "npy_vs_score": npy_run["rows_per_second"] / mem["score_rows_per_second"],
    }
    write_json(cfg.work_dir / "batch_benchmark.json", result)
    for line in format_table(result):
        echo(line)
    return result


def format_table(r: dict[str, Any]) -> list[str]:
    mem = r["in_memory"]
    rows = [
        ("NPY file, 1M rows", r["npy"]["rows_per_second"], f"{r['npy']['peak_rss_mb']:,.0f} MB"),
        ("CSV file (MNIST layout), 200k rows", r["csv"]["rows_per_second"], f"{r['csv']['peak_rss_mb']:,.0f} MB"),
        ("in memory: model forward only", mem["forward_rows_per_second"], ""),
        ("in memory: full score (forward + complexity)", mem["score_rows_per_second"], ""),
    ]  # fmt: skip
    if r.get("pyod_vae"):
        rows.append(("PyOD VAE decision_function, in memory", r["pyod_vae"]["rows_per_second"], ""))
    rows.insert(
        2, ("  reading + parsing the CSV alone (no scoring)", r["csv"]["parse_rows_per_second"], "")
    )
    rows.insert(1, ("  reading the NPY alone (no scoring)", r["npy"]["parse_rows_per_second"], ""))
    out = ["| run | samples/s | peak memory |", "|---|---|---|"]
    out += [f"| {name} | {rate:,.0f} | {mem_} |" for name, rate, mem_ in rows]
    out.append(
        f"NPY file throughput = {r['npy_vs_forward']:.0%} of the model forward, "
        f"{r['npy_vs_score']:.0%} of the full in-memory score"
    )
    return out
