"""The privacy audit report for a data protection officer: one self-contained HTML file, and a PDF.

:func:`build_report` gathers everything from one or more site ledgers into plain data: the
result of :func:`~shared.privacy.audit.verify_ledger` (chain, signatures, order, ε recomputed
with two independent accountants), every run with its rounds, mechanisms and plan hashes, ε
after each round over time, the cap changes with their notes, the caps in force and what
remains. :func:`render_html` turns that into one HTML file with inline CSS and the plots
embedded as PNG (no network, no scripts); :func:`render_pdf` writes the same as a PDF.
Everything read from a ledger is escaped: a note cannot inject markup into the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeGuard, Unpack

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from shared import signing  # noqa: E402
from shared.config import SitePolicy  # noqa: E402
from shared.privacy.audit import EntryCheck, VerifyReport, memoised_epsilon, verify_ledger  # noqa: E402
from shared.privacy.ledger import Issue, LedgerEntry, current_caps, head_hash, parse_numbered  # noqa: E402

VERIFIED = "verified"
UNSIGNED = "signatures not checked"
PROBLEMS = "problems found"
_NO_KEY_LINE = 0  # verify_ledger reports the missing public key as an issue on line 0


@dataclass(frozen=True)
class RoundRow:
    """One accounted round: the mechanism applied and ε after it."""

    line: int  # the line in the ledger file, as `audit verify` numbers it
    run_id: str
    round: int
    time: dt.datetime | None
    time_text: str
    plan_hash: str
    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    epsilon_run: float
    epsilon_total: float
    wall_time_s: float
    check: EntryCheck | None = None  # the independent recomputation of epsilon_total
    kind: str = "round"  # or "release": a noised evaluation of the model after `round` (q = 1, one step)

    @property
    def label(self) -> str:
        """The round as the report's tables show it: its number, or what a release released."""
        return str(self.round) if self.kind == "round" else f"{self.round}: noised metrics"


@dataclass(frozen=True)
class Mechanism:
    """A distinct (σ, q, steps, C) used by a run, and in how many of its rounds."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    rounds: int


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    rounds: list[RoundRow]
    epsilon: float  # recorded ε of this run after its last round
    delta: float
    accountant: str
    independent_rdp: float
    independent_pld: float
    plan_hashes: list[str]
    mechanisms: list[Mechanism]
    started: str
    ended: str
    cap_run: float | None  # the per-run cap in force when the run last trained

    @property
    def within_cap(self) -> bool | None:
        return None if self.cap_run is None else self.epsilon <= self.cap_run * 1.001


@dataclass(frozen=True)
class CapChange:
    line: int  # the line in the ledger file, as `audit verify` numbers it
    time: dt.datetime | None
    time_text: str
    cap_total: float | None
    cap_run: float | None
    note: str
    key_id: str


@dataclass
class LedgerSummary:
    path: Path
    status: str  # VERIFIED, UNSIGNED or PROBLEMS
    issues: list[Issue]  # every problem (the "no public key" notice is not one: see signatures_checked)
    notes: list[str]  # what a DPO should look at that is not a verification failure (a run above its cap, ...)
    signatures_checked: bool
    entries: int
    head_hash: str
    sites: list[str]
    datasets: list[str]
    key_ids: list[str]
    runs: list[RunSummary]
    rounds: list[RoundRow]
    cap_changes: list[CapChange]
    cap_timeline: list[tuple[dt.datetime | None, float | None, float | None]]  # (from, all-time cap, per-run cap)
    cap_total: float | None  # in force now; None when neither site.yaml nor a ledger entry says
    cap_run: float | None
    cap_source: str
    epsilon_spent: float  # recorded ε of every run together, after the last round
    delta: float | None
    epsilon_remaining: float | None
    independent_rdp: float
    independent_pld: float
    first_time: str
    last_time: str

    @property
    def site(self) -> str:
        return ", ".join(self.sites) or self.path.stem

    @property
    def ok(self) -> bool:
        return self.status == VERIFIED


@dataclass
class ReportData:
    title: str
    generated: str
    public_key: Path | None
    key_fingerprint: str
    policy: SitePolicy | None
    ledgers: list[LedgerSummary] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)  # `fedrelapse audit attack` results

    @property
    def ok(self) -> bool:
        """Everything verified, signatures included."""
        return all(led.ok for led in self.ledgers)

    @property
    def status(self) -> str:
        states = {led.status for led in self.ledgers}
        return PROBLEMS if PROBLEMS in states else UNSIGNED if UNSIGNED in states else VERIFIED


_ATTACK_NUMBERS = ("fpr_target", "epsilon_lower_bound_max", "confidence", "delta")
_ATTACK_COUNTS = ("members", "non_members", "steps")
_SETTING_NUMBERS = ("attack_auc", "tpr_at_fpr", "epsilon_lower_bound")


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_attack(obj: object) -> dict[str, Any]:
    """``obj`` (a parsed `fedrelapse audit attack` results file) if it has the shape the report reads; else ValueError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"the file holds a JSON {type(obj).__name__}, not the object `audit attack` writes")
    if "site" in obj and not isinstance(obj["site"], str):
        raise ValueError(f"field 'site' must be text, got {obj['site']!r}")
    for name in _ATTACK_NUMBERS:
        if name in obj and not _is_number(obj[name]):
            raise ValueError(f"field {name!r} must be a number, got {obj[name]!r}")
    for name in _ATTACK_COUNTS:
        if name in obj and not (isinstance(obj[name], int) and not isinstance(obj[name], bool)):
            raise ValueError(f"field {name!r} must be a whole number, got {obj[name]!r}")
    settings = obj.get("settings")
    if not isinstance(settings, list):
        raise ValueError("field 'settings' is missing or not a list")
    for i, row in enumerate(settings):
        where = f"settings[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"field {where} must be an object, got {row!r}")
        if not isinstance(row.get("setting"), str):
            raise ValueError(f"field {where}.setting is missing or not text")
        for name in _SETTING_NUMBERS:
            if name not in row:
                raise ValueError(f"field {where}.{name} is missing")
            if not _is_number(row[name]):
                raise ValueError(f"field {where}.{name} must be a number, got {row[name]!r}")
        if row.get("epsilon_accounted") is not None and not _is_number(row["epsilon_accounted"]):
            raise ValueError(f"field {where}.epsilon_accounted must be a number or null, got {row['epsilon_accounted']!r}")
    return obj


def build_report(ledgers: list[Path], *, public_key: Path | None, policy: SitePolicy | None, title: str, attacks: list[dict[str, Any]] | None = None) -> ReportData:
    """Verify every ledger and gather what the report shows. Reads files; writes nothing."""
    key = signing.load_public(public_key) if public_key is not None else None
    data = ReportData(
        title=title, generated=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), public_key=public_key,
        key_fingerprint=signing.fingerprint(key) if key is not None else "", policy=policy,
    )
    for path in ledgers:
        data.ledgers.append(_summarise(Path(path), key, policy))
    data.attacks = list(attacks or [])
    return data


