"""Evaluation metrics released through the Gaussian mechanism, the patient as the unit.

With ``privacy.metrics_noise_multiplier`` z > 0 a site does not send its held-out AUROC,
AUPRC and loss. It sends one vector of patient-level statistics with Gaussian noise added, and
the release is charged to its privacy ledger like a training round. The coordinator sums the
sites' vectors and computes the federated AUROC and AUPRC from the sum (:func:`estimates`), so
they are pooled over every site's held-out patients, not an average of per-site figures.

The statistics (:func:`patient_statistics`) are two histograms over B score bins
(:data:`BIN_EDGES`): relapse sessions, then other sessions. Each patient adds weight
``1 / (their sessions)`` per session to the bin of its predicted probability, in the histogram
of its label, so a patient's entries are at least 0 and sum to exactly 1. Adding or removing
one patient at the site changes the held-out set by that patient and, because the site holds
out a count of each stratum (:func:`client.dataset.split_patients`), by at most one other
patient moving between the training and the held-out set. The vector then moves by −a + b
with a, b ≥ 0 of L1 norm 1 each, whose L2 norm is at most √2 (‖a‖² + ‖b‖² − 2a·b ≤ 2):
:data:`SENSITIVITY`, whatever the data and the model. Gaussian noise of standard deviation
z · √2 on every coordinate makes one release the Gaussian mechanism with noise multiplier z,
which the ledger records as a Poisson-subsampled Gaussian with q = 1 and one step
(:func:`release_mechanism`), so every accountant composes it with the training rounds. (Two
data checks are outside this bound, as they are outside DP-SGD's, and the DPO runbook says
so: the markers are standardised over all of the site's sessions, and a recording listed under
two patient ids removes every session of both, so one added patient can remove others.) The loss and a
separate patient count are not released: each would add a block to the sensitivity, so more
noise on every number for the same ε; the histograms' total is the patient count.

A patient with a relapse session and another session is in both histograms: AUROC over the
weighted sessions compares each relapse session with each other session, as the exact AUROC
does, with each patient's sessions counting 1 in all. Scores within one bin count as ties
(half), which pulls AUROC towards 0.5 by a few hundredths (``fedrelapse bench metrics-noise``
measures it beside the noise).

Pure functions; the noise is drawn from a generator the caller seeds (the site seeds it with
its secret, the run, the model round, the model's digest, the plan and the data's fingerprint,
so the same model asked again gets the same answer, not a fresh draw to average away; and it
refuses the same model under another plan or on changed data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.privacy.accounting import SubsampledGaussian

# Bin edges on the logit scale, data-independent: equal width from logit -3 to 3 (probability
# 0.047 to 0.953), the outer bins open. 10 bins: fewer merge more scores into ties (AUROC pulled
# towards 0.5), more add noise (each coordinate carries noise of the same size).
BIN_EDGES: tuple[float, ...] = tuple(float(x) for x in np.linspace(-3.0, 3.0, 9))
BINS = len(BIN_EDGES) + 1
SENSITIVITY = math.sqrt(2.0)  # the L2 distance adding or removing one patient at the site can move the statistics (module docstring)
LENGTH = 2 * BINS


def release_mechanism(noise_multiplier: float) -> SubsampledGaussian:
    """One release as the ledger records it: the Gaussian mechanism with multiplier z, i.e. a
    subsampled Gaussian with every patient included (q = 1) for one step."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"A noised release needs a finite noise multiplier above 0, got {noise_multiplier!r}.")
    return SubsampledGaussian(float(noise_multiplier), 1.0, 1)


def bin_of(prob: np.ndarray) -> np.ndarray:
    """The score bin (0..BINS-1) of each probability, by its logit."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.searchsorted(np.asarray(BIN_EDGES), np.log(p / (1 - p)), side="right")


def patient_statistics(labels: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The held-out patients' statistics (module docstring), before noise.

    ``labels``, ``probs`` and ``mask``: (P, K), one row per patient and one column per session
    slot; ``mask`` marks real sessions. Returns (LENGTH,) float64: the relapse-session histogram,
    then the other-session histogram. A patient with no session adds nothing.
    """
    labels, probs, mask = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64), np.asarray(mask, dtype=bool)
    if not labels.shape == probs.shape == mask.shape or labels.ndim != 2:
        raise ValueError(f"labels, probs and mask must be (patients, sessions) alike, got {labels.shape}, {probs.shape}, {mask.shape}.")
    out = np.zeros(LENGTH)
    weight = np.where(mask, 1.0 / np.maximum(mask.sum(axis=1), 1)[:, None], 0.0)  # (P, K): a patient's weights sum to 1
    bins = bin_of(probs)  # (P, K)
    positive = labels > 0.5
    np.add.at(out, bins[mask & positive], weight[mask & positive])
    np.add.at(out, BINS + bins[mask & ~positive], weight[mask & ~positive])
    return out


