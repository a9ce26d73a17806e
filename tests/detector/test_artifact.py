from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from detector import artifact
from detector.detector import Detector
from detector.errors import ArtifactError, ArtifactIntegrityError, ArtifactNotFoundError
from training.pipeline import TrainOutcome


def test_round_trip_gives_identical_scores(trained: TrainOutcome, artifact_dir: Path) -> None:
    split = trained.split
    assert split.x_test is not None
    loaded = Detector.load(artifact_dir)
    before = trained.detector.score(split.x_test)
    after = loaded.score(split.x_test)
    np.testing.assert_array_equal(before.score, after.score)
    assert loaded.threshold == trained.detector.threshold
    assert loaded.model.config == trained.detector.model.config
    assert loaded.input_spec == trained.detector.input_spec
    assert loaded.model_version.startswith("vae-")
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    # the neighbour term is on by default: for images, the training rows' posterior means travel
    # along
    assert trained.detector.score_config.neighbour_space == "latent"
    assert set(manifest["files"]) == {*artifact.REQUIRED_FILES, artifact.REFERENCE, artifact.HEAD}
    assert loaded.reference is not None and trained.detector.reference is not None
    assert torch.equal(loaded.reference, trained.detector.reference)
    assert loaded.calibration is not None
    assert loaded.calibration.n_reference == len(split.x_train) > 0
    np.testing.assert_array_equal(before.neighbour, after.neighbour)


def test_weights_are_safetensors_not_pickle(artifact_dir: Path) -> None:
    raw = (artifact_dir / "weights.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: u64 length + JSON header
    assert "decoder.0.weight" in header and "feature_mean" in header
    assert b"\x80\x04" not in raw[:2]  # no pickle protocol marker at the start


def test_flipped_byte_in_weights_is_refused(artifact_dir: Path) -> None:
    p = artifact_dir / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactIntegrityError, match=r"weights\.safetensors does not match its SHA-256"
    ):
        Detector.load(artifact_dir)


@pytest.mark.parametrize(
    "name",
    [
        "weights.safetensors",
        "config.json",
        "calibration.json",
        "metrics.json",
        "reference.safetensors",
    ],
)
def test_deleted_file_is_refused(artifact_dir: Path, name: str) -> None:
    (artifact_dir / name).unlink()
    with pytest.raises(ArtifactNotFoundError, match=re.escape(name) + " is missing"):
        Detector.load(artifact_dir)


def test_truncated_file_is_refused(artifact_dir: Path) -> None:
    p = artifact_dir / "calibration.json"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(
        ArtifactIntegrityError, match=r"calibration\.json is \d+ bytes, manifest says"
    ):
        Detector.load(artifact_dir)


def test_missing_manifest_and_missing_dir(artifact_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError, match="does not exist or is not a directory"):
        Detector.load(tmp_path / "nope")
    (artifact_dir / "manifest.json").unlink()
    with pytest.raises(ArtifactNotFoundError, match=r"manifest\.json is missing"):
        Detector.load(artifact_dir)


def test_manifest_must_list_every_required_file(artifact_dir: Path) -> None:
    m = json.loads((artifact_dir / "manifest.json").read_text())
    del m["files"]["metrics.json"]
    (artifact_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match=r"does not list required file metrics\.json"):
        Detector.load(artifact_dir)


def test_manifest_cannot_point_outside(artifact_dir: Path) -> None:
    m = json.loads((artifact_dir / "manifest.json").read_text())
    m["files"]["../escape.json"] = {"sha256": "0" * 64, "bytes": 1}
    (artifact_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="is not allowed"):
        Detector.load(artifact_dir)


def test_save_refuses_to_overwrite_and_replaces_on_request(
    trained: TrainOutcome, artifact_dir: Path
) -> None:
    det = trained.detector
    with pytest.raises(ArtifactError, match="already exists"):
        artifact.save(
            artifact_dir,
            det.model,
            det.calibration,  # type: ignore[arg-type]
            det.input_spec,
            reference=det.reference,
            head=det.head,
        )
    artifact.save(
        artifact_dir,
        det.model,
        det.calibration,  # type: ignore[arg-type]
        det.input_spec,
        overwrite=True,
        reference=det.reference,
        head=det.head,
    )
    assert Detector.load(artifact_dir).threshold == det.threshold
    assert [p.name for p in artifact_dir.parent.iterdir()] == ["model"]  # no temp dirs left


