"""The model artifact: one self-contained directory, nothing in it executable.

::

    model-dir/
      weights.safetensors   tensors only (safetensors: no pickle, nothing runs on load)
      reference.safetensors the training rows in the neighbour term's space (when on): posterior
                            means, or input features
      head.safetensors      the transformation head's two layers (images; detector.transforms)
      config.json           model config, input spec, training config, data provenance, versions
      calibration.json      score kind, target FPR, threshold, the calibration scores (p-values)
      metrics.json          training history and validation figures
      manifest.json         format version, model version id, SHA-256 and size of every file

``save`` writes everything into a temporary sibling directory and renames it into place, so a
crash never leaves half an artifact (cf. alibi-detect ``saving/saving.py``). ``load`` checks the
manifest first and refuses a modified, truncated or incomplete artifact, naming the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from detector._io import OutputExistsError, atomic_directory, sha256_file, write_json
from detector.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
)
from detector.model import VAE, VAEConfig
from detector.neighbours import reference_widths
from detector.spec import InputSpec
from detector.threshold import Calibration
from detector.transforms import HeadConfig, TransformHead

FORMAT = "vae-anomaly-artifact"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
CALIBRATION = "calibration.json"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
REFERENCE = "reference.safetensors"
REFERENCE_TENSOR = "latent_means"
HEAD = "head.safetensors"
REQUIRED_FILES: tuple[str, ...] = (WEIGHTS, CONFIG, CALIBRATION, METRICS)
KNOWN_FILES: frozenset[str] = frozenset((*REQUIRED_FILES, REFERENCE, HEAD))


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact."""

    path: Path
    model: VAE
    calibration: Calibration
    input_spec: InputSpec
    config: dict[str, Any]  # the whole config.json
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    reference: torch.Tensor | None = None  # (n_reference, latent or n_features)
    head: TransformHead | None = None  # the transformation head (images)

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])


