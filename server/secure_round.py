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
A sum with fewer than max(2, ``reconstruction_threshold``) contributors (sites of non-zero
weight) is not applied either: with one it would be that site's own update. Any exception
inside the workflow halts the round the same way instead of stopping the coordinator.

Replies: Flower's workflow reads each stage's replies without checking them. :class:`_Tap`
checks every reply against the stage the coordinator's own message named (the ``stage``
key it sent, never guessed from the reply) before Flower sees it, and turns a malformed
one into that node's error reply, which Flower treats as a dropout. Dropping a site is what
the protocol is built for: its pairwise masks are removed with its neighbours' shares of
its key, while its private mask is never reconstructed, so a masked vector the coordinator
saw but left out of the sum stays masked. The masked-vector stage's reply is also held to
the checks of a plain train reply (``fitres.metrics``: the same record structure, train
loss, privacy figures) and its weight (``fitres.num_examples``) must be a whole number from
0 to ``max_weight``, 0 exactly for a refusal and equal to the clear-text ``num-patients``
otherwise (a larger weight would be clipped inside the sum and corrupt the model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
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

from server.strategy import (
    PatientFedAvg,
    RoundLog,
    SiteReport,
    claim_name,
    contested_names,
    one_line,
    short_reason,
    site_record_problem,
    weighted_mean,
)
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared import secure_records
from shared.config import SecureAggregationConfig
from shared.errors import ConfigError
from shared.params import PACKED, packed_vector, unflatten

MODULUS_RANGE = 2**32  # SecAgg+ mask modulus (Flower's default; must exceed sites × quantization_range)

log = logging.getLogger("fedrelapse.server")

# What Flower's workflow reads from each stage's replies (in its secaggplus_configs record):
# key -> type of the value, or of each item of a list value.
STAGE_REPLY_KEYS: dict[str, dict[str, type]] = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: bytes, Key.PUBLIC_KEY_2: bytes},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: int, Key.CIPHERTEXT_LIST: bytes},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: bytes},
    Stage.UNMASK: {Key.NODE_ID_LIST: int, Key.SHARE_LIST: bytes},
}
LIST_KEYS = {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}

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


_T = TypeVar("_T")


def _items(value: object, kind: type[_T]) -> list[_T]:
    """A reply's list value, each item a ``kind`` (never a bool), as :func:`stage_reply_problem`
    checks; TypeError if it is not."""
    if isinstance(value, list):
        items = [v for v in value if isinstance(v, kind) and not isinstance(v, bool)]
        if len(items) == len(value):
            return items
    raise TypeError(f"expected a list of {kind.__name__}, got {type(value).__name__}")


def _stage(msg: Message) -> str | None:
    """The SecAgg+ stage an outgoing message asks for (the ``stage`` key the workflow sends)."""
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = record.get(Key.STAGE) if record is not None else None
    return stage if isinstance(stage, str) else None


def stage_reply_problem(stage: str | None, reply: Message, *, sampled: set[int]) -> str | None:
    """Why a reply cannot be handed to Flower's workflow for ``stage``: the keys it reads are
    missing or of the wrong type, paired lists differ in length, an unmask reply names a node
    outside the round; None if it can."""
    if stage not in STAGE_REPLY_KEYS:
        return f"a reply to a message of no SecAgg+ stage ({stage!r})"
    record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None:
        return f"no {RECORD_KEY_CONFIGS!r} record in its {stage} reply"
    lengths = []
    for key, kind in STAGE_REPLY_KEYS[stage].items():
        value = record.get(key)
        items = value if key in LIST_KEYS and isinstance(value, list) else [value]
        if value is None or (key in LIST_KEYS) != isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
            return f"its {stage} reply's {key!r} is {'missing' if value is None else 'of the wrong type'}"
        lengths.append(len(items))
    if len(set(lengths)) > 1:
        return f"its {stage} reply's lists differ in length {lengths}"
    if stage == Stage.UNMASK and not set(_items(record[Key.NODE_ID_LIST], int)) <= sampled:
        return "its unmask reply holds shares of a node outside this round"
    return None