def _verify(path: Path, key: Ed25519PublicKey | None) -> VerifyReport:
    """verify_ledger's report (its ``lines``: each entry's line in the file, the numbers its issues and checks use)."""
    try:
        return verify_ledger(path, key)
    except Exception as exc:  # a malformed ledger must still give a report that says so
        numbered, issues = parse_numbered(path, key)
        return VerifyReport(path, [e for _, e in numbered], [*issues, Issue(0, f"verification could not finish ({type(exc).__name__}: {exc}); treat this ledger as unverified")],
                            lines=[no for no, _ in numbered])


def _time(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _independent(rounds: list[RoundRow]) -> tuple[float, float]:
    """(RDP, PLD) ε of a run's rounds: the PLD figure is the one verify_ledger computed at the run's last entry, when it did."""
    steps: dict[tuple[float, float], int] = {}  # identical mechanisms compose as one with their steps added (much faster)
    for r in rounds:
        steps[(r.noise_multiplier, r.sample_rate)] = steps.get((r.noise_multiplier, r.sample_rate), 0) + r.steps
    try:
        return memoised_epsilon(steps, rounds[-1].delta)
    except Exception:  # a nonsensical mechanism (σ < 0, q > 1): shown as unknown; verify_ledger reports the entry
        return math.nan, math.nan


def _summarise(path: Path, key: Ed25519PublicKey | None, policy: SitePolicy | None) -> LedgerSummary:
    report = _verify(path, key)
    entries: list[LedgerEntry] = report.entries
    issues = [i for i in report.issues if not (key is None and i.line == _NO_KEY_LINE and "public key" in i.message)]
    checks = {(c.run_id, c.round, c.line): c for c in report.checks}
    rows: list[RoundRow] = []
    changes: list[CapChange] = []
    cap_total = policy.epsilon_cap_total if policy else None
    cap_run = policy.epsilon_cap_run if policy else None
    timeline: list[tuple[dt.datetime | None, float | None, float | None]] = [(None, cap_total, cap_run)]
    cap_run_at: dict[str, float | None] = {}
    for no, e in zip(report.lines, entries, strict=True):  # file line numbers, as verify_ledger's issues and checks use
        if e.kind == "policy":
            cap_total = e.cap_total if e.cap_total is not None else cap_total
            cap_run = e.cap_run if e.cap_run is not None else cap_run
            changes.append(CapChange(no, _time(e.time), e.time, e.cap_total, e.cap_run, e.note, e.key_id))
            timeline.append((_time(e.time), cap_total, cap_run))
        elif e.charged:  # a training round, or a noised metrics release (both count in ε)
            rows.append(RoundRow(
                no, e.run_id, e.round, _time(e.time), e.time, e.plan_hash, e.accountant, e.delta, e.noise_multiplier, e.sample_rate,
                e.steps, e.max_grad_norm, e.epsilon_run, e.epsilon_total, e.wall_time_s, checks.get((e.run_id, e.round, no)), kind=e.kind,
            ))
            cap_run_at[e.run_id] = cap_run
    if policy is not None:  # the caps in force by the rule the site itself applies
        cap_total, cap_run = current_caps(entries, cap_total=policy.epsilon_cap_total, cap_run=policy.epsilon_cap_run)
    runs = []
    for run_id in dict.fromkeys(r.run_id for r in rows):
        mine = [r for r in rows if r.run_id == run_id]
        rdp, pld = _independent(mine)
        last = mine[-1]
        if not math.isnan(pld) and last.epsilon_run < pld * (1 - 1e-3):
            issues.append(Issue(last.line, f"run {run_id}: recorded ε={last.epsilon_run:.4f} for the run is below the independent PLD figure {pld:.4f}: an under-count"))
        mech: dict[tuple[float, float, int, float], int] = {}
        for r in mine:
            k = (r.noise_multiplier, r.sample_rate, r.steps, r.max_grad_norm)
            mech[k] = mech.get(k, 0) + 1
        runs.append(RunSummary(
            run_id=run_id, rounds=mine, epsilon=last.epsilon_run, delta=last.delta, accountant=last.accountant, independent_rdp=rdp,
            independent_pld=pld, plan_hashes=list(dict.fromkeys(r.plan_hash for r in mine)),
            mechanisms=[Mechanism(s, q, t, c, n) for (s, q, t, c), n in mech.items()], started=mine[0].time_text, ended=last.time_text,
            cap_run=cap_run_at[run_id],
        ))
    if changes and policy is None:
        source = "the ledger's last cap change (site.yaml not given: caps it did not set are unknown)"
    elif changes:
        source = "site.yaml, as changed by the ledger's signed cap changes"
    elif policy is not None:
        source = "site.yaml (no cap change in the ledger)"
    else:
        source = "unknown: site.yaml not given and no cap change in the ledger"
    spent = rows[-1].epsilon_total if rows else 0.0
    notes = [f"run {r.run_id} spent ε = {fmt_eps(r.epsilon)}, above the per-run cap of {_fmt_cap(r.cap_run)} in force when it trained "
             "(check that the site.yaml given is the one the site used)" for r in runs if r.within_cap is False]
    if cap_total is not None and spent > cap_total * 1.001:
        notes.append(f"all runs together spent ε = {fmt_eps(spent)}, above the all-time cap of {_fmt_cap(cap_total)} now in force: no further training is possible")
    if cap_total is None:
        notes.append("the caps are unknown: give the site's site.yaml with --site to compare the spending with them")
    last_check = report.checks[-1] if report.checks else None
    status = PROBLEMS if issues else UNSIGNED if key is None else VERIFIED
    times = [e.time for e in entries]
    return LedgerSummary(
        path=path, status=status, issues=issues, notes=notes, signatures_checked=key is not None, entries=len(entries), head_hash=head_hash(entries),
        sites=list(dict.fromkeys(e.site for e in entries if e.site)), datasets=list(dict.fromkeys(e.dataset for e in entries if e.dataset)),
        key_ids=list(dict.fromkeys(e.key_id for e in entries if e.key_id)), runs=runs, rounds=rows, cap_changes=changes, cap_timeline=timeline,
        cap_total=cap_total, cap_run=cap_run, cap_source=source, epsilon_spent=spent, delta=rows[-1].delta if rows else (policy.delta if policy else None),
        epsilon_remaining=None if cap_total is None else max(0.0, cap_total - spent),
        independent_rdp=last_check.rdp if last_check else 0.0, independent_pld=last_check.pld if last_check else 0.0,
        first_time=times[0] if times else "", last_time=times[-1] if times else "",
    )


# ----------------------------------------------------------------------------------------------
# numbers and words


def fmt_eps(x: float | None) -> str:
    """ε as the report prints it everywhere (two decimals)."""
    if x is None:
        return "unknown"
    if math.isnan(x):
        return "n/a"
    return "∞" if math.isinf(x) else f"{x:.2f}"


def _when(text: str) -> str:
    """An entry's time for people: '2025-03-03 09:07:00' (UTC); as written when it is not a valid time."""
    when = _time(text)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if when else text


def _fmt_cap(x: float | None) -> str:
    return "unknown" if x is None else f"{x:g}"


def _factor(eps: float) -> str:
    """e^ε in words a non-engineer can read."""
    if math.isnan(eps) or eps > 700:
        return "an astronomically large factor"
    f = math.exp(eps)
    return f"{f:.2f}" if f < 10 else f"{f:,.0f}"


def _delta(d: float | None) -> str:
    return "unknown" if d is None else f"{d:g}"


def rounds_count(rows: list[RoundRow]) -> str:
    """How many rounds ``rows`` hold, with their noised metric releases after a plus ("5 + 5 releases")."""
    n = sum(r.kind == "round" for r in rows)
    return f"{n} + {len(rows) - n} releases" if len(rows) > n else str(n)


def _status_sentence(led: LedgerSummary) -> str:
    if led.status == VERIFIED:
        return "Verified: the hash chain, every signature, the order of entries and every ε figure check out."
    if led.status == UNSIGNED:
        return ("Signatures not checked (no public key given). The hash chain, the order of entries and every ε figure check out, "
                "but without the site's public key anyone who can edit the file could have rewritten it consistently.")
    n = len(led.issues)
    return f"Problems found: {n} issue{'s' if n != 1 else ''} (listed below). Do not rely on the figures of this ledger until they are explained."


def _site_paragraph(led: LedgerSummary) -> str:
    if not led.rounds:
        return f"Ledger {led.path.name} records no training round: no privacy budget has been spent on these patients."
    n_runs, n_rounds = len(led.runs), sum(r.kind == "round" for r in led.rounds)
    n_releases = len(led.rounds) - n_rounds
    releases = f" and {n_releases} noised metric release{'s' if n_releases != 1 else ''}" if n_releases else ""
    biggest = max(led.runs, key=lambda r: r.epsilon)
    text = (f"At site {led.site}, {n_runs} training run{'s' if n_runs != 1 else ''} with {n_rounds} round{'s' if n_rounds != 1 else ''}{releases} in all "
            f"{'has' if n_runs == 1 else 'have'} spent ε = {fmt_eps(led.epsilon_spent)} at δ = {_delta(led.delta)}. ")
    if led.cap_total is not None:
        text += f"The all-time cap is ε = {_fmt_cap(led.cap_total)}, so ε = {fmt_eps(led.epsilon_remaining)} remains for future runs on these patients. "
    else:
        text += "The all-time cap is not known to this report (give the site's site.yaml with --site). "
    text += (f"The largest single run, {biggest.run_id}, spent ε = {fmt_eps(biggest.epsilon)}" if n_runs > 1 else f"That run, {biggest.run_id}, spent ε = {fmt_eps(biggest.epsilon)}")
    if biggest.cap_run is not None:
        text += f" against a per-run cap of {_fmt_cap(biggest.cap_run)}" + (", which is ABOVE that cap. " if biggest.within_cap is False else ". ")
    else:
        text += ". "
    text += (f"In words: for a patient whose recordings were used in every run, anything that can be learned from what this site sent "
             f"is at most {_factor(led.epsilon_spent)} times (e^{fmt_eps(led.epsilon_spent)}) more or less likely than if that patient "
             f"had not taken part, except with probability {_delta(led.delta)}.")
    if led.status != VERIFIED:
        text += " These figures are as the ledger records them; see the verification status above before relying on them."
    return text


MEANING = [
    ("Privacy is protected per patient.", "Models are trained at this hospital with differential privacy, and the protected unit is the patient: "
     "all of one patient's recordings together, not a single recording. Only model updates and aggregate metrics leave the hospital; random noise "
     "is added to the updates, and to the metrics in runs with noised metrics (their releases are entries of this ledger)."),
    ("What (ε, δ) means.", "Whether or not any one patient's recordings were used changes the probability of any outcome by at most a factor e^ε, "
     "except with probability δ. An outcome is anything that can be seen from the site's updates: the trained model, and whatever anyone "
     "computes from it. So nobody can tell with confidence from the results whether a given patient took part, or learn much that is specific to them."),
    ("Smaller is better.", "ε = 0 would mean no influence at all. ε = 1 allows a factor e¹ ≈ 2.7; ε = 8 allows e⁸ ≈ 2,981. The guarantee is a "
     "worst case for the most exposed patient; typical patients are exposed far less. δ is the small chance that the guarantee fails and should be "
     "far below 1 divided by the number of patients (the default is 1e-5)."),
    ("ε adds up.", "Every round of every run on the same patients adds to ε. The site keeps an all-time total and refuses a round that would take a "
     "single run past the per-run cap, or all runs together past the all-time cap. Once the all-time cap is reached, no further training on these "
     "patients is possible unless you, the DPO, raise the cap, which is recorded in the ledger with your note."),
]

PROVES = [
    "Each entry was written by whoever holds the site's private signing key (when the public key was given and every signature checks), and "
    "no entry before the last one has been edited, removed, inserted or reordered since it was written.",
    "The recorded ε figures follow from the recorded mechanisms (noise σ, sampling rate q, steps, clipping norm C): this report recomputed them with "
    "two accountants from Google's dp-accounting library that share no code with the site's own (RDP and the tighter PLD).",
    "Every cap change is in the ledger, signed, with its time and the note given by whoever made it.",
]

DOES_NOT_PROVE = [
    "That training actually used the recorded mechanism. The ledger is the site software's own record; a modified site could record one thing and "
    "do another. It is evidence about the software that ran, not a measurement of the data that left.",
    "That no entry is missing at the end. Removing the last entries, or replacing the whole file, is not visible in the file itself. Keep the head "
    "hash and number of entries shown in this report, and check that the next report still contains them.",
    "Anything against the holder of the site key: whoever has the private key can write a consistent new ledger. Keep the key on the site host only.",
    "That the public key really is the site's: compare its fingerprint with the one the site's IT team gives you by another channel.",
    "Protection of what ε does not cover: unless a run noised them (its 'noised metrics' rows, counted in ε), evaluation metrics and the training "
    "loss are sent without noise (protected by aggregation and minimum patient counts only); and the standardisation of speech markers over all "
    "sessions before training.",
    "Protection across hospitals: a person treated at two hospitals is protected by each site separately, and in the worst case the two ε add up. "
    "A person recorded under two patient ids gets less protection than ε says.",
]

GLOSSARY = [
    ("σ (noise multiplier)", "how much random noise is added at each training step, relative to C. Larger means more privacy."),
    ("q (sampling rate)", "the chance that a given patient is used in one training step."),
    ("steps", "training steps per round at the site."),
    ("C (clipping norm)", "the most any one patient can change a training step before noise is added."),
    ("run / round", "a run is one training project from the coordinator; it has several rounds, each a few local training steps."),
    ("plan hash", "a fingerprint (SHA-256) of the researcher's training plan; equal hashes mean the same plan."),
    ("RDP, PLD", "two independent methods to compute ε from the mechanisms; the site's recorded ε must match RDP and may never be below PLD."),
    ("head hash", "the fingerprint of the ledger's last entry; it changes whenever anything before it changes."),
    ("noised metrics", "a release of one model's evaluation with random noise (σ = the plan's metrics noise multiplier, q = 1, one step), "
     "counted in ε like a training round; C does not apply to it (shown as 0). Rows 'r: noised metrics' are the model after round r."),
]


# ----------------------------------------------------------------------------------------------
# plots

RUN_COLOURS = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap; get_cmap is typed as the base Colormap
CAP_TOTAL_COLOUR, CAP_RUN_COLOUR = "#b03a2e", "#d68910"


def _label(text: str) -> str:
    return text.replace("$", r"\$")  # no mathtext from ledger strings


_EARLIEST, _LATEST = dt.datetime.min.replace(tzinfo=dt.UTC), dt.datetime.max.replace(tzinfo=dt.UTC)


def _pad(lo: dt.datetime, hi: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """``lo`` and ``hi`` widened a little, never past the dates Python can hold (a ledger time can be 9999-12-31)."""
    pad = max((hi - lo) * 0.04, dt.timedelta(minutes=1))
    return (lo - pad if lo - _EARLIEST > pad else _EARLIEST), (hi + pad if _LATEST - hi > pad else _LATEST)


PLOT_YEARS = (1970, 2999)  # times outside are left out of the plot (verify reports them); matplotlib cannot place 9999-12-31 plus a margin


def _plottable(when: dt.datetime | None) -> TypeGuard[dt.datetime]:
    return when is not None and PLOT_YEARS[0] <= when.year <= PLOT_YEARS[1]


def _cap(change: tuple[dt.datetime | None, float | None, float | None], which: int) -> float | None:
    """A ``cap_timeline`` entry's all-time (``which`` 1) or per-run (2) cap."""
    return change[1] if which == 1 else change[2]


def timeline_figure(led: LedgerSummary) -> Figure:
    """ε over time: one line per run, all runs together, and the caps as they changed."""
    fig, ax = plt.subplots(figsize=(9.5, 5.2), layout="constrained")
    rows = [r for r in led.rounds if _plottable(r.time)]
    caps = [c for c in led.cap_timeline[1:] if _plottable(c[0])]
    left_out = sum(1 for r in led.rounds if r.time is not None and not _plottable(r.time)) + \
        sum(1 for c in led.cap_timeline[1:] if c[0] is not None and not _plottable(c[0]))
    if left_out:
        fig.text(0.01, 0.005, f"{left_out} entr{'y' if left_out == 1 else 'ies'} with a time outside {PLOT_YEARS[0]}–{PLOT_YEARS[1]} left out of this plot",
                 fontsize=8, color=CAP_TOTAL_COLOUR, ha="left", va="bottom")
    times = [r.time for r in led.rounds if _plottable(r.time)] + [c[0] for c in led.cap_timeline[1:] if _plottable(c[0])]  # rows' and caps' times
    if not times:
        ax.text(0.5, 0.5, "No training round recorded", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        ax.set_axis_off()
        return fig
    lo, hi = _pad(min(times), max(times))
    top = 0.0
    for i, run in enumerate(led.runs):
        pts = [(r.time, r.epsilon_run) for r in run.rounds if _plottable(r.time)]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.step(xs, ys, where="post", marker="o",  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
                 ms=5, lw=1.6, color=RUN_COLOURS[i % 10], label=_label(f"run {run.run_id}"), zorder=4)
        top = max(top, *ys)
    if rows:
        ys = [r.epsilon_total for r in rows] + [rows[-1].epsilon_total]
        ax.step([r.time for r in rows] + [hi], ys, where="post", color="black", lw=2.4, alpha=0.8, label="all runs together", zorder=2)  # type: ignore[arg-type]  # datetimes, as above
        top = max(top, *ys)
    for idx, (colour, style, name) in enumerate(((CAP_TOTAL_COLOUR, "--", "all-time cap"), (CAP_RUN_COLOUR, ":", "per-run cap")), start=1):
        segs = [(lo, _cap(led.cap_timeline[0], idx))] + [(c[0], _cap(c, idx)) for c in caps] + [(hi, _cap(caps[-1] if caps else led.cap_timeline[0], idx))]
        known = [(x, y) for x, y in segs if y is not None]
        if known:
            ax.step([x for x, _ in known], [y for _, y in known], where="post",  # type: ignore[arg-type]  # datetimes, as above
                    color=colour, ls=style, lw=2, label=name)
            top = max(top, *(y for _, y in known))
    for c in caps:
        ax.axvline(c[0], color="grey",  # type: ignore[arg-type]  # a datetime, as above
                   lw=0.8, alpha=0.6)
        ax.annotate("cap change", (c[0], 0), xytext=(3, 4), textcoords="offset points", rotation=90, fontsize=8, color="grey", va="bottom")
    ax.set_xlim(lo, hi)  # type: ignore[arg-type]  # datetimes, as above
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    locator = mdates.AutoDateLocator(tz=dt.UTC, maxticks=8)
    # intervals that keep every span within 8 ticks (matplotlib's own leave gaps, e.g. 2-4 minutes, and warn on stderr)
    locator.intervald[mdates.SECONDLY] = locator.intervald[mdates.MINUTELY] = [1, 2, 5, 10, 15, 20, 30, 60, 120]
    locator.intervald[mdates.HOURLY] = [1, 2, 3, 4, 6, 12, 24, 48]
    locator.intervald[mdates.MONTHLY] = [1, 2, 3, 4, 6, 12, 24]
    ax.xaxis.set_major_locator(locator)  # dates spelled out: "05" alone could be a day or an hour
    span = hi - lo
    fmt = "%d %b %Y" if span > dt.timedelta(days=3) else "%d %b %H:%M" if span > dt.timedelta(minutes=30) else "%d %b %H:%M:%S"
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=dt.UTC))
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("ε spent (lower = stronger protection)")
    ax.set_title(_label(f"Site {led.site}: privacy loss ε over time (δ = {_delta(led.delta)})"), loc="left", fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def runs_figure(led: LedgerSummary) -> Figure:
    """ε of each run (one bar each, oldest on top), with the per-run cap in force when it trained."""
    n = len(led.runs)
    fig, ax = plt.subplots(figsize=(9.5, 1.6 + 0.55 * max(n, 2)), layout="constrained")
    if not led.runs:
        ax.text(0.5, 0.5, "No training run recorded", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        ax.set_axis_off()
        return fig
    ys = list(range(n))
    eps = [r.epsilon for r in led.runs]
    colours = [RUN_COLOURS[i % 10] if r.within_cap is not False else CAP_TOTAL_COLOUR for i, r in enumerate(led.runs)]
    ax.barh(ys, eps, color=colours, height=0.55, edgecolor="black", linewidth=0.5)
    caps = [(y, r.cap_run) for y, r in zip(ys, led.runs, strict=True) if r.cap_run is not None]
    cap_of = dict(caps)
    right = max([*eps, *(c for _, c in caps)]) * 1.3 or 1.0
    for y, e, run in zip(ys, eps, led.runs, strict=True):  # the value right of the bar and of its cap mark, never across them
        over = run.within_cap is False
        cap = cap_of.get(y)
        label = f"ε = {fmt_eps(e)}" + (" (above cap)" if over else "")
        if cap is None or e >= cap or cap - e > 0.17 * right:  # right of the bar: the cap mark is not in the way
            ax.text(e + 0.012 * right, y, label, ha="left", va="center", color=CAP_TOTAL_COLOUR if over else "black", fontsize=9.5, weight="bold" if over else "normal")
        elif e > 0.25 * right:  # inside the bar's end, so it cannot be read as the cap's value
            ax.text(e - 0.012 * right, y, label, ha="right", va="center", color="white", fontsize=9.5, weight="bold")
        else:
            ax.text(cap + 0.012 * right, y, label, ha="left", va="center", fontsize=9.5)
    handles = []
    if caps:
        ax.vlines([c for _, c in caps], [y - 0.42 for y, _ in caps], [y + 0.42 for y, _ in caps], color=CAP_RUN_COLOUR, lw=3, zorder=3)
        handles.append(Line2D([], [], color=CAP_RUN_COLOUR, lw=3, label="per-run cap when the run trained"))
    ax.set_yticks(ys, [_label(r.run_id if len(r.run_id) <= 32 else r.run_id[:31] + "…") for r in led.runs])
    ax.set_ylim((1.0, -1.0) if n == 1 else (n - 0.5, -0.5))  # oldest run on top, as in the tables
    ax.set_xlim(0, right)
    ax.set_xlabel("ε spent by the run (lower = stronger protection)")
    ax.set_title(_label(f"Site {led.site}: ε spent by each run (δ = {_delta(led.delta)})"), loc="left", fontsize=12)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1c2833;background:#f4f6f7;margin:0;line-height:1.5}
main{max-width:1040px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:1.9em;margin:0 0 4px}h2{font-size:1.4em;border-bottom:2px solid #d5dbdb;padding-bottom:4px;margin-top:2em}
h3{font-size:1.1em;margin-top:1.6em}.meta{color:#566573;font-size:.92em;margin:0}
.status{border-radius:8px;padding:14px 18px;margin:18px 0;border:2px solid}
.status h2,.status h3{border:0;margin:0 0 6px;padding:0}
.ok{background:#e9f7ef;border-color:#27ae60}.warn{background:#fef5e7;border-color:#f39c12}.bad{background:#fdedec;border-color:#c0392b}
.badge{display:inline-block;border-radius:4px;padding:1px 8px;font-weight:600;font-size:.9em;color:#fff}
.badge.ok{background:#1e8449}.badge.warn{background:#b9770e}.badge.bad{background:#b03a2e}
table{border-collapse:collapse;width:100%;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #d5dbdb;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eaeded}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:"SFMono-Regular",Consolas,"Liberation Mono",monospace;font-size:.88em;word-break:break-all}
figure{margin:12px 0}figure img{max-width:100%;height:auto;border:1px solid #e5e8e8}figcaption{color:#566573;font-size:.9em}
.plain{background:#f8f9f9;border-left:4px solid #2e86c1;padding:6px 18px;margin:12px 0}
.plain p{margin:.6em 0}ul.tight li{margin:.3em 0}.muted{color:#566573}
@media print{body{background:#fff}main{padding:0}.status{break-inside:avoid}figure{break-inside:avoid}}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cls(status: str) -> str:
    return {VERIFIED: "ok", UNSIGNED: "warn"}.get(status, "bad")


def _table(head: list[str] | None, rows: list[list[str]], num: set[int] | frozenset[int] = frozenset()) -> str:
    """Body cells are HTML already escaped by the caller; header cells are plain text and escaped here."""
    if head is None:
        body = "".join(f"<tr><th scope='row'>{r[0]}</th>" + "".join(f"<td>{c}</td>" for c in r[1:]) + "</tr>" for r in rows)
        return f"<table><tbody>{body}</tbody></table>"
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _short(h: str, n: int = 16) -> str:
    return f'<code title="{_e(h)}">{_e(h[:n])}…</code>' if len(h) > n else f"<code>{_e(h)}</code>"


def _verification_html(led: LedgerSummary) -> str:
    cls = _cls(led.status)
    out = [f'<div class="status {cls}"><h3><span class="badge {cls}">{_e(led.status.upper())}</span> {_e(led.path.name)}</h3>',
           f"<p>{_e(_status_sentence(led))}</p>"]
    if led.issues:
        out.append(_table(["line", "problem"], [[_e(i.line or "-"), _e(i.message)] for i in led.issues], {0}))
    if led.notes:
        out.append("<p><strong>Please look at:</strong></p><ul class='tight'>" + "".join(f"<li>{_e(n)}</li>" for n in led.notes) + "</ul>")
    checked = ["the hash chain: no entry before the last was edited, removed, inserted or reordered",
               "every signature against the site's public key" if led.signatures_checked else "signatures: NOT checked, no public key was given",
               "the order of rounds and times", "every recorded ε against two independent accountants (dp-accounting RDP and PLD)"]
    out.append("<p>What was checked:</p><ul class='tight'>" + "".join(f"<li>{_e(c)}</li>" for c in checked) + "</ul>")
    out.append(f"<p class='muted'>{led.entries} entries · head hash <code>{_e(led.head_hash)}</code>"
               + (f" · signed with key id {', '.join(f'<code>{_e(k)}</code>' for k in led.key_ids)}" if led.key_ids else "") + "</p></div>")
    return "".join(out)


def _ledger_html(led: LedgerSummary, n: int) -> str:
    out = [f'<section id="ledger-{n}"><h2>Site {_e(led.site)}: <span class="mono">{_e(led.path)}</span></h2>', _verification_html(led)]
    facts = [
        ["ε spent, all runs (recorded)", f"{_e(fmt_eps(led.epsilon_spent))} at δ = {_e(_delta(led.delta))}"],
        ["ε recomputed independently", f"RDP {_e(fmt_eps(led.independent_rdp))} · PLD {_e(fmt_eps(led.independent_pld))} (lower bound)"],
        ["all-time cap in force", _e(_fmt_cap(led.cap_total))],
        ["per-run cap in force", _e(_fmt_cap(led.cap_run))],
        ["remaining before the all-time cap", _e(fmt_eps(led.epsilon_remaining))],
        ["caps read from", _e(led.cap_source)],
        ["dataset fingerprint", ", ".join(_short(d, 24) for d in led.datasets) or "-"],
        ["first / last entry", f"{_e(_when(led.first_time) or '-')} / {_e(_when(led.last_time) or '-')} (UTC)"],
    ]
    out.append("<h3>Budget at a glance</h3>" + _table(None, facts))
    out.append("<h3>Privacy loss over time</h3><figure>"
               f'<img alt="ε over time for site {_e(led.site)}" src="data:image/png;base64,{_png(timeline_figure(led))}">'
               "<figcaption>Each coloured line is one run's ε after each of its rounds; the black line is all runs together, which is what the "
               "all-time cap (dashed red) limits. The dotted orange line is the per-run cap, which limits each coloured line. Grey vertical "
               "lines mark cap changes.</figcaption></figure>")
    out.append("<h3>ε per run</h3><figure>"
               f'<img alt="ε per run for site {_e(led.site)}" src="data:image/png;base64,{_png(runs_figure(led))}">'
               "<figcaption>The ε each run spent on its own; the orange mark is the per-run cap in force when it trained. "
               "A red bar would be a run above its cap.</figcaption></figure>")
    out.append("<h3>Runs</h3>")
    if led.runs:
        rows = [[f"<code>{_e(r.run_id)}</code>", _e(_when(r.started)), _e(_when(r.ended)), _e(rounds_count(r.rounds)), _e(fmt_eps(r.epsilon)),
                 f"{_e(fmt_eps(r.independent_rdp))} / {_e(fmt_eps(r.independent_pld))}", _e(_delta(r.delta)), _e(r.accountant),
                 _e(_fmt_cap(r.cap_run)), {True: "yes", False: "<strong>NO</strong>", None: "unknown"}[r.within_cap]] for r in led.runs]
        out.append(_table(["run id", "first round (UTC)", "last round (UTC)", "rounds", "ε of the run", "independent RDP / PLD", "δ", "accountant",
                           "per-run cap then", "within cap"], rows, {3, 4, 5, 6, 8}))
    else:
        out.append("<p>No training run is recorded in this ledger.</p>")
    if led.rounds:
        out.append("<h3>Mechanisms, round by round</h3><p class='muted'>σ: noise multiplier · q: sampling rate per step · steps: DP-SGD steps in "
                   "the round · C: clipping norm. ε after the round: for its run, and for all runs together, with the independent recomputation.</p>")
        rows = [[_e(r.line), _e(_when(r.time_text)), f"<code>{_e(r.run_id)}</code>", _e(r.label), f"{r.noise_multiplier:.4f}", f"{r.sample_rate:.4f}",
                 _e(r.steps), f"{r.max_grad_norm:g}", _e(fmt_eps(r.epsilon_run)), _e(fmt_eps(r.epsilon_total)),
                 (f"{_e(fmt_eps(r.check.rdp))} / {_e(fmt_eps(r.check.pld))}" if r.check else "-")] for r in led.rounds]
        out.append(_table(["line", "time (UTC)", "run", "round", "σ", "q", "steps", "C", "ε run", "ε all runs", "independent RDP / PLD"],
                          rows, {0, 3, 4, 5, 6, 7, 8, 9, 10}))
        out.append("<h3>Training plans</h3><p class='muted'>The SHA-256 of the researcher's training plan each round ran (its canonical JSON, "
                   "not the file's bytes). It is <strong>not</strong> <code>sha256sum config.yaml</code>: compare it with <code>plan_hash</code> "
                   "in the run folder's <code>run.json</code> (and the site's <code>approved-plans.json</code>).</p>")
        plans: dict[str, list[RoundRow]] = {}
        for r in led.rounds:
            plans.setdefault(r.plan_hash, []).append(r)
        out.append(_table(["plan hash", "runs", "rounds"], [[f"<code>{_e(h or '(none)')}</code>", ", ".join(f"<code>{_e(x)}</code>" for x in dict.fromkeys(r.run_id for r in rs)),
                                                          _e(rounds_count(rs))] for h, rs in plans.items()], {2}))
    out.append("<h3>Cap changes</h3>")
    if led.cap_changes:
        rows = [[_e(c.line), _e(_when(c.time_text)), _e(_fmt_cap(c.cap_total) if c.cap_total is not None else "unchanged"),
                 _e(_fmt_cap(c.cap_run) if c.cap_run is not None else "unchanged"), _e(c.note or "(no note)"), f"<code>{_e(c.key_id)}</code>"] for c in led.cap_changes]
        out.append(_table(["line", "time (UTC)", "all-time cap from then", "per-run cap from then", "note", "key id"], rows, {0, 2, 3}))
    else:
        out.append("<p>No cap change is recorded: the caps are those of the site's site.yaml.</p>")
    out.append("</section>")
    return "".join(out)


def render_html(data: ReportData) -> str:
    """One self-contained HTML document: inline CSS, plots as data: URIs, no scripts, no links out."""
    cls = _cls(data.status)
    headline = {VERIFIED: "Everything verified", UNSIGNED: "Verified, but signatures were not checked", PROBLEMS: "Problems found"}[data.status]
    key = (f"public key <code>{_e(data.public_key)}</code> (fingerprint <code>{_e(data.key_fingerprint)}</code>)" if data.public_key
           else "<strong>no public key given: signatures not checked</strong>")
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(data.title)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{_e(data.title)}</h1><p class='meta'>Generated {_e(data.generated)} by <code>fedrelapse audit report</code> · "
        f"{len(data.ledgers)} ledger{'s' if len(data.ledgers) != 1 else ''} · {key}</p></header>",
        f'<section class="status {cls}" id="status"><h2><span class="badge {cls}">{_e(data.status.upper())}</span> {_e(headline)}</h2><ul class="tight">',
    ]
    for led in data.ledgers:
        notes = "".join(f"<br><em>Please look at:</em> {_e(n)}" for n in led.notes)
        parts.append(f"<li><strong>{_e(led.site)}</strong> (<span class='mono'>{_e(led.path.name)}</span>): {_e(_status_sentence(led))}{notes}</li>")
    parts.append("</ul></section>")
    rows = [[_e(led.site), f"<span class='mono'>{_e(led.path.name)}</span>", f'<span class="badge {_cls(led.status)}">{_e(led.status)}</span>', _e(len(led.runs)),
             _e(rounds_count(led.rounds)), _e(fmt_eps(led.epsilon_spent)), _e(_delta(led.delta)), _e(_fmt_cap(led.cap_total)), _e(fmt_eps(led.epsilon_remaining)),
             _e(_fmt_cap(led.cap_run))] for led in data.ledgers]
    parts.append("<section id='summary'><h2>Summary</h2>" + _table(
        ["site", "ledger", "status", "runs", "rounds", "ε spent", "δ", "all-time cap", "remaining", "per-run cap"], rows, {3, 4, 5, 6, 7, 8, 9}) + "</section>")
    if data.attacks:
        parts.append("<section id='attack'><h2>Empirical privacy audit (membership inference)</h2>"
                     "<p>A simulated attacker tried to tell, from the trained model alone, which patients were in the training data. "
                     "An attack AUC near 0.5 means it could not; the empirical lower bound is the ε the attack <em>proves</em> at 95% confidence "
                     "and must stay below the accounted ε. With few patients the bound is weak: a small value does not prove privacy on its own.</p>")
        for att in data.attacks:
            rows_a = [[_e(r["setting"]), _e(fmt_eps(r.get("epsilon_accounted") if r.get("epsilon_accounted") is not None else float("inf"))),
                       _e(f"{r['attack_auc']:.3f}"), _e(f"{r['tpr_at_fpr']:.3f}"), _e(f"{r['epsilon_lower_bound']:.2f}")] for r in att.get("settings", [])]
            best = float(att.get("epsilon_lower_bound_max", 0.0))
            parts.append(f"<h3>Site {_e(att.get('site', '?'))}: {_e(att.get('members', '?'))} member and {_e(att.get('non_members', '?'))} held-out patients, "
                         f"{_e(att.get('steps', '?'))} steps (the largest bound these counts allow: ε ≥ {_e(f'{best:.2f}')})</h3>")
            parts.append(_table(["training", "accounted ε", "attack AUC", f"TPR at FPR ≤ {att.get('fpr_target', 0.1)}", "empirical ε lower bound"], rows_a, {1, 2, 3, 4}))
        parts.append("</section>")
    parts.append("<section id='meaning'><h2>What the numbers mean, in plain language</h2><div class='plain'>")
    parts += [f"<p><strong>{_e(h)}</strong> {_e(t)}</p>" for h, t in MEANING]
    parts.append("</div><h3>At this site</h3>")
    parts += [f"<p>{_e(_site_paragraph(led))}</p>" for led in data.ledgers]
    parts.append("</section>")
    parts += [_ledger_html(led, n) for n, led in enumerate(data.ledgers, start=1)]
    parts.append("<section id='proof'><h2>What the ledger proves, and what it does not</h2><h3>It shows</h3><ul class='tight'>")
    parts += [f"<li>{_e(t)}</li>" for t in PROVES]
    parts.append("</ul><h3>It does not show</h3><ul class='tight'>")
    parts += [f"<li>{_e(t)}</li>" for t in DOES_NOT_PROVE]
    parts.append("</ul></section><section id='glossary'><h2>Glossary</h2>")
    parts.append(_table(["term", "meaning"], [[f"<strong>{_e(a)}</strong>", _e(b)] for a, b in GLOSSARY]))
    parts.append("</section><footer><p class='muted'>This file is self-contained: it loads nothing from the network. "
                 "Recreate it with <code>fedrelapse audit report</code>; check a ledger on its own with <code>fedrelapse audit verify</code>.</p></footer>"
                 "</main></body></html>\n")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# PDF

A4 = (8.27, 11.69)


class _LineStyle(TypedDict, total=False):
    """How :meth:`_TextPages.line` sets a line (its keyword arguments)."""

    size: float
    weight: str
    family: str
    colour: str
    gap: float


class _TextPages:
    """Flowing text on A4 pages: headings, wrapped paragraphs and monospace tables."""

    def __init__(self, pdf: PdfPages, footer: str) -> None:
        self.pdf, self.footer, self.y, self.page = pdf, footer, 0.0, 0
        self.fig: Figure | None = None

    def _new(self) -> Figure:
        if self.fig is not None:
            self._close()
        self.page += 1
        self.fig = fig = plt.figure(figsize=A4)
        self.y = 0.94
        return fig

    def _close(self) -> None:
        assert self.fig is not None
        self.fig.text(0.08, 0.03, f"{self.footer} · page {self.page}", fontsize=7, color="grey", parse_math=False)
        self.pdf.savefig(self.fig)
        plt.close(self.fig)
        self.fig = None

    def line(self, text: str, *, size: float = 9.5, weight: str = "normal", family: str = "sans-serif", colour: str = "black", gap: float = 1.45) -> None:
        step = size * gap / 72 / A4[1]
        if self.fig is None or self.y - step < 0.06:
            self._new()
        assert self.fig is not None
        self.fig.text(0.08, self.y, text, fontsize=size, weight=weight, family=family, color=colour, va="top", parse_math=False)
        self.y -= step

    def keep(self, lines: int) -> None:
        """Start a new page unless ``lines`` body lines still fit on this one (keeps a heading with its table)."""
        if self.fig is not None and self.y - min(lines, 40) * 9.5 * 1.45 / 72 / A4[1] < 0.06:
            self._new()

    def heading(self, text: str, size: float = 14) -> None:
        if self.fig is not None and self.y < 0.2:
            self._new()
        self.space(0.6)
        self.line(text, size=size, weight="bold")
        self.space(0.3)

    def para(self, text: str, *, width: int = 100, indent: str = "", **kw: Unpack[_LineStyle]) -> None:
        for i, chunk in enumerate(textwrap.wrap(text, width=width - len(indent)) or [""]):
            self.line((indent if i == 0 else " " * len(indent)) + chunk, **kw)
        self.space(0.35)

    def bullet(self, text: str, **kw: Unpack[_LineStyle]) -> None:
        self.para(text, indent="•  ", **kw)

    def table(self, head: list[str], rows: list[list[str]], width: int = 116) -> None:
        cols = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
        while sum(cols) + 2 * len(cols) > width and max(cols) > 8:
            cols[cols.index(max(cols))] -= 1
        fmt = "  ".join(f"{{:<{w}}}" for w in cols)

        def cut(cells: list[str]) -> list[str]:
            return [str(c) if len(str(c)) <= w else str(c)[: w - 1] + "…" for c, w in zip(cells, cols, strict=True)]

        self.line(fmt.format(*cut(head)), size=7.5, family="monospace", weight="bold")
        for r in rows:
            self.line(fmt.format(*cut(r)), size=7.5, family="monospace")
        self.space(0.6)

    def space(self, lines: float) -> None:
        self.y -= lines * 9.5 * 1.45 / 72 / A4[1]

    def figure(self, fig: Figure) -> None:
        if self.fig is not None:
            self._close()
        self.page += 1  # no footer on plots: it would sit on the axis label
        self.pdf.savefig(fig)
        plt.close(fig)

    def finish(self) -> None:
        if self.fig is not None:
            self._close()


def render_pdf(data: ReportData, path: Path) -> None:
    """The same report as a PDF (text pages and the plots), via matplotlib's PdfPages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(path) as pdf:
        info = pdf.infodict()
        info["Title"], info["Creator"] = data.title, "fedrelapse audit report"
        t = _TextPages(pdf, f"{data.title} · {data.generated}")
        t.line(data.title, size=18, weight="bold", gap=1.6)
        t.line(f"Generated {data.generated} by fedrelapse audit report", size=9, colour="grey")
        t.line(f"Public key: {data.public_key} (fingerprint {data.key_fingerprint})" if data.public_key else "No public key given: signatures not checked",
               size=9, colour="grey")
        headline = {VERIFIED: "EVERYTHING VERIFIED", UNSIGNED: "VERIFIED, BUT SIGNATURES NOT CHECKED", PROBLEMS: "PROBLEMS FOUND"}[data.status]
        t.heading(f"Status: {headline}", size=15)
        for led in data.ledgers:
            t.bullet(f"{led.site} ({led.path.name}): {_status_sentence(led)}", colour={"ok": "#1e8449", "warn": "#9a640b"}.get(_cls(led.status), "#b03a2e"))
            for i in led.issues:
                t.para(f"line {i.line or '-'}: {i.message}", indent="      ", colour="#b03a2e")
            for note in led.notes:
                t.para(f"Please look at: {note}", indent="      ", colour="#9a640b")
        t.heading("Summary")
        t.table(["site", "status", "runs", "rounds", "ε spent", "δ", "all-time cap", "remaining", "per-run cap"],
                [[led.site, led.status, str(len(led.runs)), rounds_count(led.rounds), fmt_eps(led.epsilon_spent), _delta(led.delta), _fmt_cap(led.cap_total),
                  fmt_eps(led.epsilon_remaining), _fmt_cap(led.cap_run)] for led in data.ledgers])
        for att in data.attacks:
            t.heading(f"Empirical privacy audit: site {att.get('site', '?')} ({att.get('steps', '?')} steps)")
            t.table(["training", "accounted ε", "attack AUC", "TPR@FPR≤0.1", "ε lower bound"],
                    [[r["setting"], fmt_eps(r["epsilon_accounted"] if r.get("epsilon_accounted") is not None else float("inf")), f"{r['attack_auc']:.3f}",
                      f"{r['tpr_at_fpr']:.3f}", f"{r['epsilon_lower_bound']:.2f}"] for r in att.get("settings", [])])
        t.heading("What the numbers mean, in plain language")
        for h, text in MEANING:
            t.line(h, weight="bold")
            t.para(text)
        t.heading("At this site", size=12)
        for led in data.ledgers:
            t.para(_site_paragraph(led))
        for led in data.ledgers:
            t.heading(f"Site {led.site}: {led.path.name}")
            t.para(_status_sentence(led), weight="bold")
            t.para(f"{led.entries} entries · head hash {led.head_hash} · key id {', '.join(led.key_ids) or '-'}", size=8)
            t.para(f"ε spent (recorded) {fmt_eps(led.epsilon_spent)} at δ = {_delta(led.delta)}; independent RDP {fmt_eps(led.independent_rdp)}, "
                   f"PLD {fmt_eps(led.independent_pld)}. All-time cap {_fmt_cap(led.cap_total)}, per-run cap {_fmt_cap(led.cap_run)}, "
                   f"remaining {fmt_eps(led.epsilon_remaining)}. Caps read from {led.cap_source}.")
            if led.runs:
                t.keep(len(led.runs) + 3)
                t.line("Runs", weight="bold")
                t.table(["run id", "first round (UTC)", "last round (UTC)", "rounds", "ε run", "RDP / PLD", "δ", "cap then", "within"],
                        [[r.run_id, _when(r.started), _when(r.ended), rounds_count(r.rounds), fmt_eps(r.epsilon), f"{fmt_eps(r.independent_rdp)} / {fmt_eps(r.independent_pld)}",
                          _delta(r.delta), _fmt_cap(r.cap_run), {True: "yes", False: "NO", None: "?"}[r.within_cap]] for r in led.runs])
                t.keep(len(led.rounds) + 3)
                t.line("Mechanisms, round by round", weight="bold")
                t.table(["line", "time (UTC)", "run", "round", "σ", "q", "steps", "C", "ε run", "ε all", "RDP / PLD"],
                        [[str(r.line), _when(r.time_text), r.run_id, r.label, f"{r.noise_multiplier:.4f}", f"{r.sample_rate:.4f}", str(r.steps),
                          f"{r.max_grad_norm:g}", fmt_eps(r.epsilon_run), fmt_eps(r.epsilon_total),
                          f"{fmt_eps(r.check.rdp)} / {fmt_eps(r.check.pld)}" if r.check else "-"] for r in led.rounds])
                t.line("Training plans (plan hash: runs)", weight="bold")
                for h in dict.fromkeys(r.plan_hash for r in led.rounds):
                    t.para(f"{h or '(none)'}: {', '.join(dict.fromkeys(r.run_id for r in led.rounds if r.plan_hash == h))}", size=7.5, family="monospace", width=120)
            t.keep(2 * len(led.cap_changes) + 3)
            t.line("Cap changes", weight="bold")
            if led.cap_changes:
                for c in led.cap_changes:  # notes in full: they are the DPO's record of why
                    t.bullet(f"line {c.line}, {_when(c.time_text)} UTC: all-time cap {_fmt_cap(c.cap_total) if c.cap_total is not None else 'unchanged'}, "
                             f"per-run cap {_fmt_cap(c.cap_run) if c.cap_run is not None else 'unchanged'}. Note: {c.note or '(no note)'}")
            else:
                t.para("None recorded: the caps are those of the site's site.yaml.")
            t.figure(timeline_figure(led))
            t.figure(runs_figure(led))
        t.heading("What the ledger proves, and what it does not")
        t.line("It shows", weight="bold")
        for text in PROVES:
            t.bullet(text)
        t.line("It does not show", weight="bold")
        for text in DOES_NOT_PROVE:
            t.bullet(text)
        t.heading("Glossary", size=12)
        for a, b in GLOSSARY:
            t.bullet(f"{a}: {b}")
        t.finish()
