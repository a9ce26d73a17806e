"""The conformal test martingale on known streams: no alarm beyond alpha on exchangeable data,
an alarm soon after a change."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import detector.drift as drift_module
from detector.drift import (
    HUGE,
    MAX_DISTINCT,
    SIGNIFICANT_BITS,
    TINY,
    DriftTest,
    OnlineConformal,
    SimpleJumper,
    alarm_level,
    ks_distance,
    ks_of_counts,
    ks_statistic,
    quantise,
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


class _Held(Executor):
    """Runs what it is given only when told to: merges stay pending across many blocks."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        self.waiting.append((f, fn, args))
        return f

    def run_all(self) -> None:
        for f, fn, args in self.waiting:
            f.set_result(fn(*args))
        self.waiting = []


def test_background_merges_change_no_p_value() -> None:
    """A service's bag merges its large arrays in the background (the event loop never sorts a
    long stream); until a merge is done its two arrays are searched as they are. Every p-value is
    the one the calling thread's merges give, bit for bit, whether the merge is pending over many
    blocks or done at once, and the bag ends the same."""
    rng = np.random.default_rng(5)
    cal = np.sort(rng.normal(size=300))
    held = _Held()
    here, pending = OnlineConformal(cal, seed=3), OnlineConformal(cal, seed=3, background=held)
    here.BACKGROUND_ROWS = pending.BACKGROUND_ROWS = 64
    submitted = 0
    for step in range(400):
        block = rng.normal(size=int(rng.integers(1, 40))).round(2)  # ties too
        assert np.array_equal(here.p_values(block), pending.p_values(block))
        submitted = max(submitted, len(held.waiting))
        if step % 9 == 8:
            held.run_all()
    assert submitted == 1  # one merge at a time, and there were some
    assert pending.size == here.size
    for mine, theirs in zip(pending.bag(), here.bag(), strict=True):
        assert np.array_equal(mine, theirs)
    while held.waiting:  # merges done: the arrays' sizes are geometric again
        held.run_all()
        pending._settle()
    sizes = [a.size for a in pending.levels]
    assert all(big > 4 * small for big, small in itertools.pairwise(sizes))


def test_the_calling_thread_never_runs_a_large_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    merges: list[tuple[str, int]] = []
    real = drift_module._merge

    def recorded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        merges.append((threading.current_thread().name, a.size + b.size))
        return real(a, b)

    monkeypatch.setattr(drift_module, "_merge", recorded)
    rng = np.random.default_rng(6)
    with ThreadPoolExecutor(1, thread_name_prefix="merges") as pool:
        bag = OnlineConformal(np.sort(rng.normal(size=100)), background=pool)
        bag.BACKGROUND_ROWS = 500
        for _ in range(300):
            bag.p_values(rng.normal(size=20))
    mine = [n for who, n in merges if not who.startswith("merges")]
    assert mine and max(mine) < 500
    assert any(who.startswith("merges") for who, _ in merges)


def test_rounding_keeps_the_order_and_the_precision() -> None:
    rng = np.random.default_rng(7)
    # a heavy tail over 60 orders of magnitude, both signs, and the edges
    x = rng.standard_cauchy(200_000) * 10.0 ** rng.integers(-30, 30, 200_000)
    x = np.sort(np.concatenate([x, [0.0, -0.0, TINY, -TINY, HUGE, -HUGE, 1e300, -1e300]]))
    q = quantise(x)
    assert (np.diff(q) >= 0).all()  # non-decreasing: a conformity score in its own right
    assert np.array_equal(quantise(q), q)
    kept = (np.abs(x) >= TINY) & (np.abs(x) <= HUGE)
    assert (np.abs(q - x)[kept] <= np.abs(x[kept]) * 2.0**-SIGNIFICANT_BITS).all()
    assert (q[np.abs(x) < TINY] == 0).all() and np.abs(q).max() == HUGE
    assert quantise([-1000.1, -1000.13]).tolist() == [-1000.0, -1000.25]  # steps of 0.25 there
    # every value the rounding can give: 2048 a binade from TINY to HUGE, both signs, and 0
    steps = np.arange(2048, 4096) / 4096.0
    grid = np.ldexp(steps[None, :], np.arange(-23, 65)[:, None]).ravel()
    assert np.array_equal(quantise(grid), grid)
    assert 2 * (grid.size + 1) + 1 == MAX_DISTINCT


def test_p_values_are_the_rounded_scores_conformal_p_values() -> None:
    """Row by row, by brute force: each p-value ranks the row's rounded score among the rounded
    calibration scores and every earlier row, ties smoothed by the test's own uniform draws."""
    rng = np.random.default_rng(8)
    cal = rng.normal(100, 30, size=300)
    stream = np.concatenate([rng.normal(100, 30, 700), np.full(50, 100.01)])  # ties after rounding
    bag = OnlineConformal(np.sort(cal), seed=4)
    got = np.concatenate([bag.p_values(b) for b in np.array_split(stream, [1, 2, 40, 300, 301])])
    u = np.random.default_rng(4).random(stream.size)  # the draws, in the same order
    seen = list(quantise(cal))
    for i, q in enumerate(quantise(stream)):
        ref = np.asarray(seen)
        expected = ((ref > q).sum() + u[i] * ((ref == q).sum() + 1)) / (ref.size + 1)
        assert got[i] == pytest.approx(expected, rel=1e-12)
        seen.append(q)


def test_the_bag_stays_bounded_however_long_the_stream() -> None:
    """A million scores: the bag counts them all in under 10,000 values (their range, rounded),
    where keeping them cost 8 bytes a row; scores spread as wide as floats go stay within
    MAX_DISTINCT."""
    rng = np.random.default_rng(9)
    bag = OnlineConformal(np.sort(rng.normal(-900, 250, 600)))
    for block in rng.normal(-900, 250, (4000, 250)):  # a service's blocks
        bag.p_values(block)
    assert bag.size == 1_000_600
    assert bag.distinct() < 10_000
    assert bag.bag()[1].sum() == bag.size
    wild = OnlineConformal(np.zeros(10))
    for _ in range(20):
        wild.p_values(rng.standard_cauchy(50_000) * 10.0 ** rng.integers(-40, 40, 50_000))
    assert wild.distinct() <= MAX_DISTINCT and wild.size == 1_000_010


@pytest.mark.parametrize("n", [3_000, 30_000])
def test_the_ks_test_of_counts_is_scipys(n: int) -> None:
    """A stream held as counts of distinct values gets scipy's KS statistic and p-value without
    being rebuilt beyond 10,000 rows (scipy's exact test below, Smirnov's asymptotic above)."""
    rng = np.random.default_rng(10)
    cal = np.sort(quantise(rng.normal(size=600)))
    stream = quantise(np.round(rng.normal(0.1, 1.0, size=n), 2))  # ties
    values, counts = np.unique(stream, return_counts=True)
    ks, p = ks_of_counts(values, counts, cal)
    want_ks, want_p = ks_statistic(stream, cal)
    assert ks == want_ks and p == pytest.approx(want_p, rel=1e-9)
    test = DriftTest(cal, seed=1)
    test.update(stream)
    got = test.summary()
    assert got["ks_statistic"] == want_ks and got["ks_p_value"] == pytest.approx(want_p, rel=1e-9)
    assert got["n"] == n
