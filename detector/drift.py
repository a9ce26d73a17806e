"""Does the scored data still look like the calibration data? A conformal test martingale.

The calibration scores are the detector's picture of normal data. For a scored row with score s,
the smoothed conformal p-value against the n calibration scores::

    p = (#{cal > s} + U * (#{cal == s} + 1)) / (n + 1),      U ~ Uniform(0, 1)

is uniform on [0, 1] when the row is exchangeable with the calibration rows. A *betting
martingale* over the stream of p-values (Vovk, Petej, Nouretdinov, Ahlberg, Carlsson and
Gammerman, "Retrain or not retrain: conformal test martingales for change-point detection",
COPA 2021: the Simple Jumper) grows when the p-values stop being uniform: it holds its capital on
three bets, f(p) = 1 + e (p - 1/2) for e in {-1, 0, +1} (small p-values, i.e. scores drifting
up; no bet; large p-values, scores drifting down), plus a fourth of ours on very small p-values
(a contamination: ``SimpleJumper``), and moves a share ``jump`` of it between them at every
step, so it follows a change that starts late. By Ville's inequality, a nonnegative
martingale that starts at 1 ever reaches 1/alpha with probability at most alpha: an alarm at
log M >= log(1 / alpha) is a false alarm with probability at most alpha, however long the stream.

The p-values are *online* (Vovk's conformal test martingales): each scored row joins the
reference bag after its own p-value is computed, so row k is ranked among the calibration scores
and the k - 1 rows before it. Then the p-values are independent and exactly uniform under
exchangeability, and Ville's bound holds for a stream of any length. Against the fixed
calibration set alone they would not be: given that set, the p-values follow its sample
distribution, and over long streams the martingale learns its quirks (measured: 24 % false
alarms at alpha = 5 % with 300 calibration rows and 10,000 scored rows; online, 1.5 %).

The bag is bounded: every score, calibration and stream alike, is ranked rounded to
``SIGNIFICANT_BITS`` significant bits (``quantise``: a relative step of at most 1/2048; a score
of -1,000 nats to the nearest 0.25). Rounding is a non-decreasing function of the score, so the
rounded score is a conformity score in its own right and the p-values above stay exactly uniform
and independent under exchangeability (the smoothing ranks the ties the rounding makes at
random): Ville's bound is untouched, only differences finer than the step go unseen. The bag is
then a count per distinct rounded value (``OnlineConformal``), at most ``MAX_DISTINCT`` of them
(16 bytes each: 5.8 MB whatever the stream's length), where keeping every score cost 8 bytes a
row without end. In practice far fewer: the 10,000 MNIST test images' scores under a class-0
model (-1,994 to 5,097 nats) take 5,964 values, 4 million served scores simulated around its
calibration scores 19,261 (300 KB, against 33 MB kept whole). A service merges the large count
arrays on a thread of its own, so its event loop never sorts them.

A two-sample Kolmogorov-Smirnov statistic of a window of scores against the calibration scores
says how far the distributions are apart (0 = identical, 1 = disjoint), for dashboards.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_ALPHA = 0.01
DEFAULT_JUMP = 0.01


# Scores are ranked to this many significant bits (``quantise``), magnitudes below TINY as 0 and
# above HUGE as HUGE: at most MAX_DISTINCT values, whatever the stream
SIGNIFICANT_BITS = 12
TINY, HUGE = 2.0**-24, 2.0**64
MAX_DISTINCT = 2 * (88 * 2 ** (SIGNIFICANT_BITS - 1) + 1) + 1  # 88 binades from TINY to HUGE


def quantise(scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Scores rounded to ``SIGNIFICANT_BITS`` significant bits (to nearest, ties to even),
    magnitudes under ``TINY`` to 0 and over ``HUGE`` to ``HUGE``: a non-decreasing map onto at
    most ``MAX_DISTINCT`` values (non-finite scores are the caller's to drop)."""
    s = np.clip(np.asarray(scores, np.float64), -HUGE, HUGE)
    mantissa, exponent = np.frexp(s)
    scale = float(1 << SIGNIFICANT_BITS)
    q = np.ldexp(np.round(mantissa * scale) / scale, exponent)
    q[np.abs(s) < TINY] = 0.0
    return np.asarray(q, np.float64)


