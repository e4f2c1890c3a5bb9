"""AUROC's mid-ranks in numpy match scipy's rankdata and sklearn's AUROC, ties included."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from shared.metrics import auroc, mid_ranks


def test_mid_ranks_equal_scipy_average_ranks_with_ties() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, size=200).astype(np.float64)  # many ties
    assert np.array_equal(mid_ranks(x), rankdata(x))
    assert np.array_equal(mid_ranks(np.array([3.0, 1.0, 3.0, 2.0])), np.array([3.5, 1.0, 3.5, 2.0]))


def test_auroc_equals_sklearn_on_tied_scores() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=300)
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounded: ties across classes
    assert abs(auroc(y, score) - roc_auc_score(y, score)) < 1e-12
