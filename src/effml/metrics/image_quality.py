"""Sample quality and diversity of generated images, measured on feature vectors: Fréchet distance and Vendi score.

Fréchet distance (the "FID" of Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", arXiv 1706.08500, when the features are Inception-v3 pool features): fit a Gaussian N(μ, Σ) to each of
two feature sets and report the squared 2-Wasserstein distance between the two Gaussians (Dowson & Landau, "The
Fréchet distance between multivariate normal distributions", J. Multivariate Anal. 12, 1982):

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}).

Lower is closer; 0 means equal means and covariances. The trace term is computed in float64 from symmetric
eigendecompositions (``torch.linalg.eigh``; eigenvalues that rounding leaves slightly negative or slightly above 0
are set to 0) of Σ₁ and Σ₂, as the sum of the singular values of Σ₁^{1/2} Σ₂^{1/2}, rather than with a general
``sqrtm`` of the non-symmetric Σ₁Σ₂, so it stays real, finite and accurate for singular covariances (more features F
than examples N), where ``scipy.linalg.sqrtm`` can return complex parts or lose precision.

Vendi score (Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning",
arXiv 2210.02410, eq. 1): with a positive semi-definite similarity kernel K (n×n, k(x, x) = 1) over n samples and
λ₁…λₙ the eigenvalues of K/n,

    VS = exp(−Σᵢ λᵢ log λᵢ)   (0 · log 0 = 0),

the exponential of the Shannon entropy of the eigenvalues: the "effective number of distinct samples", between 1 (all
samples alike) and n (all mutually orthogonal). Here k is the cosine similarity of feature vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gaussian_statistics", "frechet_distance", "frechet_distance_from_statistics", "vendi_score"]


def _feature_matrix(name: str, features: Tensor) -> Tensor:
    """``features`` (N, F) validated (2-D, real, finite) and as a detached float64 tensor."""
    features = torch.as_tensor(features).detach()
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (examples, features) tensor, but it has shape {tuple(features.shape)}. "
                         "Flatten each example's features into one row (e.g. features.reshape(len(features), -1)).")
    if features.is_complex():
        raise ValueError(f"{name} is complex ({features.dtype}); these metrics need real-valued features.")
    if features.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(features.shape)}); each example needs at least one.")
    features = features.to(torch.float64)
    if not torch.isfinite(features).all():
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ValueError(f"{name} holds NaN or infinite values (in {bad} of its {len(features)} rows); the metric "
                         "would be NaN. Check the feature extractor (e.g. a diverged model's samples) and drop or fix "
                         "those rows.")
    return features


def _symmetric_eigenvalues(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric positive semi-definite (F, F) matrix, rounding's small negatives clamped to 0."""
    return torch.linalg.eigvalsh((matrix + matrix.T) / 2).clamp_min(0.0)


def _psd_square_root(matrix: Tensor) -> Tensor:
    """The symmetric positive semi-definite square root (F, F) of a symmetric PSD (F, F) matrix, via ``eigh``.

    Eigenvalues at or below F · eps · (largest |eigenvalue|), the rank cut-off of ``numpy.linalg.matrix_rank``, are
    set to 0, not just the negative ones: an eigenvalue that is 0 in exact arithmetic comes out as ±eps · ‖matrix‖,
    and its square root, about 1e-8 · √‖matrix‖, would otherwise survive into the root of a singular covariance.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    cutoff = len(matrix) * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max()
    eigenvalues = torch.where(eigenvalues > cutoff, eigenvalues, torch.zeros_like(eigenvalues))
    return (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (F,) and unbiased covariance (F, F) (divisor N − 1), both float64, of ``features`` (N, F), N ≥ 2."""
    features = _feature_matrix("features", features)
    if len(features) < 2:
        raise ValueError(f"gaussian_statistics needs at least 2 examples to estimate a covariance, but got "
                         f"{len(features)}. Pass more samples (FID-style estimates need many more than 2).")
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (len(features) - 1)


