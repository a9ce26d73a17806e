from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.errors import ConfigError
from detector.model import VAE, VAEConfig
from detector.neighbours import (
    Search,
    feature_scale,
    fit_weight,
    neighbour_distance,
    reference_widths,
    robust_scale,
)


def test_distance_is_the_kth_nearest_reference_row() -> None:
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.normal(size=(700, 3)).astype(np.float32))
    mu = torch.from_numpy(rng.normal(size=(1100, 3)).astype(np.float32))  # > one chunk of 512
    got = neighbour_distance(mu, ref, 5).numpy()
    brute = np.sort(np.linalg.norm(mu.numpy()[:, None] - ref.numpy()[None], axis=-1), axis=1)
    np.testing.assert_allclose(got, brute[:, 4], rtol=1e-5)
    # a reference row itself is at distance 0 with k = 1
    assert neighbour_distance(ref[:10], ref, 1).abs().max() == 0
    # k larger than the reference: the farthest row
    np.testing.assert_allclose(
        neighbour_distance(mu[:4], ref[:3], 5).numpy(), brute_far(mu[:4], ref[:3]), rtol=1e-5
    )
    # batch-invariant: one row alone gets exactly what it gets inside a batch
    assert torch.equal(neighbour_distance(mu[7:8], ref, 5), neighbour_distance(mu, ref, 5)[7:8])


def test_wide_rows_prefiltered_by_a_matrix_product_get_the_exact_distance() -> None:
    """From 16 features on, a matrix product picks the candidates; the k-th distance is still
    the brute-force one, and a row alone gets exactly what it gets in a batch, with duplicated
    reference rows (ties, as one-hot tables have) too."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(900, 40)).astype(np.float32)
    ref[100:160] = ref[0]  # 61 identical rows
    mu = rng.normal(size=(600, 40)).astype(np.float32)
    mu[:3] = ref[0] + 0.01
    got = neighbour_distance(torch.from_numpy(mu), torch.from_numpy(ref), 5)
    brute = np.sort(np.linalg.norm(mu[:, None] - ref[None], axis=-1), axis=1)[:, 4]
    np.testing.assert_allclose(got.numpy(), brute, rtol=1e-5)
    alone = torch.cat(
        [
            neighbour_distance(torch.from_numpy(mu[i : i + 1]), torch.from_numpy(ref), 5)
            for i in range(20)
        ]
    )
    assert torch.equal(alone, got[:20])
    # fewer reference rows than k + the margin: every row is measured
    few = neighbour_distance(torch.from_numpy(mu[:4]), torch.from_numpy(ref[:30]), 5)
    brute_few = np.sort(np.linalg.norm(mu[:4, None] - ref[None, :30], axis=-1), axis=1)[:, 4]
    np.testing.assert_allclose(few.numpy(), brute_few, rtol=1e-5)


def brute_far(mu: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return np.linalg.norm(mu.numpy()[:, None] - ref.numpy()[None], axis=-1).max(axis=1)


def test_shape_mismatch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"neighbour reference of shape \(5, 4\) does not match"):
        neighbour_distance(torch.zeros(2, 3), torch.zeros(5, 4), 5)


def test_weight_matches_the_spreads() -> None:
    rng = np.random.default_rng(1)
    likelihood = rng.normal(0, 40.0, 5000)
    near = rng.normal(3.0, 0.5, 5000)
    w = fit_weight(likelihood, near, 0.5)
    assert w == pytest.approx(0.5 * 40.0 / 0.5, rel=0.05)
    assert robust_scale(w * near) == pytest.approx(0.5 * robust_scale(likelihood))
    assert fit_weight(likelihood, near, 0.0) == 0.0
    with pytest.raises(ConfigError, match="neighbour share must be a finite number >= 0"):
        fit_weight(likelihood, near, -1.0)


def test_robust_scale_of_degenerate_samples() -> None:
    assert robust_scale([2.0, 2.0, 2.0, 5.0]) == pytest.approx(np.std([2.0, 2.0, 2.0, 5.0]))
    assert robust_scale([3.0, 3.0]) == 1.0
    with pytest.raises(ConfigError, match="at least one value"):
        robust_scale([])


def test_input_space_counts_each_feature_in_its_spread_over_the_reference() -> None:
    """The input space: the model's input features, each divided by its standard deviation over
    the reference rows (1 for a constant one), then the k-th nearest reference row."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 4)).astype(np.float32) * np.float32([1.0, 10.0, 0.1, 1.0])
    ref[:, 3] = 0.5  # constant: its spread counts as 1
    x = rng.normal(size=(50, 4)).astype(np.float32)
    model = VAE(VAEConfig((4,), architecture="mlp", latent_dim=2, likelihood="gaussian"))
    search = Search(torch.from_numpy(ref), "input")  # the model's input features: x as it is
    scale = ref.std(0)
    scale[3] = 1.0
    np.testing.assert_allclose(feature_scale(torch.from_numpy(ref)).numpy(), scale, rtol=1e-5)
    got = search.distance(model, torch.from_numpy(x), None, 5).numpy()
    d = np.linalg.norm((x[:, None] - ref[None]) / scale, axis=-1)
    np.testing.assert_allclose(got, np.sort(d, axis=1)[:, 4], rtol=1e-4)
    # the latent space searches the posterior means it is given, and needs them
    latent = Search(torch.from_numpy(ref[:, :2]), "latent")
    mu = torch.from_numpy(x[:, :2])
    assert torch.equal(
        latent.distance(model, torch.from_numpy(x), mu, 5), neighbour_distance(mu, latent.rows, 5)
    )
    with pytest.raises(ConfigError, match="needs the posterior means"):
        latent.distance(model, torch.from_numpy(x), None, 5)
    with pytest.raises(ConfigError, match="unknown neighbour space 'pixels'"):
        Search(torch.from_numpy(ref), "pixels")
    assert reference_widths(model.config, "input") == {4}
    assert reference_widths(model.config, "latent") == {2}
    assert reference_widths(model.config, None) == {2, 4}
