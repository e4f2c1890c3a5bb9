"""The site's Flower ClientApp (Message API): train and evaluate handlers.

The experiment plan arrives in the message; the site's own ``site.yaml`` (from the
SuperNode's node config, or the simulation's site list) says where its data lives.
Replies carry only a DP-trained update, aggregate metrics and the site's name or refusal;
in a with-next-round run a train reply also carries the site's k-suppressed evaluation of
the model the message brought, evaluated after training (the round is charged first). A
model's evaluation leaves once per run and round, only in a run the site has trained in
(:mod:`client.releases`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat

from client import site as site_module
from client.approval import is_approved
from client.site import SITE_CACHE_ENV, DataIdentity, Refusal, Site, TrainResult, data_identity, site_cache_size  # noqa: F401 - SITE_CACHE_ENV: read by simulate and tests from here
from client.site_errors import PATH_WITHHELD, loggable, redacted, withheld, without_paths
from client.startup_checks import coordinator_key
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared import secure_records
from shared.config import ExperimentConfig, SecureAggregationConfig, SiteConfig, experiment_from_yaml_text, site_from_yaml_text
from shared.errors import ConfigError, FedrelapseError, PolicyError
from shared.faults import FaultPlan, InjectedCrash
from shared.model_signing import verify_model
from shared.models import build_model
from shared.params import Layout, check_arrays, flatten, pack, packed_vector, shapes, unflatten
from shared.schema import read_config_text

log = logging.getLogger("fedrelapse.clientapp")


def site_config_path(context: Context, sim_sites: tuple[str, ...]) -> Path:
    """This node's site.yaml: node config in deployment, the simulation's site list otherwise."""
    if P.NC_SITE_CONFIG in context.node_config:
        return Path(str(context.node_config[P.NC_SITE_CONFIG]))
    if not sim_sites or "partition-id" not in context.node_config:
        raise FileNotFoundError(
            f"This SuperNode has no `{P.NC_SITE_CONFIG}` in its node config; start it with "
            f"--node-config \"{P.NC_SITE_CONFIG}='/path/to/site.yaml'\"."
        )
    return Path(sim_sites[int(context.node_config["partition-id"]) % len(sim_sites)])


def site_config(path: Path) -> SiteConfig:
    """This node's ``site.yaml``, read at every message and validated again only when its text
    changed: an edit by the site's IT still applies from the next message, and an unchanged
    file is not parsed again (1.4 ms of a simulated site's 4.4 ms per-message set-up)."""
    return _site_config(str(path.absolute()), read_config_text(path))


@functools.lru_cache(maxsize=site_cache_size())
def _site_config(path: str, text: str) -> SiteConfig:
    return site_from_yaml_text(text, path)


def _import_training() -> None:
    """Import the DP training code (and Opacus) before a train handler starts its compute
    clock: a site process imports it only when it trains, and start-up is overhead, not compute."""
    importlib.import_module("client.dp_train")


def site_for(site_cfg: SiteConfig, exp: ExperimentConfig) -> Site:
    """This process's Site for (site, plan, data on disk now): built once, not per round, and
    built again when the manifest or a recording changed since (the SuperNode keeps running)."""
    return _site(site_cfg, exp, data_identity(site_cfg))


@functools.lru_cache(maxsize=site_cache_size())
def _site(site_cfg: SiteConfig, exp: ExperimentConfig, data: DataIdentity) -> Site:
    """One Site per (site, plan, data identity) per process: data and tensors are built once, not per round."""
    del data  # part of the cache key only (the Site's prepared data is memoised on the same identity)
    return Site(site_cfg, exp)


def _reply(
    msg: Message, site_name: str, *, metrics: dict[str, float] | None = None, arrays: ArrayRecord | None = None, refusal: Refusal | None = None, ledger_head: str = "",
    evaluation: dict[str, float] | Refusal | None = None,
) -> Message:
    """The reply; ``arrays`` is the packed update (:func:`shared.params.pack`), ``evaluation``
    the site's evaluation of the received model when the message asked for it first, or its
    refusal to release it (sent as the site record's evaluation refusal code and reason)."""
    content = RecordDict()
    info = ConfigRecord({P.SITE_NAME: site_name})
    if ledger_head:
        info[P.LEDGER_HEAD] = ledger_head
    if isinstance(evaluation, Refusal):
        info[P.EVAL_REFUSAL_CODE] = evaluation.code
        info[P.EVAL_REFUSAL_REASON] = without_paths(evaluation.reason)
        evaluation = None
    if refusal is not None:
        kind, cfg = msg.metadata.message_type, msg.content.config_records.get(P.CONFIG)
        log_refusal(site_name, 0 if kind == MessageType.QUERY else cfg.get(P.SERVER_ROUND) if cfg is not None else None, refusal.code, kind)
        info[P.REFUSAL_CODE] = refusal.code
        info[P.REFUSAL_REASON] = without_paths(refusal.reason)
    content[P.SITE] = info
    if arrays is not None:
        content[P.ARRAYS] = arrays
    if metrics is not None:
        content[P.METRICS] = MetricRecord(dict(metrics))  # a copy typed as Flower's value union (MetricRecord copies it anyway)
    if evaluation is not None:
        content[P.EVALUATION] = MetricRecord(dict(evaluation))
    return Message(content=content, reply_to=msg)


def log_refusal(site_name: str, server_round: object, code: str, kind: str) -> None:
    """The site's one log line for each refusal it sends: site, round (``?`` where the message
    has no usable one; 0 for the pre-flight query), code and message kind. Never the reason:
    the researcher gets that, IT finds the code here."""
    shown = server_round if isinstance(server_round, int) and not isinstance(server_round, bool) else "?"
    log.warning("site=%s refused round %s: %s (%s)", site_name, shown, code, kind)


@dataclass(frozen=True)
class Request:
    """What the coordinator asked, read and type-checked once per message."""

    run_id: str
    server_round: int  # 0 for the pre-flight query, which belongs to no round
    total_rounds: int
    plan_yaml: str
    arrays: OrderedDict[str, np.ndarray]  # the global model, unpacked (empty for the pre-flight query, and until the plan is read)
    packed: ArrayRecord | list[np.ndarray] | None = None  # the global model as it came (one float32 vector: a record, or SecAgg+'s fitins list); unpacked once the plan's model is known
    evaluate_first: bool = False  # evaluate the received model and send the evaluation with the train reply (with-next-round)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def read_request(msg: Message, site_name: str, *, needs_round: bool) -> Request | Refusal:
    """The message's config and model, or a ``malformed`` refusal naming what is wrong.

    A message that lacks a record or carries a value of the wrong type is answered with a
    structured refusal the researcher sees per site, never with a traceback.
    """
    cfg = msg.content.config_records.get(P.CONFIG)
    if cfg is None:
        return _malformed(site_name, f"it has no {P.CONFIG!r} config record")
    record = None
    if needs_round:
        record = msg.content.array_records.get(P.ARRAYS)
        if record is None:
            return _malformed(site_name, f"it has no {P.ARRAYS!r} array record (the global model)")
    req = request_from(cfg, OrderedDict(), site_name, needs_round=needs_round)
    return req if isinstance(req, Refusal) else replace(req, packed=record)


def _malformed(site_name: str, what: str) -> Refusal:
    return Refusal("malformed", f"Site {site_name} cannot use the coordinator's message: {what}; nothing was trained or charged.")


def request_from(cfg: ConfigRecord, arrays: OrderedDict[str, np.ndarray], site_name: str, *, needs_round: bool) -> Request | Refusal:
    """Type-check a config record (plain or SecAgg+ message) into a :class:`Request`."""
    for key in (P.RUN_ID, P.PLAN_YAML):
        if not isinstance(cfg.get(key), str) or not cfg[key]:
            return _malformed(site_name, f"{P.CONFIG}[{key!r}] must be a non-empty string, got {type(cfg.get(key)).__name__}")
    run_id_problem = P.run_id_problem(str(cfg[P.RUN_ID]))  # it goes into every ledger entry and log line of the run
    if run_id_problem is not None:
        return _malformed(site_name, f"{P.CONFIG}[{P.RUN_ID!r}] {run_id_problem}")
    total = cfg.get(P.TOTAL_ROUNDS)
    if not _is_int(total) or total < 1:
        return _malformed(site_name, f"{P.CONFIG}[{P.TOTAL_ROUNDS!r}] must be a whole number >= 1, got {total!r}")
    rnd = cfg.get(P.SERVER_ROUND) if needs_round else 0
    if not _is_int(rnd) or (needs_round and not 1 <= rnd <= total):  # the query's 0 is an int
        return _malformed(site_name, f"{P.CONFIG}[{P.SERVER_ROUND!r}] must be a whole number from 1 to {total}, got {rnd!r}")
    first = cfg.get(P.EVALUATE_FIRST, False)
    if not isinstance(first, bool):
        return _malformed(site_name, f"{P.CONFIG}[{P.EVALUATE_FIRST!r}] must be true or false, got {type(first).__name__}")
    return Request(run_id=str(cfg[P.RUN_ID]), server_round=int(rnd), total_rounds=int(total), plan_yaml=str(cfg[P.PLAN_YAML]), arrays=arrays, evaluate_first=first)


@functools.lru_cache(maxsize=8)
def model_shapes(exp: ExperimentConfig) -> Mapping[str, tuple[int, ...]]:
    """Parameter name -> shape of the plan's model, in its order; built once per plan and process
    (building the model for every message was 1.5 ms of a simulated site's 4.4 ms set-up)."""
    return MappingProxyType(shapes(build_model(exp)))


def unpack_model(site_name: str, packed: list[np.ndarray] | ArrayRecord, shapes_: Layout, server_round: int) -> OrderedDict[str, np.ndarray] | Refusal:
    """The packed global model (a record, or SecAgg+'s list of arrays) as name -> array in the
    plan model's layout: ``malformed`` if it is not one float32 vector, ``invalid-model`` if its
    length differs from the plan's model."""
    what = f"the global model of round {server_round}"
    try:
        if isinstance(packed, ArrayRecord):
            flat = packed_vector(packed, what=what)
        elif len(packed) == 1:
            flat = packed[0]
        else:
            return _malformed(site_name, f"{what} arrives as {len(packed)} arrays; a packed model is one float32 vector")
        if flat.ndim != 1 or flat.dtype != np.float32:
            return _malformed(site_name, f"{what} is a {flat.dtype} array of shape {tuple(flat.shape)}; a packed model is one float32 vector")
    except ValueError as exc:
        return _malformed(site_name, str(exc).rstrip("."))
    try:
        return unflatten(flat, shapes_, what=what)
    except ValueError as exc:
        return Refusal("invalid-model", f"Site {site_name} cannot load the global model: {exc} Nothing was trained or charged.")


def model_problem(site_name: str, exp: ExperimentConfig, arrays: dict[str, np.ndarray]) -> Refusal | None:
    """Refuse a global model that does not fit the plan's architecture or holds NaN/Inf."""
    try:
        check_arrays(model_shapes(exp), arrays)
    except ValueError as exc:
        return Refusal("invalid-model", f"Site {site_name} cannot load the global model: {exc} Nothing was trained or charged.")
    return None


def _setup(msg: Message, context: Context, sim_sites: tuple[str, ...], *, needs_round: bool) -> tuple[SiteConfig, Refusal | tuple[Request, Site]]:
    """This node's site config, and either a refusal or the checked request and its Site."""
    site_cfg = site_config(site_config_path(context, sim_sites))
    req = read_request(msg, site_cfg.name, needs_round=needs_round)
    if isinstance(req, Refusal):
        return site_cfg, req
    cfg = msg.content.config_records[P.CONFIG]
    return site_cfg, _check(site_cfg, cfg, req, kind=msg.metadata.message_type, secagg_setup=None, needs_round=needs_round)


@functools.lru_cache(maxsize=8)
def parse_plan(plan_yaml: str) -> ExperimentConfig:
    """The coordinator's plan, validated once per process and plan text (every message carries
    it; parsing it was a sixth of a simulated site's time per message). Errors are not cached."""
    return experiment_from_yaml_text(plan_yaml, source="training plan from the coordinator")


def _plan(site_cfg: SiteConfig, req: Request) -> ExperimentConfig | Refusal:
    """The coordinator's plan, or an ``invalid`` refusal sent as it is (the coordinator's own text).

    Parsing is cheap and touches no data: every check of the plan against the site's policy
    runs on its result before :func:`_site_data` loads anything.
    """
    try:
        return parse_plan(req.plan_yaml)
    except FedrelapseError as exc:
        return Refusal("invalid", f"Site {site_cfg.name}: {exc}")


def _folders(site_cfg: SiteConfig) -> dict[str, Path]:
    """The site's state folder and data folder (the manifest's), which its log lines never show (:func:`client.site_errors.redacted`)."""
    return {"state_dir": site_cfg.state_dir, "data_root": site_cfg.manifest.absolute().parent}


def _site_data(site_cfg: SiteConfig, exp: ExperimentConfig) -> Site | Refusal:
    """This site's data prepared for the plan (features extracted, language model loaded), or an
    ``invalid`` refusal. A problem with the site's data (its manifest, recordings, paths) is
    logged here and only its class and a log reference are sent: its message may name
    patients or local files."""
    try:
        return site_for(site_cfg, exp)
    except FedrelapseError as exc:
        return Refusal("invalid", withheld(exc, site=site_cfg.name, doing="loading its data for this plan", **_folders(site_cfg)) + " `fedrelapse site check` shows the problem too.")


def _refused_by_policy(site_cfg: SiteConfig, exp: ExperimentConfig, *, kind: str, secure: bool) -> Refusal | None:
    """Whether the site's own policy allows this plan (approval, secure aggregation): read from
    site.yaml and the approvals file only, so a plan it refuses costs no data work."""
    if site_cfg.require_approved_plans:
        try:
            approved = is_approved(site_cfg, exp)
        except ConfigError as exc:  # a damaged or unreadable approvals file: no plan counts as approved; its path stays here
            return Refusal("unapproved-plan", withheld(exc, site=site_cfg.name, doing="reading its approved plans", **_folders(site_cfg)) + " Until its IT repairs that file, no plan counts as approved.")
        if not approved:
            return Refusal("unapproved-plan", f"Site {site_cfg.name} has not approved plan {exp.plan_hash()[:16]} ({exp.name}); its IT must run `fedrelapse site approve` first.")
    if site_cfg.policy.require_secure_aggregation:
        if kind == MessageType.QUERY and not exp.federation.secure_aggregation.enabled:
            return Refusal("no-secagg", f"Site {site_cfg.name} sends updates only under secure aggregation (policy require_secure_aggregation); the plan has federation.secure_aggregation.enabled = false.")
        if kind == MessageType.TRAIN and not secure:
            return Refusal("no-secagg", f"Site {site_cfg.name} sends updates only under secure aggregation (policy require_secure_aggregation); this round was not a SecAgg+ round.")
    return None


def _mismatch(site_name: str, what: str) -> Refusal:
    return Refusal("plan-mismatch", f"Site {site_name}: {what}; the site follows the plan it was sent, so nothing was trained or charged.")


def _rounds_mismatch(site_name: str, exp: ExperimentConfig, req: Request) -> Refusal | None:
    """Refuse a message whose round count is not the plan's.

    The site calibrates σ for ``total-rounds`` × ``training.local_steps`` steps, so a smaller
    count would train this round with less noise than the approved plan, and a larger one would
    let the coordinator train (and charge) rounds beyond it; a huge one made the pre-flight's σ
    search take minutes. The plan's ``federation.rounds`` is the only count the site uses; with
    it equal to ``total-rounds``, :func:`request_from`'s bound on ``server-round`` is the plan's.
    """
    rounds = exp.federation.rounds
    if req.total_rounds != rounds:
        return _mismatch(site_name, f"the coordinator's message says {P.CONFIG}[{P.TOTAL_ROUNDS!r}] = {req.total_rounds}, but the plan has `federation.rounds` = {rounds}")
    return None


# The SecAgg+ setup values a site holds against its plan: Flower's key, the plan's field.
# server.secure_round passes these plan fields to SecAggPlusWorkflow unchanged, and Flower sends
# them to the sites as they are for the plans shared.config admits (an odd integer num_shares
# >= 3, an integer threshold >= 2 below it; a float or a threshold of 1 would be scaled by the
# number of sites, and an even num_shares widened). The modulus is not a plan setting.
_SECAGG_SETUP_FIELDS = (
    (Key.SHARE_NUMBER, "num_shares"), (Key.THRESHOLD, "reconstruction_threshold"), (Key.CLIPPING_RANGE, "clipping_range"),
    (Key.TARGET_RANGE, "quantization_range"), (Key.MAX_WEIGHT, "max_weight"),
)


def _secagg_mismatch(site_name: str, exp: ExperimentConfig, setup: ConfigRecord) -> Refusal | None:
    """Refuse a SecAgg+ round whose setup values (kept by Flower's mod, see
    :func:`secure_aggregation_mod`) are not the plan's: with a threshold of 1 the coordinator
    and any one neighbour could unmask this site's update; a larger clipping range or maximum
    weight would change how it is quantised."""
    sa = exp.federation.secure_aggregation
    if not sa.enabled:
        return _mismatch(site_name, "this round is a SecAgg+ round, but the plan has `federation.secure_aggregation.enabled` = false")
    for key, name in _SECAGG_SETUP_FIELDS:
        sent, planned = setup.get(key), getattr(sa, name)
        if isinstance(sent, bool) or not isinstance(sent, (int, float)) or sent != planned:
            return _mismatch(site_name, f"the coordinator's SecAgg+ setup has {key} = {sent!r}, but the plan's `federation.secure_aggregation.{name}` is {planned!r}")
    return None


def _check(
    site_cfg: SiteConfig, cfg: ConfigRecord, req: Request, *, kind: str, secagg_setup: ConfigRecord | None, needs_round: bool,
) -> Refusal | tuple[Request, Site]:
    """The site's own checks of a plan and model, the same for plain and SecAgg+ messages;
    ``secagg_setup`` is a SecAgg+ round's setup state (None: a plain message).

    Order matters for cost: the plan is parsed and held against the site's policy, and the
    message against the plan (its round count, a SecAgg+ round's setup values), before any
    data work (feature extraction, loading a language model the plan names) or σ search, so
    a plan or message the site refuses costs it milliseconds, not a feature cache."""
    exp = _plan(site_cfg, req)
    if isinstance(exp, Refusal):
        return exp
    refusal = (
        _refused_by_policy(site_cfg, exp, kind=kind, secure=secagg_setup is not None) or _rounds_mismatch(site_cfg.name, exp, req)
        or (_secagg_mismatch(site_cfg.name, exp, secagg_setup) if secagg_setup is not None else None)
    )
    if refusal:
        return refusal
    site = _site_data(site_cfg, exp)
    if isinstance(site, Refusal):
        return site
    if needs_round:
        if req.packed is not None:
            arrays = unpack_model(site_cfg.name, req.packed, model_shapes(exp), req.server_round)
            if isinstance(arrays, Refusal):
                return arrays
            req = replace(req, arrays=arrays, packed=None)
        refusal = check_model_signature(site_cfg, cfg, req, exp.plan_hash()) or model_problem(site_cfg.name, exp, req.arrays)
        if refusal:
            return refusal
    return req, site


def check_model_signature(site_cfg: SiteConfig, cfg: ConfigRecord, req: Request, plan_hash: str) -> Refusal | None:
    """With a coordinator key configured, refuse an unsigned or altered global model."""
    try:
        key = coordinator_key(site_cfg)
    except FedrelapseError as exc:
        return Refusal("signature", withheld(exc, site=site_cfg.name, doing="reading its coordinator_public_key (site.yaml) to verify the global model", **_folders(site_cfg)))
    if key is None:  # site.yaml sets no coordinator_public_key
        log.warning("site=%s has no coordinator_public_key: global models are not verified", site_cfg.name)
        return None
    signature = cfg.get(P.MODEL_SIGNATURE, "")
    if not isinstance(signature, str) or not signature:
        return Refusal("signature", f"Site {site_cfg.name} refuses an unsigned global model.")
    ok = verify_model(key, dict(req.arrays), signature, run_id=req.run_id, server_round=req.server_round, plan_hash=plan_hash)
    if not ok:
        return Refusal("signature", f"Site {site_cfg.name}: the global model's signature does not verify (altered model, wrong round/run/plan, or wrong coordinator key); refused.")
    return None


def restart_process_state() -> None:
    """Forget what this process holds in memory (loaded data, Site objects), as a restart does.

    The ledger, keys and feature cache are on disk and survive, exactly as after a real restart.
    """
    _site.cache_clear()
    site_module._listed_files.cache_clear()
    parse_plan.cache_clear()
    _site_config.cache_clear()
    model_shapes.cache_clear()
    _simulation_app.cache_clear()
    site_module._load.cache_clear()


def _cost(started: float) -> dict[str, float]:
    """This reply's compute seconds and the serving process's peak RSS (no patient information)."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {M.COMPUTE_SECONDS: round(time.perf_counter() - started, 4), M.PEAK_RSS_MB: round(peak_kib / 1024, 1)}


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ train messages through Flower's secaggplus_mod; pass the rest through.

    Every message carrying the SecAgg+ record goes through the mod, which replaces the
    update by its masked vector before the reply leaves; so the train handler's SecAgg+
    path (which answers in the legacy ``fitres`` form) can never send an unmasked update.

    The SETUP stage's values (share_num, threshold, clipping_range, target_range, max_weight)
    are held against the plan, but not here: that stage carries only them, no plan, run id or
    round (the plan first arrives with the masked-vector stage's ``fitins.config``). The mod
    keeps them in ``context.state`` (``RECORD_KEY_STATE``) and :func:`_secure_train` compares
    them with the plan it then receives, before it trains (``plan-mismatch``). Refusing there
    is as safe as refusing at SETUP: a refusing site masks a zero vector with weight 0, so
    whatever threshold its secrets were shared with, unmasking it reveals nothing; and unlike
    an error at SETUP (which the coordinator sees only as a dropout), the refusal reaches the
    researcher with its reason.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _secure_evaluation(evaluation: dict[str, float] | Refusal | None) -> dict[str, Any]:
    """:func:`shared.secure_records.encode`'s evaluation arguments: the evaluation, or the refusal to release it."""
    if isinstance(evaluation, Refusal):
        return {"eval_refusal_code": evaluation.code, "eval_refusal_reason": without_paths(evaluation.reason)}
    return {"evaluation": evaluation}


def _fitres(msg: Message, arrays: list[np.ndarray], weight: int, report: ConfigRecord) -> Message:
    """Legacy fitres reply: the mod weights ``arrays`` by ``weight`` and masks them."""
    content = compat.fitres_to_recorddict(FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=weight, metrics={}), keep_input=True)
    content.config_records[P.LEGACY_FITRES_METRICS] = report
    return Message(content=content, reply_to=msg)