def frechet_distance_from_statistics(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """The Fréchet distance d² between N(``mu1`` (F,), ``sigma1`` (F, F)) and N(``mu2`` (F,), ``sigma2`` (F, F)).

    Covariances must be symmetric positive semi-definite (as ``gaussian_statistics`` returns); singular ones are
    fine. Computed in float64; the result is clamped at 0, which rounding (about 1e-14 · (Tr Σ₁ + Tr Σ₂)) can
    undershoot for equal Gaussians.
    """
    mu1, mu2 = (torch.as_tensor(mu).detach().to(torch.float64) for mu in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(sigma).detach().to(torch.float64) for sigma in (sigma1, sigma2))
    width = mu1.shape[0] if mu1.ndim == 1 and len(mu1) > 0 else None
    for name, tensor, shape in (("mu1", mu1, (width,)), ("sigma1", sigma1, (width, width)),
                                ("mu2", mu2, (width,)), ("sigma2", sigma2, (width, width))):
        if width is None or tuple(tensor.shape) != shape:
            raise ValueError(f"frechet_distance_from_statistics needs means of shape (F,) and covariances of shape "
                             f"(F, F) for one feature width F, but got mu1 {tuple(mu1.shape)}, sigma1 "
                             f"{tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)} ({name} "
                             "does not fit). Compute both sets' statistics from features of the same extractor.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"frechet_distance_from_statistics: {name} holds NaN or infinite values; the distance "
                             "would be NaN. Check the features the statistics were computed from.")
    # (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} has as eigenvalues the singular values of Σ₁^{1/2} Σ₂^{1/2}, so its trace is
    # their sum. Taking singular values of the product of roots, rather than square roots of the eigenvalues of
    # Σ₁^{1/2} Σ₂ Σ₁^{1/2}, does not square the condition number: on singular covariances (F > N) the eigenvalue
    # route was off by up to ~1e-7 of the distance, this one by ~1e-15. It is also symmetric in (1, 2), since
    # Σ₂^{1/2} Σ₁^{1/2} is the transpose of Σ₁^{1/2} Σ₂^{1/2}.
    trace_of_root = torch.linalg.svdvals(_psd_square_root(sigma1) @ _psd_square_root(sigma2)).sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_of_root
    return max(float(distance), 0.0)


def frechet_distance(reference: Tensor, candidate: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to ``reference`` (N, F) and ``candidate`` (M, F) features.

    N, M ≥ 2; F may exceed N or M (singular covariances are fine). Symmetric in its arguments. Raises ValueError for
    non-2-D or non-finite input and for different feature widths.
    """
    reference, candidate = _feature_matrix("reference", reference), _feature_matrix("candidate", candidate)
    if reference.shape[1] != candidate.shape[1]:
        raise ValueError(f"frechet_distance: reference has {reference.shape[1]} features per example but candidate has "
                         f"{candidate.shape[1]}; both sets must be featurised by the same extractor, giving (N, F) "
                         "and (M, F) with one F.")
    return frechet_distance_from_statistics(*gaussian_statistics(reference), *gaussian_statistics(candidate))


def vendi_score(features: Tensor) -> float:
    """The Vendi score of n samples given as ``features`` (n, F), with the cosine-similarity kernel.

    Between 1 (all rows point the same way) and n (rows mutually orthogonal); k orthogonal directions each repeated
    equally often score k. Invariant to the order of the rows, to a positive scale of each row and to a rotation of
    the feature space. Raises ValueError for an all-zero row (its cosine similarity is undefined), for no rows, and
    for non-2-D or non-finite input.
    """
    features = _feature_matrix("features", features)
    count = len(features)
    if count == 0:
        raise ValueError("vendi_score needs at least one sample, but features has no rows.")
    norms = features.norm(dim=1, keepdim=True)
    zero_rows = (norms.squeeze(1) == 0).nonzero().flatten().tolist()
    if zero_rows:
        raise ValueError(f"vendi_score: rows {zero_rows[:10]}{' …' if len(zero_rows) > 10 else ''} of features are all "
                         "zero, and the cosine similarity of a zero vector is undefined. Drop those samples or use "
                         "features that are never all zero (e.g. a classifier's logits or probabilities).")
    unit_rows = features / norms
    # K/n = X Xᵀ/n (n×n) and Xᵀ X/n (F×F) share their non-zero eigenvalues (X's squared singular values over n), so
    # decompose whichever matrix is smaller; the extra eigenvalues of the larger one are zeros, which add nothing.
    similarity = unit_rows.T @ unit_rows if unit_rows.shape[1] < count else unit_rows @ unit_rows.T
    eigenvalues = _symmetric_eigenvalues(similarity / count)
    positive = eigenvalues[eigenvalues > 0]
    entropy = -(positive * positive.log()).sum()
    return float(entropy.exp())