class _Tap:
    """Grid wrapper between Flower's SecAgg+ workflow and the sites: each reply is checked for
    the stage the coordinator's message named (``check``: stage, reply -> why not usable);
    a malformed one reaches the workflow as that node's error reply (a dropout). Keeps the
    masked-vector stage's replies, where the site reports ride."""

    def __init__(self, grid: Grid, check: Callable[[str | None, Message], str | None]) -> None:
        self._grid = grid
        self._check = check
        self.masked_replies: list[Message] = []
        self.rejected: dict[int, str] = {}  # node -> why one of its replies was dropped (its first)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = []
        for reply in self._grid.send_and_receive(list(sent.values()), timeout=timeout):
            node = reply.metadata.src_node_id
            stage = _stage(sent[node]) if node in sent else None
            problem = None if reply.has_error() else self._check(stage, reply)
            if problem is not None:
                log.warning("SecAgg+ %s stage: the reply of node %d is dropped: %s", stage, node, problem)
                self.rejected.setdefault(node, problem)
                if node not in sent:
                    continue
                reply = Message(Error(code=ErrorCode.UNKNOWN, reason=f"its reply was rejected by the coordinator: {problem}"), reply_to=sent[node])
            replies.append(reply)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                self.masked_replies.append(reply)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _reports(replies: list[Message], asked: list[int], names: dict[int, str]) -> list[SiteReport]:
    """One report per site asked: its fitres.metrics, its error, or that it dropped out.

    ``names`` (node id -> site name for the run, :func:`server.strategy.claim_name`) names the
    sites that drop out; a site never heard from is ``node-<id>``. A report whose name is not
    its node's is recorded as that node's error (its masked update is in the sum regardless).
    """
    out, answered = [], set()
    contested = contested_names(
        (m.metadata.src_node_id, secure_records.decode(m.content.config_records[P.LEGACY_FITRES_METRICS])[0].get(P.SITE_NAME)) for m in replies if not m.has_error()
    )
    for msg in replies:
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_error():
            out.append(SiteReport(site=names.get(node, f"node-{node}"), node=node, error=f"dropped out of secure aggregation: {short_reason(str(msg.error.reason))}"))
            continue
        site, metrics = secure_records.decode(msg.content.config_records[P.LEGACY_FITRES_METRICS])
        name, problem = claim_name(names, node, site.get(P.SITE_NAME), contested)
        problem = problem or site_record_problem(site)
        if problem:
            out.append(SiteReport(site=name, node=node, error=f"malformed report rejected by the coordinator: {problem}"))
            continue
        report = SiteReport(site=name, metrics=metrics, ledger_head=site.get(P.LEDGER_HEAD), node=node,
                            evaluation=secure_records.decode_evaluation(msg.content.config_records[P.LEGACY_FITRES_METRICS]))
        if P.REFUSAL_CODE in site:
            report.refusal_code, report.refusal_reason = site[P.REFUSAL_CODE], one_line(site.get(P.REFUSAL_REASON, ""))
            report.metrics = {}
        if P.EVAL_REFUSAL_CODE in site:
            report.evaluation_refusal = (site[P.EVAL_REFUSAL_CODE], one_line(site.get(P.EVAL_REFUSAL_REASON, "")))
        out.append(report)
    for node in asked:
        if node not in answered:
            out.append(SiteReport(site=names.get(node, f"node-{node}"), error="no masked update (dropped out of secure aggregation before the masked-vector stage ended)", node=node))
    return sorted(out, key=lambda r: r.site)


