"""Image-quality metrics (effml.metrics.image_quality): the Fréchet distance against closed forms (translation,
diagonal covariances) and scipy's sqrtm, its invariances and its stability for singular covariances; the Vendi score
against known effective numbers of distinct samples and the n×n kernel definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effml.metrics import frechet_distance, frechet_distance_from_statistics, gaussian_statistics, vendi_score


def _correlated_features(count: int, width: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    """(count, width) float64 samples of a Gaussian with a random full covariance and mean ``offset``·1."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    return torch.randn(count, width, generator=generator, dtype=torch.float64) @ mixing + offset


def _rotation(width: int, seed: int) -> torch.Tensor:
    """A random orthogonal (width, width) matrix (the Q of a QR decomposition)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))[0]


# ------------------------------------------------------------------------------------------------ gaussian_statistics

def test_gaussian_statistics_are_the_mean_and_unbiased_covariance_in_float64() -> None:
    features = _correlated_features(50, 6, seed=0).float()
    mean, covariance = gaussian_statistics(features)
    assert mean.dtype == covariance.dtype == torch.float64
    assert mean.shape == (6,) and covariance.shape == (6, 6)
    as_numpy = features.double().numpy()
    np.testing.assert_allclose(mean.numpy(), as_numpy.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(covariance.numpy(), np.cov(as_numpy, rowvar=False, ddof=1), rtol=1e-12, atol=1e-12)


def test_gaussian_statistics_of_fewer_than_two_examples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 2 examples"):
        gaussian_statistics(torch.ones(1, 4))


# --------------------------------------------------------------------------------------------------- frechet_distance

def test_the_distance_of_a_set_to_itself_is_zero() -> None:
    features = _correlated_features(200, 8, seed=1)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_the_distance_is_symmetric() -> None:
    reference, candidate = _correlated_features(150, 7, seed=2), _correlated_features(90, 7, seed=3, offset=0.5)
    forward, backward = frechet_distance(reference, candidate), frechet_distance(candidate, reference)
    assert forward > 1.0 and forward == pytest.approx(backward, rel=1e-12)


def test_a_translation_by_delta_gives_the_squared_norm_of_delta() -> None:
    # Translating a set leaves its covariance unchanged, so only the mean term ‖δ‖² remains.
    features = _correlated_features(120, 10, seed=4)
    delta = torch.linspace(-1.0, 2.0, 10, dtype=torch.float64)
    assert frechet_distance(features, features + delta) == pytest.approx(float(delta.square().sum()), rel=1e-10)


def test_diagonal_covariances_give_the_closed_form_from_statistics() -> None:
    # Commuting (diagonal) covariances: Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) = Σᵢ (√aᵢ − √bᵢ)².
    variances1 = torch.tensor([4.0, 1.0, 0.25, 9.0, 0.0], dtype=torch.float64)
    variances2 = torch.tensor([1.0, 1.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 3.0, -0.5], dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (variances1.sqrt() - variances2.sqrt()).square().sum())
    distance = frechet_distance_from_statistics(mu1, torch.diag(variances1), mu2, torch.diag(variances2))
    assert distance == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("count1", "count2", "width"), [(300, 250, 6), (80, 120, 12)])
def test_agrees_with_a_scipy_sqrtm_reference_on_full_rank_data(count1: int, count2: int, width: int) -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    reference = _correlated_features(count1, width, seed=5)
    candidate = _correlated_features(count2, width, seed=6, offset=0.3)
    (mu1, sigma1), (mu2, sigma2) = gaussian_statistics(reference), gaussian_statistics(candidate)
    root = scipy_linalg.sqrtm(sigma1.numpy() @ sigma2.numpy())
    expected = float((mu1 - mu2).square().sum()) + float(np.trace(sigma1.numpy() + sigma2.numpy() - 2 * root.real))
    assert frechet_distance(reference, candidate) == pytest.approx(expected, rel=1e-9)


def test_a_common_rotation_of_both_sets_leaves_the_distance_unchanged() -> None:
    reference, candidate = _correlated_features(100, 9, seed=7), _correlated_features(140, 9, seed=8, offset=-0.4)
    rotation = _rotation(9, seed=9)
    rotated = frechet_distance(reference @ rotation, candidate @ rotation)
    assert rotated == pytest.approx(frechet_distance(reference, candidate), rel=1e-10)


def _frechet_distance_from_centred_data(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """An independent reference that needs no matrix square root: with C₁, C₂ the centred data, Σ₁Σ₂ has the
    eigenvalues of C₁C₂ᵀ(C₁C₂ᵀ)ᵀ/((N−1)(M−1)), so Tr(Σ₁Σ₂)^{1/2} is the sum of the singular values of C₁C₂ᵀ over
    √((N−1)(M−1)). Accurate for singular covariances, but N×M-sized, so not what the library computes."""
    (mu1, sigma1), (mu2, sigma2) = gaussian_statistics(reference), gaussian_statistics(candidate)
    centred1, centred2 = reference - mu1, candidate - mu2
    trace_of_root = torch.linalg.svdvals(centred1 @ centred2.T).sum() / math.sqrt(
        (len(reference) - 1) * (len(candidate) - 1))
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_of_root)


@pytest.mark.parametrize(("count", "width"), [(10, 50), (5, 200), (30, 30)])
def test_singular_covariances_give_finite_accurate_distances(count: int, width: int) -> None:
    # More features than examples: both covariances have rank < F. The distance must stay finite and ≥ 0, and match
    # known answers (the data-based reference; itself: 0; a translation: ‖δ‖²) to far better than the ~1e-4 that
    # square roots of rounding-level eigenvalues would leave.
    features, other = _correlated_features(count, width, seed=10), _correlated_features(count + 3, width, seed=11)
    delta = torch.full((width,), 0.5, dtype=torch.float64)
    distance = frechet_distance(features, other)
    assert math.isfinite(distance) and distance > 0
    assert distance == pytest.approx(frechet_distance(other, features), rel=1e-12)
    assert distance == pytest.approx(_frechet_distance_from_centred_data(features, other), rel=1e-12)
    scale = float(gaussian_statistics(features)[1].trace())
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-12 * scale)
    assert frechet_distance(features, features + delta) == pytest.approx(float(delta.square().sum()),
                                                                          abs=1e-12 * scale)


def test_frechet_distance_errors_name_the_problem() -> None:
    features = torch.randn(20, 4)
    with pytest.raises(ValueError, match="4 features per example but candidate has 5"):
        frechet_distance(features, torch.randn(20, 5))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(features, torch.randn(20))
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance(features, torch.cat([torch.randn(19, 4), torch.full((1, 4), math.inf)]))
    with pytest.raises(ValueError, match="at least 2 examples"):
        frechet_distance(features, torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(F, F\)"):
        frechet_distance_from_statistics(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))
    with pytest.raises(ValueError, match="sigma1 holds NaN"):
        frechet_distance_from_statistics(torch.zeros(2), torch.full((2, 2), math.nan), torch.zeros(2), torch.eye(2))


# -------------------------------------------------------------------------------------------------------- vendi_score

def _vendi_from_the_kernel(features: torch.Tensor) -> float:
    """The definition: exp of the entropy of the eigenvalues of K/n, K the n×n cosine-similarity matrix (numpy)."""
    rows = features.double().numpy()
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    eigenvalues = np.linalg.eigvalsh(unit @ unit.T / len(unit))
    eigenvalues = eigenvalues[eigenvalues > 1e-15]
    return float(np.exp(-(eigenvalues * np.log(eigenvalues)).sum()))


def test_identical_vectors_score_one() -> None:
    assert vendi_score(torch.tensor([[0.3, -1.0, 2.0]]).repeat(12, 1)) == pytest.approx(1.0, abs=1e-9)


def test_orthonormal_vectors_score_their_number() -> None:
    assert vendi_score(_rotation(8, seed=12)[:5]) == pytest.approx(5.0, rel=1e-10)


def test_k_orthonormal_vectors_each_repeated_m_times_score_k() -> None:
    # n = 3 · 7 = 21 rows of width 5 < n: this exercises the F×F Gram route.
    directions = _rotation(5, seed=13)[:3]
    assert vendi_score(directions.repeat_interleave(7, dim=0)) == pytest.approx(3.0, rel=1e-10)


def test_two_vectors_at_an_angle_score_the_exponential_entropy_of_half_one_plus_and_minus_cosine() -> None:
    # K = [[1, c], [c, 1]] has eigenvalues 1 ± c, so K/2 has (1 ± c)/2.
    angle = 1.0
    cosine = math.cos(angle)
    probabilities = ((1 + cosine) / 2, (1 - cosine) / 2)
    expected = math.exp(-sum(p * math.log(p) for p in probabilities))
    vectors = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]], dtype=torch.float64)
    assert vendi_score(vectors) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < expected < 2.0


@pytest.mark.parametrize(("count", "width"), [(40, 6), (6, 40), (20, 20)])
def test_the_score_equals_the_n_by_n_kernel_definition_on_either_route(count: int, width: int) -> None:
    features = _correlated_features(count, width, seed=14)
    score = vendi_score(features)
    assert score == pytest.approx(_vendi_from_the_kernel(features), rel=1e-10)
    assert 1.0 <= score <= count


def test_the_score_is_invariant_to_row_order_positive_row_scales_and_rotations() -> None:
    features = _correlated_features(30, 8, seed=15, offset=0.2)
    score = vendi_score(features)
    generator = torch.Generator().manual_seed(16)
    permuted = features[torch.randperm(30, generator=generator)]
    scaled = features * (0.1 + 10 * torch.rand(30, 1, generator=generator, dtype=torch.float64))
    rotated = features @ _rotation(8, seed=17)
    for transformed in (permuted, scaled, rotated):
        assert vendi_score(transformed) == pytest.approx(score, rel=1e-10)


def test_vendi_score_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"rows \[2\].*all zero"):
        vendi_score(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        vendi_score(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        vendi_score(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="no rows"):
        vendi_score(torch.ones(0, 3))
