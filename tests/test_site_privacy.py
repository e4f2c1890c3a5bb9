"""Site-side privacy invariants: ledger before update, no double charge, caps, k-suppression,
and replies that carry nothing patient-level."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.app import build_client_app
from client.site import Refusal, Site, TrainResult
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.config import SiteConfig, load_site
from shared.errors import PolicyError
from shared.models import build_model
from shared.params import PACKED, get_arrays, layout, pack, unpack
from shared.privacy import ledger
from tests.conftest import tiny_experiment


@pytest.fixture
def site(tiny_cohort: Path, alpha_state: Path) -> Site:
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    return Site(replace(cfg, state_dir=alpha_state), tiny_experiment())


def start_arrays() -> dict[str, np.ndarray]:
    return dict(get_arrays(build_model(tiny_experiment())))


def test_ledger_entry_is_written_before_the_update_is_returned(site: Site) -> None:
    result = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(result, TrainResult)
    entries = ledger.read_entries(site.ledger_path)
    assert [(e.run_id, e.round) for e in entries] == [("r1", 1)]
    assert entries[0].epsilon_run == pytest.approx(result.metrics[M.EPSILON_RUN])
    assert entries[0].noise_multiplier > 0 and entries[0].sample_rate > 0


def test_replayed_round_is_refused_and_not_charged_twice(site: Site) -> None:
    site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    again = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(again, Refusal) and again.code == "replay"
    assert len(ledger.read_entries(site.ledger_path)) == 1
    (entry,) = ledger.read_entries(site.ledger_path)  # the replay reports what the round was charged, so a resumed run's summary is not short
    assert again.metrics == {M.EPSILON_RUN: entry.epsilon_run, M.EPSILON_TOTAL: entry.epsilon_total, M.DELTA: entry.delta, M.NOISE_MULTIPLIER: entry.noise_multiplier}
    assert again.ledger_head == entry.hash


def test_round_beyond_the_runs_budget_is_refused_with_a_reason(site: Site) -> None:
    for rnd in (1, 2):
        assert isinstance(site.train(start_arrays(), run_id="r1", server_round=rnd, total_rounds=2), TrainResult)
    over = site.train(start_arrays(), run_id="r1", server_round=3, total_rounds=2)
    assert isinstance(over, Refusal) and over.code == "budget" and "ε=" in over.reason


def test_epsilon_across_runs_accumulates_on_the_same_dataset(site: Site) -> None:
    a = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    b = site.train(start_arrays(), run_id="r2", server_round=1, total_rounds=2)
    assert isinstance(a, TrainResult) and isinstance(b, TrainResult)
    assert b.metrics[M.EPSILON_RUN] == pytest.approx(a.metrics[M.EPSILON_RUN])
    assert b.metrics[M.EPSILON_TOTAL] > a.metrics[M.EPSILON_TOTAL]


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder"])
def test_tampered_ledger_is_detected(site: Site, tamper: str) -> None:
    for rnd in (1, 2):
        site.train(start_arrays(), run_id="r1", server_round=rnd, total_rounds=2)
    lines = site.ledger_path.read_text().splitlines(keepends=True)
    if tamper == "edit":
        body = json.loads(lines[0])
        body["noise_multiplier"] *= 2
        lines[0] = json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"
    elif tamper == "delete":
        lines = lines[1:]
    else:
        lines = lines[::-1]
    site.ledger_path.write_text("".join(lines))
    with pytest.raises(PolicyError):
        ledger.read_entries(site.ledger_path)


def test_a_half_written_last_line_is_ignored_not_miscounted(site: Site) -> None:
    site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    with site.ledger_path.open("a") as fh:
        fh.write('{"version": 1, "run_id": "r1", "rou')  # crash mid-write: no newline
    assert len(ledger.read_entries(site.ledger_path)) == 1


def _with_k(site: Site, k: int) -> None:
    site.cfg = replace(site.cfg, policy=replace(site.cfg.policy, min_patients_metric=1))
    site.exp = replace(site.exp, federation=replace(site.exp.federation, min_patients_metric=k))


def test_the_train_loss_leaves_only_when_it_covers_k_distinct_patients(site: Site) -> None:
    """A plan of 1 patient a step and 1 step would make the train loss one patient's own loss on the global model."""
    _with_k(site, 1)
    result = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(result, TrainResult) and M.TRAIN_LOSS in result.metrics
    _with_k(site, site.train_set.n_patients)  # training is allowed (n ≥ k), but one step of one patient covers fewer than k
    site.exp = replace(site.exp, training=replace(site.exp.training, batch_patients=1, local_steps=1))
    result = site.train(start_arrays(), run_id="r2", server_round=1, total_rounds=2)
    assert isinstance(result, TrainResult) and M.TRAIN_LOSS not in result.metrics
    assert M.NUM_PATIENTS in result.metrics and M.EPSILON_RUN in result.metrics  # the update and its accounting still go


