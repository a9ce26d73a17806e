"""Shared fixtures: seeds, the scikit-learn digits data, one small trained detector per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import Dataset, load_digits_dataset
from training.pipeline import (
    CalibrationOptions,
    DataOptions,
    ModelOptions,
    TrainOutcome,
    train_detector,
)
from training.train import TrainConfig

# Settings of the session's tiny detector: an MLP VAE on digits class 0 (about two seconds on CPU).
TINY_MODEL = ModelOptions(architecture="mlp", latent_dim=4, widths=(64, 32))
TINY_TRAIN = TrainConfig(
    epochs=40, batch_size=32, lr=3e-3, patience=0, min_steps=0, seed=0, device="cpu"
)
TINY_DATA = DataOptions(dataset="digits", normal_class=0, cal_fraction=0.25, val_fraction=0.15)
TINY_CAL = CalibrationOptions(target_fpr=0.05, method="split")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_digits_dataset()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> TrainOutcome:
    out = tmp_path_factory.mktemp("artifacts") / "digits-0"
    return train_detector(
        TINY_DATA, TINY_MODEL, TINY_TRAIN, TINY_CAL, out=out, progress=False, dataset=digits
    )


@pytest.fixture
def artifact_dir(trained: TrainOutcome, tmp_path: Path) -> Path:
    """A private copy of the session's artifact, free to tamper with."""
    assert trained.path is not None
    dst = tmp_path / "model"
    shutil.copytree(trained.path, dst)
    return dst
