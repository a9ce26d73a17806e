"""The transformation head: its permutations, its surprise, its config, its place in the artifact
and in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from detector import artifact
from detector.errors import ConfigError
from detector.transforms import (
    HeadConfig,
    TransformHead,
    default_pool,
    permutations,
    supports,
)
from training.head import fit_head, fit_transformation_term
from training.pipeline import CalibrationOptions, DataOptions, train_detector


def test_each_transformation_is_a_rotation_then_a_sideways_shift_of_the_pixels() -> None:
    config = HeadConfig((1, 28, 28))  # unpooled
    perms = permutations(config)
    assert perms.shape == (12, 784)
    assert torch.equal(perms[0], torch.arange(784))  # the first is the image as it is
    for row in perms:  # every one a permutation: no pixel lost or repeated
        assert torch.equal(row.sort().values, torch.arange(784))
    assert len({tuple(r.tolist()) for r in perms}) == 12  # all different
    x = torch.rand(3, 1, 28, 28)
    head = TransformHead(config)
    flat = head.inputs(x)
    expected = {
        1: torch.rot90(x, 1, (-2, -1)),  # a quarter turn, unshifted
        6: torch.roll(torch.rot90(x, 2, (-2, -1)), -4, -1),  # half a turn, 4 pixels left
        11: torch.roll(torch.rot90(x, 3, (-2, -1)), 4, -1),  # three quarters, 4 pixels right
    }
    for k, want in expected.items():
        got = head.transformed(flat, torch.full((3,), k)).reshape(x.shape)
        assert torch.equal(got, want)


def test_the_head_sees_a_pooled_normalised_image() -> None:
    config = HeadConfig((28, 28), offset=1.0, scale=254.0, pool=2)
    assert config.pool == 2 and config.grid == (1, 14, 14) and config.n_inputs == 196
    assert permutations(config).shape == (12, 196)
    x = torch.rand(2, 28, 28) * 255
    want = (F.avg_pool2d(x[:, None], 2) - 1.0) / 254.0
    torch.testing.assert_close(TransformHead(config).inputs(x), want.reshape(2, 196))
    assert default_pool(8) == default_pool(28) == default_pool(63) == 1
    assert default_pool(64) == 2 and default_pool(224) == 7
    with pytest.raises(ConfigError, match="side of at least 8"):
        HeadConfig((28, 28), pool=4)


def test_surprise_is_the_summed_cross_entropy_over_the_transformations() -> None:
    torch.manual_seed(0)
    head = TransformHead(HeadConfig((12, 12), offset=0.5, scale=2.0)).eval()
    x = torch.rand(6, 12, 12)
    flat = head.inputs(x)
    want = torch.zeros(6)
    for k in range(head.config.n_transforms):
        kk = torch.full((6,), k)
        want += F.cross_entropy(head(head.transformed(flat, kk)), kk, reduction="none")
    with torch.no_grad():
        got = head.nll(x)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        assert (got >= 0).all()
        # row by row as in one batch: the surprise of a row does not depend on its batch
        one = torch.cat([head.nll(x[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(one, got, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        ((28, 28), True),
        ((1, 28, 28), True),
        ((3, 32, 32), True),
        ((784,), False),  # a table or a flat vector: a rotation means nothing
        ((1, 28, 20), False),  # not square: a quarter turn changes the shape
        ((5, 8, 8), False),  # five channels: not an image
        ((4, 4), False),  # too small to shift
    ],
)
def test_the_head_applies_to_square_images_only(shape: tuple[int, ...], ok: bool) -> None:
    assert supports(shape) is ok
    if not ok:
        with pytest.raises(ConfigError, match="transformation head needs"):
            HeadConfig(shape)


def test_head_config_round_trips_and_refuses_what_cannot_be_right() -> None:
    config = HeadConfig((1, 8, 8), offset=0.0, scale=16.0, width=32)
    assert HeadConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (
        {**config.to_dict(), "extra": 1},
        {**config.to_dict(), "width": 1.5},
        {**config.to_dict(), "width": 10**9},
        {**config.to_dict(), "scale": 0},
        {**config.to_dict(), "transforms": "every-way"},
        {**config.to_dict(), "input_shape": "8x8"},
        {**config.to_dict(), "pool": 2.0},
    ):
        with pytest.raises(ValueError):
            HeadConfig.from_dict(bad)


def test_weight_and_offset_from_the_validation_normals() -> None:
    rng = np.random.default_rng(0)
    score = rng.normal(0, 10, 500)
    surprise = rng.exponential(3.0, 500)
    w, offset = fit_transformation_term(score, surprise, 0.4)
    assert offset == pytest.approx(np.quantile(surprise, 0.75))
    assert np.std(w * np.log(surprise + offset)) == pytest.approx(0.4 * np.std(score))
    # a head sure of most normal images (hundredths of a nat): the offset stops at one nat
    sure = rng.exponential(0.01, 500)
    w, offset = fit_transformation_term(score, sure, 0.4)
    assert offset == 1.0
    assert np.std(w * np.log(sure + offset)) == pytest.approx(0.4 * np.std(score))
    assert fit_transformation_term(score, surprise, 0.0) == (0.0, 1.0)
    assert fit_transformation_term(score, np.zeros(500), 0.4) == (0.0, 1.0)  # no evidence
    with pytest.raises(ConfigError, match="transformation share"):
        fit_transformation_term(score, surprise, float("nan"))


def test_a_trained_head_tells_the_transformations_of_its_images_apart(digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.x_train[digits.y_train == 0]
    head = fit_head(x, (1, 8, 8), (0.0, 1.0), seed=0)
    with torch.no_grad():
        normal = head.nll(torch.from_numpy(x)).mean()
        others = head.nll(torch.from_numpy(digits.x_train[digits.y_train != 0][:300])).mean()
        untrained = TransformHead(head.config).nll(torch.from_numpy(x)).mean()
    assert normal < 0.5 * untrained  # it learnt its images' transformations
    assert others > 2 * normal  # other digits leave it unsure


def test_tables_and_a_zero_share_train_without_a_head(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    flat = digits.x_train.reshape(len(digits.x_train), -1)
    np.save(tmp_path / "rows.npy", flat[digits.y_train == 1] * 16)  # a 2-D .npy: a table
    table = train_detector(
        DataOptions(dataset=str(tmp_path / "rows.npy"), normal_class=None),
        TINY_MODEL,
        TINY_TRAIN,
        CalibrationOptions(target_fpr=0.05),
        out=tmp_path / "table",
        progress=False,
    )
    assert table.detector.head is None and table.detector.score_config.transformation_weight == 0
    assert not (tmp_path / "table" / artifact.HEAD).exists()
    assert (table.detector.score_parts(flat[:5] * 16)["transformation"] == 0).all()
    off = train_detector(
        DataOptions(dataset="digits", normal_class=0),
        TINY_MODEL,
        TINY_TRAIN,
        CalibrationOptions(target_fpr=0.05, transformation_share=0.0),
        progress=False,
        dataset=digits,
    )
    assert off.detector.head is None
    with pytest.raises(ConfigError, match="needs square images"):
        train_detector(
            DataOptions(dataset=str(tmp_path / "rows.npy"), normal_class=None),
            TINY_MODEL,
            TINY_TRAIN,
            CalibrationOptions(transformation_share=0.4),
            progress=False,
        )
