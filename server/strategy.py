"""FedAvg weighted by patients, aware of per-site refusals and per-site privacy spend.

Sites reply with a DP-trained update and aggregate metrics, or with a structured refusal.
Refusals are kept (per site, with the reason) and left out of the average; ε is never
averaged across sites: each site's own figure is kept as it reported it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.errors import FederationError


@dataclass
class SiteReport:
    """What one site said in one round (aggregate numbers only)."""

    site: str
    metrics: dict[str, float] = field(default_factory=dict)
    refusal_code: str | None = None
    refusal_reason: str | None = None
    error: str | None = None
    ledger_head: str | None = None  # hash of the site's newest ledger entry (for the DPO to compare)


@dataclass
class RoundLog:
    train: list[SiteReport] = field(default_factory=list)
    evaluate: list[SiteReport] = field(default_factory=list)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, poll_s: float = 0.5) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; FederationError after timeout.

    Flower's own sampling waits forever; a consortium run must fail with a reason instead.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"Only {len(nodes)} of the {minimum} sites required (`federation.min_nodes`) connected "
                f"within {timeout_s:.0f} s; check that the site clients are running."
            )
        time.sleep(poll_s)


def site_reports(replies: Iterable[Message]) -> list[SiteReport]:
    """One SiteReport per reply: metrics, refusal or transport error."""
    out = []
    for msg in replies:
        if msg.has_error():
            out.append(SiteReport(site=f"node-{msg.metadata.src_node_id}", error=str(msg.error.reason)))
            continue
        info = msg.content.config_records.get(P.SITE, ConfigRecord())
        report = SiteReport(site=str(info.get(P.SITE_NAME, f"node-{msg.metadata.src_node_id}")))
        if P.LEDGER_HEAD in info:
            report.ledger_head = str(info[P.LEDGER_HEAD])
        if P.REFUSAL_CODE in info:
            report.refusal_code = str(info[P.REFUSAL_CODE])
            report.refusal_reason = str(info.get(P.REFUSAL_REASON, ""))
        if P.METRICS in msg.content.metric_records:
            report.metrics = {k: float(v) for k, v in msg.content[P.METRICS].items()}  # type: ignore[arg-type]
        out.append(report)
    return sorted(out, key=lambda r: r.site)


def weighted_mean(reports: list[SiteReport], key: str) -> float | None:
    """Patient-weighted mean of ``key`` over sites that reported it (None if none did)."""
    pairs = [(r.metrics[M.NUM_PATIENTS], r.metrics[key]) for r in reports if key in r.metrics and r.metrics.get(M.NUM_PATIENTS, 0) > 0]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else None


class PatientFedAvg(FedAvg):
    """FedAvg weighted by each site's number of training patients."""

    def __init__(self, *, fraction_train: float, fraction_evaluate: float, min_nodes: int, node_wait_timeout_s: float) -> None:
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
        self.log: dict[int, RoundLog] = {}
        self._sent: dict[tuple[int, str], list[int]] = {}  # (round, phase) -> node ids asked
        self.node_names: dict[int, str] = {}  # node id -> site name, learnt from replies (names sites that later drop out)

    expected: dict[str, tuple[int, ...]] | None = None  # parameter name -> shape of the global model
    max_abs_value: float = 1e4

    def check_update(self, arrays: ArrayRecord, metrics: MetricRecord) -> str | None:
        """Why an update cannot be averaged (names, shapes, NaN/Inf, range, weight), or None."""
        values = {k: v.numpy() for k, v in arrays.items()}
        if self.expected is not None:
            if list(values) != list(self.expected):
                return "parameter names differ from the global model's"
            for k, v in values.items():
                if tuple(v.shape) != self.expected[k]:
                    return f"parameter {k!r} has shape {tuple(v.shape)}, expected {self.expected[k]}"
        for k, v in values.items():
            if not np.isfinite(v).all():
                return f"parameter {k!r} holds NaN or infinite values"
            if v.size and float(np.abs(v).max()) > self.max_abs_value:
                return f"parameter {k!r} exceeds the allowed range ±{self.max_abs_value:g}"
        weight = metrics.get(M.NUM_PATIENTS)
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return f"weight {M.NUM_PATIENTS} is {weight!r}; it must be a positive number"
        return None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t\t└── Node wait timeout: %.0f s (refusals are reported per site)", self.node_wait_timeout_s)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout_s)
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self._sent[(server_round, "train")] = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout_s)
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent[(server_round, "evaluate")] = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def _with_silent_nodes(self, server_round: int, phase: str, replies: list[Message]) -> list[SiteReport]:
        """Site reports plus one per asked node that never replied (Flower just omits them)."""
        reports = site_reports(replies)
        answered = {m.metadata.src_node_id for m in replies}
        for node in self._sent.get((server_round, phase), []):
            if node not in answered:
                reports.append(SiteReport(site=f"node-{node}", error="no reply within `federation.round_timeout_s`"))
        return reports

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        reports = self._with_silent_nodes(server_round, "train", replies)
        self.log.setdefault(server_round, RoundLog()).train = reports
        by_site = {r.site: r for r in reports}
        updates = []
        for m in replies:
            if m.has_error() or P.ARRAYS not in m.content.array_records or P.METRICS not in m.content.metric_records:
                continue
            name = str(m.content.config_records.get(P.SITE, ConfigRecord()).get(P.SITE_NAME, f"node-{m.metadata.src_node_id}"))
            problem = self.check_update(m.content[P.ARRAYS], m.content[P.METRICS])
            if problem:
                log(INFO, "round %d: rejected the update of site %s: %s", server_round, name, problem)
                if name in by_site:
                    by_site[name].error = f"update rejected by the coordinator: {problem}"
                    by_site[name].metrics = {}
                continue
            updates.append(m.content)
        if not updates:
            return None, None
        arrays = aggregate_arrayrecords(updates, self.weighted_by_key)
        loss = weighted_mean(reports, M.TRAIN_LOSS)
        metrics = MetricRecord({M.NUM_PATIENTS: sum(r.metrics.get(M.NUM_PATIENTS, 0.0) for r in reports if r.refusal_code is None)})
        if loss is not None:
            metrics[M.TRAIN_LOSS] = loss
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        reports = self._with_silent_nodes(server_round, "evaluate", list(replies))
        self.log.setdefault(server_round, RoundLog()).evaluate = reports
        usable = [r for r in reports if r.metrics.get(M.SUPPRESSED, 1.0) == 0.0]
        if not usable:
            return None
        out = MetricRecord({M.NUM_PATIENTS: sum(r.metrics[M.NUM_PATIENTS] for r in usable)})
        for key in (M.AUROC, M.AUPRC, M.EVAL_LOSS):
            value = weighted_mean(usable, key)
            if value is not None:
                out[key] = value
        return out
