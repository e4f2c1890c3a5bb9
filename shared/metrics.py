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
NOISED = "noised"  # 1.0 in a site's evaluation report read from a noised release (shared.privacy.noised_metrics)
EPSILON_REMAINING = "epsilon-remaining"  # plan replies: the site's remaining all-time budget
COMPUTE_SECONDS = "compute-seconds"  # wall time of the site's own train/evaluate work in this reply
PEAK_RSS_MB = "peak-rss-mb"  # peak resident memory of the process serving the site so far


def mid_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values given the mean of their ranks (scipy's
    ``rankdata(method="average")``, in numpy: importing scipy.stats costs a fresh site
    process about a second)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last element of each group of equal values
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    r = mid_ranks(np.asarray(score, dtype=np.float64).reshape(-1))  # mid-ranks over ties
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


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared error of probabilities (lower is better)."""
    return float(np.mean((np.asarray(prob, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """|mean predicted - observed rate| averaged over equal-width probability bins, weighted by size."""
    y, prob = np.asarray(y, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(prob[sel].mean() - y[sel].mean())
    return float(total / max(len(y), 1))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean of sensitivity and specificity (NaN if a class is absent)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(((pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum()) / 2)


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean of the F1 of each class (a model predicting one class scores <= 0.5)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    scores = []
    for cls in (True, False):
        tp = ((pred == cls) & (y == cls)).sum()
        denom = (pred == cls).sum() + (y == cls).sum()
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))
