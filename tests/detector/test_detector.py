from __future__ import annotations

import numpy as np
import pytest

from detector.detector import Detector, resolve_device
from detector.errors import ConfigError, InputError, NotCalibratedError
from training.pipeline import TrainOutcome


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (
            np.zeros((3, 10)),
            r"X has 10 features per sample \(shape \(3, 10\)\), but the model is expecting 64 \(input shape 1x8x8\)",
        ),
        (np.zeros(64), r"X has shape \(64,\): expected a batch shaped \(N, 64\) or \(N, 1, 8, 8\)"),
        (np.zeros((0, 64)), "X is empty"),
        (
            np.zeros((2, 4, 16)),
            r"sample shape \(4, 16\), but the model is expecting \(1, 8, 8\) \(size-1 axes optional\)",
        ),
        (np.array([["a"] * 64]), "X must hold numbers, got dtype <U1"),
        ([[0.0] * 64, [0.0] * 3], "not a rectangular array"),
        (
            np.full((2, 64), 255.0),
            r"outside the model's input range \[0, 1\] in 2 sample\(s\), first at index 0 .*divide by 255",
        ),
        (
            np.where(np.arange(128).reshape(2, 64) == 70, np.nan, 0.0),
            r"NaN or infinite values in 1 sample\(s\), first at index 1",
        ),
        (np.full((1, 64), np.inf), "NaN or infinite"),
    ],
)
def test_bad_input_is_refused_with_a_message(trained: TrainOutcome, x: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        trained.detector.score(x)


def test_flat_and_image_inputs_agree(trained: TrainOutcome) -> None:
    x = trained.split.x_cal
    flat = x.reshape(len(x), -1)
    np.testing.assert_array_equal(
        trained.detector.score(x).score, trained.detector.score(flat).score
    )
    np.testing.assert_array_equal(
        trained.detector.score(flat.tolist()).score, trained.detector.score(x).score
    )


def test_result_fields(trained: TrainOutcome) -> None:
    det = trained.detector
    res = det.score(trained.split.x_cal)
    assert len(res) == len(trained.split.x_cal)
    assert res.threshold == det.threshold
    np.testing.assert_array_equal(res.is_anomaly, res.score > det.threshold)
    assert ((res.p_value > 0) & (res.p_value <= 1)).all()
    # On its own calibration set, at most ~target FPR are above the threshold.
    assert res.is_anomaly.mean() <= det.calibration.target_fpr  # type: ignore[union-attr]
    assert det.predict(trained.split.x_cal).dtype == bool
    x = trained.split.x_cal[:3]
    rec = det.reconstruct(x)
    assert rec.shape == (3, 1, 8, 8)
    assert np.abs(rec - x).mean() < 0.5 * np.abs(x - x.mean()).mean()  # better than the mean image


def test_uncalibrated_detector_refuses_flags_but_scores(trained: TrainOutcome) -> None:
    det = Detector(trained.detector.model, None, trained.detector.input_spec)
    assert det.score_parts(trained.split.x_cal)["score"].shape == (len(trained.split.x_cal),)
    with pytest.raises(NotCalibratedError, match="no threshold yet"):
        det.score(trained.split.x_cal)


def test_with_target_fpr_rethresholds(trained: TrainOutcome) -> None:
    loose = trained.detector.with_target_fpr(0.5)
    assert loose.threshold < trained.detector.threshold
    with pytest.raises(ConfigError, match="below 1/n"):
        trained.detector.with_target_fpr(0.001)


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_one_row_screen_names_what_is_wrong_with_each_row() -> None:
    from detector.spec import InputSpec, screen_rows

    spec = InputSpec(shape=(3,), value_range=(0.0, 1.0))
    x = np.array(
        [[0.1, 0.2, 0.3], [0.1, np.nan, 0.3], [0.0, 2.0, 1.0], [-np.inf, 5.0, 0.0]], np.float32
    )
    screen = screen_rows(x, spec)
    assert screen.bad.tolist() == [False, True, True, True]
    assert screen.nonfinite.tolist() == [False, True, False, True]
    assert screen.outside.tolist() == [False, False, True, False]  # non-finite wins
    assert screen.reason(x, 1, spec) == "NaN in feature 1"
    assert screen.reason(x, 3, spec) == "-infinity in feature 0"
    assert screen.reason(x, 2, spec).startswith("values outside the model's input range [0, 1]")
    unbounded = screen_rows(x, InputSpec(shape=(3,), value_range=None))
    assert unbounded.bad.tolist() == [False, True, False, True]
