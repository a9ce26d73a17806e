"""Calibration protocols: a held-out split, or cross-fit (every normal row scored out of fold)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from detector.detector import Detector
from detector.errors import ConfigError, FPRError
from training.data import Dataset
from training.pipeline import (
    CalibrationOptions,
    DataOptions,
    ModelOptions,
    calibration_method,
    train_detector,
)
from training.train import TrainConfig

SMALL_MODEL = ModelOptions(architecture="mlp", latent_dim=4, widths=(64, 32))
SMALL_TRAIN = TrainConfig(epochs=10, batch_size=32, lr=3e-3, min_steps=1000, device="cpu")


def _rows(digits: Dataset, n: int) -> Dataset:
    x = digits.x_train.reshape(len(digits.x_train), -1)[:n] * 16.0  # real-valued, no value range
    return Dataset(name="small", x_train=np.ascontiguousarray(x), y_train=None)


@pytest.mark.parametrize(
    ("method", "n_cal", "fpr", "expected"),
    [
        ("auto", 25, 0.01, "cross-fit"),  # 250 rows: 25 held out, 1 % needs 100
        ("auto", 199, 0.01, "cross-fit"),
        ("auto", 200, 0.01, "split"),
        ("auto", 40, 0.05, "split"),
        ("split", 25, 0.01, "split"),
        ("cross-fit", 1000, 0.01, "cross-fit"),
    ],
)
def test_calibration_method(method: str, n_cal: int, fpr: float, expected: str) -> None:
    opts = CalibrationOptions(target_fpr=fpr, method=method)
    assert calibration_method(opts, n_cal) == expected


def test_250_rows_calibrate_at_one_percent_by_cross_fitting(digits: Dataset) -> None:
    ds = _rows(digits, 250)
    out = train_detector(
        DataOptions(dataset="small"), SMALL_MODEL, SMALL_TRAIN, progress=False, dataset=ds
    )
    cal = out.detector.calibration
    assert cal is not None
    assert cal.protocol == "cross-fit" and cal.target_fpr == 0.01 and cal.n == 250
    assert out.metrics["calibration"]["method"] == "cross-fit"
    assert out.split.info["n_train"] + out.split.info["n_val"] == 250
    # Each calibration score came from a model that never trained on that row: the final model,
    # which did, scores its own training rows lower than the out-of-fold models did.
    in_sample = out.detector.score_parts(out.split.x_train)["score"]
    assert np.median(in_sample) < np.median(np.asarray(cal.scores))
    assert np.isfinite(cal.threshold)
    res = out.detector.score(ds.x_train)
    assert len(res) == 250


def test_a_split_too_small_for_the_target_is_refused_before_training(digits: Dataset) -> None:
    with pytest.raises(FPRError, match="below 1/n"):
        train_detector(
            DataOptions(dataset="small"),
            SMALL_MODEL,
            SMALL_TRAIN,
            CalibrationOptions(method="split"),
            progress=False,
            dataset=_rows(digits, 250),
        )


def test_too_few_rows_even_for_cross_fit_say_how_many_are_needed(digits: Dataset) -> None:
    with pytest.raises(
        FPRError,
        match=r"needs at least 100 normal rows, even with every row a "
        r"calibration point \(cross-fit\); the data has 80",
    ):
        train_detector(
            DataOptions(dataset="small"),
            SMALL_MODEL,
            SMALL_TRAIN,
            progress=False,
            dataset=_rows(digits, 80),
        )


def test_a_table_measures_neighbours_in_its_input_space(digits: Dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A table (1-D rows) gets the input-space neighbour term by default: its reference is the
    training rows' input features, the distance counts each feature in its spread over them, and
    the artifact carries it (scored alike after loading, on either runtime). Asked for, a table
    gets the latent space instead."""
    ds = _rows(digits, 600)
    quick = TrainConfig(epochs=3, batch_size=64, min_steps=0, patience=0, device="cpu")
    cal = CalibrationOptions(target_fpr=0.05, method="split")
    out = train_detector(
        DataOptions(dataset="small"),
        SMALL_MODEL,
        quick,
        cal,
        progress=False,
        dataset=ds,
        out=tmp_path / "m",
    )
    det = out.detector
    assert det.score_config.neighbour_space == "input" and det.score_config.neighbour_weight > 0
    # a table's reconstruction counts at a quarter against the KL term
    assert det.score_config.reconstruction_weight == 0.25
    plain = det.score_parts(ds.x_train[:25], config=det.score_config.replace(neighbour_weight=0.0))
    np.testing.assert_allclose(
        plain["score"], 0.25 * plain["reconstruction"] + plain["kl"], rtol=1e-6
    )
    assert det.reference is not None
    assert tuple(det.reference.shape) == (len(out.split.x_train), 64)
    x = ds.x_train[:25]
    feats, ref = det.input_features(x), det.reference.numpy()
    scale = ref.std(0)
    scale[scale <= 1e-6] = 1.0
    d = np.linalg.norm((feats[:, None] - ref[None]) / scale, axis=-1)
    np.testing.assert_allclose(det.score_parts(x)["neighbour"], np.sort(d, 1)[:, 4], rtol=1e-4)
    for runtime in ("torch", "onnxruntime"):
        loaded = Detector.load(tmp_path / "m", runtime=runtime)
        assert loaded.score_config.neighbour_space == "input"
        np.testing.assert_allclose(loaded.score(x).score, det.score(x).score, rtol=1e-5)
    latent = train_detector(
        DataOptions(dataset="small"),
        SMALL_MODEL,
        quick,
        CalibrationOptions(target_fpr=0.05, method="split", neighbour_space="latent"),
        progress=False,
        dataset=ds,
    ).detector
    # the posterior means of every member of the table's ensemble, side by side
    assert latent.model.config.members > 1
    assert (
        latent.reference is not None
        and latent.reference.shape[1] == 4 * latent.model.config.members
    )


