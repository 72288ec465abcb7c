import numpy as np
import pytest
import torch
import torch.nn as nn

from common.data import image_to_tensor, load_image, resize_and_crop
from common.image_metrics import (InceptionFeatures, ReferenceStats, clip_score, feature_stats, frechet_distance,
                                  inception_score)


def _random_spd(n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or n) + (0 if rank else 0.1) * torch.eye(n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_of_identical_statistics_is_zero():
    mu = torch.randn(16, dtype=torch.float64)
    sigma = _random_spd(16, seed=0)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    low_rank = _random_spd(16, seed=1, rank=5)  # fewer samples than dimensions
    assert frechet_distance(mu, low_rank, mu, low_rank) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(2**2 + 4 + 9 - 2 * 6)
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([0.5, 2.0, 1.0]), np.array([2.0, 0.1, 3.0])
    expected = ((mu1 - mu2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 6])
def test_frechet_distance_matches_scipy_sqrtm(rank):
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _random_spd(24, seed=2, rank=rank), _random_spd(24, seed=3)
    mu1, mu2 = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())
    expected = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    # symmetric up to round-off (square roots of the zero eigenvalues of a singular product amplify it)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-6)


def test_feature_stats_match_numpy():
    x = np.random.default_rng(0).standard_normal((50, 7)) * 3 + 1
    mu, sigma = feature_stats(torch.from_numpy(x).float())
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.astype(np.float32), rowvar=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        feature_stats(torch.zeros(1, 7))


# ---------------------------------------------------------------------------------------------------------------
# Inception Score and CLIP score


def test_inception_score_bounds():
    mean, std = inception_score(torch.zeros(40, 10))  # uniform predictions
    assert (mean, std) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    confident = 50.0 * torch.eye(10)  # one image per class, all sure of it
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(confident.repeat(3, 1), splits=3) == (pytest.approx(10.0, rel=1e-6),
                                                                 pytest.approx(0.0, abs=1e-6))
    # always the same confident class: no diversity, score 1
    assert inception_score(confident[[3] * 10], splits=2)[0] == pytest.approx(1.0, rel=1e-6)
    assert inception_score(confident[:4], splits=10)[0] == pytest.approx(1.0)  # 4 groups of 1 image: 1 each


def test_clip_score_range():
    torch.manual_seed(0)
    image = torch.randn(6, 16)
    assert torch.allclose(clip_score(image, 3 * image), torch.full((6,), 100.0))  # cos = 1, any scale
    assert torch.equal(clip_score(image, -image), torch.zeros(6))  # negative cosines clip to 0
    scores = clip_score(image, torch.randn(6, 16))
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 100)).all() and (scores < 100).all()


# ---------------------------------------------------------------------------------------------------------------
# Inception network and reference statistics


def test_inception_features_shapes_with_stand_in_weights():
    torch.manual_seed(0)
    net = InceptionFeatures(weights=None)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        features, logits = net(images)
        grey_features, _ = net(images[:, :1])
    assert features.shape == (2, 2048) and logits.shape == (2, 1000)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    assert (features >= 0).all()  # after ReLU and average pooling
    torch.testing.assert_close(logits, net.fc(features))
    assert grey_features.shape == (2, 2048) and net.key.startswith("inception_v3:random:")


class CountingFeatures(nn.Module):
    """A stand-in feature network: 4x4 average colours (48 features); counts its calls."""

    key = "counting-test"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        features = nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        return features, features[:, :10]


def test_reference_stats_computed_once_and_reused(demo_images, tmp_path):
    net = CountingFeatures()
    stats = ReferenceStats(tmp_path / "cache")
    mu, sigma = stats.get(demo_images, net, num_images=20, resolution=16, batch_size=8)
    assert net.calls == 3  # 8 + 8 + 4 images

    # the same as measuring the chosen images directly (evenly spaced over the sorted 48)
    files = sorted(demo_images.glob("*.png"))
    chosen = [files[i] for i in np.linspace(0, 47, 20).round().astype(int)]
    batch = torch.stack([image_to_tensor(resize_and_crop(load_image(f), 16)) for f in chosen])
    expected_mu, expected_sigma = feature_stats(net(batch)[0])
    torch.testing.assert_close(mu, expected_mu)
    torch.testing.assert_close(sigma, expected_sigma)

    net.calls = 0
    again = stats.get(demo_images, net, num_images=20, resolution=16, batch_size=8)  # from memory
    from_disk = ReferenceStats(tmp_path / "cache").get(demo_images, net, num_images=20, resolution=16)
    assert net.calls == 0
    for other in (again, from_disk):
        assert torch.equal(other[0], mu) and torch.equal(other[1], sigma)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    stats.get(demo_images, net, num_images=21, resolution=16)  # another count: computed anew
    assert net.calls == 1
    stats.get(demo_images, net, num_images=20, resolution=8)  # another resolution: computed anew
    assert net.calls == 2
