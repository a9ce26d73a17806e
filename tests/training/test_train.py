from __future__ import annotations

import pytest
import torch

from detector.errors import ConfigError
from detector.model import VAE, VAEConfig
from training.data import Dataset, split_normal
from training.train import TrainConfig, fit, kl_weight, schedule


def test_kl_warmup_schedule() -> None:
    assert kl_weight(0, 0, 10, 0, 1.0) == 1.0  # no warm-up
    assert kl_weight(0, 0, 10, 2, 1.0) == 0.0
    assert kl_weight(0, 5, 10, 2, 1.0) == pytest.approx(0.25)
    assert kl_weight(1, 0, 10, 2, 0.5) == pytest.approx(0.25)
    assert kl_weight(5, 0, 10, 2, 1.0) == 1.0


def test_schedule_gives_small_data_at_least_min_steps() -> None:
    cfg = TrainConfig(epochs=50, batch_size=128, patience=5, min_steps=2000)
    assert schedule(4800, cfg) == (53, 6)  # 38 steps an epoch: 50 epochs are 1,900 steps
    assert schedule(6000, cfg) == (50, 5)  # 47 steps an epoch: 2,350 already
    assert schedule(200, cfg) == (1000, 100)  # 2 steps an epoch
    assert schedule(10, cfg) == (2000, 200)  # one (partial) batch an epoch
    assert schedule(200, TrainConfig(epochs=50, min_steps=0)) == (50, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "learning rate must be > 0"),
        ({"patience": -1}, "patience must be >= 0"),
        ({"min_steps": -1}, "min_steps must be >= 0"),
    ],
)
def test_train_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def _small(digits: Dataset):  # type: ignore[no-untyped-def]
    return split_normal(digits.x_train[digits.y_train == 1].reshape(-1, 64), seed=0)


def _model() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(input_shape=(64,), architecture="mlp", latent_dim=4, widths=(32,)))


def test_training_is_seeded_and_learns(digits: Dataset) -> None:
    s = _small(digits)
    cfg = TrainConfig(epochs=8, batch_size=32, seed=3, device="cpu", patience=0, min_steps=0)
    a = fit(_model(), s.x_train, s.x_val, cfg, progress=False)
    b = fit(_model(), s.x_train, s.x_val, cfg, progress=False)
    for (k, va), vb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(va, vb, msg=k)
    assert len(a.history) == 8
    assert a.history[-1]["val_loss"] < a.history[0]["val_loss"]
    assert set(a.history[0]) >= {
        "train_loss",
        "train_reconstruction",
        "train_kl",
        "val_loss",
        "val_kl",
        "seconds",
    }
    assert a.best_val_loss == min(h["val_loss"] for h in a.history)


def test_early_stopping_restores_the_best_epoch(digits: Dataset) -> None:
    s = _small(digits)
    # An improvement must be 90% of the loss: only the first epoch ever counts.
    cfg = TrainConfig(
        epochs=20, batch_size=32, patience=2, min_delta=0.9, min_steps=0, device="cpu"
    )
    r = fit(_model(), s.x_train, s.x_val, cfg, progress=False)
    assert r.stopped_early and len(r.history) == 3 and r.best_epoch == 1


def test_kl_warmup_only_counts_full_kl_epochs(digits: Dataset) -> None:
    s = _small(digits)
    cfg = TrainConfig(
        epochs=4, batch_size=32, kl_warmup_epochs=3, patience=0, min_steps=0, device="cpu"
    )
    r = fit(_model(), s.x_train, s.x_val, cfg, progress=False)
    assert r.best_epoch >= 3
    assert [round(h["beta"], 3) for h in r.history] == [0.333, 0.667, 1.0, 1.0]
