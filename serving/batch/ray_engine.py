"""Batch scoring on Ray Data: the same rows, the same scores, on every core of a cluster.

``vae-anomaly score --engine ray [--address ADDR]`` runs ``serving.batch.score_files`` with the
reading and scoring done by Ray:

1. The inputs become a Ray dataset of read tasks (row ranges of an NPY file, whole CSV and Parquet
   files), each read by the same readers as the local engine (same columns, same checks, same row
   numbers); rows travel as Arrow tables with the features in one fixed-size-list column.
2. ``map_batches`` with ``_ScoreActor``: each actor receives the artifact's bytes through the
   object store, writes them to its own temporary directory, verifies the checksums and loads the
   detector once, then scores batch after batch.
3. The driver streams the results, in input order, into the one output file (written atomically
   like the local engine's), with the rejects and the summary beside it.

Input files must be readable at the same path on every node (a shared file system); the artifact
need not be, since it is shipped. Needs ``pip install 'vae-anomaly[ray]'``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detector.artifact import MANIFEST, listed_files
from detector.detector import Detector
from detector.errors import ConfigError, VAEAnomalyError
from serving.batch import (
    BatchOptions,
    Block,
    Rejects,
    Summary,
    read_blocks,
    score_block,
    score_files,
)

log = logging.getLogger(__name__)

NPY_TASK_ROWS = 65536  # rows of an NPY file per read task
READ_CPUS = 0  # see the read step below


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--engine ray needs Ray: pip install 'vae-anomaly[ray]' (or 'ray[data]')"
        ) from None
    return ray


def _plan(files: list[Path]) -> list[dict[str, Any]]:
    """Read tasks: row ranges of NPY files, whole CSV / Parquet files."""
    tasks: list[dict[str, Any]] = []
    for f in files:
        if f.suffix.lower() == ".npy":
            n = int(np.load(f, mmap_mode="r", allow_pickle=False).shape[0])
            for start in range(0, max(n, 1), NPY_TASK_ROWS):
                tasks.append(
                    {"path": str(f), "start": start, "stop": min(n, start + NPY_TASK_ROWS)}
                )
        else:
            tasks.append({"path": str(f), "start": -1, "stop": -1})
    return tasks


class _Collect(Rejects):
    """In a read task: rejected rows (skip mode) go to the driver's collector actor."""

    def __init__(self, on_error: str) -> None:
        super().__init__(on_error, None)
        self.rows: list[tuple[str, str, str]] = []

    def add(self, source: str, where: str, reason: str) -> None:
        super().add(source, where, reason)  # raises in stop mode
        self.rows.append((source, where, reason))


class _RejectsCollector:
    """A Ray actor gathering the rejected rows of every read task."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, rows: list[tuple[str, str, str]]) -> int:
        self.rows.extend(rows)
        return len(self.rows)

    def get(self) -> list[tuple[str, str, str]]:
        return self.rows


def _to_table(block: Block) -> pa.Table:
    n, k = block.x.shape
    x = pa.FixedSizeListArray.from_arrays(pa.array(block.x.reshape(-1), pa.float32()), k)
    return pa.table(
        {
            "source": pa.array([block.source] * n, pa.string()),
            "row": pa.array(block.rows, pa.int64()),
            **block.extra,
            "x": x,
        }
    )


def _read(
    batch: dict[str, np.ndarray], spec: dict[str, Any], opts: dict[str, Any], collector: Any
) -> Iterator[pa.Table]:
    """map_batches function: one read task -> the Arrow tables of its rows."""
    import ray

    from detector.spec import InputSpec
    from serving.batch import read_npy

    input_spec, options = InputSpec.from_dict(spec), BatchOptions(**opts)
    for path, start, stop in zip(batch["path"], batch["start"], batch["stop"], strict=True):
        rejects = _Collect(options.on_error)
        p = Path(str(path))
        if int(start) >= 0:  # a row range of an NPY file
            blocks = read_npy(p, input_spec, options, rejects, start=int(start), stop=int(stop))
        else:
            blocks = read_blocks(p, input_spec, options, rejects)
        for block in blocks:
            if rejects.rows:
                ray.get(collector.add.remote(rejects.rows))
                rejects.rows = []
            if len(block.rows):
                yield _to_table(block)


class _ScoreActor:
    """Loads and verifies the artifact once, then scores batches of rows."""

    def __init__(
        self,
        artifact: dict[str, bytes],
        device: str,
        batch_size: int,
        threads: int,
        explain: bool = False,
        runtime: str = "auto",
    ) -> None:
        import torch

        self.explain = explain
        torch.set_num_threads(max(1, threads))
        self._dir = tempfile.TemporaryDirectory(prefix="vae-anomaly-artifact-")
        if not isinstance(artifact, dict):  # an ObjectRef: fetch it from the object store
            import ray

            artifact = ray.get(artifact)
        for name, data in artifact.items():
            Path(self._dir.name, name).write_bytes(data)
        self.detector = Detector.load(
            self._dir.name, device=device, batch_size=batch_size, runtime=runtime
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        x = table.column("x").combine_chunks()
        k = x.type.list_size
        feats = x.values.to_numpy(zero_copy_only=False).reshape(-1, k)
        extra = {
            c: table.column(c).combine_chunks()
            for c in table.column_names
            if c not in ("source", "row", "x")
        }
        sources = table.column("source").to_pylist()
        block = Block(sources[0] if sources else "", table.column("row").to_numpy(), feats, extra)
        out = score_block(self.detector, block, explain=self.explain)
        return out.set_column(0, "source", table.column("source"))


def _artifact_bytes(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file the artifact's manifest lists, and the manifest (the actors verify them all
    on load, as the driver did before)."""
    root = Path(path)
    names = listed_files(root)
    return {name: (root / name).read_bytes() for name in (*names, MANIFEST)}