def check_secure_update(update: list[np.ndarray], incoming: list[np.ndarray], weight: float, sa: SecureAggregationConfig) -> str | None:
    """Why an update may not be masked and sent (checked here: the coordinator sees only the sum)."""
    if len(update) != len(incoming):
        return f"the update has {len(update)} arrays, the global model {len(incoming)}"
    for i, (u, g) in enumerate(zip(update, incoming, strict=True)):
        what = "the packed update" if len(update) == 1 else f"array {i}"
        if u.shape != g.shape:
            return f"{what} has shape {u.shape}, the global model's is {g.shape}"
        if not np.isfinite(u).all():
            return f"{what} holds NaN or infinite values"
        if u.size and float(np.abs(u).max()) > sa.clipping_range:
            return f"{what} exceeds ±{sa.clipping_range:g} (`federation.secure_aggregation.clipping_range`); it would be clipped in the secure sum"
    if weight > sa.max_weight:
        return f"its weight ({weight:g} training patients) exceeds `federation.secure_aggregation.max_weight` ({sa.max_weight:g})"
    return None


def _head_after(site: Site, evaluation: dict[str, float] | Refusal | None, head: str) -> str:
    """The ledger head a reply carries: ``head`` (its round's entry), or after a noised release
    (an evaluation that carries ε) the ledger's newest entry, so the head the coordinator
    records covers the release too (a DPO compares it with the ledger)."""
    if not isinstance(evaluation, dict) or M.EPSILON_RUN not in evaluation:
        return head
    try:
        return site.newest_head()
    except (OSError, PolicyError):  # the ledger went unreadable after the release: the round's own head still holds
        return head