def package_versions() -> dict[str, str]:
    from importlib import metadata

    try:
        ours = metadata.version("vae-anomaly")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {
        "vae_anomaly": ours,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def save(
    path: str | os.PathLike[str],
    model: VAE,
    calibration: Calibration,
    input_spec: InputSpec,
    *,
    training: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    reference: torch.Tensor | None = None,
    head: TransformHead | None = None,
) -> Path:
    """Write the artifact directory atomically; returns its path."""
    target = Path(path)
    n_ref = 0 if reference is None else int(reference.shape[0])
    if calibration.n_reference != n_ref:
        raise ArtifactError(
            f"the calibration expects {calibration.n_reference} reference rows, got {n_ref}"
        )
    if calibration.score_config.transformation_weight and head is None:
        raise ArtifactError("the calibration's transformation term needs the head; none given")
    try:
        with atomic_directory(target, overwrite=overwrite) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
            _fsync(tmp / WEIGHTS)
            write_json(
                tmp / CONFIG,
                {
                    "model": model.config.to_dict(),
                    "input": input_spec.to_dict(),
                    "training": training or {},
                    "data": data or {},
                    "versions": package_versions(),
                    **({"head": head.config.to_dict()} if head is not None else {}),
                },
            )
            write_json(tmp / CALIBRATION, calibration.to_dict())
            write_json(tmp / METRICS, metrics or {})
            names = list(REQUIRED_FILES)
            if reference is not None:
                ref = reference.detach().to("cpu", torch.float32).contiguous()
                save_file({REFERENCE_TENSOR: ref}, str(tmp / REFERENCE), metadata={"format": "pt"})
                _fsync(tmp / REFERENCE)
                names.append(REFERENCE)
            if head is not None:
                weights = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
                save_file(weights, str(tmp / HEAD), metadata={"format": "pt"})
                _fsync(tmp / HEAD)
                names.append(HEAD)
            files = {name: _file_entry(tmp / name) for name in names}
            digest = hashlib.sha256(
                "".join(f"{n}:{files[n]['sha256']}" for n in sorted(files)).encode()
            ).hexdigest()
            write_json(
                tmp / MANIFEST,
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "model_version": f"vae-{digest[:12]}",
                    "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "files": files,
                },
            )
    except OutputExistsError:
        raise ArtifactError(
            f"{target} already exists; pass overwrite=True (--overwrite) to replace"
        ) from None
    return target


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Artifact:
    """Verify and load an artifact directory; raises an ArtifactError naming what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactNotFoundError(f"model artifact {root} does not exist or is not a directory")
    manifest = _read_json(root, MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ArtifactIntegrityError(f"{root / MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactIntegrityError(
            f"{root / MANIFEST}: format version {manifest.get('format_version')!r} is not "
            f"supported (this version reads {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactIntegrityError(f"{root / MANIFEST} has no 'files' table")
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactIntegrityError(f"{root / MANIFEST} does not list required file {name}")
    for name in files:
        if Path(name).name != name:  # the manifest names files inside the directory only
            raise ArtifactIntegrityError(f"{root / MANIFEST}: file name {name!r} is not allowed")
        if name not in KNOWN_FILES:
            raise ArtifactIntegrityError(f"{root / MANIFEST} lists {name!r}, not an artifact file")
    _check_directory(root, files)
    for name, entry in files.items():
        _verify_file(root, name, entry)

    config = _read_json(root, CONFIG)
    try:
        model_config = VAEConfig.from_dict(config["model"])
        input_spec = InputSpec.from_dict(config["input"])
        calibration = Calibration.from_dict(_read_json(root, CALIBRATION))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactIntegrityError(
            f"{root}: config.json or calibration.json is invalid: {e}"
        ) from e
    metrics = _read_json(root, METRICS)
    if math.prod(input_spec.shape) != model_config.n_features:
        raise ArtifactIntegrityError(
            f"{root / CONFIG}: the input spec's shape {list(input_spec.shape)} does not fit the "
            f"model's input {list(model_config.input_shape)}"
        )
    schema = input_spec.schema
    if (schema is not None) != model_config.is_table or (
        schema is not None
        and (
            schema.categorical_groups != model_config.categorical
            or not math.isclose(schema.unseen_nats, model_config.unseen_nats, rel_tol=1e-9)
        )
    ):
        raise ArtifactIntegrityError(
            f"{root / CONFIG}: the input's table schema does not match the model's table layout"
        )
    _check_weight_shapes(root / WEIGHTS, model_config)  # before the model allocates anything

    model = VAE(model_config)
    try:
        state = load_file(str(root / WEIGHTS), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise _unreadable(root / WEIGHTS, e) from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactIntegrityError(f"{root / WEIGHTS}: {bad[0]} holds NaN or infinity")
    model.to(device).eval()
    reference = None
    if calibration.n_reference:
        if REFERENCE not in files:
            raise ArtifactIntegrityError(
                f"{root / MANIFEST} does not list {REFERENCE}, which the calibration's neighbour "
                "term needs"
            )
        reference = _load_reference(
            root / REFERENCE,
            calibration.n_reference,
            model_config,
            calibration.score_config.neighbour_space,
        )
    head = (
        _load_head(root, config, files, input_spec) if HEAD in files or "head" in config else None
    )
    if head is None and calibration.score_config.transformation_weight:
        raise ArtifactIntegrityError(
            f"{root / MANIFEST} does not list {HEAD}, which the calibration's transformation "
            "term needs"
        )
    return Artifact(
        path=root,
        model=model,
        calibration=calibration,
        input_spec=input_spec,
        config=config,
        metrics=metrics,
        manifest=manifest,
        reference=reference.to(device) if reference is not None else None,
        head=head.to(device).eval() if head is not None else None,
    )


def _check_directory(root: Path, files: dict[str, Any]) -> None:
    """Only the manifest and the files it lists, each a regular file, none a symlink."""
    for entry in root.iterdir():
        if entry.name != MANIFEST and entry.name not in files:
            raise ArtifactIntegrityError(
                f"{root} holds {entry.name!r}, which its manifest does not list"
            )
        if entry.is_symlink() or not entry.is_file():
            raise ArtifactIntegrityError(f"{entry} must be a regular file, not a link or folder")


def _check_weight_shapes(path: Path, config: VAEConfig) -> None:
    """The weights file's tensor names and shapes, read from its header, against the network the
    config describes (built on the meta device: no memory is allocated for it)."""
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in VAE(config).state_dict().items()}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or [
            k for k in expected if found[k] != expected[k]
        ]
        k = diff[0]
        raise ArtifactIntegrityError(
            f"{path} does not fit the model config: tensor {k!r} is "
            f"{found.get(k, 'missing')}, the config needs {expected.get(k, 'none')}"
        )


def _unreadable(path: Path, e: Exception) -> ArtifactIntegrityError:
    """The error for a file the safetensors reader refuses: its message's first line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ArtifactIntegrityError(f"{path} cannot be loaded: {first}")


