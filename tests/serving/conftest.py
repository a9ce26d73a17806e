from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from detector.detector import Detector
from serving.app import create_app
from serving.settings import Settings
from training.pipeline import CalibrationOptions, DataOptions, TrainOutcome, train_detector
from training.train import TrainConfig


@pytest.fixture
def make_client(trained: TrainOutcome) -> Iterator:  # type: ignore[type-arg]
    """Build a TestClient around the session's digits model (or an artifact dir)."""
    clients: list[TestClient] = []

    def make(
        load_from_dir: bool = False, raise_server_exceptions: bool = True, **settings: object
    ) -> TestClient:
        assert trained.path is not None
        if load_from_dir:
            settings.setdefault("model_dir", str(trained.path))
        app = create_app(
            Settings(access_log=False, **settings),  # type: ignore[arg-type]
            detector=None if load_from_dir else trained.detector,
            registry=CollectorRegistry(),
        )
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:  # type: ignore[no-untyped-def]
    return make_client()


@pytest.fixture
def test_images(trained: TrainOutcome) -> np.ndarray:
    assert trained.split.x_test is not None
    return trained.split.x_test


def _table(n: int, seed: int = 0) -> pd.DataFrame:
    """A customer-like table: numbers, a text column, 5 % empty cells."""
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 10, n)
    income = 1000 + 50 * age + rng.normal(0, 200, n)
    channel = rng.choice(["web", "phone", "store"], n, p=[0.6, 0.3, 0.1])
    visits = rng.poisson(np.where(channel == "web", 8, 2)).astype(float)
    df = pd.DataFrame({"age": age, "income": income, "channel": channel, "visits": visits})
    for c in df.columns:
        df.loc[rng.random(n) < 0.05, c] = None
    return df


@pytest.fixture(scope="session")
def table_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model trained with the default options (but few epochs) on a table with a text column
    and 5 % empty cells; and the folder of its files."""
    root = tmp_path_factory.mktemp("tables")
    _table(800).to_csv(root / "normal.csv", index=False)
    train_detector(
        DataOptions(dataset=str(root / "normal.csv")),
        train=TrainConfig(epochs=3, min_steps=0, device="cpu"),
        calibration=CalibrationOptions(target_fpr=0.05),
        out=root / "model",
        progress=False,
    )
    return root / "model", root


@pytest.fixture(scope="session")
def table_client(table_model: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from serving.app import create_app
    from serving.settings import Settings

    app = create_app(
        Settings(access_log=False),
        detector=Detector.load(table_model[0]),
        registry=CollectorRegistry(),
    )
    with TestClient(app) as client:
        yield client
