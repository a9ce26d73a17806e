"""The visual report: every figure written, the page links only files that exist, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from training.data import Dataset
from training.evaluate import detection_metrics
from training.pipeline import TrainOutcome
from training.report import build
from vae_anomaly.cli import main

LABELLED = {
    "training_curves.png",
    "score_distribution.png",
    "roc_pr.png",
    "most_anomalous.png",
    "most_normal.png",
    "false_positives.png",
    "false_negatives.png",
    "latent_space.png",
    "prior_samples.png",
    "latent_interpolation.png",
}
NEED_LABELS = {"roc_pr.png", "false_positives.png", "false_negatives.png"}
PNG = b"\x89PNG\r\n\x1a\n"


def _linked(page: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8"))


def _check_page(report_dir: Path, figures: set[str]) -> None:
    page = report_dir / "index.html"
    links = _linked(page)
    assert set(links) == figures
    for name in links:
        f = report_dir / name
        assert f.is_file() and f.stat().st_size > 5_000, name
        assert f.read_bytes()[:8] == PNG, name
    assert {p.name for p in report_dir.iterdir()} == figures | {"index.html"}


def test_labelled_report_writes_every_figure(
    trained: TrainOutcome, digits: Dataset, tmp_path: Path
) -> None:
    det = trained.detector
    assert digits.x_test is not None and digits.y_test is not None
    y = (digits.y_test != 0).astype(int)
    # The tiny model separates digits 0 perfectly at its threshold; mislabel three samples on each
    # side so that both error galleries have something to show.
    s = det.score(digits.x_test).score
    y[np.argsort(s)[:3]] = 1  # the three most normal samples called anomalous: false negatives
    y[np.argsort(-s)[:3]] = 0  # the three most anomalous called normal: false positives
    rep = build(det, digits.x_test, tmp_path / "r", is_anomaly=y, labels=digits.y_test, examples=4)
    assert {p.name for p in rep.figures} == LABELLED and rep.skipped == {}
    _check_page(tmp_path / "r", LABELLED)
    expected = detection_metrics(det.score(digits.x_test).score, y, det.threshold)
    assert rep.summary["auroc"] == pytest.approx(expected["auroc"])
    assert rep.summary["observed_fpr"] == pytest.approx(expected["observed_fpr"])
    assert {str(c) for c in range(1, 10)} <= set(rep.summary["auroc_vs_class"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"{expected['auroc']:.4f}" in page and "AUROC against each class" in page


def test_report_without_labels_shows_what_needs_none(
    trained: TrainOutcome, digits: Dataset, tmp_path: Path
) -> None:
    assert digits.x_test is not None
    rep = build(trained.detector, digits.x_test[:50].reshape(50, -1), tmp_path / "r")
    assert {p.name for p in rep.figures} == LABELLED - NEED_LABELS
    assert set(rep.skipped) == NEED_LABELS
    _check_page(tmp_path / "r", LABELLED - NEED_LABELS)
    assert "Not shown: no normal / anomalous labels" in (tmp_path / "r" / "index.html").read_text()


def test_report_bad_inputs_leave_nothing(
    trained: TrainOutcome, digits: Dataset, tmp_path: Path
) -> None:
    det = trained.detector
    assert digits.x_test is not None
    from detector.errors import DataError, InputError

    with pytest.raises(InputError, match=r"expected 64 features .*got 10|64"):
        build(det, np.zeros((20, 10), np.float32), tmp_path / "r")
    with pytest.raises(DataError, match="is_anomaly has 3 values for 20 samples"):
        build(det, digits.x_test[:20], tmp_path / "r", is_anomaly=[0, 1, 0])
    assert not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()
    with pytest.raises(InputError, match="already exists"):
        build(det, digits.x_test[:20], tmp_path / "r")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_cli(artifact_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code, stdout, _ = _cli(capsys, "report", "--model", str(artifact_dir), "--out", str(out))
    assert code == 0, stdout
    assert str(out / "index.html") in stdout
    not_drawn = set(
        re.findall(
            r"not drawn: (\S+) \((?:no normal sample is above the threshold|"
            r"every anomaly is above the threshold)\)",
            stdout,
        )
    )
    assert not_drawn <= {"false_positives.png", "false_negatives.png"}
    assert f"{len(LABELLED) - len(not_drawn)} figures" in stdout
    _check_page(out, LABELLED - not_drawn)

    code, _, err = _cli(capsys, "report", "--model", str(artifact_dir), "--out", str(out))
    assert code == 1 and "already exists; pass --overwrite" in err

    x = np.random.default_rng(0).uniform(0, 1, (30, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    unlabelled = tmp_path / "unlabelled"
    argv = ["report", "--model", str(artifact_dir), "--data", str(tmp_path / "x.npy")]
    code, stdout, _ = _cli(capsys, *argv, "--out", str(unlabelled))
    assert code == 0 and "not drawn: roc_pr.png (no normal / anomalous labels)" in stdout
    _check_page(unlabelled, LABELLED - NEED_LABELS)


def test_report_cli_errors_are_one_line(
    artifact_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((5, 10), np.float32))
    (tmp_path / "a-file").write_text("not a folder")
    not_artifact = tmp_path / "empty"
    not_artifact.mkdir()
    cases = {
        "is not a model artifact|manifest": [
            "--model",
            str(not_artifact),
            "--out",
            str(tmp_path / "o1"),
        ],
        "64": [
            "--model",
            str(artifact_dir),
            "--data",
            str(tmp_path / "wide.npy"),
            "--out",
            str(tmp_path / "o2"),
        ],
        "a-file is not a directory": [
            "--model",
            str(artifact_dir),
            "--out",
            str(tmp_path / "a-file" / "report"),
        ],
    }
    for pattern, argv in cases.items():
        code, _, err = _cli(capsys, "report", *argv)
        assert code == 1, argv
        assert err.count("\n") == 1 and err.startswith("vae-anomaly: error: "), err
        assert re.search(pattern, err), err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
