"""Early warning over a patient's timeline: CUSUM on session risk against the patient's own
baseline, a threshold chosen on validation patients, and the clinical evaluation measures
(lead time before relapse onset, false alarms per patient-month).

Pure functions on arrays: the same code runs at a site (``site timeline``) and in the
evaluation harness. Each patient is their own reference: the first ``baseline_n`` sessions
set the level that later risk is compared with, and are not themselves monitored.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DAYS_PER_MONTH = 30.44


@dataclass(frozen=True)
class Timeline:
    """One patient's sessions in time order."""

    patient_id: str
    days: np.ndarray  # (n,) days since the patient's first session
    risk: np.ndarray  # (n,) session risk in [0, 1]
    labels: np.ndarray  # (n,) 1 worsening window, 0 stable, -1 unlabelled
    onset_day: float | None  # recorded start of the acute relapse; None if the patient did not relapse


def _cusum(risk: np.ndarray, *, baseline_n: int, slack: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(statistic (n,), alert (n,) bool); the statistic restarts from 0 after each alert."""
    stat, fired = np.zeros(risk.shape[0]), np.zeros(risk.shape[0], dtype=bool)
    if risk.shape[0] <= baseline_n:
        return stat, fired
    mu0 = float(risk[:baseline_n].mean())
    acc = 0.0
    for t in range(baseline_n, risk.shape[0]):
        acc = max(0.0, acc + float(risk[t]) - mu0 - slack)
        stat[t] = acc
        if acc >= threshold:
            fired[t], acc = True, 0.0
    return stat, fired


def cusum(risk: np.ndarray, *, baseline_n: int, slack: float) -> np.ndarray:
    """One-sided CUSUM S_t = max(0, S_{t-1} + r_t - μ0 - k) with μ0 the mean of the first
    ``baseline_n`` risks; zero over the baseline sessions. Shape (n,)."""
    return _cusum(risk, baseline_n=baseline_n, slack=slack, threshold=np.inf)[0]


def alerts(risk: np.ndarray, *, baseline_n: int, slack: float, threshold: float) -> np.ndarray:
    """Sessions (bool, (n,)) at which an alert fires; the statistic restarts after each alert."""
    return _cusum(risk, baseline_n=baseline_n, slack=slack, threshold=threshold)[1]


@dataclass(frozen=True)
class AlertOutcome:
    """What an alert policy did on one patient."""

    lead_days: float | None  # onset - first early alert (>= 0); None: relapse not warned of by onset, or no relapse
    false_alarms: int
    months: float  # monitored follow-up, for the false-alarm rate
    relapsed: bool


def outcome(tl: Timeline, fired: np.ndarray, *, baseline_n: int, lookback_days: float, grace_days: float) -> AlertOutcome:
    """Classify one patient's alerts as early warnings or false alarms."""
    days = tl.days
    monitored = days[baseline_n:] if days.shape[0] > baseline_n else days[:0]
    months = float(monitored[-1] - monitored[0] + 7) / DAYS_PER_MONTH if monitored.size else 0.0
    worse = np.flatnonzero(tl.labels == 1)
    onset = tl.onset_day if tl.onset_day is not None else (float(days[worse[0]]) if worse.size else None)
    excused = np.zeros(days.shape[0], dtype=bool)
    if onset is not None:
        end = float(days[worse[-1]]) if worse.size else onset
        excused = (days >= onset - lookback_days) & (days <= end + grace_days)
        excused |= tl.labels == 1
    early = fired & (days >= (onset - lookback_days if onset is not None else np.inf)) & (days <= (onset if onset is not None else -np.inf))
    lead = float(onset - days[np.flatnonzero(early)[0]]) if onset is not None and early.any() else None
    return AlertOutcome(lead, int((fired & ~excused).sum()), months, onset is not None)


@dataclass(frozen=True)
class AlertSummary:
    threshold: float
    relapses: int
    warned: int  # relapses with an alert at or before onset (within the look-back)
    median_lead_days: float | None
    false_alarms_per_patient_month: float
    patients: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "threshold": round(self.threshold, 4), "relapses": self.relapses, "warned": self.warned,
            "sensitivity": round(self.warned / self.relapses, 4) if self.relapses else None,
            "median_lead_days": self.median_lead_days, "false_alarms_per_patient_month": round(self.false_alarms_per_patient_month, 4),
            "patients": self.patients,
        }


def summarise(timelines: Sequence[Timeline], *, threshold: float, baseline_n: int, slack: float, lookback_days: float, grace_days: float) -> AlertSummary:
    """Apply the policy to every patient and pool the clinical measures."""
    outs = [
        outcome(tl, alerts(tl.risk, baseline_n=baseline_n, slack=slack, threshold=threshold), baseline_n=baseline_n, lookback_days=lookback_days, grace_days=grace_days)
        for tl in timelines
    ]
    leads = [o.lead_days for o in outs if o.lead_days is not None]
    months = sum(o.months for o in outs)
    return AlertSummary(
        threshold=threshold,
        relapses=sum(o.relapsed for o in outs),
        warned=len(leads),
        median_lead_days=float(np.median(leads)) if leads else None,
        false_alarms_per_patient_month=sum(o.false_alarms for o in outs) / months if months else 0.0,
        patients=len(outs),
    )


def choose_threshold(
    timelines: Sequence[Timeline], *, baseline_n: int, slack: float, lookback_days: float, grace_days: float, max_false_alarms_per_month: float
) -> AlertSummary:
    """The most sensitive threshold whose false-alarm rate on these (validation) patients
    is within the target. Candidates are the CUSUM values that occur, so the search is exact."""
    values = np.unique(np.concatenate([cusum(tl.risk, baseline_n=baseline_n, slack=slack) for tl in timelines] or [np.zeros(1)]))
    positive = values[values > 0]
    if positive.size > 400:  # quantiles keep the search fast on large cohorts
        positive = np.unique(np.quantile(positive, np.linspace(0, 1, 400)))
    candidates = positive.tolist() or [1.0]
    at = functools.partial(summarise, timelines, baseline_n=baseline_n, slack=slack, lookback_days=lookback_days, grace_days=grace_days)
    for h in candidates:  # ascending: the first that meets the target is the most sensitive
        s = at(threshold=float(h))
        if s.false_alarms_per_patient_month <= max_false_alarms_per_month:
            return s
    return at(threshold=float(candidates[-1]) + 1e-9)
