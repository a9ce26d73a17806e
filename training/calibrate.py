"""Calibration: score held-out normal data, set the conformal threshold for a target FPR."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from detector.complexity import DEFAULT_CODEC, DEFAULT_FILTER, complexity_nats
from detector.detector import Detector
from detector.errors import ConfigError
from detector.model import VAE
from detector.neighbours import MAX_INPUT_REFERENCE_ROWS, fit_weight
from detector.score import ScoreConfig
from detector.spec import InputSpec
from detector.threshold import DEFAULT_TARGET_FPR, Calibration, validate_fpr
from detector.transforms import TransformHead

# The complexity credit stops at this quantile of the validation normals' complexity (0.5: the
# median); docs/experiments.md, "The complexity credit, capped".
DEFAULT_COMPLEXITY_CAP_QUANTILE = 0.5
# the floor below which an input is simpler than the normal data: MNIST one-vs-rest 98.95 ->
# 99.06 (worst class 96.9 -> 97.5), Fashion-MNIST 93.30 -> 93.31 (docs/experiments.md)
DEFAULT_COMPLEXITY_FLOOR_QUANTILE = 0.01
# The neighbour term's robust spread on normal validation rows, relative to the likelihood term's
# (detector.neighbours); docs/experiments.md, "The latent-neighbour term".
DEFAULT_NEIGHBOUR_SHARE = 0.5


def neighbour_setup(
    model: VAE,
    x_train: npt.NDArray[np.float32],
    x_val: npt.NDArray[np.float32],
    input_spec: InputSpec,
    share: float,
    *,
    config: ScoreConfig | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor | None, float]:
    """The reference (the training rows in ``config.neighbour_space``: posterior means, or input
    features, at most ``MAX_INPUT_REFERENCE_ROWS`` of them, a seeded subset beyond) and the
    neighbour weight fitted on the validation rows against the likelihood term of ``config``
    (k = its neighbour_k); (None, 0.0) when ``share`` is 0."""
    if share == 0:
        return None, 0.0
    likelihood = (config or ScoreConfig()).replace(neighbour_weight=0.0)
    det = Detector(model, None, input_spec, device=device)
    if likelihood.neighbour_space == "latent":
        reference = torch.from_numpy(det.encode(x_train))
    else:
        rows = x_train
        if len(rows) > MAX_INPUT_REFERENCE_ROWS:
            keep = np.random.default_rng(seed).choice(len(rows), MAX_INPUT_REFERENCE_ROWS, False)
            rows = rows[np.sort(keep)]
        reference = torch.from_numpy(det.input_features(rows))
    parts = Detector(model, None, input_spec, device=device, reference=reference).score_parts(
        x_val, config=likelihood
    )
    return reference, fit_weight(parts["score"], parts["neighbour"], share)


def complexity_bounds(
    x_reference: npt.NDArray[np.float32],
    input_spec: InputSpec,
    cap_quantile: float | None,
    floor_quantile: float | None = None,
    *,
    level: int = 1,
    codec: str = DEFAULT_CODEC,
    image_filter: str = DEFAULT_FILTER,
) -> tuple[float | None, float | None]:
    """The cap on the complexity credit and the floor below which an input is simpler than the
    normal data: quantiles of L(x) over held-out normal rows (never the calibration rows, whose
    scores must not shape the score). None: uncapped / no floor."""
    for name, q in (("cap", cap_quantile), ("floor", floor_quantile)):
        if q is not None and not 0.0 < q <= 1.0:
            raise ConfigError(f"complexity {name} quantile must be in (0, 1], got {q}")
    if cap_quantile is None and floor_quantile is None:
        return None, None
    if input_spec.value_range is None:
        raise ConfigError("the complexity correction needs inputs with a known value range")
    if x_reference.shape[0] == 0:
        raise ConfigError("the complexity cap and floor need at least one held-out normal row")
    flat = np.ascontiguousarray(x_reference.reshape(x_reference.shape[0], -1), dtype=np.float32)
    lengths = complexity_nats(
        flat,
        input_spec.value_range,
        level=level,
        codec=codec,
        image_filter=image_filter,
        shape=input_spec.shape,
    )

    def at(q: float | None) -> float | None:
        return None if q is None else float(np.quantile(lengths, q))

    return at(cap_quantile), at(floor_quantile)


def calibrate(
    model: VAE,
    x_cal: npt.NDArray[np.float32],
    input_spec: InputSpec,
    *,
    target_fpr: float = DEFAULT_TARGET_FPR,
    config: ScoreConfig | None = None,
    reference: torch.Tensor | None = None,
    device: str = "cpu",
    head: TransformHead | None = None,
) -> Calibration:
    """Threshold = conformal quantile of the held-out normal scores (higher = more anomalous)."""
    validate_fpr(target_fpr, int(x_cal.shape[0]))  # fail before spending time scoring
    config = config or ScoreConfig()
    scores = Detector(
        model, None, input_spec, device=device, reference=reference, head=head
    ).score_parts(x_cal, config=config)["score"]
    return Calibration.fit(
        scores,
        target_fpr,
        score_config=config,
        n_reference=0 if reference is None else int(reference.shape[0]),
    )