@pytest.mark.parametrize("private", [True, False])
def test_step_stats_count_the_distinct_patients_the_loss_covers(site: Site, private: bool) -> None:
    import torch

    from client.dp_train import make_optimizer, train_dp, train_plain

    data, t = site.train_set, site.exp.training
    for rate, expected in ((1.0, data.n_patients), (1e-12, 0)):  # everyone every step; no one
        model = build_model(site.exp)
        kw: dict[str, Any] = {"steps": 2, "sample_rate": rate, "max_sessions": t.max_sessions_per_patient, "optimizer": make_optimizer(model, name=t.optimizer, lr=t.learning_rate),
              "generator": torch.Generator().manual_seed(0), "device": torch.device("cpu")}
        stats = train_dp(model, data, noise_multiplier=1.0, max_grad_norm=1.0, **kw) if private else train_plain(model, data, **kw)
        assert stats.patients == expected


def test_evaluation_is_suppressed_when_a_class_comes_from_fewer_than_k_patients(site: Site) -> None:
    """One relapsing patient among many: AUROC would rank that patient's own scores against the rest."""
    labels, mask = site.eval_set.labels.clone(), site.eval_set.mask
    labels[:] = 0.0
    labels[0, mask[0]] = 1.0  # patient 0's sessions are the whole relapse class
    site.eval_set = replace(site.eval_set, labels=labels)
    _with_k(site, 2)
    assert site.eval_set.n_patients >= 2
    assert site.evaluate(start_arrays()) == {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}
    _with_k(site, 1)
    assert site.evaluate(start_arrays())[M.SUPPRESSED] == 0.0  # the same data with k = 1: released, so the class rule is what suppressed it


def test_a_refusal_for_too_few_training_patients_does_not_send_the_count(site: Site) -> None:
    _with_k(site, site.train_set.n_patients + 1)
    refused = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(refused, Refusal) and refused.code == "no-data"
    assert str(site.train_set.n_patients) not in refused.reason.replace(f"k={site.k}", "")


def test_evaluation_metrics_are_suppressed_below_k_patients(site: Site) -> None:
    k_big = replace(site.exp, federation=replace(site.exp.federation, min_patients_metric=site.eval_set.n_patients + 1))
    site.exp = k_big
    out = site.evaluate(start_arrays())
    assert out == {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}


