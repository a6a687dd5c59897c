"""In-context linear regression on Gaussian data, with task diversity and shifted test distributions.

The task of Gatmiry, Saunshi, Reddi, Jegelka and Kumar, "On the Role of Depth and Looping for In-Context Learning
with Task Diversity" (arXiv 2410.21698), and of Gatmiry et al., "Can Looped Transformers Learn to Implement
Multi-step Gradient Descent for In-context Learning?" (ICML 2024, arXiv 2410.08292). A prompt holds ``n_context``
pairs ``(x_i, y_i)`` and a query ``x_q``:

    x_i, x_q ~ N(0, Σ),   y_i = ⟨w, x_i⟩ + noise · ε_i,   target y_q = ⟨w, x_q⟩ (no noise on the target).

Covariance ``Σ = U diag(λ) Uᵀ`` (``U`` Haar-random orthogonal):

* ``covariance="diverse"`` (task diversity, 2410.21698): a fresh ``Σ`` per prompt, with condition number ``c`` drawn
  log-uniformly in ``[1, kappa]``; its largest eigenvalue is 1, its smallest ``1/c``, the others log-uniform between.
* ``covariance="fixed"`` (2410.08292): one ``Σ*`` for every prompt, eigenvalues ``spectrum`` (default: geometric from
  1 down to ``1/kappa``) in a random basis drawn from ``basis_seed``.

Weights: ``weight_prior="isotropic"`` draws ``w ~ N(0, I/d)``; ``"inverse-covariance"`` draws ``w ~ N(0, Σ⁻¹/d)``
(the prior of 2410.08292, scaled so that E y² = 1), so that every eigen-direction of ``Σ`` carries the same share of
``y``'s variance. The 1/d keeps the label row of the prompt matrix of order 1, which a deep stack of (cubic) linear
attention layers needs to train stably.

Shifted test distributions are the same task with other parameters: a larger ``kappa``, ``scale`` (Σ → s·Σ) or
``rotation`` (Σ → R Σ Rᵀ with ``R = exp(θ S)``, ``S`` a fixed random skew-symmetric generator of unit spectral norm).
Because the random draws do not depend on these parameters, the same seed gives *paired* prompts under two tasks;
:meth:`InContextRegression.shift_size` reports the mean 2-Wasserstein distance between the paired Gaussians,

    W2²(N(0, Σ₁), N(0, Σ₂)) = tr Σ₁ + tr Σ₂ − 2 tr (Σ₂^{1/2} Σ₁ Σ₂^{1/2})^{1/2}.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from effml.data.tasks.base import Task, check_int_param, evaluation_batches, register_task

__all__ = ["RegressionBatch", "InContextRegression", "gaussian_w2", "least_squares_weights", "random_orthogonal"]

_COVARIANCES = ("diverse", "fixed")
_WEIGHT_PRIORS = ("isotropic", "inverse-covariance")


@dataclass
class RegressionBatch:
    """A batch of ``B`` regression prompts of ``n`` in-context pairs in dimension ``d``.

    Attributes:
        xs: ``(B, n, d)`` in-context inputs. ys: ``(B, n)`` their labels.
        query: ``(B, d)`` query inputs. target: ``(B,)`` the query's noiseless label.
        covariance: ``(B, d, d)`` the Σ each prompt was drawn from. weights: ``(B, d)`` the prompt's ``w``.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    covariance: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device | str) -> RegressionBatch:
        """The same batch on ``device``."""
        return RegressionBatch(*(getattr(self, name).to(device) for name in
                                 ("xs", "ys", "query", "target", "covariance", "weights")))

    def __len__(self) -> int:
        return int(self.xs.shape[0])


