"""Input complexity: the compressed size of an input, in nats, for the complexity-corrected score.

Likelihood-based detectors rate simple inputs (a "1", a blank image) as likely, whatever they were
trained on, because a simple input is cheap to encode under any model (Serrà et al., "Input
complexity and out-of-distribution detection with likelihood-based generative models", ICLR 2020).
Serrà et al. correct for it by subtracting a general-purpose compressor's code length L(x) from
the model's negative log-likelihood, both in the same units:

    S(x) = -log p(x) - L(x)

so what remains is how much *worse* the model encodes x than a model of nothing in particular. We
quantise each input to 8 bits over its value range, compress it with zlib (DEFLATE, level 1 by
default: three times faster than level 9 and, on MNIST one-vs-rest, as good or better, see
docs/experiments.md), and count the bytes; ``L(x) = 8 * ln 2 * bytes`` nats. It depends on the input alone, so it is
deterministic and batch-invariant like the rest of the score.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

NATS_PER_BYTE = 8.0 * math.log(2.0)
_PARALLEL_MIN_ROWS = 256  # below this, threads cost more than they save
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # zlib releases the GIL while it compresses, so threads run in parallel
        _pool = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="zlib"
        )
    return _pool


def _sizes(q: npt.NDArray[np.uint8], level: int) -> list[int]:
    return [len(zlib.compress(row.tobytes(), level)) for row in q]


def complexity_nats(
    x: npt.NDArray[np.floating], value_range: tuple[float, float] = (0.0, 1.0), level: int = 1
) -> npt.NDArray[np.float64]:
    """zlib code length of each sample quantised to 8 bits over ``value_range``: (N,) nats."""
    lo, hi = value_range
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    q = np.clip(np.rint((flat - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    if len(q) < _PARALLEL_MIN_ROWS or (os.cpu_count() or 1) == 1:
        sizes = _sizes(q, level)
    else:
        chunks = np.array_split(q, min(4, os.cpu_count() or 1))
        sizes = [n for part in _executor().map(_sizes, chunks, [level] * len(chunks)) for n in part]
    return np.asarray(sizes, dtype=np.float64) * NATS_PER_BYTE
