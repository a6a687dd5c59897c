"""Measurements shared by recipes: timing, the classifier two-sample test of how alike two samples are, corpus BLEU
with the repeated-token rate of decoded sequences, and the Fréchet distance and Vendi score of generated images'
features."""

from effml.metrics.bleu import (BleuScore, BleuStatistics, bleu_from_statistics, bleu_statistics, corpus_bleu,
                                corpus_bleu_statistics, repeat_counts, repeat_rate)
from effml.metrics.image_quality import (frechet_distance, frechet_distance_from_statistics, gaussian_statistics,
                                         vendi_score)
from effml.metrics.two_sample import TwoSampleReport, classifier_two_sample_auc, classifier_two_sample_report, roc_auc

__all__ = ["TwoSampleReport", "classifier_two_sample_auc", "classifier_two_sample_report", "roc_auc",
           "BleuScore", "BleuStatistics", "bleu_statistics", "corpus_bleu_statistics", "bleu_from_statistics",
           "corpus_bleu", "repeat_counts", "repeat_rate", "gaussian_statistics", "frechet_distance",
           "frechet_distance_from_statistics", "vendi_score"]