@dataclass(frozen=True)
class _Counts:
    """A sorted array of distinct scores and how many of the bag hold each: ``cum[i]`` scores
    are below ``values[i]`` (``cum`` has one entry more, the total last)."""

    values: npt.NDArray[np.float64]
    cum: npt.NDArray[np.int64]

    @classmethod
    def of(
        cls, values: npt.NDArray[np.float64], counts: npt.NDArray[np.int64] | None = None
    ) -> _Counts:
        """Sorted ``values`` (repeats allowed) with a count each (None: 1 each), repeats
        summed."""
        if counts is None:
            counts = np.ones(values.size, np.int64)
        if values.size == 0:
            return cls(values, np.zeros(1, np.int64))
        first = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        summed = np.add.reduceat(counts, first)
        return cls(values[first], np.r_[0, np.cumsum(summed)].astype(np.int64))

    @property
    def size(self) -> int:
        """Distinct values held (what the merges' geometric sizes count)."""
        return int(self.values.size)

    def counts(self) -> npt.NDArray[np.int64]:
        return np.diff(self.cum)


class OnlineConformal:
    """Smoothed p-values of a stream against the calibration scores and the stream's own past.

    The bag of reference scores (rounded, ``quantise``) is kept as a few arrays of distinct
    values with their counts (sizes shrinking geometrically, merged as they fill, as a
    log-structured merge tree does), so a block of B new scores is ranked with a handful of
    vectorised searches plus the block's own earlier rows, instead of one Python step per row:
    batch scoring pays well under a microsecond a row. The arrays hold at most ``MAX_DISTINCT``
    values between them, however many scores the bag counts."""

    CHUNK = 512  # rows compared pairwise at once when ranking a block among itself
    # merges of at least this many distinct values go to ``background`` (the largest possible,
    # MAX_DISTINCT values, takes ~10 ms)
    BACKGROUND_ROWS = 1 << 18

    def __init__(
        self, calibration: npt.ArrayLike, seed: int = 0, background: Executor | None = None
    ) -> None:
        """``background``: where large merges run (a service's event loop must not wait for
        them); until one is done, its two arrays are searched as they are, so every p-value is
        the same as with the merge done at once. None: merge in the calling thread."""
        cal = np.sort(quantise(np.ravel(calibration)))
        self.levels = [_Counts.of(cal)]
        self.size = int(cal.size)  # scores counted: calibration and stream
        self.rng = np.random.default_rng(seed)
        self.background = background
        # a merge running in the background: its future, and the index of its first level
        self._merging: tuple[Future[_Counts], int] | None = None

    def p_values(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Each score's p-value, ranked (rounded) among the bag and the block's earlier scores;
        then the block joins the bag."""
        s = quantise(np.ravel(scores))
        u = self.rng.random(s.size)
        if s.size == 0:
            return s
        hi = np.zeros(s.size, np.int64)
        lo = np.zeros(s.size, np.int64)
        for level in self.levels:
            hi += level.cum[np.searchsorted(level.values, s, side="right")]
            lo += level.cum[np.searchsorted(level.values, s, side="left")]
        if s.size == 1:  # one row a request (the service): nothing earlier in its block
            above = ties = np.zeros(1, np.int64)
        else:
            above, ties = _earlier(s, self.CHUNK)
        n = self.size + np.arange(s.size)  # the bag's size when each score arrives
        out = ((self.size - hi + above) + u * (hi - lo + ties + 1)) / (n + 1)
        self._add(np.sort(s))
        return np.asarray(out, np.float64)

    def _add(self, block: npt.NDArray[np.float64]) -> None:
        self._settle()
        self.levels.append(_Counts.of(block))
        self.size += int(block.size)
        self._compact()

    def _compact(self) -> None:
        """Keep the sizes geometric (each array more than 4x the next, so a handful of them):
        merge the pair nearest the end that breaks it, until none does. With ``background``, a
        merge of ``BACKGROUND_ROWS`` or more goes there, one at a time; its two arrays stay as
        they are meanwhile, and another large merge waits for it."""
        levels = self.levels
        while True:
            busy = () if self._merging is None else (self._merging[1], self._merging[1] + 1)
            k = next(
                (
                    k
                    for k in range(len(levels) - 2, -1, -1)
                    if k not in busy and k + 1 not in busy
                    if levels[k].size <= 4 * levels[k + 1].size
                ),
                None,
            )
            if k is None:
                return
            if (
                self.background is not None
                and levels[k].size + levels[k + 1].size >= self.BACKGROUND_ROWS
            ):
                if self._merging is not None:
                    return
                self._merging = (self.background.submit(_merge, levels[k], levels[k + 1]), k)
                continue
            levels[k : k + 2] = [_merge(levels[k], levels[k + 1])]
            if self._merging is not None and self._merging[1] > k:
                self._merging = (self._merging[0], self._merging[1] - 1)

    def _settle(self) -> None:
        """Swap in a background merge that has finished."""
        if self._merging is None or not self._merging[0].done():
            return
        merged, i = self._merging
        self._merging = None
        self.levels[i : i + 2] = [merged.result()]
        self._compact()

    def distinct(self) -> int:
        """Values the arrays hold between them (what the bag's memory grows with)."""
        return sum(level.size for level in self.levels)

    def bag(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """The bag (calibration and stream, rounded) as its distinct values, sorted, and their
        counts."""
        whole = _merge(*self.levels)
        return whole.values, whole.counts()


def _merge(*parts: _Counts) -> _Counts:
    """Count arrays as one (numpy sorts without holding the GIL)."""
    values = np.concatenate([p.values for p in parts])
    order = np.argsort(values, kind="stable")
    return _Counts.of(values[order], np.concatenate([p.counts() for p in parts])[order])


def _earlier(
    s: npt.NDArray[np.float64], chunk: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For each s[k]: how many of s[:k] are greater, and how many equal."""
    above = np.empty(s.size, np.int64)
    ties = np.empty(s.size, np.int64)
    for start in range(0, s.size, chunk):
        c = s[start : start + chunk]
        before = np.tri(c.size, k=-1, dtype=np.bool_)  # [k, j]: j comes before k
        a = ((c[None, :] > c[:, None]) & before).sum(axis=1)
        t = ((c[None, :] == c[:, None]) & before).sum(axis=1)
        if start:
            prev = np.sort(s[:start])
            right = np.searchsorted(prev, c, side="right")
            a += start - right
            t += right - np.searchsorted(prev, c, side="left")
        above[start : start + c.size] = a
        ties[start : start + c.size] = t
    return above, ties


TAIL = 0.01  # the tail bet pays when p <= TAIL ...
TAIL_STAKE = 0.05  # ... with this share of the capital it holds


@dataclass
class SimpleJumper:
    """Vovk et al.'s Simple Jumper betting martingale, kept in log space, with a fourth bet.

    The three bets of the paper, f(p) = 1 + e (p - 1/2) for e = -1, 0, +1, follow a shift of the
    whole score distribution. A contamination (a few rows from elsewhere among normal ones)
    barely moves the mean p-value, so they miss it: the fourth bet stakes ``TAIL_STAKE`` of its
    capital on p <= ``TAIL``, f(p) = 1 - s + s * 1{p <= t} / t, which pays 1/t-fold on the
    rare very small p-values that such rows bring. Every bet has mean 1 under uniform p-values,
    so the mixture is a test martingale and Ville's bound holds."""

    jump: float = DEFAULT_JUMP
    level: float = math.inf  # log alarm level: ``first_crossing`` records when it is reached
    log_value: float = 0.0  # log M_n
    log_max: float = 0.0  # the largest log M_n so far
    n: int = 0
    first_crossing: int | None = None  # the p-value (1-based) at which log M first hit level
    # the share of the capital on each bet: e = -1, 0, +1, and the tail bet (they sum to 1)
    _shares: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])

    def __post_init__(self) -> None:
        if not 0.0 <= self.jump <= 1.0:
            raise ValueError(f"jump must be in [0, 1], got {self.jump}")

    def update(self, p_values: npt.ArrayLike) -> float:
        """Bet on each p-value in turn; returns log M after the last."""
        j = self.jump
        a, b, c, t = self._shares
        log_value, log_max = self.log_value, self.log_max
        level, crossed = self.level, self.first_crossing
        keep, win = 1.0 - TAIL_STAKE, 1.0 - TAIL_STAKE + TAIL_STAKE / TAIL
        for k, p in enumerate(np.asarray(p_values, np.float64).ravel().tolist()):
            q = j / 4.0  # the shares sum to 1: each gets J/4 of the whole
            a, b, c, t = (1 - j) * a + q, (1 - j) * b + q, (1 - j) * c + q, (1 - j) * t + q
            d = p - 0.5
            a, c, t = a * (1.0 - d), c * (1.0 + d), t * (win if p <= TAIL else keep)
            total = a + b + c + t
            log_value += math.log(total)
            a, b, c, t = a / total, b / total, c / total, t / total
            if log_value > log_max:
                log_max = log_value
                if crossed is None and log_value >= level:
                    crossed = self.n + k + 1
        self.first_crossing = crossed
        self._shares = [a, b, c, t]
        self.log_value, self.log_max = log_value, log_max
        self.n += int(np.size(p_values))
        return log_value

    def reset(self) -> None:
        self.log_value = self.log_max = 0.0
        self.n = 0
        self.first_crossing = None
        self._shares = [0.25, 0.25, 0.25, 0.25]


def alarm_level(alpha: float = DEFAULT_ALPHA) -> float:
    """log(1 / alpha): the martingale's alarm level in log space."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.log(1.0 / alpha)


def ks_distance(window: npt.ArrayLike, calibration_sorted: npt.NDArray[np.float64]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic alone: the largest gap between the two
    empirical distribution functions, evaluated at every value of either sample (scipy's
    ``ks_2samp`` statistic, without its p-value: a sort and two searches, ~0.06 ms for 1,000
    scores against 600, where the exact p-value costs ~0.5 ms and importing scipy.stats 0.4 s)."""
    w = np.sort(np.asarray(window, np.float64).ravel())
    return _ks_gap(w, np.arange(w.size + 1), np.asarray(calibration_sorted, np.float64).ravel())


def _ks_gap(
    values: npt.NDArray[np.float64], cum: npt.NDArray[np.int64], cal: npt.NDArray[np.float64]
) -> float:
    """The KS statistic of a sample held as sorted ``values`` with ``cum[i]`` of it below
    ``values[i]`` (``cum`` one longer, the total last) against the sorted ``cal``: the same
    counts over the same totals as ``ks_2samp`` divides, so the same number."""
    if cum[-1] == 0 or cal.size == 0:
        return 0.0
    at = np.concatenate([values, cal])
    gap = cum[np.searchsorted(values, at, side="right")] / cum[-1]
    gap -= np.searchsorted(cal, at, side="right") / cal.size
    return float(np.abs(gap).max())


# scipy's ks_2samp is exact for samples of up to this many rows (its 'auto' method), asymptotic
# beyond
MAX_EXACT_KS = 10_000


def ks_of_counts(
    values: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    calibration_sorted: npt.NDArray[np.float64],
) -> tuple[float, float]:
    """``ks_statistic`` of a sample held as sorted distinct ``values`` and their ``counts``, in
    memory of the distinct values alone (a scored file's stream, however long): up to
    ``MAX_EXACT_KS`` rows the sample is rebuilt for scipy's exact test; beyond, the statistic from
    the counts and Smirnov's asymptotic p-value, as ``ks_2samp`` computes them there."""
    n = int(np.sum(counts))
    cal = np.asarray(calibration_sorted, np.float64).ravel()
    if n <= MAX_EXACT_KS:
        return ks_statistic(np.repeat(values, counts), cal)
    from scipy.stats import kstwo

    d = _ks_gap(values, np.r_[0, np.cumsum(counts)], cal)
    big, small = max(n, cal.size), min(n, cal.size)
    p = float(np.clip(kstwo.sf(d, np.round(big * small / (big + small))), 0.0, 1.0))
    return d, p


def ks_statistic(
    window: npt.ArrayLike, calibration_sorted: npt.NDArray[np.float64]
) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic of ``window`` against the calibration scores, and
    its p-value (scipy's exact or asymptotic two-sided test)."""
    from scipy.stats import ks_2samp

    w = np.asarray(window, np.float64)
    if w.size == 0:
        return 0.0, 1.0
    res = ks_2samp(w, calibration_sorted)
    return float(res.statistic), float(res.pvalue)


@dataclass
class DriftTest:
    """The martingale and the KS statistic of a whole stream of scores (offline)."""

    calibration_sorted: npt.NDArray[np.float64]
    alpha: float = DEFAULT_ALPHA
    seed: int = 0
    background: Executor | None = None  # where the bag's large merges run (OnlineConformal)

    def __post_init__(self) -> None:
        self.online = OnlineConformal(self.calibration_sorted, self.seed, self.background)
        self.martingale = SimpleJumper(level=alarm_level(self.alpha))

    def update(self, scores: npt.ArrayLike) -> None:
        s = np.asarray(scores, np.float64).ravel()
        self.martingale.update(self.online.p_values(s[np.isfinite(s)]))

    def stream_counts(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """The scores seen so far as the test ranks them (rounded, ``quantise``): their distinct
        values, sorted, and counts; the online bag less the calibration scores (the bag already
        counts every score, so nothing is kept twice)."""
        values, counts = self.online.bag()
        cal, in_cal = np.unique(quantise(self.calibration_sorted), return_counts=True)
        counts[np.searchsorted(values, cal)] -= in_cal
        seen = counts > 0
        return values[seen], counts[seen]

    def summary(self) -> dict[str, Any]:
        """What ``vae-anomaly score`` writes to its summary and ``vae-anomaly drift`` prints."""
        values, counts = self.stream_counts()
        ks, ks_p = ks_of_counts(values, counts, quantise(self.calibration_sorted))
        m = self.martingale
        return {
            "alpha": self.alpha,
            "n": m.n,
            "log_martingale": m.log_value,
            "log_martingale_max": m.log_max,
            "alarm_level": m.level,
            "alarm": m.first_crossing is not None,
            "first_alarm_at_row": m.first_crossing,
            "ks_statistic": ks,
            "ks_p_value": ks_p,
        }
