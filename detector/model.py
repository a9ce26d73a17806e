"""The Variational Autoencoder, built from a config dataclass.

A VAE (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014) learns an encoder
q(z|x) = N(mu(x), diag(sigma(x)^2)) and a decoder p(x|z) with a standard normal prior p(z). Trained
on normal data only, it gives low negative ELBO to inputs like its training data and high negative
ELBO to anything else; `detector.score` turns that into an anomaly score.

Two bodies share one interface:

- ``"mlp"``: flatten -> Linear/SiLU stack -> (mu, logvar); the mirror image decodes.
- ``"conv"``: stride-2 4x4 convolutions halve H and W per width, then one Linear to
  (mu, logvar); transposed convolutions decode. H and W must divide by 2**len(widths).

Two likelihoods:

- ``"bernoulli"``: data in [0, 1] (pixel intensities); the decoder gives logits and
  -log p(x|z) is the binary cross-entropy summed over features.
- ``"gaussian"``: real-valued data; the decoder gives the mean, sigma is fixed (``sigma``) or one
  learned value per feature (``sigma=None``). Inputs are standardised with the training data's
  mean and scale (buffers saved with the weights), and the log-Jacobian of that map is added back,
  so -log p(x|z) is in nats of the raw features.

Tables (``detector.schema``) add two things to the Gaussian likelihood: ``categorical`` blocks of
the input are one-hot columns, whose likelihood is a softmax over the block's logits (the
category's surprise, -log p, in nats; an all-zero block is a category unseen in training and
costs ``unseen_nats``), and ``masked`` inputs may hold NaN for a missing cell, which the encoder
reads as the training mean and the likelihood counts as the column's typical term on the training
rows (``missing_nats``): neither an anomaly nor a perfect fit.

``members`` > 1 (MLP only; tables by default, ``training.options``) makes the VAE a seed ensemble:
that many encoder / decoder pairs, initialised apart and trained side by side on the same
batches, each with its own latent block. ``encode`` returns the blocks side by side (B, members *
latent_dim), and the reconstruction and KL terms are the members' means: the ensemble's -ELBO is
the mean of its members' (docs/experiments.md, "Eleventh session").

The config travels with the weights in the artifact (cf. nanoGPT's ``GPTConfig`` / ``model_args``),
so ``VAE(VAEConfig(**saved))`` rebuilds the exact network.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from detector.errors import ConfigError

Architecture = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian"]

ARCHITECTURES: tuple[str, ...] = ("mlp", "conv")
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {"mlp": (512, 256), "conv": (32, 64)}

_LOG_2PI = math.log(2.0 * math.pi)
MAX_MEMBERS = 16


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a VAE. Saved as JSON in the artifact's ``config.json``."""

    input_shape: tuple[int, ...]
    architecture: Architecture = "conv"
    latent_dim: int = 16
    widths: tuple[int, ...] = field(default=())  # () -> DEFAULT_WIDTHS[architecture]
    likelihood: Likelihood = "bernoulli"
    sigma: float | None = 0.1  # gaussian only; None -> one learned sigma per feature
    beta: float = 1.0  # weight of the KL term in the training loss (the score always uses 1)
    # tables: (start, size) of each one-hot block; NaN inputs are missing cells; the surprise of
    # an unseen category in nats
    categorical: tuple[tuple[int, int], ...] = ()
    masked: bool = False
    unseen_nats: float = 0.0
    members: int = 1  # > 1: a seed ensemble of that many MLP VAEs (see the module docstring)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(
            self, "categorical", tuple((int(s), int(k)) for s, k in self.categorical)
        )
        if not self.widths:
            if self.architecture not in DEFAULT_WIDTHS:
                raise ConfigError(
                    f"unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}"
                )
            object.__setattr__(self, "widths", DEFAULT_WIDTHS[self.architecture])
        self.validate()

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(
                f"unknown likelihood {self.likelihood!r}; choose one of {LIKELIHOODS}"
            )
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"input_shape must be positive sizes, got {self.input_shape}")
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(w < 1 for w in self.widths):
            raise ConfigError(f"widths must be positive, got {self.widths}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if type(self.members) is not int or not 1 <= self.members <= MAX_MEMBERS:
            raise ConfigError(f"members must be 1-{MAX_MEMBERS}, got {self.members}")
        if self.members > 1 and self.architecture != "mlp":
            raise ConfigError("an ensemble (members > 1) needs the mlp architecture")
        if self.sigma is not None and self.sigma <= 0:
            raise ConfigError(f"sigma must be > 0 (or None to learn it), got {self.sigma}")
        if self.categorical or self.masked:
            if self.likelihood != "gaussian" or self.architecture != "mlp":
                raise ConfigError("table inputs need the mlp architecture and gaussian likelihood")
            end = 0
            for start, size in self.categorical:
                if start < end or size < 1 or start + size > self.n_features:
                    raise ConfigError(f"categorical blocks overlap or overrun: {self.categorical}")
                end = start + size
            if not (math.isfinite(self.unseen_nats) and self.unseen_nats >= 0):
                raise ConfigError(f"unseen_nats must be >= 0, got {self.unseen_nats}")
        if self.architecture == "conv":
            if len(self.input_shape) != 3:
                raise ConfigError(
                    "the conv architecture needs inputs shaped (channels, height, width), got "
                    f"{self.input_shape}; use --arch mlp for flat feature vectors"
                )
            factor = 2 ** len(self.widths)
            _, h, w = self.input_shape
            if h % factor or w % factor:
                raise ConfigError(
                    f"the conv architecture with {len(self.widths)} widths needs height and width "
                    f"divisible by {factor}, got {h}x{w}"
                )

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def code_dim(self) -> int:
        """Width of ``VAE.encode``'s output: every member's latent block side by side."""
        return self.members * self.latent_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["widths"] = list(self.widths)
        d["categorical"] = [list(g) for g in self.categorical]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        groups = d.get("categorical", [])
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) == 2 for g in groups
        ):
            raise ConfigError("model config: categorical must be a list of [start, size] pairs")
        return cls(
            **{
                **d,
                "input_shape": tuple(d["input_shape"]),
                "widths": tuple(d["widths"]),
                "categorical": tuple((int(a), int(b)) for a, b in groups),
            }
        )

    @property
    def is_table(self) -> bool:
        return bool(self.categorical) or self.masked


