"""Site-side privacy invariants: ledger before update, no double charge, caps, k-suppression,
and replies that carry nothing patient-level."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.site import Refusal, Site, TrainResult
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.config import load_site
from shared.errors import PolicyError
from shared.models import build_model
from shared.params import PACKED, get_arrays, layout, pack, unpack
from shared.privacy import ledger
from tests.conftest import tiny_experiment


@pytest.fixture
def site(tiny_cohort: Path, tmp_path: Path) -> Site:
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    return Site(replace(cfg, state_dir=tmp_path / "state"), tiny_experiment())


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
        kw = {"steps": 2, "sample_rate": rate, "max_sessions": t.max_sessions_per_patient, "optimizer": make_optimizer(model, name=t.optimizer, lr=t.learning_rate),
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


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


def _message(kind: str, plan: str, rnd: int = 1) -> Message:
    content = RecordDict({
        P.ARRAYS: pack(start_arrays(), layout(start_arrays())),
        P.CONFIG: ConfigRecord({P.RUN_ID: "r-msg", P.SERVER_ROUND: rnd, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: plan}),
    })
    return Message(content=content, dst_node_id=1, message_type=kind)


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
            msg.content[P.CONFIG][P.EVALUATE_FIRST] = True
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
            assert set(unpack(c[P.ARRAYS], layout(sent), what="the update")) == model_keys  # exactly the model's length
        else:
            assert P.ARRAYS not in c
        blob = repr({k: dict(v) for k, v in c.config_records.items()})
        assert not any(pid in blob for pid in patient_ids)
        assert str(tiny_cohort) not in blob


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


def _signed_setup(tiny_cohort: Path, tmp_path: Path) -> tuple[object, Context, str, object]:
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
        msg.content[P.CONFIG][P.MODEL_SIGNATURE] = sign_model(signer, start_arrays(), run_id="r-msg", server_round=rnd, plan_hash=phash)
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


def _secure_train_message(plan: str) -> Message:
    """A SecAgg+ round's train message as the secaggplus mod hands it to the handler (legacy fitins)."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    vector = pack(start_arrays(), layout(start_arrays()))[PACKED].numpy()
    config = {P.RUN_ID: "r-msg", P.SERVER_ROUND: 1, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: plan}
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

    exp = tiny_experiment()
    lines = dict(summary(exp))
    assert "(with-next-round)" in lines["evaluation"]
    assert "(separate)" in dict(summary(replace(exp, federation=replace(exp.federation, evaluation="separate"))))["evaluation"]
    assert dict(summary(replace(exp, federation=replace(exp.federation, fraction_evaluate=0.0))))["evaluation"] == "none (fraction_evaluate 0)"


def test_a_diverged_local_model_is_not_sent(site: Site) -> None:
    site.exp = replace(site.exp, training=replace(site.exp.training, learning_rate=10.0, optimizer="sgd"))
    bad = start_arrays()
    first = next(iter(bad))
    bad[first] = bad[first] * 1e30  # overflow to inf in the first step
    result = site.train(bad, run_id="r-div", server_round=1, total_rounds=2)
    assert isinstance(result, Refusal) and result.code == "diverged"


def test_a_plan_whose_epsilon_no_noise_can_reach_is_refused_by_the_named_site_not_crashed(tiny_cohort: Path, tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    tiny_eps = tiny_experiment().with_privacy(target_epsilon=0.001).to_yaml()
    reply = build_client_app()(_message("query", tiny_eps), ctx)
    info = reply.content[P.SITE]
    assert info[P.SITE_NAME] == "alpha" and info[P.REFUSAL_CODE] == "budget"  # a structured refusal with its own code, not a crashed client
    assert "`privacy.target_epsilon` ε=0.001 cannot be met" in str(info[P.REFUSAL_REASON])
