from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from serving.app import create_app
from serving.settings import Settings
from training.pipeline import TrainOutcome


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
