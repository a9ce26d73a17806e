"""The anomaly score: the negative ELBO of a trained VAE, in nats. Higher = more anomalous.

For an input x, with q(z|x) = N(mu, diag(sigma^2)) and prior p(z) = N(0, I)::

    reconstruction = -log p(x | z)                 (at z = mu, the posterior mean)
    kl             =  KL(q(z|x) || p(z))           (analytic)
    score          =  reconstruction + kl  = -ELBO

Evaluating the reconstruction at the posterior mean rather than at a random draw makes the score
deterministic: the same input gets the same score, whatever batch it arrives in.

The importance-weighted bound (Burda et al., "Importance Weighted Autoencoders", ICLR 2016) is
the tighter estimate of -log p(x)::

    score_K = -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k = mu + sigma * eps_k

with eps_1..eps_K fixed by a seed and shared by every input, so it is deterministic and
batch-invariant too. For it, ``reconstruction`` and ``kl`` are the Monte Carlo ELBO's parts over the
same K draws: they sum to the K-sample -ELBO, which is >= ``score``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from detector.complexity import (
    DEFAULT_CODEC,
    DEFAULT_FILTER,
    DEFAULT_LEVEL,
    check_codec,
    check_filter,
    codec_version,
)
from detector.errors import ConfigError
from detector.model import VAE
from detector.neighbours import DEFAULT_K, check_space

ScoreKind = Literal["elbo", "iwae"]
SCORE_KINDS: tuple[str, ...] = ("elbo", "iwae")

# A table's default reconstruction weight: its per-column surprises (a Gaussian term per numeric
# column at sigma = 0.1, a softmax surprise per categorical one) otherwise drown the KL term and
# the neighbour evidence. A quarter is a numeric column scored at sigma = 0.2 (docs/experiments.md,
# "Seventh session").
TABLE_RECONSTRUCTION_WEIGHT = 0.25

SCORE_DEFINITION = (
    "score = reconstruction + kl = -ELBO in nats (higher = more anomalous); "
    "reconstruction = -log p(x|z) at the posterior mean, kl = KL(q(z|x) || N(0, I))"
)


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that defines a detector's score, carried end to end as one value.

    score = -ELBO (``kind`` elbo, or the ``samples``-draw importance-weighted bound; with a
              ``reconstruction_weight`` w other than 1: w * reconstruction + kl, elbo only)
            - complexity_weight * min(L(x), complexity_cap)      (detector.complexity)
            + complexity_weight * max(0, complexity_floor - L(x))
            + neighbour_weight * (distance from E[z|x], or from the standardised input when
              neighbour_space is "input", to its neighbour_k-th nearest training row)
                                                                 (detector.neighbours)
            + transformation_weight * log(transformation + transformation_offset)
                                                                 (detector.transforms)

    The calibration saves it with flat keys (``score_kind``, ``complexity_codec``, ...), which
    older artifacts also have; keys an older artifact lacks get the value it was scored with.
    """

    kind: str = "elbo"
    samples: int = 1
    # what the reconstruction counts for against the KL term: 1 = the -ELBO; a table's default
    # 0.25 (docs/experiments.md, "Seventh session")
    reconstruction_weight: float = 1.0
    complexity_weight: float = 0.0
    complexity_level: int = DEFAULT_LEVEL
    complexity_codec: str = DEFAULT_CODEC
    complexity_filter: str = DEFAULT_FILTER
    # min(L(x), cap): complexity above the cap earns no credit; None = uncapped
    complexity_cap: float | None = None
    # max(0, floor - L(x)): an input simpler than the normal data's own range (by default the 1 %
    # quantile of the validation rows' L) pays one nat per nat it falls short; None = no floor
    complexity_floor: float | None = None
    neighbour_weight: float = 0.0
    neighbour_k: int = DEFAULT_K
    # where the neighbour distance is measured (detector.neighbours): "latent" or "input"
    neighbour_space: str = "latent"
    # the transformation head's surprise (images), taken as log(transformation + offset): the
    # offset is the validation normals' 75 % quantile of it, so the log is in the normal data's
    # own scale (surprises well below the normal level count little), and the weight is fitted
    # so that the term's spread is a set share of the rest of the score's
    transformation_weight: float = 0.0
    transformation_offset: float = 1.0

    def __post_init__(self) -> None:
        validate_score_kind(self.kind, self.samples)
        w = self.reconstruction_weight
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"reconstruction weight must be a finite number > 0, got {w}")
        if w != 1 and self.kind != "elbo":
            raise ConfigError(
                f"a reconstruction weight other than 1 needs the elbo score, not {self.kind}"
            )
        check_codec(self.complexity_codec, self.complexity_level)
        check_filter(self.complexity_filter)
        if not (math.isfinite(self.complexity_weight) and self.complexity_weight >= 0):
            raise ConfigError(f"complexity weight must be >= 0, got {self.complexity_weight}")
        cap = self.complexity_cap
        if cap is not None and not (math.isfinite(cap) and cap >= 0):
            raise ConfigError(f"complexity cap must be a finite number >= 0 (nats), got {cap}")
        floor = self.complexity_floor
        if floor is not None and not (math.isfinite(floor) and floor >= 0):
            raise ConfigError(f"complexity floor must be a finite number >= 0 (nats), got {floor}")
        if not (math.isfinite(self.neighbour_weight) and self.neighbour_weight >= 0):
            raise ConfigError(
                f"neighbour weight must be a finite number >= 0, got {self.neighbour_weight}"
            )
        if self.neighbour_k < 1:
            raise ConfigError(f"neighbour k must be >= 1, got {self.neighbour_k}")
        check_space(self.neighbour_space)
        tw = self.transformation_weight
        if not (math.isfinite(tw) and tw >= 0):
            raise ConfigError(f"transformation weight must be a finite number >= 0, got {tw}")
        to = self.transformation_offset
        if not (math.isfinite(to) and to > 0):
            raise ConfigError(f"transformation offset must be a finite number > 0, got {to}")

    def replace(self, **changes: Any) -> ScoreConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The calibration file's keys."""
        return {
            "score_kind": self.kind,
            "score_samples": self.samples,
            "reconstruction_weight": self.reconstruction_weight,
            "complexity_weight": self.complexity_weight,
            "complexity_level": self.complexity_level,
            "complexity_codec": self.complexity_codec,
            "complexity_codec_version": codec_version(self.complexity_codec),
            "complexity_filter": self.complexity_filter,
            "complexity_cap": self.complexity_cap,
            "complexity_floor": self.complexity_floor,
            "neighbour_weight": self.neighbour_weight,
            "neighbour_k": self.neighbour_k,
            "neighbour_space": self.neighbour_space,
            "transformation_weight": self.transformation_weight,
            "transformation_offset": self.transformation_offset,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreConfig:
        cap = d.get("complexity_cap")
        floor = d.get("complexity_floor")  # absent before the floor existed: none
        return cls(
            kind=str(d.get("score_kind", "elbo")),
            samples=int(d.get("score_samples", 1)),
            # absent before the weight existed: the plain -ELBO
            reconstruction_weight=float(d.get("reconstruction_weight", 1.0)),
            complexity_weight=float(d.get("complexity_weight", 0.0)),
            complexity_level=int(d.get("complexity_level", 1)),
            # calibrations written before the codec was recorded used the standard zlib, and
            # before the filter was recorded compressed the raw bytes
            complexity_codec=str(d.get("complexity_codec", "zlib")),
            complexity_filter=str(d.get("complexity_filter", "none")),
            complexity_cap=None if cap is None else float(cap),
            complexity_floor=None if floor is None else float(floor),
            neighbour_weight=float(d.get("neighbour_weight", 0.0)),
            neighbour_k=int(d.get("neighbour_k", DEFAULT_K)),
            # every calibration written before the input space existed measured in the latent one
            neighbour_space=str(d.get("neighbour_space", "latent")),
            # absent before the transformation head existed: no such term
            transformation_weight=float(d.get("transformation_weight", 0.0)),
            transformation_offset=float(d.get("transformation_offset", 1.0)),
        )

    def transformation_term(
        self, transformation: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """The transformation head's term of the score (0 where the weight is 0)."""
        if not self.transformation_weight:
            return np.zeros_like(transformation)
        return self.transformation_weight * np.log(transformation + self.transformation_offset)

    def definition(self) -> str:
        """The score's definition in words, for responses and ``info``."""
        where = (
            f"the posterior mean E[z|x] to its {self.neighbour_k}th nearest training posterior mean"
            if self.neighbour_space == "latent"
            else f"the standardised input to its {self.neighbour_k}th nearest training row (each "
            "feature in units of its spread over the training rows)"
        )
        near = (
            ""
            if not self.neighbour_weight
            else f" + {self.neighbour_weight:.4g} * neighbour, where neighbour = the distance from "
            + where
        )
        if self.transformation_weight:
            near += (
                f" + {self.transformation_weight:.4g} * log(transformation + "
                f"{self.transformation_offset:.4g}), where "
                "transformation = -sum_k log p(k | T_k x), the surprise of a classifier trained "
                "to tell rotations and shifts T_k of the normal images apart"
            )
        rw = self.reconstruction_weight
        lik = "reconstruction + kl" if rw == 1 else f"{rw:g} * reconstruction + kl"
        weighted = (
            ""
            if rw == 1
            else f" (the reconstruction counted at {rw:g} of its nats against the KL term)"
        )
        if not self.complexity_weight:
            if not near and rw == 1:
                return SCORE_DEFINITION
            return (
                f"score = {lik}{near} (higher = more anomalous){weighted}; reconstruction = "
                "-log p(x|z) at the posterior mean, kl = KL(q(z|x) || N(0, I)), in nats"
            )
        cap = self.complexity_cap
        w = "" if self.complexity_weight == 1 else f"{self.complexity_weight:g} * "
        term = "complexity" if cap is None else f"min(complexity, {cap:.1f})"
        capped = (
            ""
            if cap is None
            else f"; the credit for complexity stops at {cap:.1f} nats (by default the median "
            "complexity of the normal validation data), so inputs more complex than the normal "
            "data gain nothing from it"
        )
        floor = self.complexity_floor
        below = "" if floor is None else f" + {w}max(0, {floor:.1f} - complexity)"
        floored = (
            ""
            if floor is None
            else f"; an input simpler than {floor:.1f} nats (by default the 1 % quantile of the "
            "normal validation data's complexity) pays one nat for each nat it falls short"
        )
        filtered = "" if self.complexity_filter == "none" else " after PNG's Average filter"
        return (
            f"score = {lik} - {w}{term}{below}{near} (higher = more anomalous){weighted}: the "
            f"-ELBO corrected for input complexity (Serra et al., ICLR 2020){capped}{floored}; "
            "reconstruction = -log p(x|z) at the posterior mean, kl = KL(q(z|x) || N(0, I)), "
            f"complexity = DEFLATE code length ({self.complexity_codec} level "
            f"{self.complexity_level}) of the 8-bit input{filtered}"
        )


@dataclass(frozen=True)
class ScoreParts:
    """Per-sample scores, each (B,). ``score``: higher = more anomalous."""

    score: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def validate_score_kind(kind: str, samples: int) -> None:
    if kind not in SCORE_KINDS:
        raise ConfigError(f"unknown score kind {kind!r}; choose one of {SCORE_KINDS}")
    if kind == "iwae" and samples < 2:
        raise ConfigError(f"the iwae score needs at least 2 samples, got {samples}")


@torch.no_grad()
def elbo_score(model: VAE, x: torch.Tensor) -> ScoreParts:
    """-ELBO per sample with the reconstruction at the posterior mean. Higher = more anomalous."""
    mu, logvar = model.encode(x)  # (B, latent) each
    reconstruction = model.nll(x, model.decode(mu))  # (B,)
    kl = model.kl(mu, logvar)  # (B,)
    return ScoreParts(score=reconstruction + kl, reconstruction=reconstruction, kl=kl)


@torch.no_grad()
def iwae_score(model: VAE, x: torch.Tensor, samples: int, seed: int = 0) -> ScoreParts:
    """Importance-weighted -log p(x) estimate with K fixed draws. Higher = more anomalous."""
    validate_score_kind("iwae", samples)
    if model.config.members > 1:
        raise ConfigError("the importance-weighted score needs a single VAE (members 1)")
    mu, logvar = model.encode(x)  # (B, L)
    b, latent = mu.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(samples, 1, latent, generator=gen).to(mu)  # (K, 1, L): same for every x
    std = torch.exp(0.5 * logvar)
    z = mu.unsqueeze(0) + std.unsqueeze(0) * eps  # (K, B, L)
    x_rep = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * b, *x.shape[1:])
    nll = model.nll(x_rep, model.decode(z.reshape(samples * b, latent))).view(samples, b)
    log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)  # (K, B)
    log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar.unsqueeze(0)).sum(-1)  # (K, B)
    log_w = -nll + log_pz - log_qz  # (K, B)
    score = -(torch.logsumexp(log_w, dim=0) - math.log(samples))  # (B,)
    reconstruction = nll.mean(0)
    kl = (log_qz - log_pz).mean(0)
    return ScoreParts(score=score, reconstruction=reconstruction, kl=kl)


def score_batch(model: VAE, x: torch.Tensor, kind: str = "elbo", samples: int = 1) -> ScoreParts:
    """Dispatch on the score kind stored with a calibration. Higher = more anomalous."""
    validate_score_kind(kind, samples)
    if kind == "iwae":
        return iwae_score(model, x, samples)
    return elbo_score(model, x)


def training_loss(
    model: VAE, x: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-sample reparameterised -ELBO for training: (loss, reconstruction, kl), batch means.

    ``loss = reconstruction + beta * kl``; beta < 1 during KL warm-up.
    """
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # (B, latent)
    reconstruction = model.nll(x, model.decode(z)).mean()
    kl = model.kl(mu, logvar).mean()
    return reconstruction + beta * kl, reconstruction, kl
