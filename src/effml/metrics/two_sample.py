"""Classifier two-sample test: how well can a classifier tell real examples from the examples under test?

Given feature vectors of real held-out examples (``reference``, N×F) and of the examples under test (``candidate``,
M×F; e.g. synthetic text featurised as mean-pooled hidden states of a frozen LM, as in SoftSRV, arXiv 2410.16534),
``classifier_two_sample_auc`` trains an L2-regularised logistic regression to separate the two sets and reports the
ROC AUC of its held-out scores (Lopez-Paz & Oquab, "Revisiting Classifier Two-Sample Tests", arXiv 1610.06545).

What the number means: the probability that a random candidate example gets a higher "looks like a candidate" score
than a random reference example. 0.5: the classifier cannot tell the sets apart (the distributions match, as far as a
linear classifier on these features can see); 1.0: perfectly separable. Lower is a better match. Values a little below
0.5 are noise: under equal distributions cross-validated estimates scatter around 0.5 (standard deviation about 0.06
for 100 vs 100 examples) and average slightly below it (about 0.49 there), a known bias of cross-validation under the
null. For two Gaussians with unit covariance whose means are a (Mahalanobis) distance δ
apart, the best possible AUC is Φ(δ/√2), e.g. 0.760 at δ = 1, so the AUC is also a rough effect size.

Why cross-validated: scores on the training examples reward memorisation, not a difference in distribution (with F
close to N any two sets are separable in-sample). Stratified k-fold cross-validation scores every example exactly once
with a model that did not see it, and the AUC is computed once over all N + M out-of-fold scores pooled, the standard
cross-validated estimate; it uses every example for testing, which a single train/test split does not.

Why class-balanced: the loss averages the per-example losses within each class and then averages the two classes, so
both sets weigh the same however many examples each has. An unweighted fit on N ≠ M would mostly learn the prior
log(M/N) into the intercept, and fold-to-fold variation in that intercept would leak into the pooled AUC.

Features are standardised per fold with the training part's mean and standard deviation (a constant feature is left
unscaled), so the result does not depend on the units of any feature: the L2 penalty then treats all features alike.

``roc_auc`` is the Mann–Whitney U statistic divided by n_neg·n_pos, computed with average ranks in O(n log n), exact for
ties (a tie counts one half). ``classifier_two_sample_report`` returns the pooled AUC together with per-fold AUCs and
the out-of-fold scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TwoSampleReport", "classifier_two_sample_auc", "classifier_two_sample_report", "roc_auc"]

# LBFGS stopping rule: the largest absolute gradient component of the (strongly convex when l2 > 0) objective.
_GRADIENT_TOLERANCE = 1e-9
_MAX_ITERATIONS = 2000


def _scores(name: str, values: Any) -> torch.Tensor:
    """``values`` (1-D torch tensor, numpy array or sequence of numbers) as a detached CPU tensor, validated."""
    try:
        scores = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"roc_auc: {name} must be a 1-D torch tensor or numpy array of real numbers, but it could not "
                         f"be converted to a tensor ({error}). Pass the scores as a 1-D array.") from error
    scores = scores.detach().cpu()
    if scores.is_complex():
        raise ValueError(f"roc_auc: {name} is complex ({scores.dtype}); ROC AUC needs real-valued scores. Pass the "
                         f"real scores (e.g. logits or probabilities).")
    if scores.ndim != 1:
        raise ValueError(f"roc_auc: {name} must be 1-D (one score per example), got shape {tuple(scores.shape)}. "
                         f"Flatten it (e.g. scores.reshape(-1)) or pass one score per example.")
    if scores.numel() == 0:
        raise ValueError(f"roc_auc: {name} is empty; the AUC needs at least one negative and one positive score. "
                         f"Check that both classes have examples.")
    if scores.dtype == torch.bool:
        scores = scores.to(torch.int64)
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"roc_auc: {name} has {bad} non-finite value(s) (NaN or ±inf) among {scores.numel()} scores; "
                         f"an AUC of such scores is undefined. Fix or drop those examples before computing it.")
    return scores


def roc_auc(negative_scores: Any, positive_scores: Any) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative, ties counting one half.

    Equal to the Mann–Whitney U statistic of the positives divided by ``n_neg · n_pos``, computed from average ranks
    of the pooled scores in O(n log n) time, with exact integer arithmetic up to the final division.

    Args:
        negative_scores: shape (n_neg,), n_neg >= 1; torch tensor (any device, detached here) or numpy array.
        positive_scores: shape (n_pos,), n_pos >= 1; same.

    Returns:
        The AUC in [0, 1]: 1.0 when every positive scores above every negative, 0.0 when below, 0.5 for
        indistinguishable scores. ``roc_auc(neg, pos) == 1 - roc_auc(pos, neg)``.

    Raises:
        ValueError: an input is empty, not 1-D, complex, or has NaN/±inf.
    """
    negatives = _scores("negative_scores", negative_scores)
    positives = _scores("positive_scores", positive_scores)
    # A common dtype in which comparisons are exact: float64 holds every float16/bfloat16/float32 value exactly.
    dtype = torch.float64 if negatives.is_floating_point() or positives.is_floating_point() else torch.int64
    pooled = torch.cat([negatives.to(dtype), positives.to(dtype)])
    n_neg, n_pos = negatives.numel(), positives.numel()
    ordered, order = torch.sort(pooled)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)  # 1-based rank of the last member of each group of tied values
    twice_rank = (2 * ends - counts + 1)[group]  # twice the average rank (first + last) / 2 of each sorted value
    is_positive = order >= n_neg
    twice_rank_sum = int(twice_rank[is_positive].sum())
    twice_u = twice_rank_sum - n_pos * (n_pos + 1)  # 2·U = 2·(rank sum − n_pos(n_pos + 1)/2)
    return twice_u / (2 * n_neg * n_pos)


