from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.detector import Detector
from detector.errors import ConfigError
from detector.score import ScoreConfig, elbo_score, iwae_score, score_batch
from training.data import Dataset
from training.pipeline import TrainOutcome


def _pool(digits: Dataset) -> np.ndarray:
    assert digits.x_test is not None
    return np.concatenate([digits.x_train, digits.x_test])[:1000]  # 1,000 real digit images


def test_parts_sum_to_score(trained: TrainOutcome, digits: Dataset) -> None:
    det = trained.detector
    assert det.calibration is not None
    cal = det.score_config
    assert cal.complexity_weight == 1.0  # images: on
    assert cal.complexity_cap is not None  # capped at the validation images' median L
    assert cal.complexity_floor is not None  # and floored at their 1 % quantile
    assert cal.complexity_floor < cal.complexity_cap
    assert cal.neighbour_weight > 0  # the latent-neighbour term: on by default
    assert cal.transformation_weight > 0  # and the transformation head, for square images
    parts = det.score_parts(_pool(digits))
    np.testing.assert_allclose(
        parts["reconstruction"]
        + parts["kl"]
        - np.minimum(parts["complexity"], cal.complexity_cap)
        + np.maximum(0.0, cal.complexity_floor - parts["complexity"])
        + cal.neighbour_weight * parts["neighbour"]
        + cal.transformation_weight * np.log(parts["transformation"] + cal.transformation_offset),
        parts["score"],
        rtol=1e-6,
        atol=1e-3,  # the parts are summed in float32 inside the model
    )
    assert (parts["complexity"] > cal.complexity_cap).any()  # the cap is in the data's range
    assert (parts["complexity"] < cal.complexity_cap).any()
    assert (parts["neighbour"] >= 0).all() and parts["neighbour"].max() > 0
    simple = parts["complexity"] < cal.complexity_floor  # simpler than 99 % of the normal data
    assert simple.any() and not simple.all()
    unfloored = det.score_parts(_pool(digits), config=cal.replace(complexity_floor=None))
    gap = cal.complexity_floor - parts["complexity"][simple]
    np.testing.assert_allclose(parts["score"][simple] - unfloored["score"][simple], gap, rtol=1e-6)
    np.testing.assert_array_equal(parts["score"][~simple], unfloored["score"][~simple])
    uncapped = det.score_parts(
        _pool(digits),
        config=cal.replace(
            complexity_cap=None,
            complexity_floor=None,
            neighbour_weight=0.0,
            transformation_weight=0.0,
        ),
    )
    np.testing.assert_allclose(
        uncapped["reconstruction"] + uncapped["kl"] - uncapped["complexity"],
        uncapped["score"],
        rtol=1e-6,
        atol=1e-3,
    )
    assert (parts["kl"] >= 0).all() and (parts["complexity"] > 0).all()
    plain = det.score_parts(
        _pool(digits),
        config=cal.replace(
            complexity_weight=0.0,
            complexity_floor=None,
            neighbour_weight=0.0,
            transformation_weight=0.0,
        ),
    )
    np.testing.assert_allclose(
        plain["reconstruction"] + plain["kl"], plain["score"], rtol=1e-6, atol=1e-3
    )
    assert (plain["complexity"] == 0).all()


def test_complexity_is_the_code_length_in_nats_for_each_codec() -> None:
    import math
    import zlib

    from zlib_ng import zlib_ng

    from detector.complexity import complexity_nats

    blank = np.zeros((1, 64), np.float32)
    noise = np.random.default_rng(0).uniform(0, 1, (1, 64)).astype(np.float32)
    q = np.clip(np.rint(noise * 255), 0, 255).astype(np.uint8)
    for codec, compress in (("zlib-ng", zlib_ng.compress), ("zlib", zlib.compress)):
        for level in (1, 9):
            got = complexity_nats(np.concatenate([blank, noise]), level=level, codec=codec)
            assert got[0] == len(compress(bytes(64), level)) * 8 * math.log(2)
            assert got[1] == len(compress(q.tobytes(), level)) * 8 * math.log(2)
            assert got[1] > got[0]  # noise is complex, a blank image is simple
    many = np.random.default_rng(1).uniform(0, 1, (600, 64))
    np.testing.assert_array_equal(
        complexity_nats(many),
        np.concatenate([complexity_nats(many[:100]), complexity_nats(many[100:])]),
    )