def _load_head(
    root: Path, config: dict[str, Any], files: dict[str, Any], input_spec: InputSpec
) -> TransformHead:
    """The transformation head: its config.json entry and its weights, the shapes checked
    against the header before anything is allocated."""
    if HEAD not in files or "head" not in config:
        missing = f"does not list {HEAD}" if HEAD not in files else "has no 'head' entry"
        raise ArtifactIntegrityError(
            f"{root}: the artifact's {MANIFEST if HEAD not in files else CONFIG} {missing}, "
            "which its transformation head needs"
        )
    try:
        head_config = HeadConfig.from_dict(config["head"])
    except (TypeError, ValueError) as e:
        raise ArtifactIntegrityError(f"{root / CONFIG}: the head config is invalid: {e}") from e
    if head_config.input_shape != tuple(input_spec.shape):
        raise ArtifactIntegrityError(
            f"{root / CONFIG}: the head's input {list(head_config.input_shape)} is not the "
            f"input spec's {list(input_spec.shape)}"
        )
    path = root / HEAD
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in TransformHead(head_config).state_dict().items()}
    state = _read_tensors(path, expected)
    head = TransformHead(head_config)
    head.load_state_dict(state, strict=True)
    return head


def _read_tensors(path: Path, expected: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A safetensors file's float32 tensors, exactly ``expected``'s names and shapes (checked in
    the header before any is read), all finite."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
            if found != expected or set(dtypes.values()) != {"F32"}:
                raise ArtifactIntegrityError(
                    f"{path} holds {found} ({sorted(set(dtypes.values()))}), expected F32 "
                    f"{expected}"
                )
            state = {k: f.get_tensor(k) for k in expected}
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ArtifactIntegrityError(f"{path}: {bad[0]} holds NaN or infinity")
    return state


def _load_reference(path: Path, n: int, config: VAEConfig, space: str) -> torch.Tensor:
    """The neighbour term's reference rows (posterior means, or input features for the input
    space), checked against the header before any tensor is read."""
    expected = [n, *reference_widths(config, space)]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if keys != [REFERENCE_TENSOR]:
                raise ArtifactIntegrityError(
                    f"{path} must hold exactly one tensor {REFERENCE_TENSOR!r}, found {keys}"
                )
            sl = f.get_slice(REFERENCE_TENSOR)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
            if shape != expected or dtype != "F32":
                raise ArtifactIntegrityError(
                    f"{path}: {REFERENCE_TENSOR} is {dtype} {shape}, expected F32 {expected}"
                )
            ref = f.get_tensor(REFERENCE_TENSOR)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e
    if not torch.isfinite(ref).all():
        raise ArtifactIntegrityError(f"{path}: {REFERENCE_TENSOR} holds NaN or infinity")
    return ref


def listed_files(path: str | os.PathLike[str]) -> list[str]:
    """The file names an artifact's manifest lists (each a plain name inside the directory)."""
    root = Path(path)
    files = _read_json(root, MANIFEST).get("files")
    if not isinstance(files, dict):
        raise ArtifactIntegrityError(f"{root / MANIFEST} has no 'files' table")
    for name in files:
        if Path(name).name != name:
            raise ArtifactIntegrityError(f"{root / MANIFEST}: file name {name!r} is not allowed")
    return sorted(files)


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _verify_file(root: Path, name: str, entry: Any) -> None:
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise ArtifactIntegrityError(f"{root / MANIFEST}: bad entry for {name}")
    if Path(name).name != name:  # the manifest names files inside the directory only
        raise ArtifactIntegrityError(f"{root / MANIFEST}: file name {name!r} is not allowed")
    p = root / name
    if not p.is_file():
        raise ArtifactNotFoundError(f"artifact file {p} is missing (listed in {MANIFEST})")
    size = p.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise ArtifactIntegrityError(
            f"artifact file {p} is {size} bytes, manifest says {entry['bytes']} "
            "(truncated or modified)"
        )
    if sha256_file(p) != entry["sha256"]:
        raise ArtifactIntegrityError(
            f"artifact file {p} does not match its SHA-256 in {MANIFEST} (modified or corrupt)"
        )


def _read_json(root: Path, name: str) -> dict[str, Any]:
    p = root / name
    if not p.is_file():
        raise ArtifactNotFoundError(f"artifact file {p} is missing")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactIntegrityError(f"artifact file {p} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ArtifactIntegrityError(f"artifact file {p} must hold a JSON object")
    return obj


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


__all__ = ["Artifact", "listed_files", "load", "package_versions", "save", "sha256_file"]
