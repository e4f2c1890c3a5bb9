"""FedAvg weighted by patients, aware of per-site refusals and per-site privacy spend.

Sites reply with a DP-trained update and aggregate metrics, or with a structured refusal.
Refusals are kept (per site, with the reason) and left out of the average; ε is never
averaged across sites: each site's own figure is kept as it reported it.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.config import FederationConfig
from shared.errors import FederationError
from shared.params import PACKED, Layout, packed_vector, unflatten
from shared.privacy import noised_metrics as NM  # noqa: N812


@dataclass
class SiteReport:
    """What one site said in one round (aggregate numbers only)."""

    site: str
    metrics: dict[str, float] = field(default_factory=dict)
    refusal_code: str | None = None
    refusal_reason: str | None = None
    error: str | None = None
    ledger_head: str | None = None  # hash of the site's newest ledger entry (for the DPO to compare)
    node: int = 0  # Flower node id the reply came from (0: not known)
    evaluation: dict[str, float] | None = None  # a train reply's evaluation of the model it received (with-next-round), None if it carried none
    evaluation_refusal: tuple[str, str] | None = None  # ... or (code, reason) of the site's refusal to release it


@dataclass
class RoundLog:
    train: list[SiteReport] = field(default_factory=list)
    evaluate: list[SiteReport] = field(default_factory=list)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, poll_s: float = 0.5, *, give_up: bool = True) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; FederationError after timeout.

    Flower's own sampling waits forever; a consortium run must fail with a reason instead.
    With ``give_up=False`` the ids connected at the deadline are returned (perhaps fewer than
    ``minimum``, perhaps none) instead of the error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            if not give_up:
                return nodes
            raise FederationError(
                f"Only {len(nodes)} of the {minimum} sites required (`federation.min_nodes`) connected "
                f"within {timeout_s:.0f} s; check that the site clients are running."
            )
        time.sleep(poll_s)


def sample_connected(nodes: list[int], fraction: float, minimum: int) -> list[int]:
    """The nodes asked in a phase, drawn from ``nodes`` (the ids connected when the phase starts):
    Flower's rule (``int(len(nodes) * fraction)``, at least ``minimum``; all of them when fewer
    are there) and its draw (``random.sample``, so seeding Python's ``random`` repeats it), but
    without the unbounded wait of Flower's ``sample_nodes``, which asks the Grid again and sleeps
    while fewer than ``minimum`` are connected: a site that left between the two looks hung the
    coordinator. A site that left after this list was taken simply does not answer (its report
    says so) and the round goes on without it."""
    if fraction == 0.0:
        return []
    size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    return random.sample(nodes, size)


TEXT_LIMIT = 500  # characters kept of a site's refusal reason or error (console, metrics.json, summary.json)
QUOTE_LIMIT = 40  # characters of a site-chosen record or key name quoted in a rejection

# Terminal escape sequences (CSI, OSC up to its terminator, 8-bit CSI) and the characters a site's
# text may not carry to a terminal or a file: C0/C1 controls, DEL, and invisible formatting
# (zero-width, bidirectional overrides, line/paragraph separators).
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x9b[0-?]*[ -/]*[@-~]")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")
_LEDGER_HEAD = re.compile(r"[0-9a-f]{64}")  # a SHA-256 in hex (shared.privacy.ledger; GENESIS for an empty ledger)
_REFUSAL_CODE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def one_line(text: str, limit: int = TEXT_LIMIT) -> str:
    """A site's text (refusal reason, error) made safe to print and store: terminal escape
    sequences removed, any other control or invisible character a space, at most ``limit``
    characters (a longer text is cut and says how long it was)."""
    text = _UNPRINTABLE.sub(" ", _ESCAPES.sub("", text)).strip()
    return text if len(text) <= limit else f"{text[:limit]}… (cut from {len(text)} characters)"


def quoted(names: Iterable[str], limit: int = 5) -> str:
    """Site-chosen record or key names, cleaned and shortened, for a rejection sentence."""
    names = list(names)
    shown = [one_line(n, QUOTE_LIMIT) for n in names[:limit]]
    return str(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def short_reason(reason: str, limit: int = 200) -> str:
    """The last line of a transport error (Flower sends whole tracebacks), without escape
    sequences or control characters, at most ``limit`` characters.

    Only this line is kept in the run folder: a site's traceback names its files and code.
    """
    lines = [line.strip() for line in _ESCAPES.sub("", reason).splitlines() if line.strip()]
    last = lines[-1].removesuffix("'>").strip() if lines else "no reason given"
    return one_line(last, limit)


def contested_names(claims: Iterable[tuple[int, object]]) -> dict[str, list[int]]:
    """The names claimed by more than one node in one phase's replies ((node, claimed name)
    pairs), each with the node ids that claimed it."""
    by_name: dict[str, set[int]] = {}
    for node, name in claims:
        if isinstance(name, str):
            by_name.setdefault(name, set()).add(node)
    return {name: sorted(nodes) for name, nodes in by_name.items() if len(nodes) > 1}


def claim_name(names: dict[int, str], node: int, claimed: object, contested: Mapping[str, list[int]]) -> tuple[str, str | None]:
    """The name a reply from ``node`` is recorded under, and why the name it claims is refused
    (None if it is accepted).

    ``names`` maps node ids to site names for the whole run. A node's name is pinned the first
    time it claims an acceptable one no other node holds (the pre-flight query, or its first
    reply); later it must claim the same one. A pinned name stays its node's; a new name that
    several nodes claim in one phase (``contested``) is given to none of them. A refused
    claim is recorded under the node's own pinned name, or as ``node-<id>``.
    """
    pinned = names.get(node)
    label = pinned or f"node-{node}"
    problem = P.name_problem(claimed)
    if problem:
        return label, problem
    assert isinstance(claimed, str)  # name_problem refuses anything else
    if pinned == claimed:
        return label, None
    owner = next((n for n, s in names.items() if s == claimed), None)
    whose = f", which is node {owner}'s in this run" if owner is not None else ""
    if pinned is not None:
        return label, f"node {node} is site {pinned!r} in this run and now claims the name {claimed!r}{whose}"
    if owner is not None:
        return label, f"node {node} claims the name {claimed!r}{whose}"
    if claimed in contested:
        return label, f"nodes {', '.join(map(str, contested[claimed]))} all claim the name {claimed!r} in the same phase; none of them is given it"
    names[node] = claimed
    return names[node], None


REPLY_RECORD_TYPES = {P.ARRAYS: ArrayRecord, P.METRICS: MetricRecord, P.SITE: ConfigRecord, P.EVALUATION: MetricRecord}


def reply_problem(msg: Message, needs: tuple[str, ...] = ()) -> str | None:
    """Why a reply's content cannot be used (records missing, extra or of the wrong type, a
    ledger head or refusal code of the wrong form), or None. The site name is checked by
    :func:`claim_name`.

    ``needs``: records a reply must carry unless it is a refusal (``arrays`` and ``metrics``
    for training, ``metrics`` for evaluation).
    """
    content = msg.content
    extra = sorted(set(content.keys()) - P.ALLOWED_REPLY_RECORDS)
    if extra:
        return f"unexpected record(s) {quoted(extra)}; a site may send only {sorted(P.ALLOWED_REPLY_RECORDS)}"
    for name, kind in REPLY_RECORD_TYPES.items():
        if name in content and not isinstance(content[name], kind):
            return f"record {name!r} is a {type(content[name]).__name__}, expected a {kind.__name__}"
    info = content.config_records.get(P.SITE)
    if info is None:
        return f"no {P.SITE!r} record naming the site"
    bad_keys = sorted(set(info.keys()) - P.ALLOWED_SITE_KEYS)
    if bad_keys:
        return f"unexpected key(s) {quoted(bad_keys)} in the {P.SITE!r} record"
    if any(not isinstance(v, str) for v in info.values()):
        return f"the {P.SITE!r} record must hold strings only"
    for name in (P.METRICS, P.EVALUATION):
        problem = metric_record_problem(content.metric_records.get(name), name)
        if problem:
            return problem
    problem = site_record_problem(info)  # type: ignore[arg-type]  # checked: strings only
    if problem:
        return problem
    if P.REFUSAL_CODE not in info:
        missing = [n for n in needs if n not in content]
        if missing:
            return f"neither a refusal nor the record(s) {missing}"
    return None


def site_record_problem(info: Mapping[str, str]) -> str | None:
    """Why a site record's ledger head or refusal code cannot be used (None if both can): the
    head is a SHA-256 in hex, the code a short lower-case word (``budget``, ``no-data``)."""
    head = info.get(P.LEDGER_HEAD)
    if head is not None and not _LEDGER_HEAD.fullmatch(head):
        return f"its ledger head ({len(head)} characters) is not a SHA-256 in hex (64 characters 0-9a-f)"
    for key in (P.REFUSAL_CODE, P.EVAL_REFUSAL_CODE):
        code = info.get(key)
        if code is not None and not _REFUSAL_CODE.fullmatch(code):
            return f"its {'evaluation ' if key == P.EVAL_REFUSAL_CODE else ''}refusal code {one_line(code, QUOTE_LIMIT)!r} is not a short lower-case word (a-z, 0-9, _ and -, at most 32)"
    return None


def metric_record_problem(record: MetricRecord | None, name: str) -> str | None:
    """Why a reply's metric record (``metrics`` or ``evaluation``) cannot be used: a value that
    is not one number, or NaN (∞ is allowed: ε of a non-private run); None if it can."""
    where = "" if name == P.METRICS else f" in the {name!r} record"
    for key, value in (record or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"metric {one_line(key, QUOTE_LIMIT)!r}{where} is a {type(value).__name__}, expected one number"
        if value != value:
            return f"metric {one_line(key, QUOTE_LIMIT)!r}{where} is NaN"
    return None


PRIVACY_KEYS = (M.EPSILON_RUN, M.EPSILON_TOTAL, M.DELTA, M.NOISE_MULTIPLIER)  # a DP train reply's figures, sent together or not at all
EPSILON_SLACK = 1e-6  # relative float slack for epsilon-total >= epsilon-run (both are composed by the site's accountant)


def whole_count_problem(key: str, value: float, *, low: float, high: float, where: str = "") -> str | None:
    """Why ``value`` is not a whole number of patients in [low, high] (``key`` names it), or None."""
    if not (math.isfinite(value) and value == int(value) and low <= value <= high):
        return f"metric {key!r}{where} is {value!r}; it must be a whole number of patients from {low:g} to {high:g}"
    return None


def privacy_problem(metrics: Mapping[str, float]) -> str | None:
    """Why a DP run's privacy figures in a train reply (or a refusal carrying them) are not
    plausible, or None: all four of :data:`PRIVACY_KEYS` or none; ε finite and ≥ 0; the
    site's all-time ε (its accountant composes every run's rounds) not below this run's;
    0 < δ < 1; σ finite and > 0."""
    present = [k for k in PRIVACY_KEYS if k in metrics]
    if not present:
        return None
    if len(present) < len(PRIVACY_KEYS):
        return f"privacy figure(s) {[k for k in PRIVACY_KEYS if k not in metrics]} missing; a DP reply carries {list(PRIVACY_KEYS)} together or none"
    for key in (M.EPSILON_RUN, M.EPSILON_TOTAL):
        if not (math.isfinite(metrics[key]) and metrics[key] >= 0):
            return f"metric {key!r} is {metrics[key]!r}; in a DP run ε must be finite and ≥ 0"
    eps_run, eps_total = metrics[M.EPSILON_RUN], metrics[M.EPSILON_TOTAL]
    if eps_total < eps_run * (1 - EPSILON_SLACK):
        return f"metric {M.EPSILON_TOTAL!r} ({eps_total!r}) is below {M.EPSILON_RUN!r} ({eps_run!r}); a site's all-time ε includes this run's"
    if not 0 < metrics[M.DELTA] < 1:
        return f"metric {M.DELTA!r} is {metrics[M.DELTA]!r}; δ must lie strictly between 0 and 1"
    if not (math.isfinite(metrics[M.NOISE_MULTIPLIER]) and metrics[M.NOISE_MULTIPLIER] > 0):
        return f"metric {M.NOISE_MULTIPLIER!r} is {metrics[M.NOISE_MULTIPLIER]!r}; σ must be finite and > 0"
    return None


def train_metrics_problem(metrics: Mapping[str, float], *, private: bool) -> str | None:
    """Why a train reply's aggregate metrics are not plausible (train loss finite and ≥ 0;
    with ``private`` (privacy.enabled), :func:`privacy_problem`), or None. The weight is
    checked with the update (:meth:`PatientFedAvg.update_problem`)."""
    loss = metrics.get(M.TRAIN_LOSS)
    if loss is not None and not (math.isfinite(loss) and loss >= 0):
        return f"metric {M.TRAIN_LOSS!r} is {loss!r}; it must be finite and ≥ 0"
    return privacy_problem(metrics) if private else None


def evaluation_problem(metrics: Mapping[str, float], *, k: int, max_patients: float) -> str | None:
    """Why a site's evaluation report cannot be averaged or written, or None: ``suppressed``
    is exactly 0 or 1; unsuppressed, the report is over a whole number of patients from k
    (``federation.min_patients_metric``) to ``max_patients``, AUROC and AUPRC lie in [0, 1]
    and the eval loss is finite and ≥ 0."""
    suppressed = metrics.get(M.SUPPRESSED)
    if suppressed not in (0.0, 1.0):
        return f"metric {M.SUPPRESSED!r} is {suppressed!r}; it must be 0 or 1"
    if suppressed == 1.0:
        return None
    problem = whole_count_problem(M.NUM_PATIENTS, metrics.get(M.NUM_PATIENTS, 0.0), low=k, high=max_patients)
    if problem:
        return f"{problem} (`federation.min_patients_metric` to `federation.secure_aggregation.max_weight`)"
    for key in (M.AUROC, M.AUPRC):
        if key in metrics and not 0.0 <= metrics[key] <= 1.0:
            return f"metric {key!r} is {metrics[key]!r}; it must lie in [0, 1]"
    loss = metrics.get(M.EVAL_LOSS)
    if loss is not None and not (math.isfinite(loss) and loss >= 0):
        return f"metric {M.EVAL_LOSS!r} is {loss!r}; it must be finite and ≥ 0"
    return None


def noised_evaluation_problem(metrics: Mapping[str, float], *, max_patients: float, noise_multiplier: float) -> str | None:
    """Why a site's evaluation is not a usable noised release for a plan with noised metrics
    (:mod:`shared.privacy.noised_metrics`), or None: never suppressed, every statistic present,
    finite and within :func:`~shared.privacy.noised_metrics.plausibility_bound`, and no exact
    metric beside them (one would bypass the noise)."""
    if metrics.get(M.SUPPRESSED) == 1.0 and not NM.is_noised(dict(metrics)):
        return "a suppressed exact evaluation, but the plan asks for noised metrics (privacy.metrics_noise_multiplier); a noised evaluation is never suppressed"
    if metrics.get(M.SUPPRESSED) != 0.0:
        return f"metric {M.SUPPRESSED!r} is {metrics.get(M.SUPPRESSED)!r}; a noised evaluation has it 0"
    exact = [k for k in (M.AUROC, M.AUPRC, M.EVAL_LOSS, M.NUM_PATIENTS) if k in metrics]
    if exact:
        return f"exact metric {exact[0]!r} in an evaluation, but the plan asks for noised metrics (privacy.metrics_noise_multiplier); it is not written"
    spent = [metrics[k] for k in (M.EPSILON_RUN, M.EPSILON_TOTAL) if k in metrics]  # the run's ε after the release, as the site's ledger recorded it
    if spent and (len(spent) < 2 or not all(math.isfinite(x) and x >= 0 for x in spent)):
        return f"metrics {M.EPSILON_RUN!r} and {M.EPSILON_TOTAL!r} of a noised evaluation must come together, finite and ≥ 0; got {spent}"
    if spent and spent[1] < spent[0] * (1 - EPSILON_SLACK):
        return f"metric {M.EPSILON_TOTAL!r} ({spent[1]!r}) is below {M.EPSILON_RUN!r} ({spent[0]!r}); a site's all-time ε includes this run's"
    try:
        vec = NM.from_metrics(dict(metrics), bound=NM.plausibility_bound(max_patients=max_patients, noise_multiplier=noise_multiplier))
    except ValueError as exc:
        return str(exc)
    return NM.implausibility(vec, max_patients=max_patients, noise_multiplier=noise_multiplier)


def pooled_noised_evaluation(reports: list[SiteReport]) -> MetricRecord | None:
    """The federated metrics of noised evaluations: the sum of the sites' statistics, read by
    :func:`~shared.privacy.noised_metrics.estimates` (pooled over every site's held-out patients).
    Each report's metrics become its own estimates (AUROC where its statistics give one), so the
    run folder shows per-site figures read from what the site sent, never an exact one; None when
    the pooled statistics give no AUROC."""
    vectors = []
    for r in reports:
        vec = NM.from_metrics(dict(r.metrics), bound=math.inf)  # checked by noised_evaluation_problem
        vectors.append(vec)
        own = NM.estimates(vec)
        r.metrics = {M.SUPPRESSED: 0.0, M.NOISED: 1.0, **({M.AUROC: own.auroc} if own.auroc is not None else {}),
                     **{k: r.metrics[k] for k in (M.COMPUTE_SECONDS, M.PEAK_RSS_MB, M.EPSILON_RUN, M.EPSILON_TOTAL) if k in r.metrics}}
    pooled = NM.estimates(np.sum(vectors, axis=0))
    if pooled.auroc is None:
        return None
    out = MetricRecord({M.NUM_PATIENTS: pooled.patients, M.AUROC: pooled.auroc})
    if pooled.auprc is not None:
        out[M.AUPRC] = pooled.auprc
    return out


def reject_reply(report: SiteReport, problem: str) -> None:
    """Mark a report whose reply failed a plausibility check as malformed: its figures (and the
    evaluation riding with it) are dropped, the site is named with why."""
    report.error = f"malformed reply rejected by the coordinator: {problem}"
    report.metrics, report.evaluation = {}, None


def site_report(msg: Message, names: dict[int, str], needs: tuple[str, ...] = (), *, contested: Mapping[str, list[int]] | None = None) -> SiteReport:
    """What one reply says: metrics, refusal, malformed content or transport error.

    ``names`` maps node ids to site names for the whole run (:func:`claim_name` pins them), so
    a site that crashes or stalls later is still named rather than shown as a node id, and a
    node cannot report under another site's name. ``contested``: names several nodes claim in
    this phase (:func:`contested_names`). A refusal reason and an error are made one safe
    line of at most :data:`TEXT_LIMIT` characters (:func:`one_line`).
    """
    node = msg.metadata.src_node_id
    if msg.has_error():
        return SiteReport(site=names.get(node, f"node-{node}"), error=f"the site's client failed (crashed or lost): {short_reason(str(msg.error.reason))}", node=node)
    info = msg.content.config_records.get(P.SITE, ConfigRecord())
    name, name_issue = claim_name(names, node, info.get(P.SITE_NAME), contested or {})
    report = SiteReport(site=name, node=node)
    problem = reply_problem(msg, needs) or name_issue
    if problem:
        report.error = f"malformed reply rejected by the coordinator: {problem}"
        return report
    if P.LEDGER_HEAD in info:
        report.ledger_head = str(info[P.LEDGER_HEAD])
    if P.REFUSAL_CODE in info:
        report.refusal_code = str(info[P.REFUSAL_CODE])
        report.refusal_reason = one_line(str(info.get(P.REFUSAL_REASON, "")))
    if P.EVAL_REFUSAL_CODE in info:
        report.evaluation_refusal = (str(info[P.EVAL_REFUSAL_CODE]), one_line(str(info.get(P.EVAL_REFUSAL_REASON, ""))))
    if P.METRICS in msg.content.metric_records:
        report.metrics = {k: float(v) for k, v in msg.content[P.METRICS].items()}  # type: ignore[arg-type]
    if P.EVALUATION in msg.content.metric_records:
        report.evaluation = {k: float(v) for k, v in msg.content[P.EVALUATION].items()}  # type: ignore[arg-type]
    return report


def scalar_metrics(record: MetricRecord | None) -> dict[str, float]:
    """An aggregate metric record (numbers only, as :class:`PatientFedAvg` builds them) as a
    dict, values unchanged; empty for None. TypeError for a list value, which no aggregate holds."""
    out: dict[str, float] = {}
    for key, value in (record or {}).items():
        if not isinstance(value, (int, float)):
            raise TypeError(f"Metric {key!r} is a {type(value).__name__}; an aggregate metric is a number.")
        out[key] = value
    return out


def claims(replies: Iterable[Message]) -> list[tuple[int, object]]:
    """(node id, claimed site name) of each reply that is not a transport error."""
    return [(m.metadata.src_node_id, m.content.config_records.get(P.SITE, ConfigRecord()).get(P.SITE_NAME)) for m in replies if not m.has_error()]


def evaluation_reports(train: Iterable[SiteReport]) -> list[SiteReport]:
    """The evaluation reports that rode in train replies (with-next-round), one per site asked
    to train: its evaluation, or why there is none (its error, its refusal without one, or
    that the reply carried none)."""
    out = []
    for r in train:
        if r.evaluation is not None:
            out.append(SiteReport(site=r.site, node=r.node, metrics=dict(r.evaluation)))
        elif r.evaluation_refusal is not None and not r.error:  # the site refused to release its evaluation, and says why
            out.append(SiteReport(site=r.site, node=r.node, refusal_code=r.evaluation_refusal[0], refusal_reason=r.evaluation_refusal[1]))
        elif r.error or r.refusal_code:
            out.append(SiteReport(site=r.site, node=r.node, error=r.error, refusal_code=r.refusal_code, refusal_reason=r.refusal_reason))
        else:
            out.append(SiteReport(site=r.site, node=r.node, error="the train reply carried no evaluation of the model it was sent"))
    return sorted(out, key=lambda r: r.site)


def site_reports(replies: Iterable[Message], names: dict[int, str] | None = None, *, needs: tuple[str, ...] = ()) -> list[SiteReport]:
    """One :func:`site_report` per reply, sorted by site."""
    names = {} if names is None else names
    replies = list(replies)
    contested = contested_names(claims(replies))
    return sorted((site_report(m, names, needs, contested=contested) for m in replies), key=lambda r: r.site)


def weighted_average(updates: list[tuple[float, np.ndarray]]) -> ArrayRecord:
    """The weighted average of decoded packed updates (each (N,) float32), as one packed
    record: the operations of Flower's ``aggregate_arrayrecords`` in the same order (so the
    same bits, element by element), on vectors decoded once. The weights are summed in
    float64; a total that is not finite and positive is refused (ValueError)."""
    with np.errstate(over="ignore"):  # an overflowing total is refused below, not warned about
        total = float(np.sum(np.array([w for w, _ in updates], dtype=np.float64)))
    if updates and not (math.isfinite(total) and total > 0):
        raise ValueError(f"The weights of a federated average sum to {total!r}; they must sum to a finite positive number.")
    out: np.ndarray | None = None
    for weight, flat in updates:
        factor = weight / total
        if out is None:
            out = flat * factor
        else:
            out += flat * factor
    if out is None:
        raise ValueError("There is no update to average.")
    return ArrayRecord({PACKED: Array(np.asarray(out))})


def weighted_mean(reports: list[SiteReport], key: str) -> float | None:
    """Patient-weighted mean of ``key`` over sites that reported it (None if none did)."""
    pairs = [(r.metrics[M.NUM_PATIENTS], r.metrics[key]) for r in reports if key in r.metrics and r.metrics.get(M.NUM_PATIENTS, 0) > 0]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else None


_FEDERATION = FederationConfig()  # the defaults of the settings the strategy reads


def _parameter_at(shapes: Layout, index: int) -> str:
    """The name of the parameter holding value ``index`` of a packed model."""
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if index < size:
            return name
        index -= size
    return f"value {index}"


class PatientFedAvg(FedAvg):
    """FedAvg weighted by each site's number of training patients."""

    def __init__(
        self, *, fraction_train: float, fraction_evaluate: float, min_nodes: int, node_wait_timeout_s: float, round_timeout_s: float = 1800.0,
        private: bool = True, min_patients_metric: int = _FEDERATION.min_patients_metric, max_weight: float = _FEDERATION.secure_aggregation.max_weight,
        metrics_noise_multiplier: float = 0.0, eval_fraction: float = 0.3,
    ) -> None:
        """``private``: the plan's privacy.enabled (train replies must then carry plausible ε, δ,
        σ); ``min_patients_metric``: k, the fewest evaluation patients an unsuppressed report may
        cover; ``max_weight``: the largest patient count a site may claim
        (``federation.secure_aggregation.max_weight``, in plain rounds too);
        ``metrics_noise_multiplier``: the plan's ``privacy.metrics_noise_multiplier`` (above 0:
        every evaluation must be a noised release, and the federated metrics come from their sum);
        ``eval_fraction``: the plan's ``training.eval_fraction``, which with ``max_weight`` bounds a
        site's held-out patients (:meth:`max_eval_patients`)."""
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes if fraction_evaluate > 0 else 0,
            min_available_nodes=min_nodes,
            weighted_by_key=M.NUM_PATIENTS,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
        )
        self.node_wait_timeout_s = node_wait_timeout_s
        self.private = private
        self.min_patients_metric = min_patients_metric
        self.max_weight = max_weight
        self.metrics_noise_multiplier = metrics_noise_multiplier
        self.eval_fraction = eval_fraction
        self.round_timeout_s = round_timeout_s
        self.log: dict[int, RoundLog] = {}
        self._sent: dict[tuple[int, str], list[int]] = {}  # (round, phase) -> node ids asked
        self.node_names: dict[int, str] = {}  # node id -> site name for the whole run, pinned on first sight (claim_name), plain and SecAgg+ rounds alike
        self._global: dict[int, np.ndarray] = {}  # round -> the packed global model its train messages carried, (N,) float64

    expected: Layout | None = None  # parameter name -> shape of the global model, in its order (the packed layout)
    max_abs_value: float = 1e4
    # The most the plan's local training moves any parameter in a round (shared.update_bounds), and
    # the rule in words; None: no bound (SGD), only the range check.
    max_move: float | None = None
    move_rule: str = ""

    def set_move_bound(self, *, optimizer: str, learning_rate: float, local_steps: int) -> None:
        """Check every trained model against what ``local_steps`` steps of ``optimizer`` at
        ``learning_rate`` (the plan's training) can move a parameter (:meth:`move_problem`)."""
        from shared.update_bounds import max_parameter_move

        self.max_move = max_parameter_move(optimizer=optimizer, learning_rate=learning_rate, local_steps=local_steps)
        self.move_rule = f"{local_steps} {optimizer.capitalize()} step(s) at learning rate {learning_rate:g}"

    def move_problem(self, flat: np.ndarray, server_round: int, *, tolerance: float = 0.0, clip: float | None = None) -> str | None:
        """Why a trained model (packed, (N,)) cannot have come from this round's global model by the
        plan's training: a parameter moved further than :attr:`max_move` (plus ``tolerance``, e.g.
        SecAgg+ quantisation, and float32 rounding); None if it can, or when there is no bound.
        ``clip``: the models were clipped to ±clip (SecAgg+), so the global model is compared
        clipped too (clipping never lengthens a move)."""
        start = self._global.get(server_round)
        if self.max_move is None or start is None or flat.shape != start.shape:
            return None
        if clip is not None:
            start = np.clip(start, -clip, clip)
        moved = np.abs(flat.astype(np.float64) - start)
        worst = int(np.argmax(moved)) if moved.size else 0
        rounding = 64 * 2.0**-23 * (1.0 + float(np.abs(start).max(initial=0.0)) + self.max_move)  # float32 training: 64 ulps
        allowed = self.max_move + tolerance + rounding
        if moved.size == 0 or moved[worst] <= allowed:
            return None
        name = _parameter_at(self.layout(), worst) if self.expected is not None else f"value {worst}"
        return (f"parameter {name!r} moved {moved[worst]:.4g} from the round's global model; the plan's training "
                f"({self.move_rule}) moves a parameter by at most {self.max_move:.4g}")

    def layout(self) -> Layout:
        if self.expected is None:
            raise FederationError("The strategy has no model layout (`expected`); set it from the plan's model before a round.")
        return self.expected

    def checked_update(self, arrays: ArrayRecord, metrics: MetricRecord, *, site: str) -> tuple[np.ndarray | None, str | None]:
        """The packed update (N,) decoded once, and why it cannot be averaged (None if it can;
        the vector is None when it cannot be decoded or does not fit the model's layout)."""
        try:
            flat = packed_vector(arrays, what=f"the update of site {site}")
            values = unflatten(flat, self.layout(), what=f"the update of site {site}")
        except ValueError as exc:
            return None, str(exc)
        return flat, self.update_problem(values, metrics)

    def update_problem(self, values: dict[str, np.ndarray], metrics: MetricRecord) -> str | None:
        """Why an update already unpacked to name -> array cannot be averaged (names, shapes,
        NaN/Inf, range, weight), or None; :meth:`checked_update` decodes a packed one first.

        The weight must be a whole number of patients from 1 to ``max_weight``: an honest site
        sends its training-patient count, and a larger claim would let one site's update
        outweigh every other's (or overflow the total)."""
        problem = self.values_problem(values)
        if problem:
            return problem
        weight = metrics.get(M.NUM_PATIENTS)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return f"weight {M.NUM_PATIENTS} is {weight!r}; it must be a positive number"
        if not (math.isfinite(weight) and weight == int(weight) and 1 <= weight <= self.max_weight):
            return (f"weight {M.NUM_PATIENTS} is {weight!r}; it must be a whole number of training patients from 1 to "
                    f"{self.max_weight:g} (`federation.secure_aggregation.max_weight`)")
        return None

    def values_problem(self, values: dict[str, np.ndarray]) -> str | None:
        """Why a model (an update or the unmasked sum, name -> array) cannot be used: names,
        shapes, dtype, NaN/Inf or range; None if it can."""
        if self.expected is not None:
            if list(values) != list(self.expected):
                return "parameter names differ from the global model's"
            for k, v in values.items():
                if tuple(v.shape) != tuple(self.expected[k]):
                    return f"parameter {k!r} has shape {tuple(v.shape)}, expected {tuple(self.expected[k])}"
        for k, v in values.items():
            if not np.issubdtype(v.dtype, np.floating):
                return f"parameter {k!r} has dtype {v.dtype}, expected floating point"
            if not np.isfinite(v).all():
                return f"parameter {k!r} holds NaN or infinite values"
            if v.size and float(np.abs(v).max()) > self.max_abs_value:
                return f"parameter {k!r} exceeds the allowed range ±{self.max_abs_value:g}"
        return None

    def metrics_problem(self, metrics: Mapping[str, float]) -> str | None:
        """Why a train reply's metrics are implausible for this plan (:func:`train_metrics_problem`)."""
        return train_metrics_problem(metrics, private=self.private)

    def evaluation_problem(self, metrics: Mapping[str, float]) -> str | None:
        """Why an evaluation report is unusable for this plan (:func:`evaluation_problem`, or
        :func:`noised_evaluation_problem` when the plan asks for noised metrics)."""
        if self.metrics_noise_multiplier > 0:
            return noised_evaluation_problem(metrics, max_patients=self.max_eval_patients(), noise_multiplier=self.metrics_noise_multiplier)
        if NM.is_noised(dict(metrics)):
            return "a noised evaluation, but the plan asks for exact metrics (privacy.metrics_noise_multiplier is 0)"
        return evaluation_problem(metrics, k=self.min_patients_metric, max_patients=self.max_weight)

    def max_eval_patients(self) -> float:
        """The most held-out patients an honest site can have: it trains on at most ``max_weight``
        patients, and holds out about ``eval_fraction / (1 − eval_fraction)`` as many (the split
        rounds each of its two strata, so up to 2 more)."""
        return self.max_weight * self.eval_fraction / (1.0 - self.eval_fraction) + 2.0

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t\t└── Node wait timeout: %.0f s (refusals are reported per site)", self.node_wait_timeout_s)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Round ``server_round``'s train messages to the sampled sites (:func:`sample_connected`):
        a round starts only when ``min_nodes`` are connected; FederationError after
        ``node_wait_timeout_s`` without them (the recorded rounds stay; the run can be resumed)."""
        try:
            nodes = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout_s)
        except FederationError as exc:
            raise FederationError(
                f"Round {server_round} was not started: {exc} The rounds recorded so far are kept; continue the run "
                "with `fedrelapse run --resume RUN_FOLDER` once the sites are back."
            ) from None
        if self.max_move is not None:  # the round the replies answer: what move_problem measures from
            self._global = {server_round: packed_vector(arrays, what="the global model").astype(np.float64)}
        return self._messages(server_round, "train", sample_connected(nodes, self.fraction_train, self.min_train_nodes), nodes, arrays, config)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The evaluate messages of the model after ``server_round``. The round is trained by
        then, so when fewer than ``min_nodes`` are still connected after ``node_wait_timeout_s``
        the sites that are there evaluate it (none: the round is recorded without an AUROC)
        rather than the trained round being lost."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout_s, give_up=False)
        if len(nodes) < self.min_available_nodes:
            log(WARNING, "round %d: only %d of the %d sites required (`federation.min_nodes`) are connected after %.0f s; "
                "the model is evaluated by those connected.", server_round, len(nodes), self.min_available_nodes, self.node_wait_timeout_s)
        return self._messages(server_round, "evaluate", sample_connected(nodes, self.fraction_evaluate, self.min_evaluate_nodes), nodes, arrays, config)

    def _messages(self, server_round: int, phase: str, chosen: list[int], connected: list[int], arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """One message per chosen node (the same records, the round in the config, as FedAvg's
        ``configure_*`` build them); the node ids asked are kept for :meth:`_silent`."""
        log(INFO, "configure_%s: Sampled %s nodes (out of %s)", phase, len(chosen), len(connected))
        config[P.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        kind = MessageType.TRAIN if phase == "train" else MessageType.EVALUATE
        msgs = list(self._construct_messages(record, chosen, kind))
        self._sent[(server_round, phase)] = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def _silent(self, server_round: int, phase: str, replies: list[Message]) -> list[SiteReport]:
        """One report per asked node that never replied (Flower just omits them)."""
        answered = {m.metadata.src_node_id for m in replies}
        return [
            SiteReport(site=self.node_names.get(node, f"node-{node}"), node=node,
                       error=f"no reply within `federation.round_timeout_s` ({self.round_timeout_s:g} s); left out of this round")
            for node in self._sent.get((server_round, phase), []) if node not in answered
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        contested = contested_names(claims(replies))
        pairs = [(m, site_report(m, self.node_names, (P.ARRAYS, P.METRICS), contested=contested)) for m in replies]
        reports = sorted([r for _, r in pairs] + self._silent(server_round, "train", replies), key=lambda r: r.site)
        self.log.setdefault(server_round, RoundLog()).train = reports
        updates: list[tuple[float, np.ndarray]] = []
        for m, report in pairs:
            if report.error is None and (problem := self.metrics_problem(report.metrics)):  # a refusal's figures too (a replay refusal sends them)
                log(INFO, "round %d: rejected the reply of site %s: %s", server_round, report.site, problem)
                reject_reply(report, problem)
            if report.error or report.refusal_code:
                continue
            values, problem = self.checked_update(m.content.array_records[P.ARRAYS], m.content.metric_records[P.METRICS], site=report.site)  # both there, of these types: reply_problem checked
            if values is not None and problem is None:
                problem = self.move_problem(values, server_round)
            if values is None or problem is not None:
                log(INFO, "round %d: rejected the update of site %s: %s", server_round, report.site, problem)
                report.error = f"update rejected by the coordinator: {problem}"
                report.metrics = {}
                continue
            updates.append((m.content[P.METRICS][self.weighted_by_key], values))  # type: ignore[arg-type]  # checked: a positive number
        if not updates:
            return None, None
        arrays = weighted_average(updates)
        usable = [r for r in reports if r.error is None and r.refusal_code is None]
        loss = weighted_mean(usable, M.TRAIN_LOSS)
        metrics = MetricRecord({M.NUM_PATIENTS: sum(r.metrics.get(M.NUM_PATIENTS, 0.0) for r in usable)})
        if loss is not None:
            metrics[M.TRAIN_LOSS] = loss
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        reports = sorted(site_reports(replies, self.node_names, needs=(P.METRICS,)) + self._silent(server_round, "evaluate", replies), key=lambda r: r.site)
        return self.aggregate_evaluation(server_round, reports)

    def aggregate_evaluation(self, server_round: int, reports: list[SiteReport]) -> MetricRecord | None:
        """Keep the evaluation reports of the model after ``server_round`` in its log and
        average them by patients over the sites whose metrics were not suppressed.

        The reports come from evaluate replies, or (with-next-round) from round
        ``server_round + 1``'s train replies (:func:`evaluation_reports`)."""
        for r in reports:
            if r.metrics and (problem := self.evaluation_problem(r.metrics)):  # dropped: neither averaged nor written, only named
                log(INFO, "round %d: rejected the evaluation of site %s: %s", server_round, r.site, problem)
                r.metrics, r.error = {}, f"evaluation rejected by the coordinator: {problem}"
        self.log.setdefault(server_round, RoundLog()).evaluate = reports
        usable = [r for r in reports if r.error is None and r.metrics.get(M.SUPPRESSED) == 0.0]
        if not usable:
            return None
        if self.metrics_noise_multiplier > 0:
            return pooled_noised_evaluation(usable)
        out = MetricRecord({M.NUM_PATIENTS: sum(r.metrics[M.NUM_PATIENTS] for r in usable)})
        for key in (M.AUROC, M.AUPRC, M.EVAL_LOSS):
            value = weighted_mean(usable, key)
            if value is not None:
                out[key] = value
        return out