def _crafted(seed: int) -> dict[str, np.ndarray]:
    """Another model under the same label: what a coordinator probing the site would send."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in start_arrays().items()}


def test_a_site_evaluates_only_in_a_run_it_has_trained_in(site: Site) -> None:
    """A fresh run id is free; an evaluation in it would be a free answer about the held-out patients."""
    refused = site.reserve_evaluation(start_arrays(), run_id="never-trained", model_round=1)
    assert isinstance(refused, Refusal) and refused.code == "evaluation-limit" and "never-trained" in refused.reason
    assert not (site.ledger_path.parent / "evaluation-releases.jsonl").exists()


def test_a_site_evaluates_one_model_per_run_and_round(site: Site) -> None:
    """Many crafted models under one label was the red-team's bisection (64 free evaluations
    recovered one session's marker); the same model again is answered (same answer, nothing new)."""
    assert isinstance(site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    assert site.reserve_evaluation(start_arrays(), run_id="r1", model_round=1) is None
    assert site.reserve_evaluation(start_arrays(), run_id="r1", model_round=1) is None  # the same model: a lost reply asked again
    other = site.reserve_evaluation(_crafted(1), run_id="r1", model_round=1)
    assert isinstance(other, Refusal) and other.code == "evaluation-limit"
    assert site.reserve_evaluation(_crafted(2), run_id="r1", model_round=2) is None  # the next round's model: one more
    # the record survives the process: a new Site on the same state folder refuses too
    again = Site(site.cfg, site.exp)
    assert isinstance(again.reserve_evaluation(_crafted(3), run_id="r1", model_round=2), Refusal)
    lines = (site.ledger_path.parent / "evaluation-releases.jsonl").read_text().splitlines()
    assert [(json.loads(x)["run_id"], json.loads(x)["round"]) for x in lines] == [("r1", 1), ("r1", 2)]


def test_a_policy_without_metric_releases_sends_no_evaluation_and_no_train_loss(site: Site) -> None:
    site.cfg = replace(site.cfg, policy=replace(site.cfg.policy, release_metrics=False))
    _with_k(site, 1)
    result = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(result, TrainResult) and M.TRAIN_LOSS not in result.metrics and M.EPSILON_RUN in result.metrics
    refused = site.reserve_evaluation(start_arrays(), run_id="r1", model_round=1)
    assert isinstance(refused, Refusal) and refused.code == "metrics-withheld"


@pytest.mark.usefixtures("alpha_state")
def test_an_evaluate_message_in_a_run_the_site_never_trained_in_is_refused(tiny_cohort: Path, tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    reply = build_client_app()(_message("evaluate", tiny_experiment().to_yaml()), ctx)
    assert reply.content[P.SITE][P.REFUSAL_CODE] == "evaluation-limit"
    assert P.METRICS not in reply.content


def test_a_site_above_the_plans_max_weight_refuses_before_anything_is_charged(site: Site) -> None:
    """The coordinator rejects an update weighing more than max_weight (and SecAgg+ cannot sum it):
    training it anyway would spend the round's ε on an update nobody uses."""
    fed = site.exp.federation
    site.exp = replace(site.exp, federation=replace(fed, secure_aggregation=replace(fed.secure_aggregation, max_weight=site.train_set.n_patients - 1)))
    refused = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(refused, Refusal) and refused.code == "max-weight" and str(site.train_set.n_patients) not in refused.reason
    assert not site.ledger_path.exists() or not ledger.read_entries(site.ledger_path)
    assert site.plan(run_id="r1", total_rounds=2)["code"] == "max-weight"


def test_a_non_finite_train_loss_is_not_sent_and_the_update_still_is(site: Site) -> None:
    from client.dp_train import StepStats

    _with_k(site, 1)
    assert site._train_loss(StepStats(steps=2, mean_loss=float("nan"), mean_batch=3.0, patients=5)) == {}
    assert site._train_loss(StepStats(steps=2, mean_loss=0.4, mean_batch=3.0, patients=5)) == {M.TRAIN_LOSS: 0.4}


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


def _message(kind: str, plan: str, rnd: int = 1) -> Message:
    content = RecordDict({
        P.ARRAYS: pack(start_arrays(), layout(start_arrays())),
        P.CONFIG: ConfigRecord({P.RUN_ID: "r-msg", P.SERVER_ROUND: rnd, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: plan}),
    })
    return Message(content=content, dst_node_id=1, message_type=kind)


@pytest.mark.usefixtures("alpha_state")
def test_clientapp_replies_carry_only_update_aggregates_and_site_name(tiny_cohort: Path, tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    app = build_client_app()
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    plan = tiny_experiment().to_yaml()
    patient_ids = {line.split(",")[0] for line in (tiny_cohort / "alpha" / "manifest.csv").read_text().splitlines()[1:]}
    allowed_metrics = {M.NUM_PATIENTS, M.TRAIN_LOSS, M.EVAL_LOSS, M.AUROC, M.AUPRC, M.EPSILON_RUN, M.EPSILON_TOTAL, M.DELTA, M.NOISE_MULTIPLIER, M.SUPPRESSED,
                       M.COMPUTE_SECONDS, M.PEAK_RSS_MB}  # process cost of the reply (benchmarks), nothing per patient
    model_keys = set(start_arrays())
    for kind, rnd, evaluate_first in (("train", 1, False), ("evaluate", 1, False), ("train", 2, True)):  # the last: federation.evaluation with-next-round
        msg = _message(kind, plan, rnd)
        if evaluate_first:
            msg.content.config_records[P.CONFIG][P.EVALUATE_FIRST] = True
        reply = app(msg, ctx)
        c = reply.content
        assert set(c.keys()) <= P.ALLOWED_REPLY_RECORDS
        assert set(c[P.SITE].keys()) <= P.ALLOWED_SITE_KEYS
        assert set(c[P.METRICS].keys()) <= allowed_metrics
        assert (P.EVALUATION in c) == evaluate_first
        if evaluate_first:
            assert set(c[P.EVALUATION].keys()) <= allowed_metrics - {M.TRAIN_LOSS, M.EPSILON_RUN, M.EPSILON_TOTAL, M.DELTA, M.NOISE_MULTIPLIER}
        if kind == "train":
            assert list(c[P.ARRAYS].keys()) == [PACKED]  # one packed vector: the model's parameters only, nothing more
            sent = start_arrays()
            assert set(unpack(c.array_records[P.ARRAYS], layout(sent), what="the update")) == model_keys  # exactly the model's length
        else:
            assert P.ARRAYS not in c
        blob = repr({k: dict(v) for k, v in c.config_records.items()})
        assert not any(pid in blob for pid in patient_ids)
        assert str(tiny_cohort) not in blob


@pytest.mark.usefixtures("alpha_state")
def test_clientapp_refuses_an_invalid_plan_with_a_structured_reason(tiny_cohort: Path, tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    bad = tiny_experiment().to_yaml().replace("accountant: rdp", "accountant: none")
    reply = build_client_app()(_message("train", bad), ctx)
    info = reply.content[P.SITE]
    assert info[P.REFUSAL_CODE] == "invalid"
    assert "privacy.accountant" in str(info[P.REFUSAL_REASON]) and "'rdp', 'prv'" in str(info[P.REFUSAL_REASON])
    assert P.ARRAYS not in reply.content


def _signed_setup(tiny_cohort: Path, tmp_path: Path) -> tuple[ClientApp, Context, str, Ed25519PrivateKey]:
    from shared import signing

    key = signing.generate(tmp_path / "coord.key", tmp_path / "coord.pub.pem")
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\ncoordinator_public_key: coord.pub.pem\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    return build_client_app(), ctx, tiny_experiment().to_yaml(), key


@pytest.mark.parametrize("case", ["valid", "unsigned", "altered", "other-round", "other-key"])
def test_site_verifies_the_coordinators_signature_before_training(tiny_cohort: Path, tmp_path: Path, case: str) -> None:
    from shared import signing
    from shared.model_signing import sign_model

    app, ctx, plan, key = _signed_setup(tiny_cohort, tmp_path)
    msg = _message("train", plan)
    phash = tiny_experiment().plan_hash()
    signer = signing.generate(tmp_path / "mallory.key", tmp_path / "mallory.pub") if case == "other-key" else key
    rnd = 2 if case == "other-round" else 1
    if case != "unsigned":
        msg.content.config_records[P.CONFIG][P.MODEL_SIGNATURE] = sign_model(signer, start_arrays(), run_id="r-msg", server_round=rnd, plan_hash=phash)
    if case == "altered":
        arrays = start_arrays()
        first = next(iter(arrays))
        arrays[first] = arrays[first] + 0.01
        msg.content[P.ARRAYS] = pack(arrays, layout(arrays))
    reply = app(msg, ctx)
    info = reply.content[P.SITE]
    if case == "valid":
        assert P.REFUSAL_CODE not in info and P.ARRAYS in reply.content
    else:
        assert info[P.REFUSAL_CODE] == "signature", case
        assert P.ARRAYS not in reply.content
        assert not (tmp_path / "state" / "ledger" / "privacy-ledger.jsonl").exists()  # nothing trained, nothing charged


@pytest.mark.usefixtures("alpha_state")
def test_site_trains_only_approved_plans_when_its_policy_requires_it(tiny_cohort: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli import app as cli

    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\nrequire_approved_plans: true\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    plan = tiny_experiment().to_yaml()
    refused = build_client_app()(_message("train", plan), ctx)
    assert refused.content[P.SITE][P.REFUSAL_CODE] == "unapproved-plan"
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan)
    result = CliRunner().invoke(cli, ["site", "approve", "--site", str(site_yaml), "--plan", str(plan_file), "--approved-by", "IT Ola", "--yes"])
    assert result.exit_code == 0, result.output
    assert "patient-level DP" in result.output
    assert "evaluation" in result.output and "with-next-round" in result.output  # the default evaluation mode, shown
    accepted = build_client_app()(_message("train", plan), ctx)
    assert P.REFUSAL_CODE not in accepted.content[P.SITE] and P.ARRAYS in accepted.content
    other = plan.replace("learning_rate: 0.01", "learning_rate: 0.5")  # any change is a new plan
    assert build_client_app()(_message("train", other, rnd=2), ctx).content[P.SITE][P.REFUSAL_CODE] == "unapproved-plan"


def test_a_damaged_approvals_file_refuses_every_plan_without_sending_its_path(tiny_cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cut-short approved-plans.json raised ConfigError inside the handler: the reply was the
    catch-all 'invalid'. It is an unapproved-plan refusal now, its path logged here only."""
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\nrequire_approved_plans: true\n")
    (tmp_path / "state").mkdir()
    approvals = tmp_path / "state" / "approved-plans.json"
    approvals.write_text('{"abc": {"approved_by": "IT"')  # a crash cut it short
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    for kind in ("query", "train", "evaluate"):
        info = build_client_app()(_message(kind, tiny_experiment().to_yaml()), ctx).content[P.SITE]
        assert info[P.REFUSAL_CODE] == "unapproved-plan", (kind, info[P.REFUSAL_REASON])
        assert str(tmp_path) not in str(info[P.REFUSAL_REASON]) and "ConfigError" in str(info[P.REFUSAL_REASON])
    assert "<state_dir>/approved-plans.json" in caplog.text and str(tmp_path) not in caplog.text  # the site's log names the file by its place in the state folder
    assert approvals.read_text() == '{"abc": {"approved_by": "IT"'  # kept for IT to inspect


def _secure_train_message(plan: str) -> Message:
    """A SecAgg+ round's train message as the secaggplus mod hands it to the handler (legacy fitins)."""
    from flwr.common import FitIns, Scalar, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    vector = pack(start_arrays(), layout(start_arrays()))[PACKED].numpy()
    config: dict[str, Scalar] = {P.RUN_ID: "r-msg", P.SERVER_ROUND: 1, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: plan}
    return Message(content=compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([vector]), config), keep_input=True), dst_node_id=1, message_type="train")


def test_an_unapproved_plan_is_refused_before_the_site_does_any_data_work(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature extraction (and loading a language model the plan names) costs minutes and GBs of
    cache: a plan the site has not approved must be refused before any of it starts."""
    from client import app as client_app
    from shared import secure_records
    from shared.errors import DataError

    loaded: list[str] = []

    def site_for(site_cfg: object, exp: object) -> Site:
        loaded.append("site data")
        raise DataError("the site's data was loaded for an unapproved plan")

    monkeypatch.setattr(client_app, "site_for", site_for)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\nrequire_approved_plans: true\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    plan = replace(tiny_experiment(), features=replace(tiny_experiment().features, n_mels=40)).to_yaml()
    for kind in ("query", "train", "evaluate"):
        info = build_client_app()(_message(kind, plan), ctx).content[P.SITE]
        assert info[P.REFUSAL_CODE] == "unapproved-plan", (kind, info[P.REFUSAL_REASON])
    secure = client_app._secure_train(_secure_train_message(plan), ctx, (), None)  # noqa: SLF001 - the SecAgg+ round's handler, without the mod
    site, _ = secure_records.decode(secure.content.config_records[P.LEGACY_FITRES_METRICS])
    assert site[P.REFUSAL_CODE] == "unapproved-plan", site
    assert loaded == []
    assert not (tmp_path / "state" / "features").exists()


def test_the_approval_summary_names_the_evaluation_mode() -> None:
    from client.approval import summary

    exp, site = tiny_experiment(), SiteConfig(name="oslo", manifest=Path("m.csv"))
    lines = dict(summary(exp, site))
    assert "(with-next-round)" in lines["evaluation"]
    assert "(separate)" in dict(summary(replace(exp, federation=replace(exp.federation, evaluation="separate")), site))["evaluation"]
    assert dict(summary(replace(exp, federation=replace(exp.federation, fraction_evaluate=0.0)), site))["evaluation"] == "none (fraction_evaluate 0)"


def test_the_approval_summary_shows_the_k_the_site_applies_secure_aggregation_noise_and_encoders() -> None:
    """It showed the plan's k (say 3) where the site applies its policy's 10, and said nothing
    of secure aggregation, secure noise or the encoders the plan runs at the site."""
    from client.approval import summary
    from shared.config import SecureAggregationConfig, SitePolicy

    exp = tiny_experiment()
    plain = replace(exp, federation=replace(exp.federation, min_patients_metric=3), privacy=replace(exp.privacy, secure_mode=False),
                    language=replace(exp.language, encoder="lsa"))
    secure = replace(exp, federation=replace(exp.federation, min_patients_metric=12, secure_aggregation=SecureAggregationConfig(enabled=True, num_shares=5, reconstruction_threshold=3)),
                     privacy=replace(exp.privacy, secure_mode=True), speech=replace(exp.speech, encoder="transformer", model_path="/srv/models/wav2vec2"))
    strict = SiteConfig(name="oslo", manifest=Path("m.csv"), policy=SitePolicy(min_patients_metric=10, require_secure_aggregation=True))

    lines, other = dict(summary(plain, strict)), dict(summary(secure, strict))

    assert lines["metrics"].startswith("exact aggregates over at least 10 patients") and "the plan 3" in lines["metrics"]
    assert other["metrics"].startswith("exact aggregates over at least 12 patients")
    noised = dict(summary(plain.with_privacy(metrics_noise_multiplier=4.0), strict))["metrics"]
    assert noised.startswith("noised (privacy.metrics_noise_multiplier 4)") and "charged to your ledger" in noised
    assert lines["secure aggregation"].startswith("off") and "this site will refuse to train" in lines["secure aggregation"]
    assert other["secure aggregation"].startswith("on (SecAgg+)") and "5 shares, any 3 unmask" in other["secure aggregation"]
    assert "secure_mode: false" in lines["privacy noise"] and "secure_mode: true" in other["privacy noise"]
    assert lines["language encoder"].startswith("LSA") and lines["speech encoder"] == "none"
    assert other["language encoder"].startswith("transformer all-MiniLM-L6-v2") and other["speech encoder"].startswith("/srv/models/wav2vec2 (transformer")


def test_the_approval_summary_shows_the_epsilon_and_delta_the_site_will_account() -> None:
    """It showed the plan's ε and δ, while the site accounts at the stricter δ and trains to at most its per-run cap."""
    from client.approval import summary
    from shared.config import SitePolicy

    exp = tiny_experiment().with_privacy(target_epsilon=8.0, target_delta=1e-5)
    lenient = SiteConfig(name="oslo", manifest=Path("m.csv"), policy=SitePolicy(epsilon_cap_run=10.0, delta=1e-5))
    strict = SiteConfig(name="oslo", manifest=Path("m.csv"), policy=SitePolicy(epsilon_cap_run=4.0, delta=1e-6))
    no_dp = SiteConfig(name="oslo", manifest=Path("m.csv"), policy=SitePolicy(allow_non_private=False))

    assert dict(summary(exp, lenient))["privacy"].startswith("patient-level DP, ε ≤ 8 at δ = 1e-05 for the whole run, clip C = ")
    line = dict(summary(exp, strict))["privacy"]
    assert line.startswith("patient-level DP, ε ≤ 4 at δ = 1e-06 for the whole run")
    assert "δ 1e-06 from your policy (the plan asks 1e-05)" in line and "ε 4 from your per-run cap in site.yaml (the plan asks 8" in line
    assert dict(summary(exp.with_privacy(enabled=False), no_dp))["privacy"] == "NO differential privacy (your policy does not allow it: this site will refuse to train)"


@pytest.fixture
def diverging(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Local training that ends with a NaN parameter: the real DP-SGD steps run on the patients' data, then one weight is NaN
    (``.undo()`` on the returned patch ends it).

    (A plan's learning rate is at most 10 and a patient's non-finite gradient row is dropped, so a finite model hardly
    diverges by itself: see the overflow test below.)
    """
    from client import dp_train

    original = dp_train.train_dp

    def train_then_diverge(model: torch.nn.Module, *args: Any, **kwargs: Any) -> object:
        stats = original(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr(dp_train, "train_dp", train_then_diverge)
    return monkeypatch


@pytest.mark.usefixtures("diverging")
def test_a_diverged_round_is_charged_once_refused_with_its_epsilon_and_nothing_is_sent(site: Site) -> None:
    # Act
    result = site.train(start_arrays(), run_id="r-div", server_round=1, total_rounds=2)
    # Assert
    assert isinstance(result, Refusal) and result.code == "diverged" and "charged" in result.reason
    (entry,) = ledger.read_entries(site.ledger_path)  # DP-SGD ran on the patients' data: the round is accounted
    assert (entry.run_id, entry.round) == ("r-div", 1)
    assert result.metrics == {M.EPSILON_RUN: entry.epsilon_run, M.EPSILON_TOTAL: entry.epsilon_total, M.DELTA: entry.delta, M.NOISE_MULTIPLIER: entry.noise_multiplier}
    assert result.ledger_head == entry.hash and entry.epsilon_run > 0


def test_a_model_that_overflows_on_patient_data_trains_without_those_rows_and_is_charged(site: Site) -> None:
    """A forward pass that overflows gives NaN gradient rows; they count as zero rows, so the update is finite, sent and charged
    (kept, they made the clipped sum NaN and the round a 'diverged' refusal decided by those patients' data)."""
    # Arrange
    site.exp = replace(site.exp, training=replace(site.exp.training, learning_rate=10.0, optimizer="sgd"))
    bad = start_arrays()
    first = next(iter(bad))
    bad[first] = bad[first] * 1e30  # overflows to inf in the forward pass
    # Act
    result = site.train(bad, run_id="r-big", server_round=1, total_rounds=2)
    # Assert
    assert isinstance(result, TrainResult)
    assert all(np.isfinite(v).all() for v in result.arrays.values())
    assert [(e.run_id, e.round) for e in ledger.read_entries(site.ledger_path)] == [("r-big", 1)]


def test_a_retried_diverged_round_is_a_replay_that_writes_nothing_and_the_ledger_verifies(site: Site, diverging: pytest.MonkeyPatch) -> None:
    from client.site import ledger_public_key
    from shared.privacy.audit import verify_ledger

    # Arrange
    first = site.train(start_arrays(), run_id="r-div", server_round=1, total_rounds=2)
    written = site.ledger_path.read_bytes()
    # Act
    again = site.train(start_arrays(), run_id="r-div", server_round=1, total_rounds=2)
    after_replay = site.ledger_path.read_bytes()
    diverging.undo()  # training recovers: the run's next round trains
    second = site.train(start_arrays(), run_id="r-div", server_round=2, total_rounds=2)
    # Assert
    assert isinstance(first, Refusal) and first.code == "diverged"
    assert isinstance(again, Refusal) and again.code == "replay"
    assert again.metrics == first.metrics and again.ledger_head == first.ledger_head
    assert after_replay == written  # the replay wrote nothing
    assert isinstance(second, TrainResult)
    report = verify_ledger(site.ledger_path, ledger_public_key(site.cfg.state_dir))
    assert report.ok, report.issues
    assert [(e.run_id, e.round) for e in report.entries] == [("r-div", 1), ("r-div", 2)]


def test_the_round_is_in_the_ledger_before_training_touches_patient_data(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import dp_train

    seen: list[list[tuple[str, int]]] = []
    original = dp_train.train_dp

    def spy(*args: Any, **kwargs: Any) -> object:
        seen.append([(e.run_id, e.round) for e in ledger.read_entries(site.ledger_path)])
        return original(*args, **kwargs)

    monkeypatch.setattr(dp_train, "train_dp", spy)
    assert isinstance(site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    assert seen == [[("r1", 1)]]


def test_a_round_whose_training_crashes_stays_charged_and_its_retry_is_a_replay(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import dp_train

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA out of memory")

    # Arrange
    monkeypatch.setattr(dp_train, "train_dp", crash)
    # Act
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    monkeypatch.undo()
    again = site.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2)
    # Assert
    assert [(e.run_id, e.round) for e in ledger.read_entries(site.ledger_path)] == [("r1", 1)]
    assert isinstance(again, Refusal) and again.code == "replay"


def test_two_processes_sent_the_same_round_charge_and_train_it_once(site: Site) -> None:
    """Training runs outside the ledger lock; the lock still makes check-and-append atomic (flock: each open() is its own lock holder, as another process's is)."""
    import threading

    # Arrange
    other = Site(site.cfg, site.exp)
    start = threading.Barrier(2)
    results: list[TrainResult | Refusal] = []

    def train(s: Site) -> None:
        start.wait()
        results.append(s.train(start_arrays(), run_id="r1", server_round=1, total_rounds=2))

    # Act
    threads = [threading.Thread(target=train, args=(s,)) for s in (site, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Assert
    assert sorted(type(r).__name__ for r in results) == ["Refusal", "TrainResult"]
    assert next(r for r in results if isinstance(r, Refusal)).code == "replay"
    assert [(e.run_id, e.round) for e in ledger.read_entries(site.ledger_path)] == [("r1", 1)]


@pytest.mark.usefixtures("alpha_state")
def test_a_plan_whose_epsilon_no_noise_can_reach_is_refused_by_the_named_site_not_crashed(tiny_cohort: Path, tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    tiny_eps = tiny_experiment().with_privacy(target_epsilon=0.001).to_yaml()
    reply = build_client_app()(_message("query", tiny_eps), ctx)
    info = reply.content[P.SITE]
    assert info[P.SITE_NAME] == "alpha" and info[P.REFUSAL_CODE] == "budget"  # a structured refusal with its own code, not a crashed client
    assert "`privacy.target_epsilon` ε=0.001 cannot be met" in str(info[P.REFUSAL_REASON])


def test_processes_creating_the_site_key_together_get_one_key(site: Site, tmp_path: Path) -> None:
    """Two worker processes starting a site's first round both saw no key; the loser of the create used to raise."""
    import copy
    import threading

    from cryptography.hazmat.primitives import serialization

    for attempt in range(8):
        s = copy.copy(site)  # the same loaded data (a new Site would prepare it again for its new state folder: 4 s in the suite)
        s.cfg = replace(site.cfg, state_dir=tmp_path / f"fresh-{attempt}")
        start = threading.Barrier(4)
        keys: list[bytes] = []
        errors: list[BaseException] = []

        def make(s: Site = s, start: threading.Barrier = start, keys: list[bytes] = keys, errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                keys.append(s.signing_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=make) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(keys) == 4 and len(set(keys)) == 1