def _evaluation(site: Site, arrays: dict[str, np.ndarray], *, run_id: str, model_round: int) -> dict[str, float]:
    """The site's aggregate metrics of run ``run_id``'s global model after ``model_round`` (k-suppressed,
    or a noised release: :meth:`Site.evaluate`), with their compute seconds."""
    started = time.perf_counter()
    metrics = site.evaluate(arrays, run_id=run_id, model_round=model_round)
    if site.exp.privacy.noised_metrics:  # its time and memory grow with the held-out patients, whom the noise hides
        return metrics
    return {**metrics, **_cost(started)}


def _evaluation_with_train(site: Site, req: Request) -> dict[str, float] | Refusal | None:
    """With-next-round: the received model's evaluation (the model after round ``server_round - 1``),
    sent with this train reply; the site's refusal to release it (sent as the reply's evaluation
    refusal, so the researcher sees why); None when the message did not ask for one.

    Made after training, so that this message's round is charged first: an evaluation leaves
    only in a run the site has paid into, once per model (:meth:`Site.reserve_evaluation`).
    Training never changes the received arrays, so it is the model as received. A failed
    evaluation is logged here and gives None, and the update still goes out; the coordinator
    records that the reply carried no evaluation."""
    if not req.evaluate_first:
        return None
    model_round = req.server_round - 1
    try:
        refusal = site.reserve_evaluation(req.arrays, run_id=req.run_id, model_round=model_round, total_rounds=req.total_rounds)
        if refusal is not None:
            log.warning("site=%s sends no evaluation of round %d's model: %s", site.cfg.name, model_round, refusal.code)
            return refusal
        return _evaluation(site, req.arrays, run_id=req.run_id, model_round=model_round)
    except Exception as exc:  # noqa: BLE001 - any failure of the evaluation alone must not cost the update
        log.error("site=%s run=%s round=%d could not evaluate the global model of round %d; the update is sent without an evaluation "
                  "(patient data and local paths withheld):\n%s", site.cfg.name, req.run_id, req.server_round, model_round, loggable(exc, **_folders(site.cfg)))
        return None


