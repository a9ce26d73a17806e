"""The neighbour term: how far an input lies from the training rows, in the encoder's latent
space (images) or in the standardised input space (tables).

The -ELBO asks "how well does the model reconstruct x?"; an input can be reconstructed well and
still be unlike every training sample (a simple garment under a model of bags). The distance from
the posterior mean E[z | x] to its k-th nearest neighbour among the training rows' posterior
means asks the second question, in the space the encoder learned (cf. kNN detectors, Ramaswamy et
al., SIGMOD 2000; on learned features, Bergman et al., "Deep Nearest Neighbor Anomaly Detection",
2020). The score adds it in nats::

    score = -ELBO [- complexity credit] + weight * neighbour

``weight`` is fitted on the normal validation rows (never the calibration rows), so the term's
robust spread (MAD) is ``share`` times the likelihood term's: the likelihood leads, the
neighbour term adds evidence. Distances are computed pair by pair (a matrix product at most
pre-selects the candidates of wide rows), so a row's distance does not depend on the batch it
arrives in.

Two spaces (``ScoreConfig.neighbour_space``): ``latent``, the posterior means above (images: a
learned metric in which a one-pixel shift moves a code little, where raw pixel distances are
dominated by misalignment), and ``input``, the model's own input features (a table's
standardised numeric columns and one-hot categories; a missing numeric cell at its column's mean,
a missing or unseen category an all-zero block; the likelihood term tells those two apart) with
every feature divided by its spread over the reference rows, as a kNN detector on standardised
columns measures them. A table's columns each carry meaning that an 8-dimensional code of them
can drop; on the tabular suite the input space gave 78.43 mean AUROC against the latent space's
77.88 (docs/experiments.md, "Sixth session").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from detector.errors import ConfigError

if TYPE_CHECKING:
    from detector.model import VAE, VAEConfig

DEFAULT_K = 5
NEIGHBOUR_SPACES: tuple[str, ...] = ("latent", "input")
# The input space's reference holds at most this many training rows (a seeded subset beyond it):
# every scored row is compared with each of them across the table's full width.
MAX_INPUT_REFERENCE_ROWS = 20_000
# Upper bound on the stored reference rows: the artifact loader refuses more before allocating.
MAX_REFERENCE_ROWS = 1_000_000
_CHUNK = 512
_PREFILTER_WIDTH = 16
_PREFILTER_MARGIN = 32


@torch.no_grad()
def neighbour_distance(mu: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each row of ``mu`` (B, L) to its k-th nearest row of
    ``reference`` (N, L): (B,). ``k`` is clipped to N.

    Rows of ``_PREFILTER_WIDTH`` or more features (a table's input space) take the
    ``_PREFILTER_MARGIN`` + k nearest candidates by a matrix product, then measure those pair by
    pair: the same distance, 2-8 times faster on 30-565 features (a 565-wide table's 4,434
    reference rows: 7,000 rows/s against 1,000). A candidate set can differ with the batch (the
    product's rounding), the exact k-th distance does not unless more than the margin's rows lie
    within float32 rounding of it."""
    if reference.ndim != 2 or mu.ndim != 2 or reference.shape[1] != mu.shape[1]:
        raise ConfigError(
            f"neighbour reference of shape {tuple(reference.shape)} does not match rows of shape "
            f"{tuple(mu.shape)}"
        )
    kk = min(k, reference.shape[0])
    m = kk + _PREFILTER_MARGIN
    prefilter = mu.shape[1] >= _PREFILTER_WIDTH and reference.shape[0] > m
    ref_sq = (reference * reference).sum(1) if prefilter else None
    out = []
    for start in range(0, mu.shape[0], _CHUNK):
        q = mu[start : start + _CHUNK]
        if ref_sq is not None:
            # |r|^2 - 2 q.r ranks the rows as |q - r|^2 does (|q|^2 is the same for every r)
            approx = torch.addmm(ref_sq[None], q, reference.T, alpha=-2.0)  # (b, N)
            near = approx.topk(m, dim=1, largest=False).indices  # (b, m)
            d = (q[:, None, :] - reference[near]).pow(2).sum(-1).sqrt()  # (b, m), pair by pair
        else:
            d = torch.cdist(q, reference, compute_mode="donot_use_mm_for_euclid_dist")  # (b, N)
        out.append(d.topk(kk, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else mu.new_zeros(0)


def check_space(space: str) -> str:
    if space not in NEIGHBOUR_SPACES:
        raise ConfigError(f"unknown neighbour space {space!r}; choose one of {NEIGHBOUR_SPACES}")
    return space


def feature_scale(reference: torch.Tensor) -> torch.Tensor:
    """Each input feature's spread over the reference rows (the population standard deviation,
    1 for a constant feature): the input-space distance counts every feature in its own spread,
    a one-hot category of frequency p in units of sqrt(p (1 - p))."""
    s = reference.double().std(0, unbiased=False)
    return torch.where(s > 1e-6, s, torch.ones_like(s)).float()


def reference_widths(config: VAEConfig, space: str | None) -> set[int]:
    """The widths a reference row may have: the latent's, the flat input's, or either (None)."""
    widths = {"latent": config.code_dim, "input": config.n_features}
    return set(widths.values()) if space is None else {widths[check_space(space)]}


class Search:
    """The reference rows of one space, ready to search: ``distance`` of a batch (B,)."""

    def __init__(self, rows: torch.Tensor, space: str) -> None:
        self.space = check_space(space)
        self.scale = feature_scale(rows) if space == "input" else None
        self.rows = rows if self.scale is None else rows / self.scale

    def distance(
        self, model: VAE, x: torch.Tensor | None, mu: torch.Tensor | None, k: int
    ) -> torch.Tensor:
        """``x``: the batch (B, *input_shape), input space only; ``mu``: its posterior means,
        latent space only."""
        if self.scale is None:
            if mu is None:
                raise ConfigError("the latent neighbour term needs the posterior means")
            query = mu
        else:
            if x is None:
                raise ConfigError("the input-space neighbour term needs the inputs")
            query = model.input_features(x.to(self.rows.device)) / self.scale
        return neighbour_distance(query, self.rows, k)


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
