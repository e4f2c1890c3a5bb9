"""Offline verification of a site ledger, for the data protection officer.

Checks the hash chain, every signature against the site's public key, entry order and times,
and recomputes ε from the recorded mechanisms with two accountants that share no code with
the site's: Google's ``dp-accounting`` RDP (Mironov 2017) and PLD (Doroshenko et al. 2022).
The site's recorded ε must match the independent RDP figure within ``tolerance`` and may never
be below the tighter PLD figure (a recorded ε below PLD would be an under-count).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.privacy.ledger import Issue, LedgerEntry, parse_numbered

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
    rdp: float
    pld: float


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
    """Every integrity, order and accounting problem in the ledger at ``path``."""
    numbered, issues = parse_numbered(path, public_key)
    report = VerifyReport(path, [e for _, e in numbered], list(issues))
    if public_key is None:
        report.issues.append(Issue(0, "no public key given: signatures were not checked"))
    last_time: dt.datetime | None = None
    seen: set[tuple[str, int]] = set()
    last_round: dict[str, int] = {}
    steps_by_mechanism: dict[tuple[float, float], int] = {}  # (σ, q) -> steps: composition is exact when merged
    rounds = [(line, e) for line, e in numbered if e.kind == "round"]
    # ε is recomputed at the last entry of each run (and the ledger's last entry): every
    # earlier entry of a run is dominated by it, and this keeps verification linear in runs.
    checkpoints = {line for i, (line, e) in enumerate(rounds) if i + 1 == len(rounds) or rounds[i + 1][1].run_id != e.run_id}
    last_total = 0.0
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
        last_total = max(last_total, e.epsilon_total)
        key = (e.noise_multiplier, e.sample_rate)
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + e.steps
        if line not in checkpoints:
            continue
        # PLD (slow) at the ledger's newest entry and for PRV ledgers; RDP at every run's end.
        need_pld = e.accountant == "prv" or line == rounds[-1][0]
        rdp, pld = independent_epsilon([(s, q, n) for (s, q), n in steps_by_mechanism.items()], e.delta, pld=need_pld)
        report.checks.append(EntryCheck(line, e.run_id, e.round, e.epsilon_total, rdp, pld))
        reference, name = (pld, "PLD") if e.accountant == "prv" else (rdp, "RDP")  # PRV and PLD are both near-exact
        if abs(e.epsilon_total - reference) > tolerance * max(reference, 1e-9):
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} ({e.accountant}) differs from the independent {name} ε={reference:.4f} by more than {tolerance:.0%}"))
        if need_pld and e.epsilon_total < pld * (1 - 1e-3):
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} is below the PLD lower figure {pld:.4f}: an under-count"))
    return report
