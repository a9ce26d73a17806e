"""Batch scoring of files: formats, columns, equality with Detector.score, bad rows, safety."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector.detector import Detector
from detector.errors import DataError, InputError
from serving import batch
from serving.batch import BatchOptions, csv_reader, score_files
from training.data import Dataset
from training.pipeline import TrainOutcome
from vae_anomaly.cli import main

RESULTS = [
    "score",
    "reconstruction",
    "kl",
    "complexity",
    "neighbour",
    "transformation",
    "p_value",
    "is_anomaly",
]


@pytest.fixture(scope="module")
def pixels(digits: Dataset) -> np.ndarray:
    """Digits test images as 0-16 integers, (N, 64)."""
    assert digits.x_test is not None
    return np.rint(digits.x_test.reshape(len(digits.x_test), -1) * 16).astype(np.int64)


def _mnist_layout(pixels: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(pixels, columns=[f"pixel{i}" for i in range(pixels.shape[1])])
    df.insert(0, "label", labels)
    return df


def _expect(det: Detector, x: np.ndarray, out: pd.DataFrame) -> None:
    ref = det.score(x)
    # float32 kernels blocked differently for other batch sizes: equal to 1e-5 of the score scale
    tol = 1e-5 * float(np.median(np.abs(ref.score)))
    np.testing.assert_allclose(out["score"], ref.score, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(out["reconstruction"], ref.reconstruction, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(out["kl"], ref.kl, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(out["p_value"], ref.p_value, atol=2 / (det.calibration.n + 1))
    np.testing.assert_array_equal(out["is_anomaly"].astype(bool), ref.is_anomaly)


def test_every_input_format_scores_like_detector_score(
    trained: TrainOutcome, digits: Dataset, pixels: np.ndarray, tmp_path: Path
) -> None:
    det = trained.detector
    assert digits.y_test is not None
    x = pixels / 16.0
    n = len(x)
    _mnist_layout(pixels, digits.y_test).to_csv(tmp_path / "header.csv", index=False)
    pd.DataFrame(pixels).to_csv(tmp_path / "plain.csv", index=False, header=False)
    pd.DataFrame(x).to_csv(tmp_path / "unit.csv", index=False, header=False)
    np.save(tmp_path / "flat.npy", x.astype(np.float32))
    np.save(tmp_path / "images.npy", x.reshape(n, 8, 8).astype(np.float32))
    np.save(tmp_path / "channels.npy", x.reshape(n, 1, 8, 8).astype(np.float64))
    _mnist_layout(pixels, digits.y_test).to_parquet(tmp_path / "table.parquet")
    cases = {
        "header.csv": 16.0,
        "plain.csv": 16.0,
        "unit.csv": 1.0,
        "flat.npy": 1.0,
        "images.npy": 1.0,
        "channels.npy": 1.0,
        "table.parquet": 16.0,
    }
    for name, scale in cases.items():
        out = tmp_path / f"{name}.out.csv"
        summary = score_files(
            det, [tmp_path / name], out, BatchOptions(scale=scale, chunk_rows=100), progress=False
        )
        df = pd.read_csv(out)
        assert summary.rows == n and summary.rejected == 0, name
        assert list(df["row"]) == list(range(n)) and set(df["source"]) == {str(tmp_path / name)}
        _expect(det, x, df)
        labelled = name in ("header.csv", "table.parquet")
        assert list(df.columns) == ["source", "row", *(["label"] if labelled else []), *RESULTS]
        if labelled:
            np.testing.assert_array_equal(df["label"], digits.y_test)
        saved = json.loads((tmp_path / f"{name}.out.summary.json").read_text())
        assert saved["rows"] == n and saved["anomalies"] == int(df["is_anomaly"].sum())


def test_id_and_passthrough_columns_and_parquet_output(
    trained: TrainOutcome, digits: Dataset, pixels: np.ndarray, tmp_path: Path
) -> None:
    assert digits.y_test is not None
    df = pd.DataFrame(pixels[:50], columns=[f"f{i}" for i in range(64)])
    df.insert(0, "id", [f"s-{i:03d}" for i in range(50)])
    df["label"] = digits.y_test[:50]
    df["note"] = ["ok"] * 50
    df.to_csv(tmp_path / "in.csv", index=False)
    opts = BatchOptions(scale=16, id_column="id", passthrough=("label", "note"), chunk_rows=8)
    score_files(trained.detector, [tmp_path / "in.csv"], tmp_path / "out.parquet", opts)
    out = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert list(out.columns) == ["source", "row", "id", "label", "note", *RESULTS]
    assert list(out["id"]) == list(df["id"]) and list(out["label"]) == list(df["label"])
    assert out["is_anomaly"].dtype == bool
    _expect(trained.detector, pixels[:50] / 16.0, out)

    # columns the options name must exist; the rest must be the model's features
    with pytest.raises(InputError, match="no column 'labels'"):
        score_files(
            trained.detector,
            [tmp_path / "in.csv"],
            tmp_path / "o2.csv",
            BatchOptions(scale=16, id_column="id", passthrough=("labels",)),
        )
    with pytest.raises(InputError, match=r"67 feature columns .* the model takes 64"):
        score_files(trained.detector, [tmp_path / "in.csv"], tmp_path / "o3.csv")
    assert not (tmp_path / "o2.csv").exists() and not (tmp_path / "o3.csv").exists()


def test_csv_read_in_small_blocks_keeps_rows_and_lines(
    trained: TrainOutcome, pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_BYTES", 1000)  # ~5 lines per block, lines cut midway
    lines = [",".join(map(str, row)) for row in pixels[:40]]
    lines.insert(10, "")  # a blank line: skipped, and lines after it still counted right
    lines[30] = lines[30].replace("0", "x", 1) if "0" in lines[30] else "x" + lines[30][1:]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    opts = BatchOptions(scale=16, on_error="skip", chunk_rows=3)
    s = score_files(trained.detector, [tmp_path / "in.csv"], tmp_path / "out.csv", opts)
    out = pd.read_csv(tmp_path / "out.csv")
    assert s.rows == 39 and s.rejected == 1
    # line 31 of the file is data row 29 (the blank line 11 is not a row)
    assert list(out["row"]) == [r for r in range(40) if r != 29]
    _expect(trained.detector, np.delete(pixels[:40], 29, axis=0) / 16.0, out)
    rejects = list(csv.reader((tmp_path / "out.rejects.csv").read_text().splitlines()))
    assert rejects[0] == ["source", "where", "reason"]
    assert rejects[1][1] == "line 31" and "is not a number" in rejects[1][2]


BAD_ROWS = [
    ("1,2,3", "expected 64 columns, got 3"),
    (",".join(["1"] * 63 + ["abc"]), "column '63': 'abc' is not a number"),
    (",".join(["1"] * 10 + ["nan"] + ["1"] * 53), "NaN in feature 10"),
    (",".join(["1"] * 63 + ["99"]), "values outside the model's input range [0, 1] (min"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_a_bad_row_stops_the_run_naming_file_and_line(
    trained: TrainOutcome,
    pixels: np.ndarray,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    row: str,
    reason: str,
) -> None:
    lines = [",".join(map(str, r)) for r in pixels[:20]]
    lines.insert(12, row)  # line 13 of the file
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.csv"
    argv = ["score", "--model", str(trained.path), str(tmp_path / "in.csv"), "--scale", "16"]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"in.csv, line 13: {reason}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # nothing half-written

    code = main([*argv, "--out", str(out), "--on-error", "skip"])
    assert code == 0 and "rejected: 1 malformed rows" in capsys.readouterr().out
    rejects = pd.read_csv(tmp_path / "out.rejects.csv")
    assert list(rejects["where"]) == ["line 13"] and reason in rejects["reason"][0]
    assert len(pd.read_csv(out)) == 20
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["rows"] == 20 and summary["rejected"] == 1


def test_bad_npy_rows_and_files(trained: TrainOutcome, tmp_path: Path) -> None:
    det = trained.detector
    x = np.random.default_rng(0).uniform(0, 1, (30, 64)).astype(np.float32)
    x[7, 3] = np.inf
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(batch.RowError, match=r"x.npy, row 7: infinity in feature 3"):
        score_files(det, [tmp_path / "x.npy"], tmp_path / "o.csv")
    s = score_files(det, [tmp_path / "x.npy"], tmp_path / "o.csv", BatchOptions(on_error="skip"))
    assert s.rows == 29 and 7 not in set(pd.read_csv(tmp_path / "o.csv")["row"])
    np.save(tmp_path / "wide.npy", np.zeros((3, 10), np.float32))
    with pytest.raises(InputError, match=r"wide\.npy has 10 features"):
        score_files(det, [tmp_path / "wide.npy"], tmp_path / "o2.csv")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(
        DataError, match=r"junk\.npy is not a \.npy array: it does not start with the NPY magic"
    ):
        score_files(det, [tmp_path / "junk.npy"], tmp_path / "o3.csv")
    assert not (tmp_path / "o2.csv").exists() and not (tmp_path / "o3.csv").exists()


def test_cli_globs_overwrite_and_usage_errors(
    trained: TrainOutcome, pixels: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        pd.DataFrame(pixels[i * 10 : (i + 1) * 10]).to_csv(
            tmp_path / f"part-{i}.csv", index=False, header=False
        )
    out = tmp_path / "out.csv"
    base = ["score", "--model", str(trained.path), "--scale", "16"]
    assert main([*base, str(tmp_path / "part-*.csv"), "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert (
        len(df) == 30
        and df["source"].str.endswith(("part-0.csv", "part-1.csv", "part-2.csv")).all()
    )
    assert list(df["source"].drop_duplicates().str[-10:]) == [
        "part-0.csv",
        "part-1.csv",
        "part-2.csv",
    ]
    capsys.readouterr()
    cases = {
        "already exists; pass --overwrite": [str(tmp_path / "part-0.csv"), "--out", str(out)],
        "no file matches": [str(tmp_path / "none-*.csv"), "--out", str(tmp_path / "o.csv")],
        "unsupported output type": [str(tmp_path / "part-0.csv"), "--out", str(tmp_path / "o.txt")],
        "unsupported input type .txt": [
            str(out.with_suffix(".txt")),
            "--out",
            str(tmp_path / "o.csv"),
        ],
    }
    out.with_suffix(".txt").write_text("x")
    for expect, argv in cases.items():
        code = main([*base, *argv])
        err = capsys.readouterr().err
        assert code == 1 and expect in err and err.count("\n") == 1, (expect, err)
    assert main([*base, str(tmp_path / "part-0.csv"), "--out", str(out), "--overwrite"]) == 0
    assert len(pd.read_csv(out)) == 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_leaves_no_output(trained: TrainOutcome, tmp_path: Path, sig: int) -> None:
    x = np.random.default_rng(0).uniform(0, 1, (400_000, 64)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    out = tmp_path / "out.csv"
    cmd = [
        sys.executable,
        "-m",
        "vae_anomaly",
        "score",
        "--model",
        str(trained.path),
        str(tmp_path / "big.npy"),
        "--out",
        str(out),
        "--chunk-rows",
        "256",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    tmp = None
    while time.monotonic() < deadline and tmp is None:  # wait until it is writing
        tmp = next((p for p in tmp_path.iterdir() if p.name.startswith(".out.csv.")), None)
        if tmp is None or tmp.stat().st_size < 100_000:
            tmp = None
            time.sleep(0.05)
    assert tmp is not None and proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not out.exists() and not out.with_name("out.summary.json").exists()
    if sig == signal.SIGTERM:  # handled: cleaned up, said so
        assert b"interrupted" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]


@pytest.mark.slow
def test_ray_engine_scores_like_the_local_engine(
    trained: TrainOutcome, digits: Dataset, pixels: np.ndarray, tmp_path: Path
) -> None:
    from serving.batch.ray_engine import score_files_ray  # ray is a test dependency: never skipped

    assert digits.y_test is not None
    bad = [",".join(map(str, r)) for r in pixels[:300]]
    bad.insert(100, "1,2,3")
    (tmp_path / "rows.csv").write_text("\n".join(bad) + "\n")
    np.save(
        tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (70_000, 64)).astype(np.float32)
    )
    _mnist_layout(pixels, digits.y_test).to_parquet(tmp_path / "t.parquet")
    files = [tmp_path / "rows.csv", tmp_path / "x.npy"]
    opts = BatchOptions(scale=16, on_error="skip")
    local = score_files(trained.detector, files[:1], tmp_path / "local.csv", opts)
    ray_s = score_files_ray(
        trained.path, files[:1], tmp_path / "ray.csv", opts, actors=2, num_cpus=2
    )
    assert (tmp_path / "local.csv").read_bytes() == (tmp_path / "ray.csv").read_bytes()
    assert (tmp_path / "local.rejects.csv").read_bytes() == (
        tmp_path / "ray.rejects.csv"
    ).read_bytes()
    assert local.rows == ray_s.rows == 300 and ray_s.rejected == 1 and ray_s.engine == "ray"

    opts = BatchOptions()
    score_files(trained.detector, files[1:], tmp_path / "local2.parquet", opts)
    score_files_ray(trained.path, files[1:], tmp_path / "ray2.parquet", opts, actors=2, num_cpus=2)
    a, b = pq.read_table(tmp_path / "local2.parquet"), pq.read_table(tmp_path / "ray2.parquet")
    assert a.num_rows == 70_000 and a.equals(b)  # row for row, two NPY read tasks
    with pytest.raises(DataError, match=r"rows\.csv, line 101: expected 64 columns, got 3"):
        score_files_ray(
            trained.path, files[:1], tmp_path / "r2.csv", BatchOptions(scale=16), num_cpus=2
        )
    assert not (tmp_path / "r2.csv").exists()
    assert pa is not None


def test_a_byte_order_mark_is_neither_a_row_nor_a_name(
    trained: TrainOutcome, pixels: np.ndarray, tmp_path: Path
) -> None:
    """A CSV saved by Excel starts with a UTF-8 byte-order mark: no row is lost to it, and no
    column name carries it."""
    det = trained.detector
    bom = "\ufeff"
    rows = [",".join(map(str, r)) for r in pixels[:40]]
    (tmp_path / "plain.csv").write_text(bom + "\n".join(rows) + "\n", encoding="utf-8")
    labelled = [f"{i % 10}," + r for i, r in enumerate(rows)]  # MNIST layout, no header
    (tmp_path / "mnist.csv").write_text(bom + "\n".join(labelled) + "\n", encoding="utf-8")
    names = ",".join(["label"] + [f"p{j}" for j in range(pixels.shape[1])])
    (tmp_path / "named.csv").write_text(bom + names + "\n" + "\n".join(labelled) + "\n")
    want = det.score(pixels[:40] / 16).score
    for name, opts in (
        ("plain", BatchOptions(scale=16)),
        ("mnist", BatchOptions(scale=16)),
        ("named", BatchOptions(scale=16, id_column="label")),
    ):
        s = score_files(det, [tmp_path / f"{name}.csv"], tmp_path / f"{name}-out.csv", opts)
        out = pd.read_csv(tmp_path / f"{name}-out.csv")
        assert s.rows == 40 and s.rejected == 0, name
        assert out["row"].tolist() == list(range(40)), name
        np.testing.assert_allclose(out["score"], want, rtol=1e-4, atol=1e-3)
    assert pd.read_csv(tmp_path / "named-out.csv")["label"].tolist() == [i % 10 for i in range(40)]
    # training reads the same file the same way
    from training.data import load_array

    assert load_array(tmp_path / "plain.csv").shape == (40, pixels.shape[1])


def test_bad_files_and_encodings_give_one_line_and_lose_nothing(
    trained: TrainOutcome, pixels: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    det = trained.detector
    x = (pixels[:20] / 16).astype(np.float32)
    np.save(tmp_path / "good.npy", x)
    with open(tmp_path / "archive.npy", "wb") as f:  # an .npz saved under a .npy name
        np.savez(f, x=x)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    # an .npz named .npy: one line naming it
    code = main(["score", "--model", str(trained.path), str(tmp_path / "archive.npy"),
                 "--out", str(tmp_path / "a.csv"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "archive.npy is not a .npy array" in err and "Traceback" not in err
    # a bad second input after a good first one: one line, no output, nothing left behind
    for out in ("b.csv", "b.parquet"):
        code = main(["score", "--model", str(trained.path), str(tmp_path / "good.npy"),
                     str(tmp_path / "bad.csv"), "--out", str(tmp_path / out), "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "bad.csv" in err, err
        assert not list(tmp_path.glob(f"*{out}*")), list(tmp_path.glob(f"*{out}*"))
    # a label in Latin-1 (not UTF-8) is kept as written, in CSV and in Parquet output
    names = ",".join(["label"] + [f"p{j}" for j in range(x.shape[1])])
    lines = [names.encode()] + [
        ("café" if i == 3 else "ok").encode("latin-1") + b"," + ",".join(map(str, r)).encode()
        for i, r in enumerate(pixels[:20])
    ]
    (tmp_path / "latin.csv").write_bytes(b"\n".join(lines) + b"\n")
    for out in ("l1.csv", "l2.parquet"):
        opts = BatchOptions(scale=16, passthrough=("label",))
        s = score_files(det, [tmp_path / "latin.csv"], tmp_path / out, opts)
        got = (
            pd.read_csv(tmp_path / out) if out.endswith(".csv") else pd.read_parquet(tmp_path / out)
        )
        assert s.rows == 20 and got["label"].tolist()[3] == "café"


def test_side_files_are_outputs_too_and_stale_temporaries_go(
    trained: TrainOutcome, pixels: np.ndarray, tmp_path: Path
) -> None:
    import subprocess

    from detector._io import remove_stale_temporaries

    np.save(tmp_path / "in.npy", (pixels[:10] / 16).astype(np.float32))
    (tmp_path / "out.summary.json").write_text("{}")  # from an earlier run
    with pytest.raises(InputError, match=r"out\.summary\.json already exists"):
        score_files(trained.detector, [tmp_path / "in.npy"], tmp_path / "out.csv", BatchOptions())
    assert (tmp_path / "out.summary.json").read_text() == "{}"
    # a temporary whose writer was killed (its process is gone) is removed by the next run;
    # one whose writer still runs is kept
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".out.csv.{gone.pid}.abc123.tmp"
    stale.write_text("half a file")
    live = tmp_path / f".out.csv.{os.getpid()}.def456.tmp"
    live.write_text("being written")
    assert remove_stale_temporaries(tmp_path / "out.csv") == [stale]
    assert not stale.exists() and live.exists()


def test_a_full_disk_names_the_output(
    trained: TrainOutcome, pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from serving.batch import Writer

    def full(self: Writer, table: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Writer, "write", full)
    np.save(tmp_path / "in.npy", (pixels[:10] / 16).astype(np.float32))
    with pytest.raises(OSError) as e:
        score_files(trained.detector, [tmp_path / "in.npy"], tmp_path / "out.csv")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out.csv")
    assert not list(tmp_path.glob("*out*"))  # nothing half-written is left
