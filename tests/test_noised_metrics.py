"""Noised evaluation metrics: the statistics' sensitivity, the estimators, and the accounting
that keeps a run with noised releases within its ε (shared.privacy.noised_metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared import metrics as M  # noqa: N812
from shared.errors import UnreachableEpsilonError
from shared.privacy import noised_metrics as NM  # noqa: N812
from shared.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon


def cohort(rng: np.random.Generator, patients: int, sessions: int = 8, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probs, mask), each (patients, sessions): scores higher on relapse sessions by ``signal`` logits."""
    mask = rng.random((patients, sessions)) < 0.8
    mask[:, 0] = True
    labels = (rng.random((patients, sessions)) < 0.3).astype(np.float64)
    probs = 1 / (1 + np.exp(-(signal * labels - 0.8 + rng.normal(0, 1, (patients, sessions)))))
    return labels, probs, mask


def weighted_auroc(labels: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> float:
    """The exact AUROC over sessions weighted 1/(the patient's sessions), ties counted ½."""
    w = np.where(mask, 1 / np.maximum(mask.sum(1), 1)[:, None], 0.0)[mask]
    y, s = labels[mask] > 0.5, probs[mask]
    pairs = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
    return float((w[y][:, None] * w[~y][None, :] * pairs).sum() / (w[y].sum() * w[~y].sum()))


@pytest.mark.parametrize("seed", range(20))
def test_one_patient_moves_the_statistics_by_at_most_the_sensitivity(seed: int) -> None:
    """Add/remove adjacency: dropping any one patient (any labels, scores, session count) moves
    the vector by at most 1 in L2, the figure the noise is scaled to."""
    rng = np.random.default_rng(seed)
    labels, probs, mask = cohort(rng, patients=12, sessions=int(rng.integers(1, 15)))
    probs[0] = rng.choice([1e-9, 0.5, 1 - 1e-9], size=probs.shape[1])  # extreme scores for the patient removed
    full = NM.patient_statistics(labels, probs, mask)
    for i in range(labels.shape[0]):
        keep = np.arange(labels.shape[0]) != i
        without = NM.patient_statistics(labels[keep], probs[keep], mask[keep])
        assert np.linalg.norm(full - without) <= NM.SENSITIVITY + 1e-12


def test_one_patient_out_and_another_in_moves_the_statistics_by_at_most_the_sensitivity_and_it_is_tight() -> None:
    """The held-out split holds out a count, so removing one patient at the site can also move
    another into the held-out set: −a + b, at most √2 in L2, reached by one-session patients in
    different bins."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        labels, probs, mask = cohort(rng, patients=10, sessions=int(rng.integers(1, 10)))
        before = NM.patient_statistics(labels[:9], probs[:9], mask[:9])  # patient 9 held out next, patient 0 removed
        after = NM.patient_statistics(labels[1:], probs[1:], mask[1:])
        assert np.linalg.norm(before - after) <= NM.SENSITIVITY + 1e-12
    one = NM.patient_statistics(np.array([[1.0]]), np.array([[0.3]]), np.array([[True]]))
    other = NM.patient_statistics(np.array([[0.0]]), np.array([[0.9]]), np.array([[True]]))
    assert np.linalg.norm(one - other) == pytest.approx(NM.SENSITIVITY) == pytest.approx(math.sqrt(2))


def test_without_noise_the_estimates_follow_the_exact_metrics() -> None:
    rng = np.random.default_rng(1)
    labels, probs, mask = cohort(rng, patients=200)
    est = NM.estimates(NM.patient_statistics(labels, probs, mask))
    assert est.patients == pytest.approx(200)
    assert est.auroc == pytest.approx(weighted_auroc(labels, probs, mask), abs=0.03)  # binning: ties within a bin count ½
    assert est.auroc == pytest.approx(M.auroc(labels[mask], probs[mask]), abs=0.04)
    # AUPRC: step-wise average precision with the scores of one bin tied, each session weighted 1/(its patient's sessions)
    w = np.where(mask, 1 / mask.sum(1)[:, None], 0.0)[mask]
    y, b = labels[mask] > 0.5, NM.bin_of(probs[mask])
    ap = sum(w[y & (b == t)].sum() * w[y & (b >= t)].sum() / w[b >= t].sum() for t in range(NM.BINS) if (b >= t).any()) / w[y].sum()
    assert est.auprc == pytest.approx(ap)


def test_sites_summed_give_the_pooled_estimate() -> None:
    rng = np.random.default_rng(2)
    parts = [cohort(rng, patients=n) for n in (30, 50, 20)]
    summed = NM.estimates(np.sum([NM.patient_statistics(*p) for p in parts], axis=0))
    pooled = NM.estimates(NM.patient_statistics(*(np.concatenate([p[i] for p in parts]) for i in range(3))))
    assert summed.auroc == pytest.approx(pooled.auroc) and summed.auprc == pytest.approx(pooled.auprc)
    assert summed.patients == pytest.approx(100)


def test_noise_has_the_scale_of_the_mechanism_and_is_reproducible_from_its_seed() -> None:
    stats = np.zeros(NM.LENGTH)
    draws = np.stack([NM.noised(stats, noise_multiplier=2.0, generator=np.random.default_rng(s)) for s in range(400)])
    assert draws.std() == pytest.approx(2.0 * math.sqrt(2), rel=0.05)
    a = NM.noised(stats, noise_multiplier=2.0, generator=np.random.default_rng(7))
    assert np.array_equal(a, NM.noised(stats, noise_multiplier=2.0, generator=np.random.default_rng(7)))


def test_estimates_give_none_without_weight_and_stay_in_range() -> None:
    v = np.zeros(NM.LENGTH)
    v[:NM.BINS] = -1.0
    assert NM.estimates(v) == NM.Estimates(None, None, 0.0)
    v[:NM.BINS], v[3], v[NM.BINS + 1] = 0.0, 5.0, 5.0
    assert NM.estimates(v).auroc == 1.0 and NM.estimates(v).auprc == 1.0
    v[NM.BINS + 8] = -4.0  # noise below 0 in a higher other-session bin: the ratio may leave [0, 1] and is held to it
    held = NM.estimates(v).auroc
    assert held is not None and 0.0 <= held <= 1.0


def test_noise_does_not_pull_auroc_towards_chance() -> None:
    """Unbiased numerator and denominator: over many draws the mean estimate stays within 0.02
    of the noise-free one (reading negative weights as 0 was 0.07-0.2 low at these sizes)."""
    rng = np.random.default_rng(5)
    stats = np.sum([NM.patient_statistics(*cohort(rng, patients=100)) for _ in range(3)], axis=0)
    truth = NM.estimates(stats).auroc
    assert truth is not None
    draws = [NM.estimates(NM.noised(stats, noise_multiplier=1.0, generator=rng)).auroc for _ in range(400)]
    assert abs(np.mean([d for d in draws if d is not None]) - truth) < 0.02


def test_metrics_round_trip_and_implausible_values_are_named() -> None:
    v = np.arange(NM.LENGTH, dtype=np.float64)
    metrics = NM.to_metrics(v)
    assert NM.is_noised(metrics) and not NM.is_noised({M.AUROC: 0.7})
    assert np.array_equal(NM.from_metrics(metrics, bound=1e6), v)
    with pytest.raises(ValueError, match="dp-stat-05"):
        NM.from_metrics({**metrics, "dp-stat-05": 1e9}, bound=1e6)
    with pytest.raises(ValueError, match="missing"):
        NM.from_metrics({k: x for k, x in metrics.items() if k != "dp-stat-00"}, bound=1e6)
    with pytest.raises(ValueError, match="unknown key 'dp-stat-99'"):
        NM.from_metrics({**metrics, "dp-stat-99": 0.0}, bound=1e6)


def test_a_release_is_the_gaussian_mechanism_in_the_accountant() -> None:
    """q = 1, one step: RDP α/(2z²), so ε at δ follows the Gaussian mechanism's RDP bound."""
    z, delta = 5.0, 1e-5
    eps = epsilon([NM.release_mechanism(z)], delta=delta)
    closed = min(a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in np.linspace(1.1, 200, 5000))
    assert eps == pytest.approx(closed, rel=0.01)
    with pytest.raises(ValueError):
        NM.release_mechanism(0.0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_sigma_calibrated_beside_releases_keeps_the_run_within_epsilon(accountant: str) -> None:
    """The run's DP-SGD steps and its releases together spend the target (within the search's
    tolerance), and need more noise than the steps alone."""
    q, steps, target, delta = 0.25, 30, 4.0, 1e-5
    releases = (SubsampledGaussian(8.0, 1.0, 3),)
    alone = calibrate_noise(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    beside = calibrate_noise(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant=accountant, fixed=releases)
    assert beside > alone
    spent = epsilon([SubsampledGaussian(beside, q, steps), *releases], delta=delta, accountant=accountant)
    assert target - 0.01 <= spent <= target


def test_releases_that_alone_exceed_the_target_are_refused_with_what_to_change() -> None:
    with pytest.raises(UnreachableEpsilonError, match="metrics_noise_multiplier"):
        calibrate_noise(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.25, steps=30, fixed=(SubsampledGaussian(0.5, 1.0, 10),))


def test_the_bench_shows_error_falling_with_cohort_size_and_cost_rising_as_noise_falls() -> None:
    from server.bench_metrics import release_cost, release_utility
    from tests.conftest import tiny_experiment

    rows = release_utility(sites=3, patients=(25, 400), noise=(2.0,), draws=60)
    small, large = rows
    assert small["rmse"] > 2 * large["rmse"] and abs(large["binned_auroc"] - large["exact_auroc"]) < 0.03
    cost = release_cost(tiny_experiment(), noise=(0.2, 4.0, 16.0), training_patients=40)
    sigma = {r["noise_multiplier"]: r["training_sigma"] for r in cost}
    assert sigma[0.2] is None  # the releases alone would spend more than the plan's ε
    assert "more than the plan's" in next(r for r in cost if r["noise_multiplier"] == 0.2)["note"]
    assert sigma[4.0] > sigma[16.0] > sigma[0.0]


def test_secure_noise_is_standard_normal_deterministic_in_its_key_and_needs_one_source() -> None:
    a = NM.secure_standard_normal(b"k" * 32, 20000)
    assert abs(a.mean()) < 0.03 and a.std() == pytest.approx(1.0, rel=0.03)
    assert abs(float(np.mean(a**4)) - 3.0) < 0.2  # Gaussian tails, not uniform or clipped
    assert np.array_equal(a[:100], NM.secure_standard_normal(b"k" * 32, 100))
    assert not np.array_equal(a[:100], NM.secure_standard_normal(b"j" * 32, 100))
    v = NM.noised(np.zeros(NM.LENGTH), noise_multiplier=2.0, secure_key=b"k" * 32)
    assert np.allclose(v, 2.0 * NM.SENSITIVITY * NM.secure_standard_normal(b"k" * 32, NM.LENGTH))
    with pytest.raises(ValueError, match="exactly one source"):
        NM.noised(np.zeros(NM.LENGTH), noise_multiplier=2.0)
    with pytest.raises(ValueError, match="32 bytes"):
        NM.secure_standard_normal(b"short", 3)