class VAE(nn.Module):
    """A VAE whose parts (encode, decode, nll, kl) are used by training and by the score."""

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor
    numeric_mask: torch.Tensor  # tables: 1 for numeric features, 0 in one-hot blocks
    cat_index: torch.Tensor  # (blocks, largest block): each block's feature indices, padded
    cat_pad: torch.Tensor  # (blocks, largest block): True where padded
    cat_start: torch.Tensor  # (blocks,): each block's first feature
    missing_nats: torch.Tensor  # tables: what a missing cell counts, its typical term (saved)
    log_sigma: nn.Parameter | None

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        shape = config.input_shape
        # Standardisation of inputs (identity unless set from data by `set_standardization`).
        self.register_buffer("feature_mean", torch.zeros(shape))
        self.register_buffer("feature_scale", torch.ones(shape))
        if config.architecture == "mlp":
            self.encoder, self.decoder = _mlp(config)
        else:
            self.encoder, self.decoder = _conv(config)
        if config.likelihood == "gaussian" and config.sigma is None:
            self.log_sigma = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("log_sigma", None)
        if config.is_table:
            # derived from the config, so not saved with the weights
            numeric = torch.ones(config.n_features)
            size = max((k for _, k in config.categorical), default=1)
            index = torch.zeros(len(config.categorical), size, dtype=torch.long)
            pad = torch.ones(len(config.categorical), size, dtype=torch.bool)
            for g, (start, k) in enumerate(config.categorical):
                numeric[start : start + k] = 0.0
                index[g, :k] = torch.arange(start, start + k)
                pad[g, :k] = False
            self.register_buffer("numeric_mask", numeric, persistent=False)
            self.register_buffer("cat_index", index, persistent=False)
            self.register_buffer("cat_pad", pad, persistent=False)
            self.register_buffer(
                "cat_start", torch.tensor([s for s, _ in config.categorical]), persistent=False
            )
            # a missing cell counts its column's typical term on the training rows (set after
            # training): rows with more unknown cells must not score lower for it
            self.register_buffer("missing_nats", torch.zeros(config.n_features))

    # -- preprocessing ----------------------------------------------------------------------
    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Standardise inputs as (x - mean) / scale (Gaussian likelihood only)."""
        if self.config.likelihood != "gaussian":
            raise ConfigError("standardisation is only used with the gaussian likelihood")
        self.feature_mean.copy_(mean.reshape(self.config.input_shape))
        self.feature_scale.copy_(scale.reshape(self.config.input_shape).clamp_min(1e-6))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.config.input_shape)  # (B, *input_shape)
        if self.config.is_table:  # a missing cell reads as the training mean (0 standardised)
            observed = ~torch.isnan(x)
            x = torch.where(observed, (x - self.feature_mean) / self.feature_scale, 0.0)
        elif self.config.likelihood == "gaussian":
            x = (x - self.feature_mean) / self.feature_scale
        return x

    def input_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input, flat: (B, n_features); a table's missing numeric cell at its
        mean (0), a missing or unseen category an all-zero block."""
        return self._prepare(x).flatten(1)

    # -- the two halves ---------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, *input_shape) -> mu, logvar, each (B, latent); an ensemble's (B, M * latent)."""
        h = self.encoder(self._prepare(x))  # (B, 2 * latent); an ensemble's (M, B, 2 * latent)
        mu, logvar = h.chunk(2, dim=-1)
        if self.config.members > 1:  # the members' blocks side by side: (B, M * latent)
            mu, logvar = (t.transpose(0, 1).flatten(1) for t in (mu, logvar))
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent) -> likelihood parameters (B, *input_shape): logits or Gaussian mean; an
        ensemble's z (B, M * latent) -> (B, M, *input_shape), member m's from its own block."""
        m = self.config.members
        if m > 1:
            out = self.decoder(z.reshape(z.shape[0], m, -1).transpose(0, 1)).transpose(0, 1)
            return out.reshape(z.shape[0], m, *self.config.input_shape)
        return self.decoder(z).reshape(z.shape[0], *self.config.input_shape)

    def _stacked(self, params: torch.Tensor) -> bool:
        """Whether ``params`` are an ensemble's (B, M, *input_shape), not one member's."""
        return params.dim() == len(self.config.input_shape) + 2

    def _members_mean(self, fn: Any, params: torch.Tensor) -> torch.Tensor:
        """The mean over an ensemble's members of ``fn(member's params)``."""
        m = self.config.members
        return sum(fn(params[:, i]) for i in range(m)) / m

    # -- log densities, per sample ----------------------------------------------------------
    def nll(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats, summed over features: (B,)."""
        if self._stacked(params):
            return self._members_mean(lambda p: self.nll(x, p), params)
        if self.config.is_table:
            return self.nll_features(x, params).sum(-1)
        x = self._prepare(x)
        if self.config.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
            return nll.flatten(1).sum(-1)
        log_sigma = self._log_sigma(params)
        sq = ((x - params) * torch.exp(-log_sigma)) ** 2
        nll = 0.5 * sq + log_sigma + 0.5 * _LOG_2PI
        # Jacobian of the standardisation, so the density is that of the raw features.
        return nll.flatten(1).sum(-1) + torch.log(self.feature_scale).sum()

    def nll_features(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """A table's -log p(x | z) per feature, in nats of the raw values: (B, features).

        Numeric features: the Gaussian's terms. A categorical block: its softmax surprise at the
        block's first feature (0 at the others), ``unseen_nats`` for an all-zero block. A missing
        cell (NaN) counts its column's typical term (``missing_nats``, the mean over the
        training rows): neither a perfect fit (0) nor an anomaly. ``detector.schema.TableSchema.
        column_contributions`` sums them per column.
        """
        if self._stacked(params):
            return self._members_mean(lambda p: self.nll_features(x, p), params)
        if not self.config.is_table:
            xs = self._prepare(x)
            log_sigma = self._log_sigma(params)
            sq = ((xs - params) * torch.exp(-log_sigma)) ** 2
            terms = 0.5 * sq + log_sigma + 0.5 * _LOG_2PI + torch.log(self.feature_scale)
            return terms.flatten(1)
        observed = ~torch.isnan(x.reshape(params.shape))
        xs = self._prepare(x)
        log_sigma = self._log_sigma(params)
        sq = ((xs - params) * torch.exp(-log_sigma)) ** 2
        terms = (0.5 * sq + log_sigma + 0.5 * _LOG_2PI + torch.log(self.feature_scale)) * (
            self.numeric_mask
        )
        if self.config.categorical:
            logits = params[:, self.cat_index].masked_fill(self.cat_pad, -torch.inf)
            logp = torch.log_softmax(logits, dim=-1).masked_fill(self.cat_pad, 0.0)
            onehot = xs[:, self.cat_index].masked_fill(self.cat_pad, 0.0)  # (B, G, K)
            surprise = -(onehot * logp).sum(-1)  # (B, G)
            seen = onehot.sum(-1) > 0
            surprise = torch.where(seen, surprise, self.config.unseen_nats)
            terms = terms.index_add(1, self.cat_start, surprise)
        return torch.where(observed, terms, self.missing_nats)

    @torch.no_grad()
    def set_missing_nats(self, x: torch.Tensor, batch_size: int = 1024) -> None:
        """Each feature's mean term over the observed cells of rows ``x`` (training rows): what
        a missing cell will count."""
        total = torch.zeros_like(self.missing_nats, dtype=torch.float64)
        count = torch.zeros_like(total)
        self.missing_nats.zero_()
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(self.missing_nats.device)
            mu, _ = self.encode(xb)
            observed = ~torch.isnan(xb.reshape(xb.shape[0], -1))
            terms = self.nll_features(xb, self.decode(mu))
            total += torch.where(observed, terms, 0.0).sum(0).double()
            count += observed.sum(0).double()
        self.missing_nats.copy_((total / count.clamp_min(1)).float())

    def surprise_features(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """A table's per-feature -log p(x | z) above its best case, in nats: (B, features).

        A numeric cell's 0.5 * ((x - mean) / sigma)^2 in standardised units (its Gaussian term
        less the constant the cell pays even when predicted exactly), a categorical block's
        surprise; 0 for a missing cell. Comparable across columns of any scale: what
        ``detector.explain`` ranks columns by."""
        if self._stacked(params):
            return self._members_mean(lambda p: self.surprise_features(x, p), params)
        terms = self.nll_features(x, params)
        constant = (
            self._log_sigma(params) + 0.5 * _LOG_2PI + torch.log(self.feature_scale)
        ) * self.numeric_mask
        observed = ~torch.isnan(x.reshape(params.shape))
        return torch.where(observed, terms - constant, 0.0)

    def _log_sigma(self, like: torch.Tensor) -> torch.Tensor:
        if self.log_sigma is not None:
            return self.log_sigma.clamp(-7.0, 5.0)
        assert self.config.sigma is not None  # guaranteed by the config: fixed sigma
        return torch.full_like(like, math.log(self.config.sigma))

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) in nats, analytic: (B,); an ensemble's members' mean."""
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return kl / self.config.members if self.config.members > 1 else kl

    def mean_prediction(self, params: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters -> expected reconstruction in the input's own units."""
        if self._stacked(params):
            return self._members_mean(self.mean_prediction, params)
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(params)
        out = params * self.feature_scale + self.feature_mean
        if self.config.categorical:  # a one-hot block's expectation: the category probabilities
            logits = params[:, self.cat_index].masked_fill(self.cat_pad, -torch.inf)
            probs = torch.softmax(logits, dim=-1)
            out = out.clone()
            out[:, self.cat_index[~self.cat_pad]] = probs[:, ~self.cat_pad]
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct at the posterior mean: returns (params, mu, logvar)."""
        mu, logvar = self.encode(x)
        return self.decode(mu), mu, logvar


class ParallelLinear(nn.Module):
    """``members`` independent Linear layers applied side by side: (M, B, a) -> (M, B, b), each
    member initialised as ``nn.Linear`` would be."""

    def __init__(self, members: int, a: int, b: int) -> None:
        super().__init__()
        layers = [nn.Linear(a, b) for _ in range(members)]
        self.weight = nn.Parameter(torch.stack([la.weight.detach() for la in layers]))
        self.bias = nn.Parameter(torch.stack([la.bias.detach() for la in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, a), or (B, a) read by every member, -> (M, B, b)."""
        return torch.matmul(x, self.weight.transpose(1, 2)) + self.bias.unsqueeze(-2)


def _mlp(config: VAEConfig) -> tuple[nn.Module, nn.Module]:
    m = config.members

    def linear(a: int, b: int) -> nn.Module:
        return nn.Linear(a, b) if m == 1 else ParallelLinear(m, a, b)

    dims = [config.n_features, *config.widths]
    enc: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(dims):
        enc += [linear(a, b), nn.SiLU()]
    enc.append(linear(dims[-1], 2 * config.latent_dim))
    rev = [config.latent_dim, *reversed(config.widths)]
    dec: list[nn.Module] = []
    for a, b in itertools.pairwise(rev):
        dec += [linear(a, b), nn.SiLU()]
    dec.append(linear(rev[-1], config.n_features))
    return nn.Sequential(*enc), nn.Sequential(*dec)


def _conv(config: VAEConfig) -> tuple[nn.Module, nn.Module]:
    c, h, w = config.input_shape
    factor = 2 ** len(config.widths)
    hb, wb = h // factor, w // factor  # spatial size at the bottleneck
    chans = [c, *config.widths]
    enc: list[nn.Module] = []
    for a, b in itertools.pairwise(chans):
        enc += [nn.Conv2d(a, b, kernel_size=4, stride=2, padding=1), nn.SiLU()]
    enc += [nn.Flatten(), nn.Linear(chans[-1] * hb * wb, 2 * config.latent_dim)]
    dec: list[nn.Module] = [
        nn.Linear(config.latent_dim, chans[-1] * hb * wb),
        nn.SiLU(),
        nn.Unflatten(1, (chans[-1], hb, wb)),
    ]
    rev = list(reversed(chans))
    for i, (a, b) in enumerate(itertools.pairwise(rev)):
        dec.append(nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1))
        if i < len(rev) - 2:
            dec.append(nn.SiLU())
    return nn.Sequential(*enc), nn.Sequential(*dec)
