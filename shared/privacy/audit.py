"""Offline verification of a site ledger, for the data protection officer.

Checks the hash chain, every signature against the site's public key, entry order and times,
and recomputes ε from the recorded mechanisms with two accountants that share no code with
the site's: Google's ``dp-accounting`` RDP (Mironov 2017) and PLD (Doroshenko et al. 2022).
Every round entry's recorded ε (all rounds, and its run's) may not exceed the independent RDP
figure by more than ``tolerance`` and may never be below the tighter PLD figure (an under-count);
a PRV ledger's must also stay within the tolerance of PLD at each run's end.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.privacy.accounting import RDP_ALPHAS
from shared.privacy.ledger import Issue, LedgerEntry, parse_numbered, unfinished_tail

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs every non-converging order


def independent_epsilon(mechanisms: list[tuple[float, float, int]], delta: float, *, pld: bool = True) -> tuple[float, float]:
    """(RDP, PLD) ε of composed Poisson-subsampled Gaussian steps, via dp-accounting.

    PLD is the slow one (a fresh ``PLDAccountant`` builds each step's PLD: 0.2–1 s); with
    ``pld=False`` its figure is returned as NaN. ``verify_ledger`` and the report compute the same
    figures with :func:`memoised_epsilon`'s parts; this is the reference the tests pin them to.
    """
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps) for sigma, q, steps in mechanisms if steps > 0]
    if not events:
        return 0.0, 0.0
    composed = dp_event.ComposedDpEvent(events)
    rdp = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ALPHAS))
    rdp.compose(composed)
    if not pld:
        return float(rdp.get_epsilon(delta)), float("nan")
    pld_acc = pld_privacy_accountant.PLDAccountant()
    pld_acc.compose(composed)
    return float(rdp.get_epsilon(delta)), float(pld_acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """dp-accounting's RDP curve of one Poisson-subsampled Gaussian step over :data:`RDP_ALPHAS`,
    once per (q, σ): a self-composed event is this curve times its steps (what
    ``RdpAccountant.compose`` adds), and one curve costs ~0.1 s, which ``verify_ledger`` paid
    twice per entry (26.5 s for 200 entries, minutes for thousands) though a run repeats one (σ, q)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    curve = np.asarray(rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(  # noqa: SLF001 - the curve compose() adds; pinned by a test
        q=sample_rate, noise_multiplier=noise_multiplier, orders=np.asarray(RDP_ALPHAS, dtype=float)), dtype=float)
    curve.flags.writeable = False
    return curve


def _rdp_epsilon(curve: np.ndarray, delta: float) -> float:
    """ε at ``delta`` of an RDP curve over :data:`RDP_ALPHAS` (dp-accounting's conversion)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return float(rdp_privacy_accountant.compute_epsilon(RDP_ALPHAS, curve, delta)[0])


_PLD_DISCRETISATION = 1e-4  # PLDAccountant's default value_discretization_interval, so that _pld's figures are its figures


@functools.lru_cache(maxsize=32)  # one PLD is 0.05–7 MB (larger for small σ)
def _pld_per_step(noise_multiplier: float, sample_rate: float) -> PrivacyLossDistribution:
    """dp-accounting's PLD of one Poisson-subsampled Gaussian step, built with the arguments
    ``PLDAccountant`` builds it with (its discretisation; pessimistic rounding and add-or-remove
    neighbours by default), once per (σ, q): building it was most of a PLD evaluation (0.1–0.3 s),
    which ``verify_ledger`` paid up to twice per entry though a run repeats one (σ, q). dp-accounting
    never changes a PLD in place (composing returns a new one), so one object serves every query."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(noise_multiplier, value_discretization_interval=_PLD_DISCRETISATION, sampling_prob=sample_rate)


def _pld(mechanisms: dict[tuple[float, float], int], delta: float) -> float:
    """The independent PLD ε of {(σ, q): steps}, composed in the dict's order."""
    return _pld_of(tuple(mechanisms.items()), delta)


@functools.lru_cache(maxsize=4096)
def _pld_of(mechanisms: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    """The PLD ε that ``PLDAccountant`` gives for ((σ, q), steps) pairs composed in this order:
    the same dp-accounting operations on the same values (identity, then each step's PLD
    self-composed and composed in turn), so the same figure to the last bit (a test pins it),
    without rebuilding each step's PLD. Memoised: an entry's all-rounds and run figures are one
    query when the ledger has one run. What remains is the self-composition (0.03 s at 10 steps,
    0.7 s at 10⁴)."""
    from dp_accounting.pld import privacy_loss_distribution

    composed = privacy_loss_distribution.identity(value_discretization_interval=_PLD_DISCRETISATION)
    for (sigma, q), steps in mechanisms:
        if q == 0:  # as PLDAccountant: a step that samples no one adds nothing
            continue
        if sigma == 0:  # as PLDAccountant: a step without noise has no bound
            return math.inf
        composed = composed.compose(_pld_per_step(sigma, q).self_compose(steps))
    return float(composed.get_epsilon_for_delta(delta))


def memoised_epsilon(mechanisms: dict[tuple[float, float], int], delta: float) -> tuple[float, float]:
    """(RDP, PLD) ε of {(σ, q): steps} composed in the dict's order: :func:`independent_epsilon`'s
    figures to the last bit (tests pin both), from the memoised step curves and figures that
    ``verify_ledger`` has usually computed already for a run's last entry, so the report's
    figures for a run cost no second PLD evaluation (a fresh accountant took 0.1–0.25 s a run of 500 steps)."""
    live = {key: steps for key, steps in mechanisms.items() if steps > 0}
    if not live:
        return 0.0, 0.0
    curve = np.zeros(len(RDP_ALPHAS))
    for (sigma, q), steps in live.items():
        curve = curve + steps * _rdp_per_step(q, sigma)  # what RdpAccountant.compose adds, in the same order
    return _rdp_epsilon(curve, delta), _pld(live, delta)


@dataclass
class EntryCheck:
    line: int
    run_id: str
    round: int
    recorded_total: float
    rdp: float  # independent RDP ε of every round up to this entry
    pld: float  # independent PLD ε of the same (NaN where not computed: it takes 0.03–0.7 s)
    recorded_run: float = math.nan
    rdp_run: float = math.nan  # independent RDP ε of this entry's run up to this entry


@dataclass
class VerifyReport:
    path: Path
    entries: list[LedgerEntry] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    checks: list[EntryCheck] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each entry's line in the file, the numbers issues and checks use

    @property
    def ok(self) -> bool:
        return not self.issues


def verify_ledger(path: Path, public_key: Ed25519PublicKey | None, *, tolerance: float = 0.02) -> VerifyReport:
    """Every integrity, order and accounting problem in the ledger at ``path``.

    Each round entry's recorded ``epsilon_total`` (every round so far) and ``epsilon_run`` (its
    run's rounds so far) is compared with dp-accounting's RDP figure for the same rounds (on the
    site's grid of Rényi orders, :data:`~shared.privacy.accounting.RDP_ALPHAS`: the same bound,
    computed by code the site does not share), kept by one accountant per quantity that composes
    each entry's mechanism as it is read (linear in the ledger). Above RDP by more than the
    tolerance is a problem; below it, only a figure below PLD is (RDP is loose for PRV ledgers and
    at large ε, where its small orders give no bound), so PLD (0.03–0.7 s a figure) is computed
    there, at the ledger's newest entry, and for PRV ledgers at each run's last entry, which must
    not exceed PLD by more than the tolerance and PRV's own 0.01.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"The tolerance must be a fraction of at least 0 (0.02 is 2 %), got {tolerance}.")
    numbered, issues = parse_numbered(path, public_key)
    report = VerifyReport(path, [e for _, e in numbered], list(issues), lines=[no for no, _ in numbered])
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
    rounds = [(line, e) for line, e in numbered if e.charged]  # training rounds and noised metric releases: both count in ε
    run_ends = {line for i, (line, e) in enumerate(rounds) if i + 1 == len(rounds) or rounds[i + 1][1].run_id != e.run_id}
    released: set[tuple[str, int]] = set()
    # RDP curves over the site's order grid (same bound, dp-accounting's code, none shared with the site): all rounds, and per run
    total_rdp = np.zeros(len(RDP_ALPHAS))
    run_rdp: dict[str, np.ndarray] = {}
    run_mechanisms: dict[str, dict[tuple[float, float], int]] = {}
    last_total = 0.0
    last_run: dict[str, float] = {}
    # The largest PLD ε computed so far over all rounds / over each run's rounds: a later entry adds
    # rounds, so its PLD ε is at least this; an ε recorded below it is an under-count with no new PLD
    # (seconds each; a ledger of forged ε = 0 entries made one per entry, hours for 10⁴ entries).
    pld_floor_total = 0.0
    pld_floor_run: dict[str, float] = {}

    for line, e in numbered:
        try:
            when = dt.datetime.fromisoformat(e.time)
        except ValueError:
            report.issues.append(Issue(line, f"time {e.time!r} is not ISO 8601"))
            continue
        if last_time and when < last_time:
            report.issues.append(Issue(line, f"time {e.time} is earlier than the entry before it"))
        last_time = when
        if not e.charged:
            continue
        if e.kind == "release":
            _check_release(e, line, report, released, last_round)
            if e.epsilon_total <= last_total or e.epsilon_run <= last_run.get(e.run_id, 0.0):  # a release always adds to ε
                report.issues.append(Issue(line, f"a noised release records ε={e.epsilon_total:.6g} (run {e.epsilon_run:.6g}), no more than before it; a release that spends nothing was not counted"))
        else:
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
            added = e.steps * _rdp_per_step(e.sample_rate, e.noise_multiplier)  # RDP of e.steps self-composed steps
            total_rdp = total_rdp + added
            run_rdp[e.run_id] = run_rdp.get(e.run_id, np.zeros(len(RDP_ALPHAS))) + added
            key = (e.noise_multiplier, e.sample_rate)
            steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + e.steps
            mine = run_mechanisms.setdefault(e.run_id, {})
            mine[key] = mine.get(key, 0) + e.steps
        rdp = _rdp_epsilon(total_rdp, e.delta) if steps_by_mechanism else 0.0
        rdp_run = _rdp_epsilon(run_rdp[e.run_id], e.delta) if e.run_id in run_rdp else 0.0
        need_pld = line == rounds[-1][0] or (e.accountant == "prv" and line in run_ends)
        pld = _pld(steps_by_mechanism, e.delta) if need_pld else math.nan
        if not math.isnan(pld):
            pld_floor_total = max(pld_floor_total, pld)
        report.checks.append(EntryCheck(line, e.run_id, e.round, e.epsilon_total, rdp, pld, e.epsilon_run, rdp_run))
        for recorded, reference, mechanisms, what in ((e.epsilon_total, rdp, steps_by_mechanism, ""), (e.epsilon_run, rdp_run, run_mechanisms.get(e.run_id, {}), f" for run {e.run_id}")):
            # Above the RDP upper bound: not what the site's accountant gives. Below it: RDP can be loose (PRV is tighter by
            # design; at large ε RDP's small orders give no bound), so only a figure below the near-exact PLD is an under-count.
            if recorded > reference * (1 + tolerance) + (0.01 if e.accountant == "prv" else 1e-9):  # Opacus' PRV is accurate to 0.01 in ε
                report.issues.append(Issue(line, f"recorded ε={recorded:.4f} ({e.accountant}){what} is above the independent RDP ε={reference:.4f} of its rounds by more than {tolerance:.0%}"))
            elif recorded < reference * (1 - tolerance) and mechanisms:
                floor = pld_floor_total if what == "" else pld_floor_run.get(e.run_id, 0.0)
                if recorded < floor * (1 - 1e-3):
                    lower = floor  # already below an earlier entry's PLD ε, which this entry's can only exceed
                else:
                    lower = pld if what == "" and not math.isnan(pld) else _pld(mechanisms, e.delta)
                    if what == "":
                        pld_floor_total = max(pld_floor_total, lower)
                    else:
                        pld_floor_run[e.run_id] = max(floor, lower)
                if recorded < lower * (1 - 1e-3):
                    report.issues.append(Issue(line, f"recorded ε={recorded:.4f} ({e.accountant}){what} is below the independent RDP ε={reference:.4f} and the PLD lower figure {lower:.4f}: an under-count"))
        if e.accountant == "prv" and not math.isnan(pld) and e.epsilon_total > pld * (1 + tolerance) + 0.01:  # Opacus' PRV is accurate to 0.01 in ε
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} (prv) is above the independent PLD ε={pld:.4f} by more than {tolerance:.0%} and PRV's 0.01"))
        if not math.isnan(pld) and e.epsilon_total < pld * (1 - 1e-3):
            report.issues.append(Issue(line, f"recorded ε={e.epsilon_total:.4f} is below the PLD lower figure {pld:.4f}: an under-count"))
    return report


def _check_release(e: LedgerEntry, line: int, report: VerifyReport, released: set[tuple[str, int]], last_round: dict[str, int]) -> None:
    """The problems of one noised-metrics ``release`` entry: it is the Gaussian mechanism (q = 1,
    one step), once per (run, model round), in a run whose ledger already holds a round (the
    model round itself may be later than this site's newest round: a site not sampled for a
    round still evaluates its model; the site bounds it by the plan's rounds)."""
    if (e.run_id, e.round) in released:
        report.issues.append(Issue(line, f"the evaluation of round {e.round}'s model of run {e.run_id} is released twice"))
    released.add((e.run_id, e.round))
    if e.run_id not in last_round:
        report.issues.append(Issue(line, f"a noised release in run {e.run_id} before any round of it was charged; the site releases only in runs it has trained in"))
    if e.round < 0:
        report.issues.append(Issue(line, f"a noised release of round {e.round}'s model of run {e.run_id}; rounds count from 0 (the initial model)"))
    if (e.sample_rate, e.steps) != (1.0, 1):
        report.issues.append(Issue(line, f"a noised release must be one Gaussian mechanism (q = 1, 1 step), got q={e.sample_rate}, {e.steps} steps"))
