"""Calibration protocols: a held-out split, or cross-fit (every normal row scored out of fold)."""

from __future__ import annotations

import numpy as np
import pytest

from detector.errors import FPRError
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