@dataclass(frozen=True)
class TwoSampleReport:
    """Result of ``classifier_two_sample_report``.

    ``auc``: ROC AUC over all N + M out-of-fold scores pooled (what ``classifier_two_sample_auc`` returns).
    ``fold_aucs``: the AUC of each fold's held-out part alone (noisier; their spread shows the estimate's variability).
    ``reference_scores`` (N,) and ``candidate_scores`` (M,): out-of-fold logits (float64, CPU) of the fitted
    classifiers, higher = "looks like a candidate"; example i of each set was scored by the model that did not see it.
    ``folds``: the number of folds, ``seed``: the seed of the fold assignment.
    """

    auc: float
    fold_aucs: tuple[float, ...]
    reference_scores: torch.Tensor
    candidate_scores: torch.Tensor
    folds: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-example scores)."""
        return {"auc": self.auc, "fold_aucs": list(self.fold_aucs), "folds": self.folds, "seed": self.seed,
                "n_reference": int(self.reference_scores.numel()), "n_candidate": int(self.candidate_scores.numel())}


def _features(name: str, values: Any) -> torch.Tensor:
    try:
        features = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"classifier two-sample test: {name} must be a 2-D torch tensor or numpy array of shape "
                         f"(examples, features), but it could not be converted to a tensor ({error}).") from error
    features = features.detach()
    if features.is_complex():
        raise ValueError(f"classifier two-sample test: {name} is complex ({features.dtype}); the classifier needs "
                         f"real features. Pass real feature vectors (e.g. mean-pooled hidden states).")
    if features.ndim != 2:
        raise ValueError(f"classifier two-sample test: {name} must be 2-D, one row of features per example, got shape "
                         f"{tuple(features.shape)}. Pool or flatten each example's features into one vector first "
                         f"(e.g. mean over tokens), or add a feature axis with x[:, None] for scalar features.")
    features = features.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(features).all()):
        rows = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ValueError(f"classifier two-sample test: {name} has NaN or ±inf in {rows} of its {features.shape[0]} "
                         f"rows. Fix or drop those examples (an overflow in float16 featurisation is a common cause).")
    return features


def _validate(reference: Any, candidate: Any, folds: int, l2: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"classifier two-sample test: folds must be an int >= 2 (cross-validation needs a training "
                         f"part and a held-out part), got {folds!r}. Use e.g. folds=5.")
    if not isinstance(l2, (int, float)) or isinstance(l2, bool) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"classifier two-sample test: l2 must be a finite number >= 0, got {l2!r}. Use a small "
                         f"positive value such as 1e-3 (with l2 = 0 separable data has no finite maximum-likelihood "
                         f"fit).")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"classifier two-sample test: seed must be an int, got {seed!r}.")
    reference_features = _features("reference", reference)
    candidate_features = _features("candidate", candidate)
    if reference_features.shape[1] != candidate_features.shape[1]:
        raise ValueError(f"classifier two-sample test: reference has {reference_features.shape[1]} features per "
                         f"example but candidate has {candidate_features.shape[1]}; both must be featurised the same "
                         f"way (same model, layer and pooling) so that their columns mean the same thing.")
    if reference_features.shape[1] == 0:
        raise ValueError("classifier two-sample test: the inputs have 0 features per example; pass at least one "
                         "feature column.")
    for name, features in (("reference", reference_features), ("candidate", candidate_features)):
        if features.shape[0] < folds:
            raise ValueError(f"classifier two-sample test: {name} has {features.shape[0]} examples, fewer than "
                             f"folds={folds}; every fold needs at least one example of each set. Pass more examples "
                             f"or fewer folds (an AUC from a few dozen examples per set is very noisy anyway).")
    return reference_features, candidate_features


def _fold_assignment(count: int, folds: int, generator: torch.Generator) -> torch.Tensor:
    """Fold index (0..folds-1) of each of ``count`` examples: a random permutation dealt round-robin, so fold sizes
    differ by at most one."""
    fold = torch.empty(count, dtype=torch.int64)
    fold[torch.randperm(count, generator=generator)] = torch.arange(count) % folds
    return fold


def _fit_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced L2-regularised logistic regression by full-batch L-BFGS (strong Wolfe line search) in float64.

    Minimises ``½·mean_{y=1} softplus(−z) + ½·mean_{y=0} softplus(z) + ½·l2·‖w‖²`` with ``z = features @ w + b``
    (the bias is not penalised). features: (n, F) float64; labels: (n,) bool with both classes present.
    Returns ``(w, b)``: shapes (F,) and ().
    """
    weights = torch.where(labels, 0.5 / labels.sum(), 0.5 / (~labels).sum()).to(torch.float64)
    targets = labels.to(torch.float64)
    w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=_MAX_ITERATIONS, max_eval=2 * _MAX_ITERATIONS,
                                  tolerance_grad=_GRADIENT_TOLERANCE, tolerance_change=1e-15, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ w + b
        # Cross-entropy −y·z + log(1 + eᶻ) by softplus: exact in float64 below the threshold, and cheap. (On a busy
        # CPU, binary_cross_entropy_with_logits' log_sigmoid kernel was measured at milliseconds per call on tensors of
        # a few dozen elements with two OpenMP threads, over 1000x slower than softplus.)
        loss = (weights * (F.softplus(logits, threshold=40.0) - targets * logits)).sum() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def classifier_two_sample_report(reference: Any, candidate: Any, *, folds: int = 5, l2: float = 1e-3,
                                 seed: int = 0) -> TwoSampleReport:
    """Classifier two-sample test with the details: pooled AUC, per-fold AUCs and out-of-fold scores.

    See ``classifier_two_sample_auc`` for the procedure and the arguments; this returns a ``TwoSampleReport``.
    """
    reference_features, candidate_features = _validate(reference, candidate, folds, l2, seed)
    n_reference, n_candidate = reference_features.shape[0], candidate_features.shape[0]
    features = torch.cat([reference_features, candidate_features])
    labels = torch.cat([torch.zeros(n_reference, dtype=torch.bool), torch.ones(n_candidate, dtype=torch.bool)])
    generator = torch.Generator().manual_seed(seed)  # a private generator: the global RNG stays untouched
    # Stratified: each set is dealt into the folds separately, so every fold holds ~1/folds of each.
    fold = torch.cat([_fold_assignment(n_reference, folds, generator), _fold_assignment(n_candidate, folds, generator)])
    scores = torch.empty(n_reference + n_candidate, dtype=torch.float64)
    fold_aucs = []
    for k in range(folds):
        held_out = fold == k
        train = features[~held_out]
        mean = train.mean(dim=0)
        std = train.std(dim=0, correction=0)
        # A (numerically) constant feature carries no information: leave it centred but unscaled.
        constant = std <= 1e-12 * mean.abs()
        std = torch.where(constant | (std == 0), torch.ones_like(std), std)
        w, b = _fit_logistic((train - mean) / std, labels[~held_out], l2)
        scores[held_out] = ((features[held_out] - mean) / std) @ w + b
        fold_aucs.append(roc_auc(scores[held_out & ~labels], scores[held_out & labels]))
    reference_scores, candidate_scores = scores[:n_reference], scores[n_reference:]
    return TwoSampleReport(auc=roc_auc(reference_scores, candidate_scores), fold_aucs=tuple(fold_aucs),
                           reference_scores=reference_scores, candidate_scores=candidate_scores, folds=folds, seed=seed)


