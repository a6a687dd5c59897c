"""In-context linear regression: covariances with the requested spectra and condition numbers, least-squares
recovery, paired shifts and their Wasserstein sizes, evaluation, validation."""

from __future__ import annotations

import math

import pytest
import torch

from effml.data.tasks import TASKS, InContextRegression, build_task
from effml.data.tasks.regression import gaussian_w2, least_squares_weights


def condition_numbers(covariances: torch.Tensor) -> torch.Tensor:
    eigenvalues = torch.linalg.eigvalsh(covariances.double())
    return eigenvalues[:, -1] / eigenvalues[:, 0]


def test_registered_and_sample_is_a_pure_function_of_seed() -> None:
    assert TASKS["linear-regression"] is InContextRegression
    task = build_task("linear-regression", d=4, n_context=9, kappa=10.0)
    first, again, other = task.sample(8, 3), task.sample(8, 3), task.sample(8, 4)
    assert first.xs.shape == (8, 9, 4) and first.ys.shape == (8, 9) and first.query.shape == (8, 4)
    assert first.target.shape == (8,) and first.covariance.shape == (8, 4, 4) and first.weights.shape == (8, 4)
    assert first.xs.dtype == torch.float32 and task.sample(2, 3, dtype=torch.float64).xs.dtype == torch.float64
    assert torch.equal(first.xs, again.xs) and torch.equal(first.ys, again.ys)
    assert not torch.equal(first.xs, other.xs)
    # labels are the linear function of the inputs (noise 0), the target likewise for the query
    assert torch.allclose(first.ys, torch.einsum("bnd,bd->bn", first.xs, first.weights), atol=1e-5)
    assert torch.allclose(first.target, (first.query * first.weights).sum(-1), atol=1e-5)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0])
def test_diverse_covariances_have_condition_numbers_in_range_and_unit_top_eigenvalue(kappa: float) -> None:
    task = InContextRegression(d=5, kappa=kappa)
    covariances = task.sample(512, 0, dtype=torch.float64).covariance
    assert torch.allclose(covariances, covariances.transpose(1, 2))
    eigenvalues = torch.linalg.eigvalsh(covariances)
    assert torch.allclose(eigenvalues[:, -1], torch.ones(512, dtype=torch.float64))
    conditions = condition_numbers(covariances)
    assert bool((conditions >= 1 - 1e-9).all()) and bool((conditions <= kappa * (1 + 1e-9)).all())
    if kappa == 1.0:
        assert torch.allclose(covariances, torch.eye(5, dtype=torch.float64).expand(512, 5, 5))
    else:  # log-uniform over [1, κ]: the whole range is covered, the median near √κ
        assert conditions.max() > kappa ** 0.95 and conditions.min() < kappa ** 0.05
        assert abs(math.log(float(conditions.median())) / math.log(kappa) - 0.5) < 0.1


def test_fixed_covariance_has_the_given_spectrum_and_the_data_follow_it() -> None:
    spectrum = (0.2, 0.65, 1.1, 1.55, 2.0)
    task = InContextRegression(d=5, n_context=40, covariance="fixed", spectrum=spectrum, basis_seed=3)
    batch = task.sample(2000, 1, dtype=torch.float64)
    assert torch.equal(batch.covariance[0], batch.covariance[-1])
    assert torch.allclose(torch.linalg.eigvalsh(batch.covariance[0]), torch.tensor(spectrum, dtype=torch.float64))
    assert float(condition_numbers(batch.covariance[:1])) == pytest.approx(10.0)
    inputs = batch.xs.reshape(-1, 5)
    empirical = inputs.T @ inputs / inputs.shape[0]
    assert torch.allclose(empirical, batch.covariance[0], atol=0.05)
    # default spectrum: geometric from 1 down to 1/kappa
    default = InContextRegression(d=3, covariance="fixed", kappa=100.0)
    assert default.fixed_eigenvalues().tolist() == pytest.approx([1.0, 0.1, 0.01])


def test_inverse_covariance_prior_gives_unit_label_variance() -> None:
    task = InContextRegression(d=5, kappa=100.0, weight_prior="inverse-covariance")
    batch = task.sample(4000, 2, dtype=torch.float64)
    assert float(batch.ys.pow(2).mean()) == pytest.approx(1.0, rel=0.08)
    # every eigen-direction carries the same share of the label variance: wᵀΣw has mean 1 whatever κ is
    quadratic = torch.einsum("bi,bij,bj->b", batch.weights, batch.covariance, batch.weights)
    assert float(quadratic.mean()) == pytest.approx(1.0, rel=0.08)


@pytest.mark.parametrize(("d", "n"), [(3, 3), (5, 40), (8, 20)])
def test_least_squares_recovers_the_weights_when_n_is_at_least_d(d: int, n: int) -> None:
    batch = InContextRegression(d=d, n_context=n, kappa=10.0).sample(16, 7, dtype=torch.float64)
    assert torch.allclose(least_squares_weights(batch), batch.weights.double(), atol=1e-8)


def test_least_squares_cannot_recover_the_weights_when_n_is_below_d() -> None:
    batch = InContextRegression(d=6, n_context=3).sample(16, 7, dtype=torch.float64)
    solution = least_squares_weights(batch)
    assert torch.allclose(torch.einsum("bnd,bd->bn", batch.xs, solution), batch.ys, atol=1e-8)  # fits the data
    assert (solution - batch.weights).norm(dim=1).min() > 1e-3  # but is not w


