"""Measurements shared by recipes: timing, and the classifier two-sample test of how alike two samples are."""

from effml.metrics.two_sample import TwoSampleReport, classifier_two_sample_auc, classifier_two_sample_report, roc_auc

__all__ = ["TwoSampleReport", "classifier_two_sample_auc", "classifier_two_sample_report", "roc_auc"]
