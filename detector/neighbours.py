"""The latent-neighbour term: how far an input's posterior mean lies from the training data's.

The -ELBO asks "how well does the model reconstruct x?"; an input can be reconstructed well and
still be unlike every training sample (a simple garment under a model of bags). The distance from
the posterior mean E[z | x] to its k-th nearest neighbour among the training rows' posterior
means asks the second question, in the space the encoder learned (cf. kNN detectors, Ramaswamy et
al., SIGMOD 2000; on learned features, Bergman et al., "Deep Nearest Neighbor Anomaly Detection",
2020). The score adds it in nats::

    score = -ELBO [- complexity credit] + weight * neighbour

``weight`` is fitted on the normal validation rows (never the calibration rows), so the term's
robust spread (MAD) is ``share`` times the likelihood term's: the likelihood leads, the
neighbour term adds evidence. Distances are computed pair by pair (no matrix-product shortcut),
so a row's distance does not depend on the batch it arrives in.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from detector.errors import ConfigError

DEFAULT_K = 5
# Upper bound on the stored reference rows: the artifact loader refuses more before allocating.
MAX_REFERENCE_ROWS = 1_000_000
_CHUNK = 512


@torch.no_grad()
def neighbour_distance(mu: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each row of ``mu`` (B, L) to its k-th nearest row of
    ``reference`` (N, L): (B,). ``k`` is clipped to N."""
    if reference.ndim != 2 or mu.ndim != 2 or reference.shape[1] != mu.shape[1]:
        raise ConfigError(
            f"latent reference of shape {tuple(reference.shape)} does not match codes of shape "
            f"{tuple(mu.shape)}"
        )
    kk = min(k, reference.shape[0])
    out = []
    for start in range(0, mu.shape[0], _CHUNK):
        d = torch.cdist(
            mu[start : start + _CHUNK],
            reference,
            compute_mode="donot_use_mm_for_euclid_dist",
        )  # (b, N)
        out.append(d.topk(kk, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else mu.new_zeros(0)


def robust_scale(values: npt.ArrayLike) -> float:
    """1.4826 * median absolute deviation (the standard deviation for normal data); falls back
    to the standard deviation, then 1, for degenerate samples."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ConfigError("a robust scale needs at least one value")
    mad = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    if mad > 0 and np.isfinite(mad):
        return mad
    sd = float(v.std())
    return sd if sd > 0 and np.isfinite(sd) else 1.0


def fit_weight(likelihood_term: npt.ArrayLike, neighbour: npt.ArrayLike, share: float) -> float:
    """The neighbour term's weight in nats per latent unit: its robust spread on normal rows
    becomes ``share`` times the likelihood term's. ``share`` 0 turns the term off."""
    if not (np.isfinite(share) and share >= 0):
        raise ConfigError(f"neighbour share must be a finite number >= 0, got {share}")
    if share == 0:
        return 0.0
    return float(share * robust_scale(likelihood_term) / robust_scale(neighbour))