def test_gaussian_w2_matches_closed_forms() -> None:
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    sigma = root @ root.T + 0.1 * torch.eye(4, dtype=torch.float64)
    assert float(gaussian_w2(sigma, sigma)) == pytest.approx(0.0, abs=1e-6)
    # commuting pair Σ and sΣ: W2² = (1 − √s)² tr Σ
    assert float(gaussian_w2(sigma, 2.25 * sigma)) == pytest.approx(0.5 * math.sqrt(float(sigma.trace())))
    # diagonal pair: W2² = Σ (√a_i − √b_i)²; symmetric in its arguments
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = math.sqrt(float(((a.sqrt() - b.sqrt()) ** 2).sum()))
    assert float(gaussian_w2(torch.diag(a), torch.diag(b))) == pytest.approx(expected)
    assert float(gaussian_w2(torch.diag(b), torch.diag(a))) == pytest.approx(expected)


def test_shifts_transform_paired_covariances_and_report_their_size() -> None:
    task = InContextRegression(d=4, kappa=10.0)
    base = task.covariances(64, 5)
    scaled = task.shifted(scale=1.5)
    assert torch.allclose(scaled.covariances(64, 5), 1.5 * base)
    expected = ((1 - math.sqrt(1.5)) ** 2 * torch.diagonal(base, dim1=1, dim2=2).sum(-1)).sqrt().mean()
    assert task.shift_size(scaled, n=64, seed=5) == pytest.approx(float(expected))
    assert task.shift_size(task, n=64, seed=5) == pytest.approx(0.0, abs=1e-6)
    # a larger κ keeps the bases and stretches the spectra: condition numbers grow as κ'^v for the same v
    wider = task.shifted(kappa=100.0)
    assert torch.allclose(torch.log(condition_numbers(wider.covariances(64, 5))),
                          2 * torch.log(condition_numbers(base)), rtol=1e-6, atol=1e-9)
    # a rotation keeps the spectrum of the fixed Σ* and conjugates it: R Σ Rᵀ with R orthogonal
    fixed = InContextRegression(d=4, covariance="fixed", kappa=10.0)
    rotated = fixed.shifted(rotation=0.4)
    rotation = torch.from_numpy(rotated.rotation_matrix())
    assert torch.allclose(rotation @ rotation.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    sigma, sigma_rotated = fixed.covariances(1, 0)[0], rotated.covariances(1, 0)[0]
    assert torch.allclose(sigma_rotated, rotation @ sigma @ rotation.T, atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(sigma_rotated), torch.linalg.eigvalsh(sigma))
    assert 0 < fixed.shift_size(rotated, n=1) < fixed.shift_size(fixed.shifted(rotation=0.8), n=1)


def test_evaluate_scores_oracle_zero_and_per_readout_predictions() -> None:
    task = InContextRegression(d=3, n_context=10, kappa=10.0)

    def least_squares(batch):
        return (least_squares_weights(batch) * batch.query.double()).sum(-1)

    assert task.evaluate(least_squares, 100, seed=1, batch_size=32)["nmse"] < 1e-10
    zero = task.evaluate(lambda batch: torch.zeros(len(batch)), 100, seed=1, batch_size=32)
    assert zero["nmse"] == pytest.approx(1.0) and zero["mse"] > 0
    both = task.evaluate(lambda batch: torch.stack([torch.zeros(len(batch)), least_squares(batch)]), 100, seed=1)
    assert both["nmse@1"] == pytest.approx(1.0) and both["nmse@2"] == both["nmse"] < 1e-10
    with pytest.raises(ValueError, match=r"shape \(32,\) or \(K, 32\)"):
        task.evaluate(lambda batch: torch.zeros(3), 32, seed=1, batch_size=32)


@pytest.mark.parametrize(("params", "message"), [
    ({"covariance": "random"}, "covariance='random'.*diverse"),
    ({"kappa": 0.5}, "kappa=0.5 must be a finite number ≥ 1"),
    ({"spectrum": (1.0, 2.0)}, "only used with covariance='fixed'"),
    ({"covariance": "fixed", "d": 3, "spectrum": (1.0, 2.0)}, "spectrum must hold d=3"),
    ({"weight_prior": "flat"}, "weight_prior='flat'"),
    ({"scale": 0.0}, "scale must be > 0"),
])
def test_bad_parameters_are_refused_with_a_clear_message(params, message) -> None:
    with pytest.raises(ValueError, match=message):
        InContextRegression(**params)


@pytest.mark.parametrize("world_size", [2, 4])  # 4 ranks, 3 batches: one rank scores nothing
def test_ranks_split_a_regression_evaluation_and_their_sums_give_the_one_process_metrics(world_size) -> None:
    task = InContextRegression(d=3, n_context=10)

    def predict(batch) -> torch.Tensor:  # two read-outs: predicting 0, and half the target
        return torch.stack([torch.zeros_like(batch.target), 0.5 * batch.target])

    one = task.evaluate(predict, n=50, seed=2, batch_size=20)
    shards = [task.evaluation_sums(predict, n=50, seed=2, batch_size=20, rank=rank, world_size=world_size)
              for rank in range(world_size)]
    combined = task.metrics_from_sums(shards, n=50)
    assert combined.keys() == one.keys()
    for name, value in one.items():
        assert combined[name] == pytest.approx(value, rel=1e-12), name
    assert one["nmse@1"] == pytest.approx(1.0) and one["nmse@2"] == pytest.approx(0.25)
