"""Early warning (CUSUM against the patient's own baseline), its clinical measures, and the
aggregation strategies the evaluation compares (FedProx term, FedAdam server step)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pytest
import torch

from client.dp_train import add_prox
from client.early_warning import Timeline, alerts, choose_threshold, cusum, outcome, summarise
from server.aggregation import ServerAdam, server_step, weighted_average


class Policy(TypedDict):
    """The alert policy's keywords of summarise and choose_threshold."""

    baseline_n: int
    slack: float
    lookback_days: float
    grace_days: float


KW = Policy(baseline_n=3, slack=0.05, lookback_days=42.0, grace_days=21.0)


def weekly(risk: list[float], labels: list[int], onset_session: int | None, pid: str = "p") -> Timeline:
    days = np.arange(len(risk)) * 7.0
    return Timeline(pid, days, np.asarray(risk, dtype=float), np.asarray(labels), None if onset_session is None else onset_session * 7.0)


def test_cusum_is_relative_to_the_patients_own_baseline() -> None:
    high_but_flat = np.full(10, 0.8)
    assert not cusum(high_but_flat, baseline_n=3, slack=0.05).any()  # a high baseline is not a warning
    rising = np.array([0.2, 0.2, 0.2, 0.2, 0.5, 0.6, 0.7, 0.3])
    s = cusum(rising, baseline_n=3, slack=0.05)
    assert (s[:3] == 0).all() and s[4] == pytest.approx(0.25) and s[6] > s[5] > s[4]
    fired = alerts(rising, baseline_n=3, slack=0.05, threshold=0.5)
    assert fired.tolist() == [False, False, False, False, False, True, False, False]  # restarts after an alert


def test_lead_time_false_alarms_and_grace() -> None:
    tl = weekly([0.1] * 6 + [0.5, 0.7, 0.9, 0.9, 0.2, 0.1], [0] * 6 + [1, 1, 1, 1, 0, 0], onset_session=8)
    early = np.zeros(12, dtype=bool)
    early[6] = True  # alert at the first prodromal session, two weeks before onset
    o = outcome(tl, early, baseline_n=3, lookback_days=42.0, grace_days=21.0)
    assert o.lead_days == 14.0 and o.false_alarms == 0 and o.relapsed
    noisy = np.zeros(12, dtype=bool)
    noisy[3] = True  # 35 days before onset: inside the look-back window, so an early warning
    noisy[11] = True  # 14 days after the window ends: within grace
    o = outcome(tl, noisy, baseline_n=3, lookback_days=42.0, grace_days=21.0)
    assert o.lead_days == 35.0 and o.false_alarms == 0
    strict = outcome(tl, noisy, baseline_n=3, lookback_days=14.0, grace_days=7.0)
    assert strict.lead_days is None and strict.false_alarms == 2
    stable = weekly([0.1] * 12, [0] * 12, None)
    alarm = np.zeros(12, dtype=bool)
    alarm[5] = True
    o = outcome(stable, alarm, baseline_n=3, lookback_days=42.0, grace_days=21.0)
    assert o.false_alarms == 1 and not o.relapsed and o.months == pytest.approx(63 / 30.44)


def test_threshold_chosen_on_validation_meets_the_target_and_is_most_sensitive() -> None:
    rng = np.random.default_rng(0)
    tls = []
    for i in range(40):
        risk = 0.2 + 0.05 * rng.standard_normal(12)
        labels = np.zeros(12, dtype=int)
        onset = None
        if i % 2:
            risk[7:10] += [0.3, 0.5, 0.5]
            labels[7:10] = 1
            onset = 9
        tls.append(weekly(risk.tolist(), labels.tolist(), onset, f"p{i}"))
    chosen = choose_threshold(tls, max_false_alarms_per_month=0.1, **KW)
    assert chosen.false_alarms_per_patient_month <= 0.1
    assert chosen.warned >= 15 and chosen.median_lead_days is not None and chosen.median_lead_days >= 7
    looser = summarise(tls, threshold=chosen.threshold * 0.5, **KW)
    assert looser.false_alarms_per_patient_month > 0.1 or looser.warned == chosen.warned


def test_weighted_average_and_fedadam_step() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 2.0], np.float32)}
    avg = weighted_average([a, b], [1.0, 2.0])
    assert np.allclose(avg["w"], [2.0, 2.0])
    with pytest.raises(ValueError, match="one weight per update"):
        weighted_average([a], [1.0, 2.0])
    assert server_step(None, a, avg) is avg  # FedAvg: the average is the model
    adam = ServerAdam(lr=0.1, tau=1e-9)
    stepped = adam.step({"w": np.zeros(2, np.float32)}, avg)
    assert np.allclose(stepped["w"], [0.1, 0.1], atol=1e-4)  # first Adam step: η towards the average, per coordinate


def test_fedprox_term_pulls_towards_the_global_model() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    p.grad = torch.zeros(2)
    add_prox([p], [torch.zeros(2)], 0.5)
    assert torch.allclose(p.grad, torch.tensor([0.5, -0.5]))
    add_prox([p], None, 0.5)  # FedAvg: no reference, no change
    assert torch.allclose(p.grad, torch.tensor([0.5, -0.5]))