def policy_refusal(site_cfg: SiteConfig, exc: PolicyError) -> Refusal:
    """The structured refusal for a policy error: its code (``ledger`` unless the error names
    another, e.g. ``budget`` for an ε no noise can reach) and its sentence, which the site's
    own code wrote about its ledger, keys or budget (never patient data); local paths in it
    are withheld when the reply is built. The site's log keeps the full text."""
    log.warning("site=%s refuses: %s", site_cfg.name, redacted(str(exc), **_folders(site_cfg)))  # the ledger file by its place in <state_dir>
    text = str(exc)
    for folder in sorted({str(site_cfg.state_dir.absolute()), str(site_cfg.state_dir.resolve()), str(site_cfg.state_dir)}, key=len, reverse=True):
        text = text.replace(folder, PATH_WITHHELD)  # the site's own folder, whole, even where a space would end the pattern in without_paths
    return Refusal(getattr(exc, "refusal_code", "ledger"), f"Site {site_cfg.name}: {text}")


def _train(site_name: str, site: Site, req: Request, faults: FaultPlan | None) -> tuple[TrainResult | Refusal, float]:
    """One round of local training for a plain or SecAgg+ message; (result, compute start)."""
    if faults is not None:
        faults.before_training(site_name, req.server_round)
    _import_training()
    started = time.perf_counter()
    try:
        return site.train(req.arrays, run_id=req.run_id, server_round=req.server_round, total_rounds=req.total_rounds), started
    except PolicyError as exc:  # a ledger that fails its integrity check, an ε no noise reaches: our own sentences, no patient data (paths are withheld in _reply)
        return policy_refusal(site.cfg, exc), started


