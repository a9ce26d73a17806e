"""ONNX export: ONNX Runtime on the exported file scores like ``Detector.score_parts``, for every
architecture and likelihood; the ``onnxruntime`` runtime gives the detector's own results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pandas as pd
import pytest

from detector.detector import Detector
from detector.errors import ConfigError
from detector.export import export_onnx
from training.data import Dataset
from training.options import TABLE_MEMBERS
from training.pipeline import CalibrationOptions, DataOptions, ModelOptions, train_detector
from training.train import TrainConfig
from vae_anomaly.cli import main

QUICK = TrainConfig(epochs=3, batch_size=64, min_steps=0, patience=0, seed=0, device="cpu")
CAL = CalibrationOptions(target_fpr=0.05, method="split")


def _close(a: npt.ArrayLike, b: npt.ArrayLike) -> None:
    """Equal to float32 precision: sums of hundreds of float32 terms, compared in nats."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(b).max())))


def _run_file(path: Path, x: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
    """The exported file run by a plain ONNX Runtime session: no vae-anomaly code involved."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": x}), strict=True))


def _check_file_parity(det: Detector, path: Path, x: npt.NDArray[np.float32]) -> None:
    parts = det.score_parts(x)
    out = _run_file(path, x.reshape(len(x), *det.model.config.input_shape))
    for name in ("reconstruction", "kl", "neighbour", "transformation"):
        _close(out[name], parts[name])
    cfg = det.score_config
    if cfg.complexity_weight:
        credit = np.minimum(parts["complexity"], cfg.complexity_cap or np.inf)
        credit -= np.maximum(0.0, (cfg.complexity_floor or 0.0) - parts["complexity"])
        _close(out["score_before_complexity"] - cfg.complexity_weight * credit, parts["score"])
        assert "score" not in out
    else:
        _close(out["score"], parts["score"])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    cal = json.loads(meta["vae_anomaly.calibration"])
    assert cal["threshold"] == det.threshold
    assert cal["scores"] == list(det.require_calibration().scores)
    assert meta["vae_anomaly.model_version"] == det.model_version
    assert json.loads(meta["vae_anomaly.input_spec"]) == det.input_spec.to_dict()


@pytest.mark.parametrize(
    ("architecture", "likelihood", "widths"),
    [
        ("mlp", "gaussian", (32, 16)),
        ("mlp", "bernoulli", (32, 16)),
        ("conv", "gaussian", (8, 16)),
        ("conv", "bernoulli", (8, 16)),
    ],
)
def test_onnx_runtime_scores_images_like_the_detector(
    tmp_path: Path, digits: Dataset, architecture: str, likelihood: str, widths: tuple[int, ...]
) -> None:
    model = ModelOptions(
        architecture=architecture, latent_dim=4, widths=widths, likelihood=likelihood
    )
    train_detector(
        DataOptions(dataset="digits", normal_class=3, cal_fraction=0.25, val_fraction=0.15),
        model,
        QUICK,
        CAL,
        out=tmp_path / "model",
        progress=False,
        dataset=digits,
    )
    det = Detector.load(tmp_path / "model")
    assert det.score_config.complexity_weight > 0  # digits have a value range: the credit is on
    assert det.score_config.neighbour_weight > 0
    assert det.head is not None and det.score_config.transformation_weight > 0  # square images
    export_onnx(det, tmp_path / "model.onnx")
    x = digits.x_test[:300]  # every digit: normal and anomalous rows
    _check_file_parity(det, tmp_path / "model.onnx", x)

    fast = Detector.load(tmp_path / "model", runtime="onnxruntime")
    a, b = det.score(x), fast.score(x)
    for name in ("score", "reconstruction", "kl", "complexity", "neighbour", "transformation"):
        _close(getattr(b, name), getattr(a, name))
    far = np.abs(a.score - a.threshold) > 1e-3 * np.abs(a.threshold)
    assert (a.is_anomaly == b.is_anomaly)[far].all()


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 10, n)
    df = pd.DataFrame(
        {
            "age": age,
            "income": 1000 + 50 * age + rng.normal(0, 200, n),
            "channel": rng.choice(["web", "phone", "store"], n, p=[0.6, 0.3, 0.1]),
            "visits": rng.poisson(5, n).astype(float),
        }
    )
    for c in df.columns:
        df.loc[rng.random(n) < 0.05, c] = None
    return df


def test_onnx_runtime_scores_a_table_with_categories_and_missing_cells(tmp_path: Path) -> None:
    _table(600, 0).to_csv(tmp_path / "normal.csv", index=False)
    train_detector(
        DataOptions(dataset=str(tmp_path / "normal.csv")),
        train=QUICK,
        calibration=CAL,
        out=tmp_path / "model",
        progress=False,
    )
    det = Detector.load(tmp_path / "model")
    assert det.score_config.neighbour_space == "input"  # a table's default: in the graph too
    assert det.model.config.members == TABLE_MEMBERS  # and its seed ensemble
    schema = det.input_spec.schema
    assert schema is not None
    fresh = _table(200, 1)
    fresh.loc[:9, "income"] *= 3  # anomalies
    fresh.loc[10:14, "channel"] = "fax"  # a category never seen
    columns = [
        [None if pd.isna(v) else (str(v) if c == "channel" else float(v)) for v in fresh[c]]
        for c in schema.names
    ]
    x = schema.encode(columns).x
    assert np.isnan(x).any()
    export_onnx(det, tmp_path / "model.onnx")
    _check_file_parity(det, tmp_path / "model.onnx", x)
    fast = Detector.load(tmp_path / "model", runtime="onnxruntime")
    _close(fast.score(x).score, det.score(x).score)


def test_export_command(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(trained.path), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "score_before_complexity" in said and "score_completion" in said
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "min(complexity(x)" in meta["vae_anomaly.score_completion"]
    assert "max(0, " in meta["vae_anomaly.score_completion"]  # the floor
    assert main(["export", "--model", str(trained.path), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(trained.path), "--out", str(out), "--overwrite"]) == 0


def test_iwae_score_is_not_exported(trained) -> None:  # type: ignore[no-untyped-def]
    det = Detector.load(trained.path)
    cal = det.require_calibration()
    iwae = Detector(
        det.model,
        type(cal)(
            target_fpr=cal.target_fpr,
            threshold=cal.threshold,
            scores=cal.scores,
            score_config=cal.score_config.replace(kind="iwae", samples=4),
            n_reference=cal.n_reference,
        ),
        det.input_spec,
        reference=det.reference,
        head=det.head,
    )
    with pytest.raises(ConfigError, match="only the ELBO score exports"):
        export_onnx(iwae, "/nonexistent/never-written.onnx")


def test_onnxruntime_runtime_needs_the_cpu(trained) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="unknown runtime"):
        Detector.load(trained.path, runtime="tensorrt")