def test_png_average_filter_matches_the_png_definition_pixel_by_pixel() -> None:
    from detector.complexity import png_average

    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (3, 2, 5, 7), dtype=np.uint8)  # (N, C, H, W)
    got = png_average(q, (1, 2))
    for n, c, i, j in np.ndindex(q.shape):
        left = int(q[n, c, i, j - 1]) if j > 0 else 0
        up = int(q[n, c, i - 1, j]) if i > 0 else 0
        assert got[n, c, i, j] == (int(q[n, c, i, j]) - (left + up) // 2) % 256
    # channels-last images are filtered over the same plane
    np.testing.assert_array_equal(
        png_average(np.moveaxis(q, 1, -1), (0, 1)), np.moveaxis(got, 1, -1)
    )


def test_image_axes_find_the_plane_and_leave_flat_rows_alone() -> None:
    from detector.complexity import image_axes

    assert image_axes((64,)) is None
    assert image_axes((28, 28)) == (0, 1)
    assert image_axes((1, 28, 28)) == (1, 2)
    assert image_axes((3, 32, 32)) == (1, 2)
    assert image_axes((32, 32, 3)) == (0, 1)


def test_filtered_complexity_is_the_code_length_of_the_filtered_image() -> None:
    import math

    from zlib_ng import zlib_ng

    from detector.complexity import complexity_nats, png_average

    x = np.random.default_rng(2).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    x[:, :, :, :4] = 0.5
    q = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    f = png_average(q, (1, 2))
    want = [len(zlib_ng.compress(r.tobytes(), 1)) * 8 * math.log(2) for r in f]
    got = complexity_nats(x, image_filter="png-average")
    np.testing.assert_array_equal(got, want)
    # rows may arrive flat as long as the sample shape is given
    flat = complexity_nats(x.reshape(4, -1), image_filter="png-average", shape=(1, 8, 8))
    np.testing.assert_array_equal(flat, want)
    # flat feature vectors have no plane: the filter leaves them as they are
    v = x.reshape(4, -1)
    np.testing.assert_array_equal(
        complexity_nats(v, image_filter="png-average"), complexity_nats(v)
    )


def test_unknown_complexity_codec_is_a_config_error() -> None:
    from detector.complexity import complexity_nats
    from detector.errors import ConfigError
    from detector.threshold import Calibration

    with pytest.raises(ConfigError, match="unknown complexity codec 'lzma'"):
        complexity_nats(np.zeros((1, 4)), codec="lzma")
    with pytest.raises(ConfigError, match="complexity level must be 0-9"):
        ScoreConfig(complexity_level=12)
    saved = Calibration.fit(np.arange(200.0), 0.05).to_dict()
    assert saved["complexity_codec"] == "zlib-ng"
    old = {k: v for k, v in saved.items() if k != "complexity_codec"}
    assert Calibration.from_dict(old).score_config.complexity_codec == "zlib"  # older artifacts
    with pytest.raises(ConfigError, match="unknown complexity codec"):
        Calibration.from_dict({**saved, "complexity_codec": "brotli"})
    assert saved["complexity_filter"] == "png-average"
    old = {k: v for k, v in saved.items() if k != "complexity_filter"}
    assert Calibration.from_dict(old).score_config.complexity_filter == "none"  # before it existed
    with pytest.raises(ConfigError, match="unknown complexity filter 'paeth'"):
        Calibration.from_dict({**saved, "complexity_filter": "paeth"})
    with pytest.raises(ConfigError, match="unknown complexity filter"):
        complexity_nats(np.zeros((1, 4)), image_filter="up")


def test_scores_are_batch_invariant_and_repeatable(trained: TrainOutcome, digits: Dataset) -> None:
    det = trained.detector
    pool = _pool(digits)
    first = pool[:100]
    alone = np.concatenate([det.score(first[i : i + 1]).score for i in range(100)])
    in_batch = det.score(pool).score[:100]  # the same 100 inside a batch of 1,000
    again = det.score(first).score
    twice = det.score(first).score
    # float32 kernels blocked differently for other batch sizes: equal to 1e-5 of the score scale
    tol = 1e-5 * float(np.median(np.abs(in_batch)))
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(again, in_batch, rtol=1e-5, atol=tol)
    np.testing.assert_array_equal(again, twice)


def test_small_internal_batches_give_the_same_scores(
    trained: TrainOutcome, digits: Dataset
) -> None:
    big = trained.detector
    small = Detector(
        big.model,
        big.calibration,
        big.input_spec,
        batch_size=7,
        reference=big.reference,
        head=big.head,
    )
    ref = big.score(_pool(digits))
    tol = 1e-5 * float(np.median(np.abs(ref.score)))
    got = small.score(_pool(digits))
    np.testing.assert_allclose(got.score, ref.score, rtol=1e-5, atol=tol)
    # distances are computed pair by pair: the neighbour part does not depend on the batch
    np.testing.assert_allclose(got.neighbour, ref.neighbour, rtol=1e-5, atol=1e-6)


def test_planted_anomalies_score_above_every_inlier(trained: TrainOutcome) -> None:
    split = trained.split
    assert split.x_test is not None and split.y_test is not None
    inliers = split.x_test[split.y_test == 0]  # unseen test zeros
    rng = np.random.default_rng(0)
    planted = np.concatenate(
        [
            rng.uniform(0, 1, size=(20, *inliers.shape[1:])).astype(np.float32),  # noise
            1.0 - inliers[:20],  # inverted zeros
            np.ones((1, *inliers.shape[1:]), np.float32),  # all white
        ]
    )
    s_in = trained.detector.score(inliers).score
    s_out = trained.detector.score(planted).score
    assert s_out.min() > s_in.max()


def test_iwae_is_deterministic_batch_invariant_and_below_its_elbo(
    trained: TrainOutcome, digits: Dataset
) -> None:
    model = trained.detector.model
    x = torch.from_numpy(_pool(digits)[:64])
    a = iwae_score(model, x, samples=16)
    b = iwae_score(model, x[:10], samples=16)
    torch.testing.assert_close(a.score[:10], b.score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.score, iwae_score(model, x, samples=16).score)
    # Jensen: log-mean-exp of the weights >= mean of the logs, for the same draws.
    assert (a.score <= a.reconstruction + a.kl + 1e-4).all()
    # And the importance-weighted score tracks the ELBO: same ranking, broadly.
    e = elbo_score(model, x).score
    assert np.corrcoef(a.score.numpy(), e.numpy())[0, 1] > 0.9


def test_reconstruction_weight_scales_the_reconstruction_alone(
    trained: TrainOutcome, digits: Dataset
) -> None:
    det = trained.detector
    assert det.score_config.reconstruction_weight == 1.0  # images: the -ELBO
    x = _pool(digits)[:200]
    base = det.score_parts(x)
    cfg = det.score_config.replace(reconstruction_weight=0.25)
    weighted = det.score_parts(x, config=cfg)
    for part in ("reconstruction", "kl", "complexity", "neighbour"):
        np.testing.assert_array_equal(weighted[part], base[part])  # the parts stay the -ELBO's
    np.testing.assert_allclose(
        weighted["score"], base["score"] - 0.75 * base["reconstruction"], rtol=1e-6, atol=1e-3
    )
    assert "0.25 * reconstruction + kl" in cfg.definition()
    assert ScoreConfig.from_dict(cfg.to_dict()) == cfg
    assert ScoreConfig.from_dict({}).reconstruction_weight == 1.0  # older calibrations


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_a_reconstruction_weight_must_be_positive_and_finite(weight: float) -> None:
    with pytest.raises(ConfigError, match="reconstruction weight must be a finite number > 0"):
        ScoreConfig(reconstruction_weight=weight)


def test_a_reconstruction_weight_needs_the_elbo_score() -> None:
    with pytest.raises(ConfigError, match="needs the elbo score, not iwae"):
        ScoreConfig(kind="iwae", samples=4, reconstruction_weight=0.5)


@pytest.mark.parametrize(
    ("kind", "samples", "match"),
    [("mse", 1, "unknown score kind"), ("iwae", 1, "at least 2 samples")],
)
def test_score_kind_errors(trained: TrainOutcome, kind: str, samples: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        score_batch(trained.detector.model, torch.zeros(1, 1, 8, 8), kind, samples)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_traced_graph_matches_eager_score(arch: str, digits: Dataset) -> None:
    from detector.model import VAE, VAEConfig
    from detector.spec import InputSpec

    shape = (64,) if arch == "mlp" else (1, 8, 8)
    torch.manual_seed(0)
    model = VAE(VAEConfig(input_shape=shape, architecture=arch, latent_dim=3)).eval()  # type: ignore[arg-type]
    det = Detector(model, None, InputSpec(shape=(1, 8, 8), value_range=(0.0, 1.0)))
    x = _pool(digits)[:37]
    for n in (1, 2, 37):  # traced with a batch of 2; other batch sizes must work too
        got = det.score_parts(x[:n])
        ref = elbo_score(model, torch.from_numpy(x[:n].reshape(n, *shape)))
        np.testing.assert_allclose(got["score"], ref.score.double().numpy(), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(got["kl"], ref.kl.double().numpy(), rtol=1e-6, atol=1e-6)