def _secure_train(msg: Message, context: Context, sim_sites: tuple[str, ...], faults: FaultPlan | None) -> Message:
    """A SecAgg+ train round: DP-train, check the update here, hand it to the mod to mask.

    DP noise is added during local training (train_dp), before the mod masks the result.
    A refusing site still takes part in the protocol with weight 0 and a zero vector, so
    the other sites' round completes and the refusal reaches the researcher. Asked to
    evaluate first (with-next-round), the site evaluates the received model after training
    (:func:`_evaluation_with_train`) and sends the evaluation in ``fitres.metrics``
    (``eval.<key>``), with its refusal too if it refused to train.
    """
    cfg = msg.content.config_records[P.LEGACY_FITINS_CONFIG]
    incoming = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content.array_records[P.LEGACY_FITINS_ARRAYS], keep_input=True))
    zeros = [np.zeros_like(a) for a in incoming]
    site_cfg = site_config(site_config_path(context, sim_sites))

    def refuse(refusal: Refusal, evaluation: dict[str, float] | Refusal | None = None) -> Message:
        log_refusal(site_cfg.name, cfg.get(P.SERVER_ROUND), refusal.code, "secure train")
        report = secure_records.encode(site_name=site_cfg.name, metrics=None, refusal_code=refusal.code, refusal_reason=without_paths(refusal.reason), **_secure_evaluation(evaluation))
        return _fitres(msg, zeros, 0, report)

    req = request_from(cfg, OrderedDict(), site_cfg.name, needs_round=True)
    if isinstance(req, Refusal):
        return refuse(req)
    setup = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord())  # this round's SETUP values, kept by Flower's mod
    checked = _check(site_cfg, cfg, replace(req, packed=incoming), kind=MessageType.TRAIN, secagg_setup=setup, needs_round=True)
    if isinstance(checked, Refusal):
        return refuse(checked)
    req, site = checked
    result, started = _train(site_cfg.name, site, req, faults)
    cost = _cost(started)  # training's own, before the evaluation (its time and memory grow with the held-out patients)
    evaluation = _evaluation_with_train(site, req)
    if isinstance(result, Refusal):
        return refuse(result, evaluation)
    update = [flatten(result.arrays, model_shapes(site.exp))]  # one (N,) float32 vector, the global model's layout
    weight = result.metrics[M.NUM_PATIENTS]
    problem = check_secure_update(update, incoming, weight, site.exp.federation.secure_aggregation)
    if problem:
        return refuse(Refusal("update-check", f"Site {site_cfg.name}: round {req.server_round}'s update was not sent: {problem}."), evaluation)
    report = secure_records.encode(site_name=site_cfg.name, metrics={**result.metrics, **cost}, ledger_head=_head_after(site, evaluation, result.ledger_head), **_secure_evaluation(evaluation))
    return _fitres(msg, update, int(weight), report)