def masked_reply_problem(reply: Message, *, strategy: PatientFedAvg, sa: SecureAggregationConfig, n_values: int) -> str | None:
    """Why a masked-vector stage reply may not enter the sum, or None: the masked vector is
    the quantised weight then one (n_values,) vector, as integers; ``fitres`` can be read; the
    weight is a whole number from 0 to ``max_weight`` (0 exactly for a refusal, the clear-text
    ``num-patients`` otherwise); the report passes the checks of a plain train reply."""
    try:
        vector = [bytes_to_ndarray(b) for b in _items(reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS], bytes)]
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the reply is unusable
        return f"its masked vector cannot be decoded ({type(exc).__name__})"
    shapes = [tuple(v.shape) for v in vector]
    if shapes != [(1,), (n_values,)] or any(v.dtype.kind not in "iu" for v in vector):
        return f"its masked vector has arrays of shapes {shapes}; a masked packed model is [(1,), ({n_values},)] of integers"
    try:
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    except Exception as exc:  # noqa: BLE001
        return f"its fitres records cannot be read ({type(exc).__name__}: {exc})"
    weight = fitres.num_examples
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not (np.isfinite(weight) and weight == int(weight) and 0 <= weight <= sa.max_weight):
        return f"its weight fitres.num_examples is {weight!r}; it must be a whole number from 0 to {sa.max_weight:g} (`federation.secure_aggregation.max_weight`)"
    record = reply.content.config_records[P.LEGACY_FITRES_METRICS]
    problem = secure_records.problem(record)
    if problem:
        return problem
    site, metrics = secure_records.decode(record)
    if P.REFUSAL_CODE in site:
        if weight != 0:
            return f"it refuses the round but weights its vector by {weight!r}; a refusal's weight is 0"
    elif metrics.get(M.NUM_PATIENTS) != weight or weight < 1:
        return f"its clear-text {M.NUM_PATIENTS} ({metrics.get(M.NUM_PATIENTS)!r}) is not its weight in the sum (fitres.num_examples {weight!r})"
    return strategy.metrics_problem(metrics)


def secure_train_round(grid: Grid, *, strategy: PatientFedAvg, sa: SecureAggregationConfig, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> SecureRoundResult:
    """Train one round with SecAgg+; the result is the patient-weighted average or a halt."""
    plain = list(strategy.configure_train(server_round, arrays, config, grid))  # sampling + the node list the log needs
    nodes = [m.metadata.dst_node_id for m in plain]
    round_log = strategy.log.setdefault(server_round, RoundLog())
    needed = max(2, sa.reconstruction_threshold)
    if len(nodes) < needed:
        round_log.train = [SiteReport(site=strategy.node_names.get(n, f"node-{n}"), node=n, error="not trained: too few sites for secure aggregation") for n in nodes]
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
    n_values = int(sum(int(np.prod(shape)) for shape in layout.values()))

    def check(stage: str | None, reply: Message) -> str | None:
        problem = stage_reply_problem(stage, reply, sampled=set(nodes))
        if problem is None and stage == Stage.COLLECT_MASKED_VECTORS:
            problem = masked_reply_problem(reply, strategy=strategy, sa=sa, n_values=n_values)
        return problem

    tap = _Tap(grid, check)
    try:
        workflow(tap, context)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a reply the checks missed must not stop the coordinator: the round halts
        log.exception("round %d: SecAgg+ workflow failed", server_round)
        round_log.train = _reports(tap.masked_replies, nodes, strategy.node_names)
        text = " ".join(str(exc).split())[:200]
        return SecureRoundResult(None, None, halted=f"secure aggregation failed on a reply it could not process ({type(exc).__name__}: {text}); nothing was aggregated.")
    reports = _reports(tap.masked_replies, nodes, strategy.node_names)
    for r in reports:  # a site dropped before the masked-vector stage for a malformed reply: say why
        if r.node in tap.rejected and r.error and r.error.startswith("no masked update"):
            r.error = f"dropped out of secure aggregation: its reply was rejected by the coordinator: {tap.rejected[r.node]}"
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
    if len(contributed) < needed:  # a sum of one is that site's update: never applied, never published
        return SecureRoundResult(None, None, halted=(
            f"only {len(contributed)} site(s) contributed a non-zero weight to the secure sum; a sum of fewer than {needed} "
            f"(max(2, `federation.secure_aggregation.reconstruction_threshold`)) would reveal a single site's update. Not applied."
        ))
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
    if problem is None:  # a weighted average of models the plan's training made moves no further than each (plus quantisation)
        problem = strategy.move_problem(flat, server_round, tolerance=2 * sa.clipping_range / sa.quantization_range, clip=sa.clipping_range)
    if problem:
        return SecureRoundResult(None, None, halted=f"the unmasked sum failed the coordinator's check: {problem}.")
    metrics = MetricRecord({M.NUM_PATIENTS: total})
    loss = weighted_mean(contributed, M.TRAIN_LOSS)
    if loss is not None:
        metrics[M.TRAIN_LOSS] = loss
    return SecureRoundResult(ArrayRecord({PACKED: Array(flat)}), metrics)
