"""One training round under Flower's SecAgg+: the coordinator only ever holds the sum.

Flower 1.42 runs SecAgg+ only as a legacy workflow (``SecAggPlusWorkflow`` over a
``LegacyContext`` with a legacy ``Strategy``). We run one round of it at a time from our
own loop: :class:`PatientFedAvg` still picks the sites and keeps the per-site log, and the
small :class:`_CollectSum` strategy only hands the workflow the sites' instructions and
receives the unmasked result.

Weighting: each site's secaggplus mod multiplies its update by w/max_weight (w = its
training patients, sent as ``num_examples``), quantises it and puts the quantised factor
in front of the masked vector, so the unmasked result is Σ w_i·x_i / Σ w_i: the
patient-weighted average, computed inside the secure sum.

Wire format: the global model goes out as one packed float32 vector (the single entry of
``fitins.parameters``, :func:`shared.params.pack`), each site's update comes back the same
way and the mod masks it value by value; the unmasked sum's length is checked against the
plan model's layout before it is unpacked and range-checked.

Halting: when fewer than ``reconstruction_threshold`` neighbours of a site survive a
stage, Flower logs "Secure aggregation halted" and returns normally without an aggregate.
We detect it (aggregate_fit never ran) and fail the round loudly; the model is not updated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from server.strategy import PatientFedAvg, RoundLog, SiteReport, weighted_mean
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared import secure_records
from shared.config import SecureAggregationConfig
from shared.errors import ConfigError
from shared.params import PACKED, packed_vector, unflatten

MODULUS_RANGE = 2**32  # SecAgg+ mask modulus (Flower's default; must exceed sites × quantization_range)

@dataclass(frozen=True)
class SecureRoundResult:
    arrays: ArrayRecord | None  # the new global model, None when the round produced none
    metrics: MetricRecord | None
    halted: str | None = None  # why SecAgg+ produced no aggregate (a sentence), None if it did


class _CollectSum(Strategy):
    """The legacy strategy the workflow calls: fixed instructions in, the unmasked sum out."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.aggregate: Parameters | None = None
        self.aggregated = False

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        # The workflow sets every result's parameters to the unmasked weighted average.
        self.aggregated = True
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Tap:
    """Grid wrapper that keeps the masked-vector stage's replies (site reports ride there)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.masked_replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if any(not m.has_error() and P.LEGACY_FITRES_METRICS in m.content.config_records for m in replies):
            self.masked_replies = replies
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _reports(replies: list[Message], asked: list[int], names: dict[int, str]) -> list[SiteReport]:
    """One report per site asked: its fitres.metrics, its error, or that it dropped out.

    ``names`` (node id -> site name, from earlier replies) is updated, and names the sites
    that drop out; a site never heard from is ``node-<id>``.
    """
    out, answered = [], set()
    for msg in replies:
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_error():
            out.append(SiteReport(site=names.get(node, f"node-{node}"), error=f"dropped out of secure aggregation: {msg.error.reason}"))
            continue
        site, metrics = secure_records.decode(msg.content.config_records[P.LEGACY_FITRES_METRICS])
        names[node] = site.get(P.SITE_NAME, f"node-{node}")
        report = SiteReport(site=names[node], metrics=metrics, ledger_head=site.get(P.LEDGER_HEAD), node=node,
                            evaluation=secure_records.decode_evaluation(msg.content.config_records[P.LEGACY_FITRES_METRICS]))
        if P.REFUSAL_CODE in site:
            report.refusal_code, report.refusal_reason = site[P.REFUSAL_CODE], site.get(P.REFUSAL_REASON, "")
            report.metrics = {}
        out.append(report)
    for node in asked:
        if node not in answered:
            out.append(SiteReport(site=names.get(node, f"node-{node}"), error="no masked update (dropped out of secure aggregation before the masked-vector stage ended)"))
    return sorted(out, key=lambda r: r.site)


def secure_train_round(grid: Grid, *, strategy: PatientFedAvg, sa: SecureAggregationConfig, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> SecureRoundResult:
    """Train one round with SecAgg+; the result is the patient-weighted average or a halt."""
    plain = list(strategy.configure_train(server_round, arrays, config, grid))  # sampling + the node list the log needs
    nodes = [m.metadata.dst_node_id for m in plain]
    round_log = strategy.log.setdefault(server_round, RoundLog())
    needed = max(2, sa.reconstruction_threshold)
    if len(nodes) < needed:
        round_log.train = [SiteReport(site=f"node-{n}", error="not trained: too few sites for secure aggregation") for n in nodes]
        return SecureRoundResult(None, None, halted=f"only {len(nodes)} site(s) were sampled; SecAgg+ needs at least {needed} (`federation.secure_aggregation.reconstruction_threshold`).")
    if (len(nodes) + 1) * sa.quantization_range >= MODULUS_RANGE:
        raise ConfigError(
            f"{len(nodes)} sites × `federation.secure_aggregation.quantization_range` {sa.quantization_range} would overflow "
            f"the SecAgg+ modulus 2**32; lower quantization_range below {MODULUS_RANGE // (len(nodes) + 1)}."
        )
    cfg = dict(plain[0].content[P.CONFIG])  # the plan's config plus server-round
    layout = strategy.layout()
    # The packed global model, (N,) float32: the secaggplus mod clips, quantises and masks
    # this one vector per value exactly as it did a list of per-parameter arrays.
    fitins = FitIns(ndarrays_to_parameters([packed_vector(arrays, what="the global model")]), cfg)  # type: ignore[arg-type]
    collector = _CollectSum([(GridClientProxy(n, grid, 0), fitins) for n in nodes])
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=collector)
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(fitins.parameters, keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    workflow = SecAggPlusWorkflow(
        num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold, max_weight=sa.max_weight,
        clipping_range=sa.clipping_range, quantization_range=sa.quantization_range, modulus_range=MODULUS_RANGE, timeout=sa.stage_timeout_s,
    )
    tap = _Tap(grid)
    workflow(tap, context)  # type: ignore[arg-type]
    reports = _reports(tap.masked_replies, nodes, strategy.node_names)
    round_log.train = reports
    contributed = [r for r in reports if r.refusal_code is None and r.error is None and r.metrics.get(M.NUM_PATIENTS, 0) > 0]
    if not collector.aggregated or collector.aggregate is None:
        alive = sum(1 for r in reports if r.error is None)
        return SecureRoundResult(None, None, halted=(
            f"secure aggregation halted: {alive} of {len(nodes)} sites sent a masked update and too few shares survived "
            f"to unmask (`federation.secure_aggregation.reconstruction_threshold` = {sa.reconstruction_threshold})."
        ))
    if not contributed:
        return SecureRoundResult(None, None)
    total = float(sum(r.metrics[M.NUM_PATIENTS] for r in contributed))
    values = parameters_to_ndarrays(collector.aggregate)
    if len(values) != 1:
        return SecureRoundResult(None, None, halted=f"the unmasked sum has {len(values)} arrays; a packed model is one vector. Not applied.")
    flat = np.ascontiguousarray(values[0], dtype=np.float32)  # (N,) the dequantised (float64) sum in the wire dtype
    try:
        model = unflatten(flat, layout, what="the unmasked sum")
    except ValueError as exc:
        return SecureRoundResult(None, None, halted=f"{exc} Not applied.")
    problem = strategy.values_problem(model)  # the total weight is a sum, not one site's capped weight
    if problem is None:
        bad = [n for n, v in model.items() if float(np.abs(v).max(initial=0.0)) > sa.clipping_range * (1 + 1e-6)]
        problem = f"parameter {bad[0]!r} lies outside ±clipping_range" if bad else None
    if problem:
        return SecureRoundResult(None, None, halted=f"the unmasked sum failed the coordinator's range/shape check: {problem}.")
    metrics = MetricRecord({M.NUM_PATIENTS: total})
    loss = weighted_mean(contributed, M.TRAIN_LOSS)
    if loss is not None:
        metrics[M.TRAIN_LOSS] = loss
    return SecureRoundResult(ArrayRecord({PACKED: Array(flat)}), metrics)
