"""``score_files``: the run loop (read, score, write, summarise), atomic from start to end."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector._io import atomic_output, write_json
from detector.detector import Detector
from detector.drift import DriftTest
from detector.errors import InputError
from serving.batch.files import check_output, side_files
from serving.batch.options import BatchOptions, Block, Summary
from serving.batch.readers import Rejects, read_blocks
from serving.batch.writer import Writer, score_block


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _progress(total: int | None, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    disable = (not enabled) if enabled is not None else (None if not os.environ.get("CI") else True)
    return tqdm(
        total=total,
        unit="rows",
        unit_scale=True,
        dynamic_ncols=True,
        disable=disable,
        desc="scoring",
        smoothing=0.1,
    )


def _known_rows(path: Path) -> int | None:
    """Rows of a file for the progress bar's ETA: exact for NPY and Parquet, estimated for CSV
    from the length of its first lines."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        if suffix == ".parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        lines = head.count(b"\n")
        size = path.stat().st_size
        return max(1, round(size * lines / len(head)) - 1) if lines else 1
    except Exception:  # the reader reports unreadable files properly
        return None


def score_files(
    detector: Detector,
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    options: BatchOptions | None = None,
    *,
    progress: bool | None = None,
    blocks: Callable[[list[Path], Rejects], Iterator[pa.Table]] | None = None,
    engine: str = "local",
) -> Summary:
    """Score every row of ``inputs`` into ``output`` (.csv or .parquet); returns the summary.

    ``progress``: None = a bar on a terminal only (never when ``CI`` is set). ``blocks`` replaces
    the local read-and-score loop (the Ray engine passes its own); it yields output tables.
    """
    opts = options or BatchOptions()
    opts.validate()
    if opts.explain and detector.input_spec.schema is None:
        raise InputError("--explain needs a model trained on a table (per-column contributions)")
    if opts.scale != 1.0 and detector.input_spec.schema is not None:
        raise InputError("--scale is for pixels; a table model standardises its columns itself")
    detector.require_calibration()
    files = [Path(p) for p in inputs]
    out = Path(output)
    check_output(out, opts.overwrite)
    rejects_path, summary_path = side_files(out)
    t0 = time.perf_counter()
    totals = [_known_rows(f) for f in files]
    total = sum(t for t in totals if t is not None) if all(t is not None for t in totals) else None
    rows = anomalies = 0
    drift = new_drift_test(detector, opts.drift_alpha)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(atomic_output(out))
        rsink = (
            stack.enter_context(atomic_output(rejects_path, "w"))
            if opts.on_error == "skip"
            else None
        )
        rejects = Rejects(opts.on_error, rsink)
        writer = Writer(sink, out.suffix.lower())
        stack.callback(writer.abandon)  # unwinds before the sink: nothing writes a closed file
        bar = stack.enter_context(_progress(total, progress))
        tables = (
            blocks(files, rejects) if blocks is not None else _local(detector, files, opts, rejects)
        )
        for table in tables:
            _write(writer, table, out)
            n = table.num_rows
            rows += n
            anomalies += int(pc.sum(table.column("is_anomaly")).as_py() or 0)
            drift.update(table.column("score").to_numpy())
            bar.update(n)
        bar.total = bar.n  # the CSV row count was an estimate: end at 100 %
        bar.refresh()
        if writer.schema is None:  # no row at all: still a valid, empty output with a header
            writer.write(
                score_block(
                    detector,
                    Block(
                        str(files[0]),
                        np.zeros(0, np.int64),
                        np.zeros((0, detector.input_spec.n_features), np.float32),
                    ),
                    explain=opts.explain,
                )
            )
        _write(writer, None, out)
        seconds = time.perf_counter() - t0
        cal = detector.require_calibration()
        summary = Summary(
            inputs=[str(f) for f in files],
            output=str(out),
            rows=rows,
            rejected=rejects.count,
            anomalies=anomalies,
            anomaly_rate=anomalies / rows if rows else 0.0,
            target_fpr=cal.target_fpr,
            threshold=cal.threshold,
            model_version=detector.model_version,
            seconds=seconds,
            rows_per_second=rows / seconds if seconds > 0 else 0.0,
            peak_rss_mb=peak_rss_mb(),
            rejects_file=str(rejects_path) if opts.on_error == "skip" else None,
            engine=engine,
            drift=drift.summary(),
            columns=_columns_note(detector),
        )
    write_json(summary_path, asdict(summary))  # once the output is in place
    return summary


def _local(
    detector: Detector, files: list[Path], opts: BatchOptions, rejects: Rejects
) -> Iterator[pa.Table]:
    # Reading the next chunk in a thread while this one is scored was measured and dropped: on two
    # cores torch and pyarrow already use both, and it cost 5-10 % of the CSV rate and 100 MB.
    for f in files:
        for block in read_blocks(f, detector.input_spec, opts, rejects):
            if len(block.rows):
                yield score_block(detector, block, explain=opts.explain, rejects=rejects)


def _write(writer: Writer, table: pa.Table | None, out: Path) -> None:
    """Write a table (None: finish the file); an OS error that names no file (a full disk:
    "[Errno 28] No space left on device") is made to name the output."""
    try:
        if table is None:
            writer.close()
        else:
            writer.write(table)
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(out)) from e
        raise


def new_drift_test(detector: Detector, alpha: float) -> DriftTest:
    scores = np.asarray(detector.require_calibration().scores, np.float64)
    return DriftTest(np.sort(scores), alpha=alpha)


def drift_files(
    detector: Detector,
    inputs: Sequence[str | os.PathLike[str]],
    options: BatchOptions | None = None,
) -> dict[str, Any]:
    """The drift test (``detector.drift``) of every row of ``inputs`` in order, nothing written:
    do they look exchangeable with the calibration data? Bad rows are skipped and counted."""
    opts = options or BatchOptions()
    opts.validate()
    drift = new_drift_test(detector, opts.drift_alpha)
    rejects = Rejects("skip", None)
    rows = 0
    for f in [Path(p) for p in inputs]:
        for block in read_blocks(f, detector.input_spec, opts, rejects):
            if len(block.rows):
                parts = detector.score_validated(
                    block.x.reshape(len(block.rows), *detector.input_spec.shape)
                )
                drift.update(parts["score"])
                rows += len(block.rows)
    return {
        **drift.summary(),
        "rows": rows,
        "rejected": rejects.count,
        "inputs": list(map(str, inputs)),
    }


def _columns_note(detector: Detector) -> str:
    schema = detector.input_spec.schema
    if schema is None:
        return ""
    if schema.by_name:
        return f"columns: matched by name ({len(schema.columns)} features)"
    return (
        f"columns: taken by position ({len(schema.columns)} features; the model was trained on "
        "a file without a header)"
    )
