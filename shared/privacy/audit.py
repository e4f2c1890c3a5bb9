"""Offline verification of a site ledger, for the data protection officer.

Checks the hash chain, every signature against the site's public key, entry order and times,
and recomputes ε from the recorded mechanisms with two accountants that share no code with
the site's: Google's ``dp-accounting`` RDP (Mironov 2017) and PLD (Doroshenko et al. 2022).
Every round entry's recorded ε (all rounds, and its run's) must match the independent RDP
figure within ``tolerance`` (a PRV ledger's may be lower, never higher, and must match PLD at
each run's end) and may never be below the tighter PLD figure (an under-count).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.privacy.ledger import Issue, LedgerEntry, parse_numbered, unfinished_tail

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs every non-converging order


def independent_epsilon(mechanisms: list[tuple[float, float, int]], delta: float, *, pld: bool = True) -> tuple[float, float]:
    """(RDP, PLD) ε of composed Poisson-subsampled Gaussian steps, via dp-accounting.

    PLD is the slow one (seconds); with ``pld=False`` its figure is returned as NaN.
    """
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps) for sigma, q, steps in mechanisms if steps > 0]
    if not events:
        return 0.0, 0.0
    composed = dp_event.ComposedDpEvent(events)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(composed)
    if not pld:
        return float(rdp.get_epsilon(delta)), float("nan")
    pld_acc = pld_privacy_accountant.PLDAccountant()
    pld_acc.compose(composed)
    return float(rdp.get_epsilon(delta)), float(pld_acc.get_epsilon(delta))


@dataclass
class EntryCheck:
    line: int
    run_id: str
    round: int
    recorded_total: float
    rdp: float  # independent RDP ε of every round up to this entry
    pld: float  # independent PLD ε of the same (NaN where not computed: it takes seconds)
    recorded_run: float = math.nan
    rdp_run: float = math.nan  # independent RDP ε of this entry's run up to this entry


@dataclass
class VerifyReport:
    path: Path
    entries: list[LedgerEntry] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    checks: list[EntryCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues


def verify_ledger(path: Path, public_key: Ed25519PublicKey | None, *, tolerance: float = 0.02) -> VerifyReport:
    """Every integrity, order and accounting problem in the ledger at ``path``.

    Each round entry's recorded ``epsilon_total`` (every round so far) and ``epsilon_run`` (its
    run's rounds so far) is compared with dp-accounting's RDP figure for the same rounds, kept
    by one accountant per quantity that composes each entry's mechanism as it is read (linear in
    the ledger). PLD, which takes seconds, is computed at the ledger's newest entry (the
    under-count check) and, for PRV ledgers, at each run's last entry, which it is compared with.
    """
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"The tolerance must be a fraction of at least 0 (0.02 is 2 %), got {tolerance}.")
    numbered, issues = parse_numbered(path, public_key)
    report = VerifyReport(path, [e for _, e in numbered], list(issues))
    if public_key is None:
        report.issues.append(Issue(0, "no public key given: signatures were not checked"))
    tail = unfinished_tail(path)
    if tail is not None:
        report.issues.append(Issue(tail[0], f"the file ends in an unfinished line of {tail[1]} bytes (no newline, not a complete entry), which is not counted: "
                                            "a crash while the site appended leaves one, and so does cutting the last entry short; compare the coordinator's ledger head (runbook)"))
    last_time: dt.datetime | None = None
    seen: set[tuple[str, int]] = set()
    last_round: dict[str, int] = {}
    steps_by_mechanism: dict[tuple[float, float], int] = {}  # (σ, q) -> steps: composition is exact when merged
    rounds = [(line, e) for line, e in numbered if e.kind == "round"]
    run_ends = {line for i, (line, e) in enumerate(rounds) if i + 1 == len(rounds) or rounds[i + 1][1].run_id != e.run_id}
    total_rdp = rdp_privacy_accountant.RdpAccountant()
    run_rdp: dict[str, rdp_privacy_accountant.RdpAccountant] = {}
    last_total = 0.0
    last_run: dict[str, float] = {}

    def differs(recorded: float, reference: float) -> bool:
        return abs(recorded - reference) > tolerance * max(reference, 1e-9)

    for line, e in numbered:
        try:
            when = dt.datetime.fromisoformat(e.time)
        except ValueError:
            report.issues.append(Issue(line, f"time {e.time!r} is not ISO 8601"))
            continue
        if last_time and when < last_time:
            report.issues.append(Issue(line, f"time {e.time} is earlier than the entry before it"))
        last_time = when
        if e.kind != "round":
            continue
        if (e.run_id, e.round) in seen:
            report.issues.append(Issue(line, f"round {e.round} of run {e.run_id} is accounted twice"))
        if e.round < 1:
            report.issues.append(Issue(line, f"round number {e.round} of run {e.run_id} is not positive"))
        elif e.round <= last_round.get(e.run_id, 0):
            report.issues.append(Issue(line, f"round {e.round} of run {e.run_id} comes after round {last_round[e.run_id]}"))
        seen.add((e.run_id, e.round))
        last_round[e.run_id] = max(e.round, last_round.get(e.run_id, 0))
        if e.epsilon_total < last_total - 1e-9:
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} is lower than the entry before it ({last_total:.4f}); ε can only grow"))
        if e.epsilon_run < last_run.get(e.run_id, 0.0) - 1e-9:
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_run:.4f} for run {e.run_id} is lower than at its round before ({last_run[e.run_id]:.4f}); ε can only grow"))
        last_total, last_run[e.run_id] = max(last_total, e.epsilon_total), max(last_run.get(e.run_id, 0.0), e.epsilon_run)
        if e.steps > 0:
            if not (0 < e.sample_rate <= 1 and e.noise_multiplier > 0 and e.delta > 0):
                report.issues.append(Issue(line, f"the mechanism (σ={e.noise_multiplier}, q={e.sample_rate}, δ={e.delta}) is not a Poisson-subsampled Gaussian; ε cannot be checked"))
                continue
            event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)), e.steps)
            total_rdp.compose(event)
            run_rdp.setdefault(e.run_id, rdp_privacy_accountant.RdpAccountant()).compose(event)
            key = (e.noise_multiplier, e.sample_rate)
            steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + e.steps
        rdp = float(total_rdp.get_epsilon(e.delta)) if steps_by_mechanism else 0.0
        rdp_run = float(run_rdp[e.run_id].get_epsilon(e.delta)) if e.run_id in run_rdp else 0.0
        need_pld = line == rounds[-1][0] or (e.accountant == "prv" and line in run_ends)
        pld = independent_epsilon([(s, q, n) for (s, q), n in steps_by_mechanism.items()], e.delta)[1] if need_pld else math.nan
        report.checks.append(EntryCheck(line, e.run_id, e.round, e.epsilon_total, rdp, pld, e.epsilon_run, rdp_run))
        if e.accountant == "prv":  # PRV is near-exact: it may sit below RDP (an upper bound), never above it, and at a run's end it must match PLD
            if e.epsilon_total > rdp * (1 + tolerance) + 1e-9:
                report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} (prv) is above the independent RDP upper figure {rdp:.4f} by more than {tolerance:.0%}"))
            if e.epsilon_run > rdp_run * (1 + tolerance) + 1e-9:
                report.issues.append(Issue(line, f"recorded ε={e.epsilon_run:.4f} (prv) for run {e.run_id} is above the independent RDP upper figure {rdp_run:.4f} by more than {tolerance:.0%}"))
            if not math.isnan(pld) and differs(e.epsilon_total, pld):
                report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} (prv) differs from the independent PLD ε={pld:.4f} by more than {tolerance:.0%}"))
        else:
            if differs(e.epsilon_total, rdp):
                report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} ({e.accountant}) differs from the independent RDP ε={rdp:.4f} by more than {tolerance:.0%}"))
            if differs(e.epsilon_run, rdp_run):
                report.issues.append(Issue(line, f"recorded ε={e.epsilon_run:.4f} ({e.accountant}) for run {e.run_id} differs from the independent RDP ε={rdp_run:.4f} of its rounds so far by more than {tolerance:.0%}"))
        if not math.isnan(pld) and e.epsilon_total < pld * (1 - 1e-3):
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} is below the PLD lower figure {pld:.4f}: an under-count"))
    return report
