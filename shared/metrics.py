"""Metric names both sides use, and the metrics themselves as pure numpy functions."""

from __future__ import annotations

import numpy as np

# Keys of MetricRecords (one spelling, used everywhere).
NUM_PATIENTS = "num-patients"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
AUROC = "auroc"
AUPRC = "auprc"
EPSILON_RUN = "epsilon-run"
EPSILON_TOTAL = "epsilon-total"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SUPPRESSED = "suppressed"
EPSILON_REMAINING = "epsilon-remaining"  # plan replies: the site's remaining all-time budget
COMPUTE_SECONDS = "compute-seconds"  # wall time of the site's own train/evaluate work in this reply
PEAK_RSS_MB = "peak-rss-mb"  # peak resident memory of the process serving the site so far


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # mid-ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise average precision); NaN if no positive."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(score), kind="mergesort")
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())