def _site_of(context: Context, sim_sites: tuple[str, ...]) -> SiteConfig | None:
    """This node's site config for an error reply and its log line, or None if its site.yaml cannot be read."""
    try:
        return site_config(site_config_path(context, sim_sites))
    except Exception:  # noqa: BLE001 - the reply must go out whatever is wrong with site.yaml
        return None


class _PicklesAsItsBuild(ClientApp):
    """The site's ClientApp: it pickles as the arguments that built it, and no exception's text leaves it.

    Flower's Simulation Engine sends the ClientApp to a Ray actor with every message, pickled
    by value (its handlers are closures): about 1 ms per message each way, and the actor
    unpickled a new app each time. Pickled as its build arguments, the actor builds it from
    this module instead, once per process (:func:`_rebuilt_client_app`).

    Flower answers a ClientApp that raises with an error reply holding ``str(exception)``,
    which can name a patient or a local path (an ``IsADirectoryError`` on a transcript did).
    This app answers an unexpected exception itself: the error is logged at the site under a
    reference, without patient data or local paths (:func:`client.site_errors.loggable`), and the error reply names only the exception's class and that
    reference (:func:`client.site_errors.withheld`). A test fault (InjectedCrash) is raised
    as it is: its text is the test's.
    """

    def __init__(self, build_args: tuple[tuple[str, ...], FaultPlan | None, tuple[Mod, ...]], *, mods: list[Mod]) -> None:
        super().__init__(mods=mods)
        self._build_args = build_args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuilt_client_app, self._build_args

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            return super().__call__(message, context)
        except InjectedCrash:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered, without its text
            site_cfg = _site_of(context, self._build_args[0])
            site, folders = ("this site", {}) if site_cfg is None else (site_cfg.name, _folders(site_cfg))
            reason = withheld(exc, site=site, doing=f"its ClientApp, handling a {message.metadata.message_type} message,", **folders)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def _rebuilt_client_app(sim_sites: tuple[str, ...], faults: FaultPlan | None, inner_mods: tuple[Mod, ...]) -> ClientApp:
    """The unpickled ClientApp: one per process and site list; with test faults or mods, a new
    one per message as before (their state is the copy the message carried)."""
    if faults is None and not inner_mods:
        return _simulation_app(sim_sites)
    return build_client_app(sim_sites, faults, inner_mods)