def test_failed_save_leaves_nothing(
    trained: TrainOutcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    det = trained.detector

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "write_json", boom)
    target = tmp_path / "out" / "model"
    with pytest.raises(OSError, match="disk full"):
        artifact.save(
            target,
            det.model,
            det.calibration,
            det.input_spec,
            reference=det.reference,
            head=det.head,
        )  # type: ignore[arg-type]
    assert not target.exists()
    assert os.listdir(tmp_path / "out") == []


def _rewrite_tensors(artifact_dir: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a tensor file and re-sign it in the manifest, as an attacker could."""
    from safetensors.torch import save_file

    p = artifact_dir / name
    save_file(tensors, str(p))
    m = json.loads((artifact_dir / "manifest.json").read_text())
    m["files"][name] = {"sha256": artifact.sha256_file(p), "bytes": p.stat().st_size}
    (artifact_dir / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (
            {"latent_means": torch.zeros(3, 4)},
            r"latent_means is F32 \[3, 4\], expected F32 \[\d+, 4\]",
        ),
        ({"latent_means": torch.zeros(2, 2, 2)}, r"is F32 \[2, 2, 2\], expected"),
        ({"other": torch.zeros(1)}, r"must hold exactly one tensor 'latent_means'"),
    ],
)
def test_reference_of_the_wrong_shape_is_refused_before_it_is_read(
    artifact_dir: Path, tensors: dict[str, torch.Tensor], match: str
) -> None:
    _rewrite_tensors(artifact_dir, artifact.REFERENCE, tensors)
    with pytest.raises(ArtifactIntegrityError, match=match):
        Detector.load(artifact_dir)


def test_reference_with_nan_or_unlisted_is_refused(
    trained: TrainOutcome, artifact_dir: Path
) -> None:
    ref = trained.detector.reference
    assert ref is not None
    bad = ref.clone()
    bad[0, 0] = float("nan")
    _rewrite_tensors(artifact_dir, artifact.REFERENCE, {"latent_means": bad})
    with pytest.raises(ArtifactIntegrityError, match="holds NaN or infinity"):
        Detector.load(artifact_dir)
    m = json.loads((artifact_dir / "manifest.json").read_text())
    del m["files"][artifact.REFERENCE]
    (artifact_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="which its manifest does not list"):
        Detector.load(artifact_dir)  # the file is there, unlisted
    (artifact_dir / artifact.REFERENCE).unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"does not list reference\.safetensors"):
        Detector.load(artifact_dir)  # the calibration needs it


def _resign(artifact_dir: Path) -> None:
    """Recompute every checksum in the manifest, as an attacker who edits files can."""
    m = json.loads((artifact_dir / "manifest.json").read_text())
    for name in m["files"]:
        p = artifact_dir / name
        m["files"][name] = {"sha256": artifact.sha256_file(p), "bytes": p.stat().st_size}
    (artifact_dir / "manifest.json").write_text(json.dumps(m))


def _edit_json(artifact_dir: Path, name: str, edit: Any) -> None:
    p = artifact_dir / name
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))
    _resign(artifact_dir)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # values that verify but cannot be right
        (lambda c: c.update(scores=[], n_calibration=0), "at least one calibration score"),
        (lambda c: c.update(threshold=float("nan")), "must be finite"),
        (lambda c: c.update(target_fpr=1.5), "target FPR must be between 0 and 1"),
    ],
)
def test_calibrations_that_verify_but_cannot_be_right_are_refused(
    artifact_dir: Path, edit: Any, match: str
) -> None:
    _edit_json(artifact_dir, "calibration.json", edit)
    with pytest.raises(ArtifactIntegrityError, match=match):
        Detector.load(artifact_dir)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # memory bombs: refused from the weights' header, before the model allocates anything
        (lambda c: c["model"].update(widths=[200_000, 200_000]), "does not fit the model config"),
        (lambda c: c["model"].update(latent_dim=2_000_000_000), "does not fit the model config"),
        (
            lambda c: (
                c["model"].update(input_shape=[1, 100_000, 100_000]),
                c["input"].update(shape=[1, 100_000, 100_000]),
            ),
            "does not fit the model config",
        ),
        # an ensemble's config over one VAE's weights, and sizes no ensemble can have
        (lambda c: c["model"].update(members=3), "does not fit the model config"),
        (lambda c: c["model"].update(members=2.5), "members must be 1-16"),
        (lambda c: c["model"].update(members="3"), "members must be 1-16"),
        (lambda c: c["model"].update(members=1_000_000), "members must be 1-16"),
        # the spec and the model disagree
        (lambda c: c["input"].update(shape=[65]), "does not fit the model's input"),
    ],
)
def test_configs_that_do_not_fit_the_weights_are_refused(
    artifact_dir: Path, edit: Any, match: str
) -> None:
    _edit_json(artifact_dir, "config.json", edit)
    with pytest.raises(ArtifactIntegrityError, match=match):
        Detector.load(artifact_dir)


def test_nan_weights_are_refused(artifact_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    p = artifact_dir / artifact.WEIGHTS
    state = load_file(str(p))
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(p), metadata={"format": "pt"})
    _resign(artifact_dir)
    with pytest.raises(ArtifactIntegrityError, match="holds NaN or infinity"):
        Detector.load(artifact_dir)


def test_unlisted_files_links_and_folders_are_refused(artifact_dir: Path, tmp_path: Path) -> None:
    (artifact_dir / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(
        ArtifactIntegrityError, match=r"'evil\.pkl', which its manifest does not list"
    ):
        Detector.load(artifact_dir)
    (artifact_dir / "evil.pkl").unlink()
    # a listed file that is a symlink pointing outside the artifact
    outside = tmp_path / "metrics.json"
    (artifact_dir / "metrics.json").rename(outside)
    (artifact_dir / "metrics.json").symlink_to(outside)
    with pytest.raises(ArtifactIntegrityError, match="must be a regular file, not a link"):
        Detector.load(artifact_dir)
    (artifact_dir / "metrics.json").unlink()
    outside.rename(artifact_dir / "metrics.json")
    Detector.load(artifact_dir)  # whole again
    # a manifest that lists a file no artifact has
    (artifact_dir / "notes.txt").write_text("hello")
    m = json.loads((artifact_dir / "manifest.json").read_text())
    m["files"]["notes.txt"] = {"sha256": artifact.sha256_file(artifact_dir / "notes.txt")}
    (artifact_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match=r"lists 'notes\.txt', not an artifact file"):
        Detector.load(artifact_dir)


def test_a_reference_of_the_other_space_is_refused_before_it_is_read(artifact_dir: Path) -> None:
    """The calibration says which space the reference rows live in: an image model's latent
    rows (N x 4) under a calibration re-signed to claim the input space (N x 64) are refused
    from the header, naming both shapes."""
    p = artifact_dir / "calibration.json"
    cal = json.loads(p.read_text())
    assert cal["neighbour_space"] == "latent"
    cal["neighbour_space"] = "input"
    p.write_text(json.dumps(cal))
    m = json.loads((artifact_dir / "manifest.json").read_text())
    m["files"]["calibration.json"] = {"sha256": artifact.sha256_file(p), "bytes": p.stat().st_size}
    (artifact_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ArtifactIntegrityError, match=r"is F32 \[\d+, 4\], expected F32 \[\d+, 64\]"
    ):
        Detector.load(artifact_dir)


def test_a_head_that_does_not_fit_or_is_missing_is_refused(trained, artifact_dir: Path) -> None:  # type: ignore[no-untyped-def]
    head = trained.detector.head
    assert head is not None
    state = {k: v.clone() for k, v in head.state_dict().items()}
    _rewrite_tensors(
        artifact_dir, artifact.HEAD, {**state, "hidden.weight": torch.zeros(5, 64)}
    )  # 8x8 digits
    with pytest.raises(ArtifactIntegrityError, match=r"head\.safetensors holds"):
        Detector.load(artifact_dir)
    bad = {k: v.clone() for k, v in state.items()}
    bad["out.bias"][0] = float("inf")
    _rewrite_tensors(artifact_dir, artifact.HEAD, bad)
    with pytest.raises(ArtifactIntegrityError, match="holds NaN or infinity"):
        Detector.load(artifact_dir)
    m = json.loads((artifact_dir / "manifest.json").read_text())
    del m["files"][artifact.HEAD]
    (artifact_dir / "manifest.json").write_text(json.dumps(m))
    (artifact_dir / artifact.HEAD).unlink()
    with pytest.raises(ArtifactIntegrityError, match="which its transformation head needs"):
        Detector.load(artifact_dir)  # config.json still describes a head
