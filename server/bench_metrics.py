"""``fedrelapse bench metrics-noise``: what noised metric releases cost and how exact they stay.

Two tables, both from one call:

* **utility**: the pooled federated AUROC read from the sites' noised score histograms
  (:mod:`shared.privacy.noised_metrics`) against the exact session AUROC, over many noise
  draws, for cohorts of synthetic scores (sessions of relapse scored higher by a fixed number of
  logits, so the exact AUROC is about 0.8): the binning's own bias, and the noise's RMSE and bias,
  per (held-out patients a site, z);
* **cost**: for a plan's training (its rounds, local steps and sampling rate), the σ DP-SGD needs
  with exact metrics and with one noised release per round at each z, and the ε the releases
  alone would spend: the price of the noise in training noise.

Synthetic scores, not a trained model: the figures depend on the score distribution and the
cohort's size, not on the model that made the scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared import metrics as M  # noqa: N812
from shared.config import ExperimentConfig
from shared.errors import UnreachableEpsilonError
from shared.privacy import noised_metrics as NM  # noqa: N812
from shared.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon


def synthetic_scores(rng: np.random.Generator, patients: int, *, sessions: int = 8, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probs, mask), each (patients, sessions): about 30 % relapse sessions, scored
    ``signal`` logits higher than the others with unit logistic-normal spread; 80 % of the
    session slots are real (each patient has at least one)."""
    mask = rng.random((patients, sessions)) < 0.8
    mask[:, 0] = True
    labels = (rng.random((patients, sessions)) < 0.3).astype(np.float64)
    probs = 1 / (1 + np.exp(-(signal * labels - 0.8 + rng.normal(0, 1, (patients, sessions)))))
    return labels, probs, mask


def release_utility(*, sites: int, patients: tuple[int, ...], noise: tuple[float, ...], draws: int, seed: int = 0) -> list[dict[str, Any]]:
    """Per (patients a site, z): exact and binned AUROC of the pooled cohort, and the noised
    pooled AUROC's RMSE and bias against the binned one over ``draws`` noise draws, with the share
    of draws that gave no AUROC (a histogram's total not above 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in patients:
        cohorts = [synthetic_scores(rng, n) for _ in range(sites)]
        stats = [NM.patient_statistics(*c) for c in cohorts]
        exact = M.auroc(np.concatenate([c[0][c[2]] for c in cohorts]), np.concatenate([c[1][c[2]] for c in cohorts]))
        binned = NM.estimates(np.sum(stats, axis=0)).auroc
        if binned is None:
            raise RuntimeError(f"The synthetic cohort of {n} patients a site holds one class only; use more patients.")
        for z in noise:
            errors, none = [], 0
            for _ in range(draws):
                got = NM.estimates(np.sum([NM.noised(s, noise_multiplier=z, generator=rng) for s in stats], axis=0)).auroc
                if got is None:
                    none += 1
                else:
                    errors.append(got - binned)
            err = np.asarray(errors)
            rows.append({
                "patients_per_site": n, "sites": sites, "noise_multiplier": z, "exact_auroc": round(exact, 4), "binned_auroc": round(binned, 4),
                "rmse": round(float(np.sqrt(np.mean(err**2))), 4) if err.size else None, "bias": round(float(err.mean()), 4) if err.size else None,
                "no_auroc_share": round(none / draws, 4),
            })
    return rows


def release_cost(exp: ExperimentConfig, *, noise: tuple[float, ...], training_patients: int) -> list[dict[str, Any]]:
    """Per z (and 0: exact metrics): the σ a site with ``training_patients`` needs for the plan's
    rounds and local steps at its ε, with one release per round beside them, and the ε the
    releases alone spend (None where they leave nothing for training)."""
    p, t, rounds = exp.privacy, exp.training, exp.federation.rounds
    q = min(1.0, t.batch_patients / training_patients)
    steps = rounds * t.local_steps
    rows = []
    for z in (0.0, *noise):
        fixed = (SubsampledGaussian(z, 1.0, rounds),) if z > 0 else ()
        alone = epsilon(fixed, delta=p.target_delta, accountant=p.accountant) if fixed else 0.0
        try:
            sigma: float | None = calibrate_noise(target_epsilon=p.target_epsilon, target_delta=p.target_delta, sample_rate=q, steps=steps, accountant=p.accountant, fixed=fixed)
        except UnreachableEpsilonError:
            sigma = None
        note = "" if sigma else f"refused: the releases alone spend ε {alone:.3g}, more than the plan's {p.target_epsilon:g}"
        rows.append({"noise_multiplier": z, "releases": rounds if z > 0 else 0, "epsilon_of_releases_alone": round(alone, 4), "training_sigma": round(sigma, 4) if sigma else None,
                     **({"note": note} if note else {})})
    return [{**r, "sample_rate": round(q, 4), "steps": steps, "target_epsilon": p.target_epsilon, "accountant": p.accountant} for r in rows]