@functools.lru_cache(maxsize=4)
def _simulation_app(sim_sites: tuple[str, ...]) -> ClientApp:
    return build_client_app(sim_sites)


def build_client_app(sim_sites: tuple[str, ...] = (), faults: FaultPlan | None = None, inner_mods: tuple[Mod, ...] = ()) -> ClientApp:
    """The ClientApp; ``sim_sites`` maps simulated partition ids to site.yaml paths.

    ``faults`` is for tests in the Simulation Engine only (see :mod:`shared.faults`).
    ``inner_mods`` run inside the SecAgg+ mod, on the handler's side (tests use one to
    inject a site crash in the masked-vector stage; production passes none).
    """
    client_app = _PicklesAsItsBuild((sim_sites, faults, inner_mods), mods=[secure_aggregation_mod, *inner_mods])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if P.LEGACY_FITINS_ARRAYS in msg.content.array_records:
            if RECORD_KEY_CONFIGS not in msg.content.config_records:  # not routed through secaggplus_mod
                raise ValueError("A legacy train message outside SecAgg+ is refused: the update would leave the site unmasked.")
            return _secure_train(msg, context, sim_sites, faults)
        site_cfg, setup = _setup(msg, context, sim_sites, needs_round=True)
        if isinstance(setup, Refusal):
            return _reply(msg, site_cfg.name, refusal=setup)
        req, site = setup
        result, started = _train(site_cfg.name, site, req, faults)
        if faults is not None:
            try:
                faults.after_training(site_cfg.name, req.server_round)
            except InjectedCrash:
                restart_process_state()
                raise
        cost = _cost(started)  # training's own: taken before the evaluation, whose time and memory grow with the held-out patients
        evaluation = _evaluation_with_train(site, req)  # after training: the round is charged first
        head = _head_after(site, evaluation, result.ledger_head)
        if isinstance(result, Refusal):
            return _reply(msg, site_cfg.name, refusal=result, evaluation=evaluation, metrics=result.metrics or None, ledger_head=head)
        return _reply(
            msg, site_cfg.name, arrays=pack(result.arrays, model_shapes(site.exp)), metrics={**result.metrics, **cost}, ledger_head=head,
            evaluation=evaluation,
        )

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site_cfg, setup = _setup(msg, context, sim_sites, needs_round=True)
        if isinstance(setup, Refusal):
            return _reply(msg, site_cfg.name, refusal=setup)
        req, site = setup
        try:
            refusal = site.reserve_evaluation(req.arrays, run_id=req.run_id, model_round=req.server_round, total_rounds=req.total_rounds)
        except PolicyError as exc:  # a ledger that fails its integrity check
            refusal = policy_refusal(site_cfg, exc)
        if refusal is not None:
            return _reply(msg, site_cfg.name, refusal=refusal)
        metrics = _evaluation(site, req.arrays, run_id=req.run_id, model_round=req.server_round)
        return _reply(msg, site_cfg.name, metrics=metrics, ledger_head=_head_after(site, metrics, ""))

    @client_app.query()
    def plan(msg: Message, context: Context) -> Message:
        """Pre-flight: what the run would cost here, and whether the site would refuse it."""
        site_cfg, setup = _setup(msg, context, sim_sites, needs_round=False)
        if isinstance(setup, Refusal):
            return _reply(msg, site_cfg.name, refusal=setup)
        req, site = setup
        try:
            out = site.plan(run_id=req.run_id, total_rounds=req.total_rounds)
        except PolicyError as exc:
            return _reply(msg, site_cfg.name, refusal=policy_refusal(site_cfg, exc))
        metrics = {M.EPSILON_RUN: float(out["epsilon_run"]), M.EPSILON_REMAINING: float(out["epsilon_remaining"]), M.NOISE_MULTIPLIER: float(out["noise_multiplier"]), M.DELTA: float(out["delta"])}
        refusal = Refusal(str(out["code"]), str(out["reason"])) if out["code"] != "ok" else None
        return _reply(msg, site_cfg.name, metrics=metrics, refusal=refusal)

    return client_app


app = build_client_app()  # the Deployment Engine's entry point (site from node config)
