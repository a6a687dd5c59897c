"""Classifier two-sample test (effml.metrics.two_sample): the rank AUC against a pairwise count, and the cross-validated
classifier AUC against known answers (0.5 for equal distributions, Φ(δ/√2) for a Gaussian mean shift δ)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effml.metrics.two_sample import (_fold_assignment, classifier_two_sample_auc, classifier_two_sample_report,
                                      roc_auc)


def _pairwise_auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """The definition, in O(n²): the fraction of (negative, positive) pairs with positive > negative, ties = 1/2."""
    difference = positives[None, :] - negatives[:, None]
    return float(((difference > 0).double() + 0.5 * (difference == 0).double()).mean())


def _gaussians(n_reference: int, n_candidate: int, features: int, shift: float, seed: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Unit-covariance Gaussian samples; the candidate's mean is moved by ``shift`` along the first axis."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(n_reference, features, generator=generator)
    candidate = torch.randn(n_candidate, features, generator=generator)
    candidate[:, 0] += shift
    return reference, candidate


def _bayes_auc(shift: float) -> float:
    """AUC of the optimal (likelihood-ratio) classifier for N(0, I) vs N(shift·e₁, I): Φ(shift/√2)."""
    return 0.5 * (1 + math.erf(shift / 2))


# ------------------------------------------------------------------------------------------------------------ roc_auc

@pytest.mark.parametrize(("n_neg", "n_pos"), [(1, 1), (1, 9), (7, 3), (40, 25), (300, 200)])
def test_roc_auc_equals_the_pairwise_count_with_many_ties(n_neg: int, n_pos: int) -> None:
    generator = torch.Generator().manual_seed(n_neg * 1000 + n_pos)
    for high in (2, 5, 30):  # few distinct values: most pairs are ties
        negatives = torch.randint(0, high, (n_neg,), generator=generator)
        positives = torch.randint(0, high, (n_pos,), generator=generator) + (high // 3)
        expected = _pairwise_auc(negatives, positives)
        assert roc_auc(negatives, positives) == pytest.approx(expected, abs=1e-12)
        assert roc_auc(negatives.double().numpy(), positives.float()) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_on_continuous_scores_equals_the_pairwise_count() -> None:
    generator = torch.Generator().manual_seed(0)
    negatives, positives = torch.randn(123, generator=generator), torch.randn(77, generator=generator) + 0.4
    assert roc_auc(negatives, positives) == pytest.approx(_pairwise_auc(negatives, positives), abs=1e-12)


def test_roc_auc_swapping_the_classes_gives_one_minus_the_auc() -> None:
    generator = torch.Generator().manual_seed(1)
    negatives, positives = torch.randint(0, 6, (57,), generator=generator), torch.randint(1, 8, (41,),
                                                                                          generator=generator)
    auc = roc_auc(negatives, positives)
    assert 0.5 < auc < 1
    assert roc_auc(positives, negatives) == pytest.approx(1 - auc, abs=1e-12)


def test_roc_auc_of_perfectly_separated_and_of_identical_scores() -> None:
    low, high = np.array([-3.0, 0.0, 1.5]), np.array([1.6, 2.0, 9.0, 100.0])
    assert roc_auc(low, high) == 1.0
    assert roc_auc(high, low) == 0.0
    assert roc_auc(np.full(5, 2.0), np.full(8, 2.0)) == 0.5  # all ties
    assert roc_auc(np.array([True, False]), np.array([True])) == 0.75  # booleans count as 0/1


def test_roc_auc_is_invariant_to_a_strictly_increasing_transform() -> None:
    generator = torch.Generator().manual_seed(2)
    negatives = torch.randint(-20, 20, (200,), generator=generator).double() / 4
    positives = torch.randint(-15, 25, (150,), generator=generator).double() / 4
    auc = roc_auc(negatives, positives)
    for transform in (torch.exp, torch.sigmoid, lambda x: x ** 3 + 2 * x - 7):
        assert roc_auc(transform(negatives), transform(positives)) == pytest.approx(auc, abs=1e-12)


def test_roc_auc_is_exact_on_a_large_input() -> None:
    """Positive i (score i + ½) beats negatives 0..i, so AUC = Σ(i + 1)/n² = (n + 1)/(2n), in O(n log n)."""
    n = 200_000
    negatives = torch.arange(n, dtype=torch.float64).flip(0)
    positives = negatives + 0.5
    assert roc_auc(negatives, positives) == pytest.approx((n + 1) / (2 * n), abs=1e-12)


@pytest.mark.parametrize(("negatives", "positives", "message"), [
    (torch.tensor([]), torch.tensor([1.0]), "empty"),
    (torch.tensor([1.0]), np.array([]), "empty"),
    (torch.ones(2, 2), torch.tensor([1.0]), "1-D"),
    (torch.tensor(1.0), torch.tensor([1.0]), "1-D"),
    (torch.tensor([0.0, float("nan")]), torch.tensor([1.0]), "non-finite"),
    (torch.tensor([0.0]), np.array([1.0, np.inf]), "non-finite"),
])
def test_roc_auc_rejects_bad_inputs(negatives, positives, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        roc_auc(negatives, positives)


# -------------------------------------------------------------------------------------------- classifier two-sample AUC

def test_same_distribution_gives_an_auc_near_one_half() -> None:
    reference, candidate = _gaussians(400, 400, 8, shift=0.0, seed=0)
    assert abs(classifier_two_sample_auc(reference, candidate) - 0.5) < 0.07


@pytest.mark.parametrize(("features", "shift"), [(1, 0.5), (4, 1.0)])
def test_a_mean_shift_gives_the_bayes_auc(features: int, shift: float) -> None:
    """δ = 1 → Φ(1/√2) ≈ 0.760; δ = 0.5 → ≈ 0.638. The AUC's standard error at n = 2000 per class is ≈ 0.007."""
    reference, candidate = _gaussians(2000, 2000, features, shift=shift, seed=3)
    assert classifier_two_sample_auc(reference, candidate) == pytest.approx(_bayes_auc(shift), abs=0.04)


