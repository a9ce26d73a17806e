"""The conformal test martingale on known streams: no alarm beyond alpha on exchangeable data,
an alarm soon after a change."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.drift import (
    DriftTest,
    OnlineConformal,
    SimpleJumper,
    alarm_level,
    ks_distance,
    ks_statistic,
)


def test_smoothed_p_values_are_uniform_for_exchangeable_scores() -> None:
    rng = np.random.default_rng(0)
    cal = np.sort(rng.normal(size=500))
    p = OnlineConformal(cal, seed=1).p_values(rng.normal(size=20000))
    assert p.min() > 0 and p.max() < 1
    assert abs(p.mean() - 0.5) < 0.02
    # ties: a discrete score gets a random position among its equals
    tied = OnlineConformal(np.zeros(99), seed=2).p_values(np.zeros(5000))
    assert abs(tied.mean() - 0.5) < 0.02


def test_the_martingale_bets_the_known_way() -> None:
    m = SimpleJumper(jump=0.0)  # no jumps: the mean of the four bets' products
    m.update([0.1, 0.005])
    tail = 0.95 * (0.95 + 0.05 / 0.01)  # p = 0.1 misses the tail, 0.005 hits it
    expected = ((1.4 * 1.495) + 1.0 + (0.6 * 0.505) + tail) / 4
    assert math.isclose(m.log_value, math.log(expected), rel_tol=1e-12)
    assert m.n == 2 and m.log_max >= m.log_value


def test_uniform_streams_alarm_at_most_alpha() -> None:
    """Ville's inequality on 400 streams of 5,000 uniform p-values: at most alpha alarm."""
    rng = np.random.default_rng(1)
    alpha = 0.05
    alarms = 0
    for _ in range(400):
        m = SimpleJumper(level=alarm_level(alpha))
        m.update(rng.random(5000))
        alarms += m.first_crossing is not None
    assert alarms / 400 <= alpha


def test_online_p_values_keep_the_false_alarm_rate() -> None:
    """A small calibration set and streams 20 times longer (the service's case): the online
    p-values keep the alarm rate at most alpha, where p-values against the fixed calibration
    set alone would not (docs in detector.drift)."""
    rng = np.random.default_rng(2)
    alpha = 0.05
    alarms = 0
    for _ in range(100):
        cal = np.sort(rng.normal(size=200))
        t = DriftTest(cal, alpha=alpha, seed=int(rng.integers(1 << 30)))
        t.update(rng.normal(size=4000))
        alarms += t.summary()["alarm"]
    assert alarms / 100 <= alpha


@pytest.mark.parametrize("shift", [0.5, -0.5])
def test_a_shift_raises_the_alarm(shift: float) -> None:
    rng = np.random.default_rng(3)
    cal = np.sort(rng.normal(size=1000))
    t = DriftTest(cal)
    t.update(rng.normal(size=500))  # normal traffic first
    t.update(rng.normal(loc=shift, size=2000))  # then the scores move
    s = t.summary()
    assert s["alarm"] and 500 < s["first_alarm_at_row"] < 1500
    assert s["ks_statistic"] > 0.1 and s["ks_p_value"] < 1e-6


def test_ks_statistic_of_identical_samples_is_small() -> None:
    rng = np.random.default_rng(4)
    cal = np.sort(rng.normal(size=2000))
    ks, p = ks_statistic(rng.normal(size=2000), cal)
    assert ks < 0.06 and p > 0.01


def test_ks_distance_is_scipys_statistic() -> None:
    """The service's statistic-only KS equals scipy's, with ties inside and across the samples."""
    rng = np.random.default_rng(5)
    for n, m, shift in [(1000, 592, 0.0), (300, 50, 0.4), (1, 7, 0.0), (64, 64, -2.0)]:
        cal = np.sort(np.round(rng.normal(size=m), 1))
        window = np.round(rng.normal(shift, 1.0, size=n), 1)
        assert ks_distance(window, cal) == pytest.approx(ks_statistic(window, cal)[0], abs=1e-12)
    assert ks_distance([], np.array([1.0])) == 0.0
    assert ks_distance([5.0, 6.0], np.array([1.0, 2.0])) == 1.0


def test_score_summary_and_drift_command(trained, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Offline: the score summary carries the test, `vae-anomaly drift` prints it."""
    import json

    from serving.batch import BatchOptions, drift_files, score_files
    from vae_anomaly.cli import main

    det = trained.detector
    x = trained.split.x_test.reshape(len(trained.split.x_test), -1)
    normal = x[trained.split.y_test == 0]
    np.save(tmp_path / "normal.npy", normal)
    np.save(tmp_path / "shifted.npy", x[trained.split.y_test == 1])
    s = score_files(det, [tmp_path / "normal.npy"], tmp_path / "o.csv", BatchOptions())
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["drift"] == s.drift and s.drift["n"] == len(normal)
    shifted = drift_files(det, [tmp_path / "shifted.npy"])
    assert shifted["alarm"] and shifted["ks_statistic"] > 0.5
    code = main(
        ["drift", "--model", str(trained.path), str(tmp_path / "shifted.npy"), "--fail-on-drift"]
    )
    assert code == 3 and "drift: the rows stop looking like the calibration data" in (
        capsys.readouterr().out
    )


def test_benchmark_streams_shift_after_the_clean_rows() -> None:
    from vae_anomaly.bench.drift import streams

    rng = np.random.default_rng(0)
    normal = np.zeros((1000, 4), np.float32)
    other = np.ones((500, 4), np.float32)
    s = streams(normal, other, 0.2, 200, rng)
    swapped = s[:, 0] == 1
    assert not swapped[:200].any() and 0.15 < swapped[200:].mean() < 0.25
    ramp = streams(normal, other, "ramp", 200, rng)[:, 0] == 1
    assert not ramp[:200].any() and ramp[200:600].mean() < ramp[600:].mean()
    assert (streams(normal, other, 0.0, 200, rng) == 0).all()


def test_a_contamination_raises_the_alarm() -> None:
    """5 % of the rows from far away among normal ones: the tail bet catches it."""
    rng = np.random.default_rng(5)
    cal = np.sort(rng.normal(size=585))
    s = rng.normal(size=1000)
    odd = rng.random(1000) < 0.05
    odd[:200] = False
    s[odd] = rng.normal(5, 1, int(odd.sum()))
    t = DriftTest(cal)
    t.update(s)
    assert t.summary()["alarm"] and t.summary()["first_alarm_at_row"] > 200
