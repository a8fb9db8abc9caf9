"""FID statistics, Fréchet distance and statistics files (pgpis_jax.metrics.fid).

References: the textbook formula with scipy.linalg.sqrtm written here, an eigenvalue route that needs no
sqrtm (tr sqrtm(S1 S2) = sum of sqrt(eig(S1^1/2 S2 S1^1/2))), the closed form for diagonal covariances, and
the covariance written out.
"""

import hashlib

import numpy as np
import pytest
import scipy.linalg

from pgpis_jax.errors import UserError
from pgpis_jax.metrics import fid


def random_statistics(rng, samples, dim):
    features = rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + rng.normal(size=dim)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def scipy_formula(mu1, sigma1, mu2, sigma2):
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)


def eigenvalue_route(mu1, sigma1, mu2, sigma2):
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


@pytest.mark.parametrize("samples, dim", [(500, 64), (2000, 128)])
def test_frechet_distance_matches_references(samples, dim):
    rng = np.random.default_rng(dim)
    first, second = random_statistics(rng, samples, dim), random_statistics(rng, samples, dim)
    ours = fid.frechet_distance(*first, *second)
    assert isinstance(ours, float) and ours > 1.0
    assert ours == pytest.approx(scipy_formula(*first, *second), rel=1e-10)
    assert ours == pytest.approx(eigenvalue_route(*first, *second), rel=1e-8)
    assert ours == pytest.approx(fid.frechet_distance(*second, *first), rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, sigma = fid.statistics(np.random.default_rng(1).normal(size=(1000, 128)) * 3.0)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4.0, 32), rng.uniform(0.1, 4.0, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_rank_deficient_covariances_match_the_scipy_formula():
    """N < D: singular covariances, sqrtm of their product has a tiny imaginary part that is dropped."""
    rng = np.random.default_rng(3)
    first, second = random_statistics(rng, 20, 64), random_statistics(rng, 20, 64)
    assert np.linalg.matrix_rank(first[1]) == 19
    assert fid.frechet_distance(*first, *second) == pytest.approx(scipy_formula(*first, *second), rel=1e-8)


def test_non_finite_sqrtm_retries_with_eps_on_the_diagonal(monkeypatch):
    """Where sqrtm(S1 S2) is not finite (older scipy on singular products), the retry uses (S1 + eps I)(S2 + eps I)."""
    rng = np.random.default_rng(4)
    (mu1, sigma1), (mu2, sigma2) = random_statistics(rng, 200, 16), random_statistics(rng, 200, 16)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", failing_once)
    eps = 1e-2
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    np.testing.assert_allclose(calls[1], (sigma1 + eps * np.eye(16)) @ (sigma2 + eps * np.eye(16)), rtol=1e-14)
    diff = mu1 - mu2
    expected = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.trace(real_sqrtm((sigma1 + eps * np.eye(16)) @ (sigma2 + eps * np.eye(16))).real))
    assert ours == pytest.approx(expected, rel=1e-12)


def test_imaginary_part_small_is_dropped_large_is_an_error(monkeypatch):
    sigma = np.diag([1.0, 4.0])
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda matrix: real_sqrtm(matrix) + 5e-4j)
    assert fid.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", real_sqrtm)
    with pytest.raises(ValueError, match="imaginary diagonal component of 1"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mu1 \(3,\), sigma1 \(3, 3\), mu2 \(4,\)"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_statistics_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32)
    mu, sigma = fid.statistics(features)
    centred = features.astype(np.float64) - features.astype(np.float64).sum(axis=0) / 50
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match=r"features \[N >= 2, D\], got shape \(1, 8\)"):
        fid.statistics(features[:1])


META = {"variant": "torchvision", "input_transform": "legacy_pidm", "image_size": [256, 176],
        "resize_kernel": "pil_bicubic_aa", "num_images": 3, "file_list_hash": fid.file_list_hash(["b.png", "a.png"])}


def test_statistics_file_round_trip_and_stale_cache(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=16), np.cov(rng.normal(size=(40, 16)), rowvar=False)
    path = str(tmp_path / "stats" / "real.npz")
    fid.save_statistics(path, mu, sigma, {**META, "image_size": (256, 176)})
    loaded_mu, loaded_sigma = fid.load_statistics(path, META)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)

    with pytest.raises(UserError, match=r"real.npz was computed for other settings \(num_images: stored 3, wanted 4\)"):
        fid.load_statistics(path, {**META, "num_images": 4})
    with pytest.raises(UserError, match=r"file_list_hash: stored '[0-9a-f]{64}', wanted '[0-9a-f]{64}'; variant"):
        fid.load_statistics(path, {**META, "variant": "pt_inception", "file_list_hash": fid.file_list_hash(["a.png"])})
    with pytest.raises(UserError, match=r"weights_sha256: stored '\(absent\)', wanted 'abc'"):
        fid.load_statistics(path, {**META, "weights_sha256": "abc"})
    with pytest.raises(UserError, match=r"missing.npz does not exist"):
        fid.load_statistics(str(tmp_path / "missing.npz"), META)
    np.savez(tmp_path / "other.npz", mu=mu)
    with pytest.raises(UserError, match=r"other.npz is not an FID statistics file"):
        fid.load_statistics(str(tmp_path / "other.npz"), META)
    with pytest.raises(ValueError, match="meta lacks resize_kernel"):
        fid.save_statistics(path, mu, sigma, {k: v for k, v in META.items() if k != "resize_kernel"})
    with pytest.raises(ValueError, match=r"expected mu \[D\] and sigma \[D, D\]"):
        fid.save_statistics(path, mu, sigma[:3], META)


def test_file_list_hash_is_of_the_sorted_names():
    expected = hashlib.sha256("a.png\nb/c.jpg".encode()).hexdigest()
    assert fid.file_list_hash(["b/c.jpg", "a.png"]) == expected
    assert fid.file_list_hash(["a.png"]) != expected
