from __future__ import annotations

import pytest
import torch

from detector.errors import ConfigError
from detector.model import VAE, VAEConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"input_shape": (64,), "architecture": "transformer"},
            "unknown architecture 'transformer'",
        ),
        (
            {"input_shape": (64,), "architecture": "mlp", "likelihood": "poisson"},
            "unknown likelihood",
        ),
        (
            {"input_shape": (64,), "architecture": "conv"},
            r"needs inputs shaped \(channels, height, width\)",
        ),
        ({"input_shape": (1, 10, 10), "architecture": "conv"}, "divisible by 4, got 10x10"),
        ({"input_shape": (64,), "architecture": "mlp", "latent_dim": 0}, "latent_dim must be >= 1"),
        ({"input_shape": (64,), "architecture": "mlp", "beta": 0.0}, "beta must be > 0"),
        ({"input_shape": (64,), "architecture": "mlp", "sigma": -1.0}, "sigma must be > 0"),
        ({"input_shape": (0,), "architecture": "mlp"}, "input_shape must be positive"),
        ({"input_shape": (64,), "architecture": "mlp", "members": 0}, "members must be 1-16"),
        ({"input_shape": (64,), "architecture": "mlp", "members": 17}, "members must be 1-16"),
        (
            {"input_shape": (1, 8, 8), "architecture": "conv", "members": 2},
            r"ensemble .* needs the mlp architecture",
        ),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        VAEConfig(**kwargs)


def test_config_round_trip_and_default_widths() -> None:
    cfg = VAEConfig(input_shape=(1, 28, 28), architecture="conv", latent_dim=8)
    assert cfg.widths == (32, 64)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config keys"):
        VAEConfig.from_dict(cfg.to_dict() | {"dropout": 0.1})


@pytest.mark.parametrize(
    ("shape", "arch", "likelihood", "sigma"),
    [
        ((1, 28, 28), "conv", "bernoulli", 0.1),
        ((1, 8, 8), "conv", "gaussian", 0.1),
        ((20,), "mlp", "gaussian", None),
        ((64,), "mlp", "bernoulli", 0.1),
    ],
)
def test_shapes_and_finite_losses(
    shape: tuple, arch: str, likelihood: str, sigma: float | None
) -> None:
    vae = VAE(
        VAEConfig(
            input_shape=shape, architecture=arch, latent_dim=3, likelihood=likelihood, sigma=sigma
        )
    )  # type: ignore[arg-type]
    x = torch.rand(5, *shape)
    params, mu, logvar = vae(x)
    assert params.shape == (5, *shape)
    assert mu.shape == logvar.shape == (5, 3)
    nll, kl = vae.nll(x, params), vae.kl(mu, logvar)
    assert nll.shape == kl.shape == (5,)
    assert torch.isfinite(nll).all() and (kl >= 0).all()
    assert (vae.log_sigma is not None) == (sigma is None and likelihood == "gaussian")


def test_gaussian_nll_matches_torch_distribution() -> None:
    vae = VAE(VAEConfig(input_shape=(6,), architecture="mlp", likelihood="gaussian", sigma=0.3))
    mean, scale = torch.randn(6), torch.rand(6) + 0.5
    vae.set_standardization(mean, scale)
    x, params = torch.randn(4, 6), torch.randn(4, 6)
    # -log N(x; mean + scale * params, (scale * sigma)^2) in raw units
    ref = -torch.distributions.Normal(mean + scale * params, scale * 0.3).log_prob(x).sum(-1)
    torch.testing.assert_close(vae.nll(x, params), ref, rtol=1e-5, atol=1e-4)


def test_standardization_is_gaussian_only() -> None:
    vae = VAE(VAEConfig(input_shape=(4,), architecture="mlp"))
    with pytest.raises(ConfigError, match="only used with the gaussian"):
        vae.set_standardization(torch.zeros(4), torch.ones(4))


def test_an_ensemble_scores_the_mean_of_its_members() -> None:
    """members = 3: one network whose -ELBO parts are the means of three VAEs' parts, each member
    exactly a plain VAE with that member's weights (numeric and categorical columns)."""
    torch.manual_seed(0)
    plain = VAEConfig(
        input_shape=(10,),
        architecture="mlp",
        latent_dim=4,
        widths=(16,),
        likelihood="gaussian",
        categorical=((6, 4),),
        masked=True,
    )
    ens = VAE(VAEConfig(**{**plain.__dict__, "members": 3}))
    x = torch.randn(5, 10)
    x[:, 6:] = torch.nn.functional.one_hot(torch.arange(5) % 4, 4).float()
    mu, logvar = ens.encode(x)
    params = ens.decode(mu)
    assert mu.shape == (5, 12) and params.shape == (5, 3, 10)
    members = []
    for i in range(3):
        one = VAE(plain)
        one.load_state_dict(
            {
                k: (v[i] if k.startswith(("encoder", "decoder")) else v)
                for k, v in ens.state_dict().items()
            }
        )
        members.append(one)
    for fn in ("nll", "nll_features", "surprise_features"):
        want = sum(getattr(m, fn)(x, m.decode(m.encode(x)[0])) for m in members) / 3
        torch.testing.assert_close(getattr(ens, fn)(x, params), want)
    kl = sum(m.kl(*m.encode(x)) for m in members) / 3
    torch.testing.assert_close(ens.kl(mu, logvar), kl)
    pred = sum(m.mean_prediction(m.decode(m.encode(x)[0])) for m in members) / 3
    torch.testing.assert_close(ens.mean_prediction(params), pred)
    # initialised apart, as three nn.Linear layers would be
    w = ens.state_dict()["encoder.1.weight"]
    assert not torch.equal(w[0], w[1]) and w.shape == (3, 16, 10)
    # one member is the plain VAE: the same nn.Linear layers and state-dict names as ever
    assert isinstance(VAE(plain).encoder[1], torch.nn.Linear)
