"""The value range of a user's images: declared (``--value-range LO,HI``) or inferred.

A known range gives a user's images what the built-in image sets get: the model sees them mapped
onto [0, 1] (``training.fitting``), and the score its complexity term, which quantises them to 8
bits within the range (``detector.complexity``). Without one, the features are standardised one
by one and the score has no complexity term, as for a table (docs/experiments.md: Fashion-MNIST
as a user's uint8 .npy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from detector.errors import DataError

VALUE_RANGE_AUTO = "auto"


def parse_value_range(text: str) -> tuple[float, float] | str | None:
    """``--value-range``: "auto" (inferred from the images), "none", or "LO,HI"."""
    t = text.strip().lower()
    if t in (VALUE_RANGE_AUTO, "none"):
        return VALUE_RANGE_AUTO if t == VALUE_RANGE_AUTO else None
    parts = t.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise DataError(
            f"value range {text!r}: expected auto, none, or two numbers LO,HI (e.g. 0,255)"
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise DataError(f"value range {text!r}: need finite LO < HI")
    return (lo, hi)


def infer_value_range(raw: npt.NDArray[Any]) -> tuple[tuple[float, float] | None, str]:
    """The range a user's images' pixels live in, from their dtype or their values, and why:
    uint8 is 0-255, uint16 0-65535; floats within [0, 1] are [0, 1], and whole numbers
    within 0-255 are 8-bit pixels stored as floats. Anything else has no known range."""
    if raw.dtype in (np.uint8, np.uint16):
        hi = float(np.iinfo(raw.dtype).max)
        return (0.0, hi), f"{raw.dtype} pixels"
    lo, hi = float(raw.min()), float(raw.max())
    if lo >= 0.0 and hi <= 1.0:
        return (0.0, 1.0), "every value within [0, 1]"
    if lo >= 0.0 and hi <= 255.0 and bool(np.all(np.mod(raw, 1) == 0)):
        return (0.0, 255.0), "whole numbers within 0-255 (8-bit pixels)"
    return None, f"values from {lo:g} to {hi:g}; declare the range with --value-range LO,HI"


def image_range(
    raw: npt.NDArray[Any], declared: tuple[float, float] | str | None
) -> tuple[tuple[float, float] | None, str]:
    """The images' range and how it was found: ``declared`` "auto" infers it from ``raw`` (the
    array as stored: its dtype counts), a (lo, hi) pair must hold every value of ``raw``."""
    if declared == VALUE_RANGE_AUTO:
        vr, why = infer_value_range(raw)
        return vr, f"inferred: {why}"
    if declared is None:
        return None, "none (--value-range none)"
    assert isinstance(declared, tuple)
    (lo, hi), (vmin, vmax) = declared, (float(raw.min()), float(raw.max()))
    if vmin < lo or vmax > hi:
        raise DataError(
            f"the images' values run from {vmin:g} to {vmax:g}, outside the declared value "
            f"range {lo:g},{hi:g}"
        )
    return declared, "declared (--value-range)"