def random_orthogonal(rng: np.random.Generator, batch_size: int, d: int) -> np.ndarray:
    """``(batch_size, d, d)`` Haar-random orthogonal matrices (QR of a Gaussian, signs fixed by diag(R) > 0)."""
    q, r = np.linalg.qr(rng.standard_normal((batch_size, d, d)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def _psd_sqrt(matrices: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of ``(..., d, d)`` positive semi-definite matrices (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh(matrices)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


def gaussian_w2(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """2-Wasserstein distance between ``N(0, first)`` and ``N(0, second)``: ``(..., d, d)`` pairs → ``(...)``.

    ``W2² = tr Σ₁ + tr Σ₂ − 2 tr (Σ₂^{1/2} Σ₁ Σ₂^{1/2})^{1/2}``, computed in float64.
    """
    first, second = first.double(), second.double()
    root = _psd_sqrt(second)
    cross = _psd_sqrt(root @ first @ root)
    trace = torch.diagonal(first, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(second, dim1=-2, dim2=-1).sum(-1)
    squared = trace - 2 * torch.diagonal(cross, dim1=-2, dim2=-1).sum(-1)
    return squared.clamp_min(0).sqrt()


def least_squares_weights(batch: RegressionBatch) -> torch.Tensor:
    """Per prompt, the minimum-norm least-squares solution ``argmin_w ‖X w − y‖²``: ``(B, d)``."""
    return torch.linalg.lstsq(batch.xs.double(), batch.ys.double().unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


@register_task
@dataclass(frozen=True)
class InContextRegression(Task):
    """In-context linear regression; see the module docstring for the distribution and its parameters."""

    name: ClassVar[str] = "linear-regression"
    d: int = 5
    n_context: int = 40
    covariance: str = "diverse"
    kappa: float = 1.0
    spectrum: tuple[float, ...] | None = None
    basis_seed: int = 0
    weight_prior: str = "inverse-covariance"
    noise: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0

    def __post_init__(self) -> None:
        check_int_param(self.name, "d", self.d)
        check_int_param(self.name, "n_context", self.n_context)
        check_int_param(self.name, "basis_seed", self.basis_seed, minimum=0)
        if self.covariance not in _COVARIANCES:
            raise ValueError(f"Task {self.name!r}: covariance={self.covariance!r} is not known; choose 'diverse' "
                             "(a new Σ per prompt, condition number in [1, kappa]) or 'fixed' (one Σ* for all).")
        if self.weight_prior not in _WEIGHT_PRIORS:
            raise ValueError(f"Task {self.name!r}: weight_prior={self.weight_prior!r} is not known; choose one of "
                             f"{list(_WEIGHT_PRIORS)}.")
        if not (isinstance(self.kappa, (int, float)) and math.isfinite(self.kappa) and self.kappa >= 1):
            raise ValueError(f"Task {self.name!r}: kappa={self.kappa!r} must be a finite number ≥ 1 (a condition "
                             "number: largest over smallest eigenvalue).")
        for field_name in ("scale", "noise", "rotation"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"Task {self.name!r}: {field_name}={value!r} must be a finite number.")
        if self.scale <= 0 or self.noise < 0:
            raise ValueError(f"Task {self.name!r}: scale must be > 0 and noise ≥ 0, got scale={self.scale}, "
                             f"noise={self.noise}.")
        if self.spectrum is not None:
            if self.covariance != "fixed":
                raise ValueError(f"Task {self.name!r}: a spectrum is only used with covariance='fixed'; drop it or "
                                 "set covariance='fixed'.")
            if len(self.spectrum) != self.d or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.spectrum):
                raise ValueError(f"Task {self.name!r}: spectrum must hold d={self.d} positive eigenvalues, "
                                 f"got {self.spectrum!r}.")
        if self.d < 2 and self.rotation != 0:
            raise ValueError(f"Task {self.name!r}: a rotation needs d ≥ 2, got d={self.d}.")

    # -- covariances -----------------------------------------------------------------------------------------------

    def fixed_eigenvalues(self) -> np.ndarray:
        """The unshifted eigenvalues of Σ* (``covariance="fixed"``): ``(d,)``, largest first."""
        if self.spectrum is not None:
            return np.sort(np.asarray(self.spectrum, dtype=np.float64))[::-1]
        return self.kappa ** (-np.arange(self.d) / max(self.d - 1, 1))

    def rotation_matrix(self) -> np.ndarray:
        """``R = exp(rotation · S)``: ``(d, d)``; S is a unit-norm random skew-symmetric matrix from ``basis_seed``."""
        rng = np.random.default_rng([self.basis_seed, 1])
        gaussian = rng.standard_normal((self.d, self.d))
        skew = gaussian - gaussian.T
        skew /= np.linalg.norm(skew, 2)
        return torch.linalg.matrix_exp(torch.from_numpy(self.rotation * skew)).numpy()

    def _eigen(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Unshifted eigenvalues ``(B, d)`` and bases ``(B, d, d)``; the draws do not depend on kappa/scale/rotation."""
        d = self.d
        if self.covariance == "fixed":
            basis = random_orthogonal(np.random.default_rng([self.basis_seed, 0]), 1, d)
            return (np.broadcast_to(self.fixed_eigenvalues(), (batch_size, d)).copy(),
                    np.broadcast_to(basis, (batch_size, d, d)).copy())
        log_condition = rng.random(batch_size) * math.log(self.kappa)  # c = kappa^v, v ~ U[0, 1]
        positions = rng.random((batch_size, d))  # exponents in [0, 1]: λ = c^(-t)
        positions[:, 0] = 0.0
        if d > 1:
            positions[:, 1] = 1.0
        eigenvalues = np.exp(-positions * log_condition[:, None])
        return eigenvalues, random_orthogonal(rng, batch_size, d)

    def _covariance_factors(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Shifted eigenvalues ``(B, d)`` and eigenvectors ``(B, d, d)`` of each prompt's Σ."""
        eigenvalues, basis = self._eigen(rng, batch_size)
        if self.rotation != 0:
            basis = self.rotation_matrix() @ basis
        return self.scale * eigenvalues, basis

    # -- sampling --------------------------------------------------------------------------------------------------

    def sample(self, batch_size: int, seed: int, dtype: torch.dtype = torch.float32) -> RegressionBatch:
        """``batch_size`` prompts drawn with ``numpy.random.default_rng(seed)`` (float64 draws, cast to ``dtype``)."""
        check_int_param(self.name, "batch_size", batch_size)
        check_int_param(self.name, "seed", seed, minimum=0)
        rng = np.random.default_rng(int(seed))
        eigenvalues, basis = self._covariance_factors(rng, batch_size)
        root = basis * np.sqrt(eigenvalues)[:, None, :]  # Σ^{1/2}-factor: Σ = root rootᵀ
        normals = rng.standard_normal((batch_size, self.n_context + 1, self.d))
        inputs = normals @ root.transpose(0, 2, 1)  # rows x = root z
        coefficients = rng.standard_normal((batch_size, self.d)) / math.sqrt(self.d)
        if self.weight_prior == "inverse-covariance":
            coefficients = coefficients / np.sqrt(eigenvalues)
        weights = np.einsum("bij,bj->bi", basis, coefficients)
        labels = np.einsum("bnd,bd->bn", inputs, weights)
        noisy = labels[:, :-1] + self.noise * rng.standard_normal((batch_size, self.n_context))
        covariance = (basis * eigenvalues[:, None, :]) @ basis.transpose(0, 2, 1)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

        return RegressionBatch(xs=tensor(inputs[:, :-1]), ys=tensor(noisy), query=tensor(inputs[:, -1]),
                               target=tensor(labels[:, -1]), covariance=tensor(covariance), weights=tensor(weights))

    def covariances(self, batch_size: int, seed: int) -> torch.Tensor:
        """The ``(B, d, d)`` float64 covariances ``sample(batch_size, seed)`` uses (without drawing the data)."""
        eigenvalues, basis = self._covariance_factors(np.random.default_rng(int(seed)), batch_size)
        return torch.from_numpy((basis * eigenvalues[:, None, :]) @ basis.transpose(0, 2, 1))

    # -- shifts ----------------------------------------------------------------------------------------------------

    def shifted(self, **changes: Any) -> InContextRegression:
        """This task with some parameters changed (e.g. ``kappa=``, ``scale=``, ``rotation=``)."""
        return replace(self, **changes)

    def shift_size(self, other: InContextRegression, n: int = 256, seed: int = 0) -> float:
        """Mean W2 distance between the x-distributions of ``n`` paired prompts of this task and ``other``."""
        if other.d != self.d or other.covariance != self.covariance:
            raise ValueError("shift_size pairs prompts of two tasks of the same d and covariance kind; got "
                             f"d={self.d}/{other.d}, covariance={self.covariance!r}/{other.covariance!r}.")
        return float(gaussian_w2(self.covariances(n, seed), other.covariances(n, seed)).mean())

    # -- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, predict: Callable[[RegressionBatch], torch.Tensor], n: int, seed: int,
                 batch_size: int = 256) -> dict[str, float]:
        """Query-prediction error of ``predict`` on ``n`` prompts.

        Args:
            predict: maps a :class:`RegressionBatch` (on CPU) to predictions ``(B,)`` of ``target``, or to ``(K, B)``
                predictions (for example one per loop read-out); then every metric is reported per read-out ``k``.

        Returns:
            ``mse``: mean squared error; ``nmse``: ``Σ (ŷ − y)² / Σ y²`` (0 is perfect, 1 is predicting 0). With
            ``(K, B)`` predictions, ``mse@k`` and ``nmse@k`` for ``k = 1 … K`` as well (``mse``/``nmse`` are the last).
        """
        return self.metrics_from_sums([self.evaluation_sums(predict, n, seed, batch_size)], n)

    @torch.no_grad()
    def evaluation_sums(self, predict: Callable[[RegressionBatch], torch.Tensor], n: int, seed: int,
                        batch_size: int = 256, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """The sums behind :meth:`evaluate` over this rank's share of the ``n`` prompts (see
        ``evaluation_batches``): ``squared_errors`` (float64 ``(K,)``, one per read-out; None for a rank left
        without a batch) and ``target_energy`` (Σ y²)."""
        squared_errors: torch.Tensor | None = None
        target_energy = 0.0
        for size, batch_seed in evaluation_batches(n, seed, batch_size, rank, world_size):
            batch = self.sample(size, batch_seed)
            predictions = torch.as_tensor(predict(batch)).detach().cpu().double()
            if predictions.dim() == 1:
                predictions = predictions.unsqueeze(0)
            if predictions.dim() != 2 or predictions.shape[1] != size:
                raise ValueError(f"predict must return predictions of shape ({size},) or (K, {size}) for a batch of "
                                 f"{size} prompts, got {tuple(predictions.shape)}.")
            errors = ((predictions - batch.target.double()) ** 2).sum(dim=1)
            squared_errors = errors if squared_errors is None else squared_errors + errors
            target_energy += float((batch.target.double() ** 2).sum())
        return {"squared_errors": squared_errors, "target_energy": target_energy}

    def metrics_from_sums(self, sums: list[dict[str, Any]], n: int) -> dict[str, float]:
        """:meth:`evaluate`'s metrics from every rank's :meth:`evaluation_sums` of the same ``n`` prompts."""
        errors = [rank_sums["squared_errors"] for rank_sums in sums if rank_sums["squared_errors"] is not None]
        squared_errors = functools.reduce(torch.add, errors)
        target_energy = sum(rank_sums["target_energy"] for rank_sums in sums)
        mse = (squared_errors / n).tolist()
        metrics = {"mse": mse[-1], "nmse": mse[-1] * n / target_energy}
        if len(mse) > 1:
            for k, value in enumerate(mse, start=1):
                metrics[f"mse@{k}"] = value
                metrics[f"nmse@{k}"] = value * n / target_energy
        return metrics
