from __future__ import annotations

import math

import numpy as np
import pytest

from detector.errors import ConfigError, FPRError
from detector.score import ScoreConfig
from detector.threshold import Calibration, conformal_threshold, p_values, validate_fpr


@pytest.mark.parametrize(
    ("scores", "fpr", "expected"),
    [
        (np.arange(1, 101), 0.05, 96.0),  # k = ceil(101 * 0.95) = 96
        (np.arange(1, 101), 0.01, 100.0),  # k = ceil(101 * 0.99) = 100
        (np.arange(1, 10), 0.2, 8.0),  # k = ceil(10 * 0.8) = 8
        (np.arange(1, 20)[::-1], 0.5, 10.0),  # order of input does not matter; k = 10
        (np.array([5.0, 5.0, 5.0, 1.0]), 0.25, 5.0),  # ties; k = ceil(3.75) = 4
    ],
)
def test_conformal_threshold_known_values(scores: np.ndarray, fpr: float, expected: float) -> None:
    assert conformal_threshold(scores, fpr) == expected


def test_p_values_known_values() -> None:
    cal = np.array([4.0, 1.0, 3.0, 2.0])
    got = p_values([0.0, 1.0, 2.5, 3.0, 4.0, 10.0], cal)
    # (1 + #{cal >= s}) / (n + 1), n = 4
    np.testing.assert_allclose(got, [5 / 5, 5 / 5, 3 / 5, 3 / 5, 2 / 5, 1 / 5])


@pytest.mark.parametrize(
    ("fpr", "n", "match"),
    [
        (0.0, 100, "strictly between 0 and 1"),
        (1.0, 100, "strictly between 0 and 1"),
        (-0.1, 100, "strictly between 0 and 1"),
        (1.5, 100, "strictly between 0 and 1"),
        (math.nan, 100, "must be a number"),
        (0.01, 50, r"below 1/n = 0.02 for n = 50.*at least 100"),
        (0.05, 0, "at least one held-out"),
    ],
)
def test_validate_fpr_errors(fpr: float, n: int, match: str) -> None:
    with pytest.raises(FPRError, match=match):
        validate_fpr(fpr, n)


def test_fpr_error_is_a_value_error_and_threshold_uses_it() -> None:
    with pytest.raises(ValueError, match="below 1/n"):
        conformal_threshold(np.arange(10.0), 0.01)


def test_calibration_rejects_bad_scores() -> None:
    with pytest.raises(ConfigError, match="NaN or infinity"):
        Calibration.fit([1.0, np.nan, 2.0], 0.5)
    with pytest.raises(ConfigError, match="at least one"):
        Calibration.fit([], 0.5)


def test_flags_agree_with_p_values() -> None:
    rng = np.random.default_rng(1)
    cal = Calibration.fit(rng.normal(size=500), 0.05)
    s = rng.normal(size=2000) * 1.5
    flags, p = cal.flags(s), cal.p_values(s)
    assert np.all(p[flags] <= cal.target_fpr)  # flagged -> p <= target FPR


def test_conformal_fpr_holds_on_fresh_normal_data() -> None:
    rng = np.random.default_rng(2)
    fprs = []
    for _ in range(200):  # average over calibration draws: E[FPR] <= target
        cal = Calibration.fit(rng.standard_normal(199), 0.05)
        fprs.append(cal.flags(rng.standard_normal(2000)).mean())
    assert np.mean(fprs) <= 0.05 + 0.005
    assert np.mean(fprs) > 0.04  # and the threshold is not needlessly loose


def test_calibration_dict_round_trip_and_refit() -> None:
    cal = Calibration.fit(np.arange(200.0), 0.02, score_config=ScoreConfig(kind="iwae", samples=8))
    back = Calibration.from_dict(cal.to_dict())
    assert back == cal
    assert cal.with_fpr(0.1).threshold == conformal_threshold(np.arange(200.0), 0.1)
    bad = cal.to_dict() | {"n_calibration": 3}
    with pytest.raises(ConfigError, match="n_calibration"):
        Calibration.from_dict(bad)


def test_calibration_records_cap_and_protocol() -> None:
    cal = Calibration.fit(
        np.arange(200.0),
        0.02,
        score_config=ScoreConfig(
            complexity_weight=1.0, complexity_cap=300.0, complexity_floor=120.0
        ),
    )
    assert cal.protocol == "split"
    xf = Calibration.fit(np.arange(200.0), 0.02, protocol="cross-fit")
    for c in (cal, xf):
        assert Calibration.from_dict(c.to_dict()) == c
    old = cal.to_dict()
    del old["complexity_cap"], old["complexity_floor"], old["protocol"]  # before they existed
    back = Calibration.from_dict(old)
    assert back.score_config.complexity_cap is None and back.protocol == "split"
    assert back.score_config.complexity_floor is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"complexity_cap": -1.0}, "complexity cap must be a finite number >= 0"),
        ({"complexity_cap": float("nan")}, "complexity cap must be a finite number >= 0"),
        ({"complexity_floor": -3.0}, "complexity floor must be a finite number >= 0"),
        ({"protocol": "jackknife"}, "unknown calibration protocol 'jackknife'"),
    ],
)
def test_calibration_refuses_bad_cap_or_protocol(change: dict, match: str) -> None:
    d = Calibration.fit(np.arange(200.0), 0.02).to_dict() | change
    with pytest.raises(ConfigError, match=match):
        Calibration.from_dict(d)


def test_a_calibration_written_before_the_score_config_reads_and_writes_the_same() -> None:
    """calibration.json as the release of 2026-12-04 (f2d7552) wrote it, before the score
    settings became one ScoreConfig: every key reads back, and writing gives the same file."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "calibration-2026-12-04.json"
    saved = json.loads(path.read_text())
    cal = Calibration.from_dict(saved)
    assert cal.score_config == ScoreConfig(
        complexity_weight=1.0,
        complexity_cap=151.2,
        neighbour_weight=2.5,
        neighbour_k=5,
        complexity_codec="zlib-ng",
        complexity_filter="png-average",
    )
    assert (cal.protocol, cal.n_reference, cal.n, cal.target_fpr) == ("cross-fit", 120, 40, 0.05)
    assert cal.threshold == saved["threshold"]
    written = cal.to_dict()
    del written["complexity_codec_version"], saved["complexity_codec_version"]  # the library's
    assert written.pop("complexity_floor") is None  # added since, absent = no floor
    assert written.pop("neighbour_space") == "latent"  # added since, absent = the latent space
    assert written.pop("reconstruction_weight") == 1.0  # added since, absent = the -ELBO
    assert written.pop("transformation_weight") == 0.0  # added since, absent = no head
    assert written.pop("transformation_offset") == 1.0
    assert written == saved


def test_a_vanishing_target_fpr_is_refused_in_words() -> None:
    from detector.errors import FPRError
    from detector.threshold import validate_fpr

    with pytest.raises(FPRError, match="hold out at least more than 1e308 normal samples"):
        validate_fpr(5e-324, 119)
    with pytest.raises(FPRError, match="hold out at least 1000000000000 normal samples"):
        validate_fpr(1e-12, 119)