def test_the_input_space_reference_is_a_seeded_subset_beyond_its_cap(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    import training.calibrate as C
    from detector.model import VAE, VAEConfig
    from detector.score import ScoreConfig
    from detector.spec import InputSpec

    monkeypatch.setattr(C, "MAX_INPUT_REFERENCE_ROWS", 100)
    torch.manual_seed(0)
    model = VAE(VAEConfig((6,), architecture="mlp", latent_dim=2, likelihood="gaussian"))
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    config = ScoreConfig(neighbour_space="input")
    ref, w = C.neighbour_setup(model, x, x[:50], InputSpec((6,)), 0.5, config=config, seed=3)
    assert ref is not None and tuple(ref.shape) == (100, 6) and w > 0
    rows = {tuple(r) for r in x}
    assert all(tuple(r) in rows for r in ref.numpy())  # training rows, not made-up ones
    again, _ = C.neighbour_setup(model, x, x[:50], InputSpec((6,)), 0.5, config=config, seed=3)
    assert again is not None and torch.equal(ref, again)  # the same seed, the same subset
    small, _ = C.neighbour_setup(model, x[:80], x[:50], InputSpec((6,)), 0.5, config=config)
    assert small is not None and small.shape[0] == 80  # under the cap: every training row


def test_the_ensemble_size_follows_the_data_and_the_score() -> None:
    """auto: a seed ensemble of TABLE_MEMBERS for rows of features, one VAE for images and for
    the importance-weighted score, which needs a single VAE; asked for, it is refused there."""
    import torch

    from detector.model import VAE
    from detector.score import iwae_score
    from training.options import TABLE_MEMBERS, ModelOptions
    from training.pipeline import build_model_config

    auto = ModelOptions()
    assert TABLE_MEMBERS > 1 and auto.resolve_members((30,)) == TABLE_MEMBERS
    assert auto.resolve_members((1, 28, 28)) == 1
    assert auto.resolve_members((30,), "iwae") == 1
    assert ModelOptions(members=5).resolve_members((1, 28, 28)) == 5
    with pytest.raises(ConfigError, match=r"ensemble .* is scored by the elbo, not iwae"):
        ModelOptions(members=2).resolve_members((30,), "iwae")
    cfg = build_model_config((30,), False, auto)
    assert cfg.members == TABLE_MEMBERS and cfg.code_dim == TABLE_MEMBERS * cfg.latent_dim
    assert build_model_config((784,), True, auto, score_kind="iwae").members == 1
    with pytest.raises(ConfigError, match="needs a single VAE"):
        iwae_score(VAE(cfg), torch.zeros(2, 30), 4)


def test_a_reconstruction_weight_is_checked_before_training() -> None:
    """Refused from the options alone (train_detector resolves them before it fits a model)."""
    auto = CalibrationOptions()
    assert auto.resolve_reconstruction_weight((30,)) == 0.25  # a table
    assert auto.resolve_reconstruction_weight((1, 28, 28)) == 1.0  # an image
    iwae = CalibrationOptions(score_kind="iwae", score_samples=4)
    assert iwae.resolve_reconstruction_weight((30,)) == 1.0  # the bound is scored whole
    with pytest.raises(ConfigError, match="needs --score elbo; the iwae score is scored whole"):
        replace(iwae, reconstruction_weight=0.5).resolve_reconstruction_weight((30,))
    with pytest.raises(ConfigError, match="finite number > 0, got 0"):
        CalibrationOptions(reconstruction_weight=0.0).resolve_reconstruction_weight((30,))