def test_well_separated_samples_give_an_auc_near_one() -> None:
    reference, candidate = _gaussians(300, 300, 5, shift=8.0, seed=4)
    assert classifier_two_sample_auc(reference, candidate) > 0.99
    assert classifier_two_sample_auc(candidate, reference) > 0.99  # either direction: the classifier learns the sign


def test_scores_are_out_of_fold_so_memorising_noise_does_not_help() -> None:
    """With more features than examples any two sets are separable in-sample (AUC 1); held out, noise scores ≈ ½."""
    reference, candidate = _gaussians(50, 50, 200, shift=0.0, seed=5)
    assert abs(classifier_two_sample_auc(reference, candidate) - 0.5) < 0.15


def test_invariant_to_an_affine_rescaling_of_every_feature() -> None:
    """The signal sits in a feature scaled by 1e-3: without standardisation the L2 penalty would suppress it. (Rescaled
    in float64: in float32, 100 + 1e-3·x keeps only ~3 significant digits of x, which changes the data itself.)"""
    reference, candidate = (x.double() for x in _gaussians(300, 300, 4, shift=1.0, seed=6))
    scale = torch.tensor([1e-3, 1e3, 0.25, -7.0], dtype=torch.float64)
    offset = torch.tensor([100.0, -5e3, 3.0, 0.5], dtype=torch.float64)
    plain = classifier_two_sample_report(reference, candidate)
    rescaled = classifier_two_sample_report(reference * scale + offset, candidate * scale + offset)
    assert plain.auc > 0.7
    assert rescaled.auc == pytest.approx(plain.auc, abs=1e-4)
    torch.testing.assert_close(rescaled.reference_scores, plain.reference_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(rescaled.candidate_scores, plain.candidate_scores, atol=1e-5, rtol=0)


def test_a_constant_feature_is_harmless() -> None:
    """A column with zero spread (in both sets) would divide by a zero standard deviation if it were not guarded."""
    reference, candidate = _gaussians(200, 200, 2, shift=1.0, seed=10)
    reference[:, 1], candidate[:, 1] = 0.1, 0.1
    report = classifier_two_sample_report(reference, candidate)
    assert bool(torch.isfinite(report.reference_scores).all() and torch.isfinite(report.candidate_scores).all())
    assert report.auc == pytest.approx(classifier_two_sample_auc(reference[:, :1], candidate[:, :1]), abs=1e-6)


def test_deterministic_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    reference, candidate = _gaussians(60, 80, 3, shift=0.3, seed=7)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = classifier_two_sample_report(reference, candidate, seed=11)
    again = classifier_two_sample_report(reference.numpy(), candidate.numpy(), seed=11)
    other = classifier_two_sample_report(reference, candidate, seed=12)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert first.auc == again.auc and first.fold_aucs == again.fold_aucs
    assert torch.equal(first.candidate_scores, again.candidate_scores)
    assert not torch.equal(first.candidate_scores, other.candidate_scores)  # another seed, another fold assignment


def test_class_imbalance_is_weighted_out() -> None:
    """100 vs 1000 from one distribution: AUC ≈ ½, and the balanced loss keeps the logits centred near 0 instead of
    at the prior log(1000/100) ≈ 2.3 that an unweighted fit learns into its intercept."""
    reference, candidate = _gaussians(100, 1000, 4, shift=0.0, seed=8)
    report = classifier_two_sample_report(reference, candidate)
    assert abs(report.auc - 0.5) < 0.1
    assert abs(float(torch.cat([report.reference_scores, report.candidate_scores]).mean())) < 0.5


def test_report_pools_the_out_of_fold_scores() -> None:
    reference, candidate = _gaussians(53, 47, 3, shift=0.7, seed=9)
    report = classifier_two_sample_report(reference, candidate, folds=4)
    assert report.reference_scores.shape == (53,) and report.candidate_scores.shape == (47,)
    assert len(report.fold_aucs) == 4
    assert report.auc == roc_auc(report.reference_scores, report.candidate_scores)
    assert report.auc == classifier_two_sample_auc(reference, candidate, folds=4)
    assert report.as_dict()["n_reference"] == 53


def test_folds_are_stratified_and_balanced() -> None:
    fold = _fold_assignment(23, 5, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(fold, minlength=5).tolist()) == [4, 4, 5, 5, 5]
    assert not torch.equal(fold, torch.arange(23) % 5)  # shuffled, not dealt in input order


@pytest.mark.parametrize(("reference", "candidate", "options", "message"), [
    (torch.zeros(10), torch.zeros(10, 2), {}, "must be 2-D"),
    (torch.zeros(10, 2), torch.zeros(10, 2, 1), {}, "must be 2-D"),
    (torch.zeros(10, 2), torch.zeros(10, 3), {}, "2 features per example but candidate has 3"),
    (torch.zeros(4, 2), torch.zeros(10, 2), {}, "reference has 4 examples, fewer than folds=5"),
    (torch.zeros(10, 2), torch.zeros(2, 2), {"folds": 3}, "candidate has 2 examples, fewer than folds=3"),
    (torch.zeros(10, 2), torch.zeros(10, 2), {"folds": 1}, "folds must be an int >= 2"),
    (torch.zeros(10, 2), torch.zeros(10, 2), {"folds": 2.0}, "folds must be an int >= 2"),
    (torch.zeros(10, 2), torch.zeros(10, 2), {"l2": -1.0}, "l2 must be a finite number >= 0"),
    (torch.zeros(10, 2).index_fill(0, torch.tensor([3]), float("nan")), torch.zeros(10, 2), {}, "NaN or ±inf in 1"),
    (torch.zeros(10, 2), np.full((10, 2), np.inf), {}, "candidate has NaN or ±inf"),
])
def test_classifier_two_sample_auc_rejects_bad_inputs(reference, candidate, options, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classifier_two_sample_auc(reference, candidate, **options)
