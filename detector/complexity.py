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

Before compressing, images go through PNG's "Average" filter (PNG specification, section 9.2,
filter type 3): each byte becomes its difference, modulo 256, from the mean of its left and upper
neighbours. That is how PNG, the compressor Serrà et al. used, turns smooth strokes into runs of
small numbers that DEFLATE codes well, so L(x) is a better estimate of how complex the image
really is (docs/experiments.md: +0.25 mean AUROC on MNIST one-vs-rest, Fashion-MNIST unchanged).
The filter needs the image plane, so it runs on inputs of two or more axes; flat feature vectors
are compressed as they are.

The compressor is part of the score, so the calibration records it (filter, codec and level). New
models use zlib-ng at level 1 (its "quick" strategy): 3x faster than zlib level 1 (about 5 µs per
MNIST image) and, on MNIST one-vs-rest, the better correction (docs/experiments.md). Artifacts
calibrated before the filter or zlib-ng existed keep the unfiltered input or the standard zlib.
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


FILTERS: tuple[str, ...] = ("none", "png-average")
DEFAULT_FILTER = "png-average"


def codec_version(codec: str) -> str:
    """The compressor library's version, saved with a calibration for provenance."""
    return str(zlib_ng.ZLIBNG_VERSION if codec == "zlib-ng" else zlib.ZLIB_RUNTIME_VERSION)


def check_codec(codec: str, level: int) -> None:
    if codec not in CODECS:
        raise ConfigError(f"unknown complexity codec {codec!r}; choose one of {sorted(CODECS)}")
    if not 0 <= level <= 9:
        raise ConfigError(f"complexity level must be 0-9, got {level}")


def check_filter(name: str) -> None:
    if name not in FILTERS:
        raise ConfigError(f"unknown complexity filter {name!r}; choose one of {list(FILTERS)}")


def image_axes(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The (height, width) axes of one sample of ``shape``, or None for a flat feature vector.

    (H, W) and channels-first (C, H, W) use the last two axes; channels-last (H, W, C) with at
    most 4 channels, the first two. Any other shape of two or more axes: the last two.
    """
    if len(shape) < 2:
        return None
    if len(shape) == 3 and shape[2] <= 4 < min(shape[0], shape[1]):
        return 0, 1
    return len(shape) - 2, len(shape) - 1


def png_average(q: npt.NDArray[np.uint8], axes: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """PNG's Average filter over the image plane ``axes`` of a batch ``q`` (N, *shape).

    out = (x - floor((left + up) / 2)) mod 256, a missing neighbour counting as 0, as in PNG.
    """
    h, w = axes[0] + 1, axes[1] + 1  # axes of the batch
    x = q.astype(np.int16)
    pred = np.zeros_like(x)
    left = [slice(None)] * x.ndim
    up = [slice(None)] * x.ndim
    left[w] = slice(1, None)
    up[h] = slice(1, None)
    src_left = [slice(None)] * x.ndim
    src_up = [slice(None)] * x.ndim
    src_left[w] = slice(None, -1)
    src_up[h] = slice(None, -1)
    pred[tuple(left)] += x[tuple(src_left)]
    pred[tuple(up)] += x[tuple(src_up)]
    return ((x - (pred >> 1)) & 0xFF).astype(np.uint8)


def complexity_nats(
    x: npt.NDArray[np.floating],
    value_range: tuple[float, float] = (0.0, 1.0),
    level: int = DEFAULT_LEVEL,
    codec: str = DEFAULT_CODEC,
    image_filter: str = "none",
    shape: tuple[int, ...] | None = None,
) -> npt.NDArray[np.float64]:
    """Code length of each sample quantised to 8 bits over ``value_range``: (N,) nats.

    ``shape``: one sample's shape (default: ``x.shape[1:]``), which tells ``image_filter`` where the
    image plane is; rows may come flattened.
    """
    check_codec(codec, level)
    check_filter(image_filter)
    compress = CODECS[codec]
    lo, hi = value_range
    shape = tuple(x.shape[1:]) if shape is None else tuple(shape)
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    scale = np.float32(255.0 / (hi - lo))
    t = flat * scale if lo == 0 else (flat - np.float32(lo)) * scale  # a fresh float32 array
    np.rint(t, out=t)
    np.clip(t, 0, 255, out=t)
    q = t.astype(np.uint8)
    axes = image_axes(shape) if image_filter == "png-average" else None
    if axes is not None:
        q = png_average(q.reshape(len(q), *shape), axes).reshape(len(q), -1)
    sizes = np.fromiter((len(compress(row.tobytes(), level)) for row in q), np.float64, len(q))
    return sizes * NATS_PER_BYTE
