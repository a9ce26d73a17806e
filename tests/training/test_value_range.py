"""A user's images in a .npy: their value range, inferred or declared, and what it gives them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from detector.errors import DataError
from training.data import Dataset, load_dataset
from training.pipeline import DataOptions, train_detector
from training.train import TrainConfig
from training.value_range import infer_value_range, parse_value_range


@pytest.mark.parametrize(
    ("arr", "expected"),
    [
        (np.array([[[0, 7]], [[255, 3]]], np.uint8), (0.0, 255.0)),
        (np.array([[[0, 7]], [[4000, 3]]], np.uint16), (0.0, 65535.0)),
        (np.array([[[0.0, 0.25]], [[1.0, 0.5]]], np.float32), (0.0, 1.0)),
        (np.array([[[0.0, 17.0]], [[255.0, 3.0]]], np.float64), (0.0, 255.0)),  # 8-bit as floats
        (np.array([[[0.0, 17.5]], [[255.0, 3.0]]], np.float32), None),  # not whole numbers
        (np.array([[[-1.0, 0.5]], [[1.0, 0.0]]], np.float32), None),  # below 0
        (np.array([[[0, 300]], [[1, 2]]], np.int32), None),  # above 255
    ],
)
def test_infer_value_range(arr: np.ndarray, expected: tuple[float, float] | None) -> None:
    vr, why = infer_value_range(arr)
    assert vr == expected
    assert why  # the reason is shown to the user and saved as the preprocessing
    if expected is None:
        assert "--value-range" in why


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", "auto"), ("None", None), ("0,255", (0.0, 255.0)), (" -1, 1 ", (-1.0, 1.0))],
)
def test_parse_value_range(text: str, expected: object) -> None:
    assert parse_value_range(text) == expected


@pytest.mark.parametrize("text", ["0", "0,1,2", "a,b", "1,1", "2,1", "0,inf", "nan,1"])
def test_parse_value_range_refuses(text: str) -> None:
    with pytest.raises(DataError, match="value range"):
        parse_value_range(text)


def _uint8_images(digits: Dataset) -> np.ndarray:
    """The digits' 4-bit images as a user's 8-bit array: (N, 8, 8) uint8."""
    return np.round(digits.x_train[:, 0] * 255).astype(np.uint8)


def test_load_dataset_infers_and_checks_a_declared_range(tmp_path: Path, digits: Dataset) -> None:
    np.save(tmp_path / "u8.npy", _uint8_images(digits))
    ds = load_dataset(str(tmp_path / "u8.npy"))
    assert ds.value_range == (0.0, 255.0) and ds.sample_shape == (8, 8)
    assert "uint8" in ds.preprocessing
    assert load_dataset(str(tmp_path / "u8.npy"), value_range=(0.0, 1000.0)).value_range == (
        0.0,
        1000.0,
    )
    assert load_dataset(str(tmp_path / "u8.npy"), value_range=None).value_range is None
    with pytest.raises(DataError, match=r"run from 0 to 255, outside the declared value range 0,1"):
        load_dataset(str(tmp_path / "u8.npy"), value_range=(0.0, 1.0))
    # a table or a built-in set has no pixels to range
    np.save(tmp_path / "table.npy", np.ones((5, 3), np.float32))
    for name in (str(tmp_path / "table.npy"), "digits"):
        with pytest.raises(DataError, match=r"applies to images in a \.npy file"):
            load_dataset(name, value_range=(0.0, 255.0))


def test_uint8_images_get_what_unit_images_get(tmp_path: Path, digits: Dataset) -> None:
    """The same images as uint8 (0-255) and as floats in [0, 1] train the same model: scores
    differ by the constant log-Jacobian of the map (D log 255 nats), and both have the
    complexity term. Before, the uint8 copy was standardised pixel by pixel, without it."""
    u8 = _uint8_images(digits)
    np.save(tmp_path / "u8.npy", u8)
    np.save(tmp_path / "f.npy", u8.astype(np.float32) / 255.0)
    train = TrainConfig(device="cpu", epochs=2, min_steps=40, seed=3)
    dets = [
        train_detector(DataOptions(dataset=str(tmp_path / n)), train=train, progress=False).detector
        for n in ("u8.npy", "f.npy")
    ]
    assert [d.input_spec.value_range for d in dets] == [(0.0, 255.0), (0.0, 1.0)]
    assert all(d.score_config.complexity_weight == 1.0 for d in dets)
    assert dets[0].score_config.complexity_cap == dets[1].score_config.complexity_cap
    parts = [d.score_parts(x) for d, x in zip(dets, (u8, u8 / 255.0), strict=True)]
    shift = u8[0].size * math.log(255.0)
    np.testing.assert_allclose(
        parts[0]["reconstruction"] - parts[1]["reconstruction"], shift, rtol=0, atol=0.05
    )
    np.testing.assert_allclose(parts[0]["complexity"], parts[1]["complexity"])
    np.testing.assert_allclose(parts[0]["score"] - parts[1]["score"], shift, rtol=0, atol=0.05)
    assert dets[0].threshold - dets[1].threshold == pytest.approx(shift, abs=0.05)