def noised(statistics: np.ndarray, *, noise_multiplier: float, generator: np.random.Generator | None = None, secure_key: bytes | None = None) -> np.ndarray:
    """``statistics`` plus Gaussian noise of standard deviation z · :data:`SENSITIVITY` on every coordinate.

    The standard normals come from ``generator`` or, for ``privacy.secure_mode``, from
    :func:`secure_standard_normal` keyed by ``secure_key`` (exactly one of the two).
    """
    stats = np.asarray(statistics, dtype=np.float64)
    if stats.shape != (LENGTH,):
        raise ValueError(f"Statistics must be a ({LENGTH},) vector, got {stats.shape}.")
    release_mechanism(noise_multiplier)  # the same check of z
    if (generator is None) == (secure_key is None):
        raise ValueError("Give the noise exactly one source: a generator, or a secure key (privacy.secure_mode).")
    normal = generator.standard_normal(LENGTH) if generator is not None else secure_standard_normal(secure_key or b"", LENGTH)
    return stats + noise_multiplier * SENSITIVITY * normal


def secure_standard_normal(key: bytes, size: int) -> np.ndarray:
    """``size`` standard normals from a ChaCha20 keystream keyed by ``key`` (32 bytes): a
    cryptographically secure source that is still deterministic in the key, so the same release
    asked again gets the same noise. Box-Muller over 53-bit uniforms; each value is the mean of
    two such normals times √2, as Opacus' secure mode does, which blunts attacks on the
    floating-point representation of a single Gaussian draw (Mironov 2012)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if len(key) != 32:
        raise ValueError(f"The secure noise key must be 32 bytes, got {len(key)}.")
    pairs = 2 * size  # two normals per value, each from two uniforms (Box-Muller gives two per pair; the second is dropped)
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (16 * pairs))
    words = np.frombuffer(stream, dtype="<u8").reshape(pairs, 2) >> np.uint64(11)  # (pairs, 2) 53-bit integers
    u1 = (words[:, 0].astype(np.float64) + 1.0) / 2.0**53  # (0, 1]: log is finite
    u2 = words[:, 1].astype(np.float64) / 2.0**53  # [0, 1)
    normals = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # (pairs,)
    return normals.reshape(size, 2).sum(axis=1) / math.sqrt(2.0)


@dataclass(frozen=True)
class Estimates:
    """Metrics computed from (summed, noised) statistics; None where the statistics cannot give one."""

    auroc: float | None
    auprc: float | None
    patients: float  # the histograms' total weight, at least 0: the patients with a held-out session, noised


def estimates(statistics: np.ndarray) -> Estimates:
    """AUROC and AUPRC from one site's or the sum of several sites' statistics.

    AUROC counts a relapse session above an other session as 1 and one in the same bin as ½,
    computed from the noised weights as they are: numerator and denominator are products of the
    two histograms, whose noise is independent and of mean 0, so each is an unbiased estimate
    (reading negative weights as 0 instead pulled AUROC towards 0.5 by up to 0.2 at small
    cohorts); the ratio is then held to [0, 1]. AUPRC is step-wise average precision over the
    bins from the highest down, with negative weights read as 0. Post-processing: no privacy
    cost. Both are None when a histogram's total is not above 0.
    """
    v = np.asarray(statistics, dtype=np.float64)
    if v.shape != (LENGTH,) or not np.isfinite(v).all():
        raise ValueError(f"Statistics must be a finite ({LENGTH},) vector, got shape {v.shape}.")
    pos, neg = v[:BINS], v[BINS:]  # (B,), (B,)
    patients = max(0.0, float(v.sum()))
    if not (pos.sum() > 0 and neg.sum() > 0):
        return Estimates(None, None, patients)
    below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))  # other-session weight in lower bins
    auroc = float(np.clip(np.sum(pos * (below + 0.5 * neg)) / (pos.sum() * neg.sum()), 0.0, 1.0))
    pos_c, neg_c = np.maximum(pos, 0.0), np.maximum(neg, 0.0)
    tp, fp = np.cumsum(pos_c[::-1]), np.cumsum(neg_c[::-1])  # thresholds from the top bin down
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    auprc = float(np.sum(pos_c[::-1] * precision) / pos_c.sum()) if pos_c.sum() > 0 else None
    return Estimates(auroc, auprc, patients)


STAT_PREFIX = "dp-stat-"
STAT_KEYS: tuple[str, ...] = tuple(f"{STAT_PREFIX}{i:02d}" for i in range(LENGTH))  # the keys of a noised evaluation in a reply's metrics


def to_metrics(statistics: np.ndarray) -> dict[str, float]:
    """A (noised) statistics vector as reply metrics, one key per coordinate (:data:`STAT_KEYS`)."""
    return {key: float(value) for key, value in zip(STAT_KEYS, np.asarray(statistics, dtype=np.float64), strict=True)}


def is_noised(metrics: dict[str, float] | object) -> bool:
    """Whether a reply's evaluation metrics are a noised release (carry any statistics key)."""
    return isinstance(metrics, dict) and any(str(k).startswith(STAT_PREFIX) for k in metrics)