def classifier_two_sample_auc(reference: Any, candidate: Any, *, folds: int = 5, l2: float = 1e-3,
                              seed: int = 0) -> float:
    """Cross-validated ROC AUC of a classifier trained to tell ``candidate`` examples from ``reference`` examples.

    Stratified k-fold: each set is shuffled (``torch.Generator`` seeded with ``seed``) and dealt into ``folds`` folds.
    For each fold, the features are standardised with the mean and standard deviation of the other folds (the
    training part), a class-balanced L2-regularised logistic regression (candidate = label 1) is fitted on the training
    part in float64 by full-batch L-BFGS with a strong Wolfe line search until its gradient vanishes, and the held-out
    part is scored. The AUC is computed once over all N + M out-of-fold scores pooled.

    Args:
        reference: (N, F) features of real examples (torch tensor or numpy array), N >= folds.
        candidate: (M, F) features of the examples under test, M >= folds; N ≠ M is fine (classes weigh equally).
        folds: number of cross-validation folds, >= 2.
        l2: L2 penalty ``½·l2·‖w‖²`` on the weights of standardised features (the bias is not penalised), >= 0.
        seed: seed of the fold assignment; the same seed gives the same result, and the global RNG is not used.

    Returns:
        The pooled out-of-fold AUC: 0.5 = indistinguishable, 1.0 = perfectly separable; lower is a better match.

    Raises:
        ValueError: inputs not 2-D, different feature widths, fewer than ``folds`` examples in a set, NaN/±inf
        values, ``folds`` < 2, or a negative ``l2``.

    Computed on the CPU in float64 whatever the inputs' device and dtype.
    """
    return classifier_two_sample_report(reference, candidate, folds=folds, l2=l2, seed=seed).auc