def score_files_ray(
    model: str | os.PathLike[str],
    files: list[Path],
    output: str | os.PathLike[str],
    options: BatchOptions,
    *,
    address: str | None = None,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    batch_size: int = 2048,
    device: str = "auto",
    runtime: str = "auto",
    progress: bool | None = None,
    num_cpus: int | None = None,
) -> Summary:
    """``score_files`` with Ray Data doing the reading and the scoring (see the module doc)."""
    ray = _import_ray()
    # verified here first (and the runtime tried): fail before starting Ray
    detector = Detector.load(model, device="cpu", runtime=runtime)
    if runtime == "onnxruntime" and device == "auto":
        device = "cpu"
    artifact = _artifact_bytes(model)
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count()
        ray.init(**kwargs)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come out in input order
        ctx.enable_progress_bars = False  # the driver draws one bar over the output rows
        opts = {
            "scale": options.scale,
            "id_column": options.id_column,
            "passthrough": options.passthrough,
            "header": options.header,
            "delimiter": options.delimiter,
            "on_error": options.on_error,
            "chunk_rows": options.chunk_rows,
        }
        tasks = _plan(files)
        collector = ray.remote(num_cpus=0)(_RejectsCollector).remote()
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map_batches(
            _read,
            fn_kwargs={
                "spec": detector.input_spec.to_dict(),
                "opts": opts,
                "collector": collector,
            },
            batch_size=1,
            batch_format="numpy",
            # Reads reserve no CPU: every CPU can then hold a scoring actor, and the
            # differing resources keep Ray from fusing the read into the actors, so the blocks of
            # one file spread over all actors.
            num_cpus=READ_CPUS,
        )
        ds = ds.map_batches(
            _ScoreActor,
            fn_constructor_kwargs={
                "artifact": ray.put(artifact),
                "device": device,
                "batch_size": batch_size,
                "threads": max(1, int(cpus_per_actor)),
                "explain": options.explain,
                "runtime": runtime,
            },
            batch_size=None,
            batch_format="pyarrow",
            concurrency=(1, actors),  # an actor pool that grows to `actors` as blocks queue up
            num_cpus=cpus_per_actor,
            num_gpus=1 if device.startswith("cuda") else 0,
        )

        def tables(_files: list[Path], rejects: Rejects) -> Iterator[pa.Table]:
            try:
                for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if t.num_rows:
                        yield t
            except Exception as e:  # a task's error: show ours, not Ray's wrapper
                raise _unwrap(e) from None
            order = {str(f): i for i, f in enumerate(files)}
            for src, where, reason in sorted(
                ray.get(collector.get.remote()),
                key=lambda r: (order.get(r[0], 0), int(r[1].split()[-1])),
            ):
                rejects.add(src, where, reason)

        return score_files(
            detector, files, output, options, progress=progress, blocks=tables, engine="ray"
        )
    finally:
        if started:
            ray.shutdown()


def _unwrap(e: BaseException) -> BaseException:
    """The VAEAnomalyError inside a Ray task error, else the error itself."""
    seen = e
    for _ in range(5):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(cause, VAEAnomalyError):
            return cause
        if cause is None:
            break
        seen = cause
    from detector.errors import DataError

    text = str(e)
    for cls_name in ("RowError", "InputError", "DataError", "ArtifactIntegrityError"):
        marker = f"{cls_name}: "
        if marker in text:
            return DataError(text.split(marker, 1)[1].strip().splitlines()[0])
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return VAEAnomalyError(f"Ray scoring failed: {lines[-1] if lines else type(e).__name__}")


__all__ = ["score_files_ray"]
