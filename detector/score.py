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
from dataclasses import dataclass
from typing import Literal

import torch

from detector.errors import ConfigError
from detector.model import VAE

ScoreKind = Literal["elbo", "iwae"]
SCORE_KINDS: tuple[str, ...] = ("elbo", "iwae")

SCORE_DEFINITION = (
    "score = reconstruction + kl = -ELBO in nats (higher = more anomalous); "
    "reconstruction = -log p(x|z) at the posterior mean, kl = KL(q(z|x) || N(0, I))"
)


def score_definition(
    complexity_weight: float = 0.0,
    codec: str = "zlib-ng",
    level: int = 1,
    cap: float | None = None,
    neighbour_weight: float = 0.0,
    neighbour_k: int = 5,
    image_filter: str = "none",
) -> str:
    """The score's definition in words, for responses and ``info``."""
    near = (
        ""
        if not neighbour_weight
        else f" + {neighbour_weight:.4g} * neighbour, where neighbour = the distance from the "
        f"posterior mean E[z|x] to its {neighbour_k}th nearest training posterior mean"
    )
    if not complexity_weight:
        if not near:
            return SCORE_DEFINITION
        return (
            f"score = reconstruction + kl{near} (higher = more anomalous); reconstruction = "
            "-log p(x|z) at the posterior mean, kl = KL(q(z|x) || N(0, I)), in nats"
        )
    w = "" if complexity_weight == 1 else f"{complexity_weight:g} * "
    term = "complexity" if cap is None else f"min(complexity, {cap:.1f})"
    capped = (
        ""
        if cap is None
        else f"; the credit for complexity stops at {cap:.1f} nats (by default the median "
        "complexity of the normal validation data), so inputs more complex than the normal data "
        "gain nothing from it"
    )
    filtered = "" if image_filter == "none" else " after PNG's Average filter"
    return (
        f"score = reconstruction + kl - {w}{term}{near} (higher = more anomalous): the -ELBO "
        f"corrected for input complexity (Serra et al., ICLR 2020){capped}; "
        "reconstruction = -log p(x|z) at "
        "the posterior mean, kl = KL(q(z|x) || N(0, I)), complexity = DEFLATE code length "
        f"({codec} level {level}) of the 8-bit input{filtered}"
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
