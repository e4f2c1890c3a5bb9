"""The site's Flower ClientApp (Message API): train and evaluate handlers.

The experiment plan arrives in the message; the site's own ``site.yaml`` (from the
SuperNode's node config, or the simulation's site list) says where its data lives.
Replies carry only a DP-trained update, aggregate metrics and the site's name or refusal.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.approval import is_approved
from client.site import Refusal, Site
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared import secure_records, signing
from shared.config import ExperimentConfig, SecureAggregationConfig, SiteConfig, experiment_from_yaml_text, load_site
from shared.errors import FedrelapseError, PolicyError
from shared.model_signing import verify_model
from shared.models import build_model
from shared.params import from_record, to_record

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


@functools.lru_cache(maxsize=4)
def _site(site_cfg: SiteConfig, exp: ExperimentConfig) -> Site:
    """One Site per (site, plan) per process: data and tensors are built once, not per round."""
    return Site(site_cfg, exp)


def _reply(msg: Message, site_name: str, *, metrics: dict[str, float] | None = None, arrays: dict | None = None, refusal: Refusal | None = None, ledger_head: str = "") -> Message:
    content = RecordDict()
    info = ConfigRecord({P.SITE_NAME: site_name})
    if ledger_head:
        info[P.LEDGER_HEAD] = ledger_head
    if refusal is not None:
        info[P.REFUSAL_CODE] = refusal.code
        info[P.REFUSAL_REASON] = refusal.reason
    content[P.SITE] = info
    if arrays is not None:
        content[P.ARRAYS] = to_record(arrays)
    if metrics is not None:
        content[P.METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def _setup(msg: Message, context: Context, sim_sites: tuple[str, ...], *, secure: bool = False) -> tuple[SiteConfig, Site | Refusal]:
    """Site and plan for a Message-API message (plain train, evaluate, query)."""
    arrays = from_record(msg.content[P.ARRAYS]) if P.ARRAYS in msg.content.array_records else None
    return _setup_from(msg.content[P.CONFIG], arrays, context, sim_sites, kind=msg.metadata.message_type, secure=secure)


def _setup_from(cfg: ConfigRecord, arrays: dict[str, np.ndarray] | None, context: Context, sim_sites: tuple[str, ...], *, kind: str, secure: bool) -> tuple[SiteConfig, Site | Refusal]:
    site_cfg = load_site(site_config_path(context, sim_sites))
    try:
        exp = experiment_from_yaml_text(str(cfg[P.PLAN_YAML]), source="training plan from the coordinator")
        site = _site(site_cfg, exp)
    except FedrelapseError as exc:
        return site_cfg, Refusal("invalid", f"Site {site_cfg.name}: {exc}")
    if site_cfg.require_approved_plans and not is_approved(site_cfg, exp):
        return site_cfg, Refusal("unapproved-plan", f"Site {site_cfg.name} has not approved plan {exp.plan_hash()[:16]} ({exp.name}); its IT must run `fedrelapse site approve` first.")
    if site_cfg.policy.require_secure_aggregation:
        if kind == MessageType.QUERY and not exp.federation.secure_aggregation.enabled:
            return site_cfg, Refusal("no-secagg", f"Site {site_cfg.name} sends updates only under secure aggregation (policy require_secure_aggregation); the plan has federation.secure_aggregation.enabled = false.")
        if kind == MessageType.TRAIN and not secure:
            return site_cfg, Refusal("no-secagg", f"Site {site_cfg.name} sends updates only under secure aggregation (policy require_secure_aggregation); this round was not a SecAgg+ round.")
    if arrays is not None:
        refusal = check_model_signature(site_cfg, cfg, arrays, exp.plan_hash())
        if refusal:
            return site_cfg, refusal
    return site_cfg, site


def check_model_signature(site_cfg: SiteConfig, cfg: ConfigRecord, arrays: dict[str, np.ndarray], plan_hash: str) -> Refusal | None:
    """With a coordinator key configured, refuse an unsigned or altered global model."""
    if site_cfg.coordinator_public_key is None:
        log.warning("site=%s has no coordinator_public_key: global models are not verified", site_cfg.name)
        return None
    try:
        key = signing.load_public(site_cfg.coordinator_public_key)
    except FedrelapseError as exc:
        return Refusal("signature", f"Site {site_cfg.name}: {exc}")
    signature = str(cfg.get(P.MODEL_SIGNATURE, ""))
    if not signature:
        return Refusal("signature", f"Site {site_cfg.name} refuses an unsigned global model.")
    ok = verify_model(key, arrays, signature, run_id=str(cfg[P.RUN_ID]), server_round=int(cfg[P.SERVER_ROUND]), plan_hash=plan_hash)  # type: ignore[arg-type]
    if not ok:
        return Refusal("signature", f"Site {site_cfg.name}: the global model's signature does not verify (altered model, wrong round/run/plan, or wrong coordinator key); refused.")
    return None


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ train messages through Flower's secaggplus_mod; pass the rest through.

    Every message carrying the SecAgg+ record goes through the mod, which replaces the
    update by its masked vector before the reply leaves; so the train handler's SecAgg+
    path (which answers in the legacy ``fitres`` form) can never send an unmasked update.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


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
        if u.shape != g.shape:
            return f"array {i} has shape {u.shape}, the global model's is {g.shape}"
        if not np.isfinite(u).all():
            return f"array {i} holds NaN or infinite values"
        if u.size and float(np.abs(u).max()) > sa.clipping_range:
            return f"array {i} exceeds ±{sa.clipping_range:g} (`federation.secure_aggregation.clipping_range`); it would be clipped in the secure sum"
    if weight > sa.max_weight:
        return f"its weight ({weight:g} training patients) exceeds `federation.secure_aggregation.max_weight` ({sa.max_weight:g})"
    return None


def _secure_train(msg: Message, context: Context, sim_sites: tuple[str, ...]) -> Message:
    """A SecAgg+ train round: DP-train, check the update here, hand it to the mod to mask.

    DP noise is added during local training (train_dp), before the mod masks the result.
    A refusing site still takes part in the protocol with weight 0 and a zero vector, so
    the other sites' round completes and the refusal reaches the researcher.
    """
    cfg = msg.content.config_records[P.LEGACY_FITINS_CONFIG]
    incoming = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content.array_records[P.LEGACY_FITINS_ARRAYS], keep_input=True))
    zeros = [np.zeros_like(a) for a in incoming]
    site_cfg, site = _setup_from(cfg, None, context, sim_sites, kind=MessageType.TRAIN, secure=True)

    def refuse(refusal: Refusal) -> Message:
        log.warning("site=%s refused secure round %s: %s", site_cfg.name, cfg.get(P.SERVER_ROUND), refusal.code)
        return _fitres(msg, zeros, 0, secure_records.encode(site_name=site_cfg.name, metrics=None, refusal_code=refusal.code, refusal_reason=refusal.reason))

    if isinstance(site, Refusal):
        return refuse(site)
    names = list(build_model(site.exp).state_dict())
    if len(names) != len(incoming):
        return refuse(Refusal("invalid", f"Site {site_cfg.name}: the global model has {len(incoming)} arrays, the plan's model {len(names)}."))
    arrays = OrderedDict(zip(names, incoming, strict=True))
    refusal = check_model_signature(site_cfg, cfg, arrays, site.exp.plan_hash())
    if refusal:
        return refuse(refusal)
    try:
        result = site.train(arrays, run_id=str(cfg[P.RUN_ID]), server_round=int(cfg[P.SERVER_ROUND]), total_rounds=int(cfg[P.TOTAL_ROUNDS]))  # type: ignore[arg-type]
    except PolicyError as exc:
        result = Refusal("ledger", str(exc))
    if isinstance(result, Refusal):
        return refuse(result)
    update = [result.arrays[n] for n in names]  # global model order
    weight = result.metrics[M.NUM_PATIENTS]
    problem = check_secure_update(update, incoming, weight, site.exp.federation.secure_aggregation)
    if problem:
        return refuse(Refusal("update-check", f"Site {site_cfg.name}: round {cfg[P.SERVER_ROUND]}'s update was not sent: {problem}."))
    report = secure_records.encode(site_name=site_cfg.name, metrics=result.metrics, ledger_head=result.ledger_head)
    return _fitres(msg, update, int(weight), report)


def build_client_app(sim_sites: tuple[str, ...] = (), inner_mods: tuple[Mod, ...] = ()) -> ClientApp:
    """The ClientApp; ``sim_sites`` maps simulated partition ids to site.yaml paths.

    ``inner_mods`` run inside the SecAgg+ mod, on the handler's side (tests use one to
    inject a site crash in the masked-vector stage; production passes none).
    """
    client_app = ClientApp(mods=[secure_aggregation_mod, *inner_mods])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if P.LEGACY_FITINS_ARRAYS in msg.content.array_records:
            if RECORD_KEY_CONFIGS not in msg.content.config_records:  # not routed through secaggplus_mod
                raise ValueError("A legacy train message outside SecAgg+ is refused: the update would leave the site unmasked.")
            return _secure_train(msg, context, sim_sites)
        site_cfg, site = _setup(msg, context, sim_sites)
        if isinstance(site, Refusal):
            return _reply(msg, site_cfg.name, refusal=site)
        cfg = msg.content[P.CONFIG]
        arrays = from_record(msg.content[P.ARRAYS])
        try:
            result = site.train(arrays, run_id=str(cfg[P.RUN_ID]), server_round=int(cfg[P.SERVER_ROUND]), total_rounds=int(cfg[P.TOTAL_ROUNDS]))
        except PolicyError as exc:  # e.g. a ledger that fails its integrity check
            result = Refusal("ledger", str(exc))
        if isinstance(result, Refusal):
            log.warning("site=%s refused round %s: %s", site_cfg.name, cfg[P.SERVER_ROUND], result.code)
            return _reply(msg, site_cfg.name, refusal=result)
        return _reply(msg, site_cfg.name, arrays=result.arrays, metrics=result.metrics, ledger_head=result.ledger_head)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site_cfg, site = _setup(msg, context, sim_sites)
        if isinstance(site, Refusal):
            return _reply(msg, site_cfg.name, refusal=site)
        return _reply(msg, site_cfg.name, metrics=site.evaluate(from_record(msg.content[P.ARRAYS])))

    @client_app.query()
    def plan(msg: Message, context: Context) -> Message:
        """Pre-flight: what the run would cost here, and whether the site would refuse it."""
        site_cfg, site = _setup(msg, context, sim_sites)
        if isinstance(site, Refusal):
            return _reply(msg, site_cfg.name, refusal=site)
        cfg = msg.content[P.CONFIG]
        try:
            out = site.plan(run_id=str(cfg[P.RUN_ID]), total_rounds=int(cfg[P.TOTAL_ROUNDS]))
        except PolicyError as exc:
            return _reply(msg, site_cfg.name, refusal=Refusal("ledger", str(exc)))
        metrics = {M.EPSILON_RUN: float(out["epsilon_run"]), M.EPSILON_REMAINING: float(out["epsilon_remaining"]), M.NOISE_MULTIPLIER: float(out["noise_multiplier"]), M.DELTA: float(out["delta"])}
        refusal = Refusal(str(out["code"]), str(out["reason"])) if out["code"] != "ok" else None
        return _reply(msg, site_cfg.name, metrics=metrics, refusal=refusal)

    return client_app


app = build_client_app()  # the Deployment Engine's entry point (site from node config)