def from_metrics(metrics: dict[str, float], *, bound: float) -> np.ndarray:
    """The statistics vector of a noised evaluation reply; ValueError naming what is wrong when
    a key is missing or unknown or a value is not a finite number within ±``bound`` (the
    coordinator's plausibility limit: real statistics are at most the site's patient count plus
    a few standard deviations of noise)."""
    keys = {k for k in metrics if str(k).startswith(STAT_PREFIX)}
    missing, extra = [k for k in STAT_KEYS if k not in keys], sorted(keys - set(STAT_KEYS))
    if missing or extra:
        raise ValueError(f"a noised evaluation carries the {LENGTH} keys {STAT_KEYS[0]!r} to {STAT_KEYS[-1]!r}; " + (f"{len(missing)} missing (first {missing[0]!r})" if missing else f"unknown key {extra[0]!r}"))
    out = np.array([metrics[k] for k in STAT_KEYS], dtype=np.float64)
    bad = [k for k, v in zip(STAT_KEYS, out, strict=True) if not (math.isfinite(v) and abs(v) <= bound)]
    if bad:
        raise ValueError(f"metric {bad[0]!r} is {metrics[bad[0]]!r}; a noised statistic must be a finite number within ±{bound:g}")
    return out


def plausibility_bound(*, max_patients: float, noise_multiplier: float) -> float:
    """The largest magnitude a site's noised statistic can honestly have: its patients (each
    adds at most 1 to a coordinate) plus 12 standard deviations of the noise (the chance that
    any coordinate exceeds that is below 1e-30)."""
    return max_patients + 12.0 * noise_multiplier * SENSITIVITY


def implausibility(statistics: np.ndarray, *, max_patients: float, noise_multiplier: float) -> str | None:
    """Why a site's noised statistics cannot be honest, or None. Honest ones are the site's
    patients' weights (each coordinate at least 0, all of them summing to its patients, at most
    ``max_patients``) plus noise of standard deviation σ = z · :data:`SENSITIVITY`: so each
    coordinate lies in [−12σ, max_patients + 12σ] and their sum at most max_patients + 12σ√LENGTH
    (12 standard deviations of the summed noise). A site that sends more is trying to weigh
    more in the pooled AUROC than it has patients, or to cancel the others' histograms."""
    v = np.asarray(statistics, dtype=np.float64)
    sd = noise_multiplier * SENSITIVITY
    low, high = -12.0 * sd, max_patients + 12.0 * sd
    bad = np.flatnonzero((v < low) | (v > high))
    if bad.size:
        return f"metric {STAT_KEYS[bad[0]]!r} is {v[bad[0]]!r}; a noised statistic lies within [{low:.4g}, {high:.4g}] (the site's patients plus 12 standard deviations of noise)"
    total = float(v.sum())
    if total > max_patients + 12.0 * sd * math.sqrt(LENGTH):
        return f"the noised statistics sum to {total:.4g}, more than {max_patients:g} patients plus 12 standard deviations of the summed noise"
    return None
