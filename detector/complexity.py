"""Input complexity: the compressed size of an input, in nats, for the complexity-corrected score.

Likelihood-based detectors rate simple inputs (a "1", a blank image) as likely, whatever they were
trained on, because a simple input is cheap to encode under any model (Serrà et al., "Input
complexity and out-of-distribution detection with likelihood-based generative models", ICLR 2020).
Serrà et al. correct for it by subtracting a general-purpose compressor's code length L(x) from
the model's negative log-likelihood, both in the same units:

    S(x) = -log p(x) - L(x)

so what remains is how much *worse* the model encodes x than a model of nothing in particular. We
quantise each input to 8 bits over its value range, compress it with DEFLATE and count the bytes;
``L(x) = 8 * ln 2 * bytes`` nats. It depends on the input alone, so it is deterministic and
batch-invariant like the rest of the score.

The compressor is part of the score, so the calibration records it (codec and level). New models
use zlib-ng at level 1 (its "quick" strategy): 3x faster than zlib level 1 (about 5 µs per MNIST
image) and, on MNIST one-vs-rest, the better correction (docs/experiments.md). Artifacts calibrated
with the standard library's zlib keep using it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from zlib_ng import zlib_ng

from detector.errors import ConfigError

NATS_PER_BYTE = 8.0 * math.log(2.0)
DEFAULT_CODEC = "zlib-ng"
DEFAULT_LEVEL = 1
CODECS: dict[str, Callable[[bytes, int], bytes]] = {
    "zlib-ng": zlib_ng.compress,
    "zlib": zlib.compress,  # models calibrated before zlib-ng became the default
}


def codec_version(codec: str) -> str:
    """The compressor library's version, saved with a calibration for provenance."""
    return str(zlib_ng.ZLIBNG_VERSION if codec == "zlib-ng" else zlib.ZLIB_RUNTIME_VERSION)


def check_codec(codec: str, level: int) -> None:
    if codec not in CODECS:
        raise ConfigError(f"unknown complexity codec {codec!r}; choose one of {sorted(CODECS)}")
    if not 0 <= level <= 9:
        raise ConfigError(f"complexity level must be 0-9, got {level}")


def complexity_nats(
    x: npt.NDArray[np.floating],
    value_range: tuple[float, float] = (0.0, 1.0),
    level: int = DEFAULT_LEVEL,
    codec: str = DEFAULT_CODEC,
) -> npt.NDArray[np.float64]:
    """Code length of each sample quantised to 8 bits over ``value_range``: (N,) nats."""
    check_codec(codec, level)
    compress = CODECS[codec]
    lo, hi = value_range
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    scale = np.float32(255.0 / (hi - lo))
    t = flat * scale if lo == 0 else (flat - np.float32(lo)) * scale  # a fresh float32 array
    np.rint(t, out=t)
    np.clip(t, 0, 255, out=t)
    q = t.astype(np.uint8)
    sizes = np.fromiter((len(compress(row.tobytes(), level)) for row in q), np.float64, len(q))
    return sizes * NATS_PER_BYTE
