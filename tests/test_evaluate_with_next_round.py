"""`federation.evaluation: with-next-round`: one message exchange per round.

Round r's train message asks each site to evaluate the model it carries (round r-1's)
before training; the evaluation rides back in the train reply's own ``evaluation`` record
(SecAgg+: ``eval.<key>`` in ``fitres.metrics``) and completes round r-1's record. The final
model is evaluated by one evaluate message. Site-level checks run the real ClientApp on the
tiny cohort; whole runs run in-process (LoopbackGrid, real sites, SecAgg+ and resume) and
once in Flower's Simulation Engine.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from client.app import build_client_app
from server.bench_fl import _round_figures, phase_compute, with_evaluation
from server.run_folder import RunFolder, checkpoint_path
from server.strategy import PatientFedAvg, RoundLog, SiteReport, evaluation_reports, scalar_metrics
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared import secure_records
from shared.config import ExperimentConfig, SecureAggregationConfig, load_experiment
from shared.errors import ConfigError
from shared.models import build_model
from shared.params import PACKED, get_arrays, layout, pack
from tests.conftest import RecordingGrid, tiny_experiment

SITE_METRICS = {M.NUM_PATIENTS, M.EVAL_LOSS, M.AUROC, M.AUPRC, M.SUPPRESSED, M.COMPUTE_SECONDS, M.PEAK_RSS_MB}


def with_next_round(exp: ExperimentConfig, **federation: Any) -> ExperimentConfig:
    return replace(exp, federation=replace(exp.federation, evaluation="with-next-round", **federation))


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


# --- config ----------------------------------------------------------------------------------


def write_plan(tmp_path: Path, federation: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: x\nfederation: {{{federation}}}\n")
    return path


@pytest.mark.parametrize("mode", ["evaluation: with-next-round, ", ""])  # set, or the default
@pytest.mark.parametrize("fractions", ["fraction_train: 1.0, fraction_evaluate: 0.5", "fraction_train: 0.5, fraction_evaluate: 1.0"])
def test_with_next_round_refuses_an_evaluation_share_other_than_none_or_the_training_share(tmp_path: Path, fractions: str, mode: str) -> None:
    path = write_plan(tmp_path, f"{mode}{fractions}")

    with pytest.raises(ConfigError) as err:
        load_experiment(path)

    message = str(err.value)
    assert "`federation.fraction_evaluate`" in message and "`federation.fraction_train`" in message
    assert "must be 0 (no evaluation) or equal to" in message and "`federation.evaluation: separate`" in message
    assert "`federation.evaluation` is with-next-round (the default)" in message


@pytest.mark.parametrize(("federation", "evaluation"), [
    ("evaluation: with-next-round, fraction_train: 0.5, fraction_evaluate: 0.5", "with-next-round"),
    ("evaluation: with-next-round, fraction_evaluate: 0", "with-next-round"),
    ("evaluation: separate, fraction_train: 1.0, fraction_evaluate: 0.5", "separate"),  # separate keeps any share
    ("fraction_train: 0.5, fraction_evaluate: 0.5", "with-next-round"),  # the default
])
def test_evaluation_modes_that_fit_their_shares_load(tmp_path: Path, federation: str, evaluation: str) -> None:
    assert load_experiment(write_plan(tmp_path, federation)).federation.evaluation == evaluation


def test_an_unknown_evaluation_mode_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`federation.evaluation` is 'later'; allowed values are 'separate', 'with-next-round'"):
        load_experiment(write_plan(tmp_path, "evaluation: later"))


def test_the_bench_option_sets_the_mode_with_the_plans_checks() -> None:
    exp = tiny_experiment()
    assert with_evaluation(exp, None) is exp and exp.federation.evaluation == "with-next-round"  # the default
    assert with_evaluation(exp, "separate").federation.evaluation == "separate"
    assert with_evaluation(with_evaluation(exp, "separate"), "with-next-round").federation.evaluation == "with-next-round"
    with pytest.raises(ConfigError, match="`federation.fraction_evaluate`"):
        with_evaluation(replace(exp, federation=replace(exp.federation, fraction_evaluate=0.5)), "with-next-round")


# --- the site's train handler ------------------------------------------------------------------


def start_arrays() -> dict[str, np.ndarray]:
    return dict(get_arrays(build_model(tiny_experiment())))


def site_context(tiny_cohort: Path, tmp_path: Path) -> Context:
    """Site alpha with its default policy: k = 5, more than its 3 evaluation patients, fewer
    than its 7 training patients (evaluation suppressed, training allowed)."""
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    return Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})


def site_message(kind: str, *, rnd: int = 1, evaluate_first: object = True, plan: str | None = None) -> Message:
    cfg = ConfigRecord({P.RUN_ID: "r-next", P.SERVER_ROUND: rnd, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: plan or tiny_experiment().to_yaml()})
    if evaluate_first is not None:
        cfg[P.EVALUATE_FIRST] = evaluate_first  # type: ignore[assignment]
    content = RecordDict({P.ARRAYS: pack(start_arrays(), layout(start_arrays())), P.CONFIG: cfg})
    return Message(content=content, dst_node_id=1, message_type=kind)


@pytest.mark.usefixtures("alpha_state")
def test_a_train_reply_brings_the_sites_evaluation_of_the_received_model_in_its_own_record(tiny_cohort: Path, tmp_path: Path) -> None:
    app, ctx = build_client_app(), site_context(tiny_cohort, tmp_path)

    reply = app(site_message("train"), ctx)
    evaluated = app(site_message("evaluate", evaluate_first=None), ctx)

    c = reply.content
    assert set(c.keys()) == {P.ARRAYS, P.METRICS, P.SITE, P.EVALUATION} <= P.ALLOWED_REPLY_RECORDS
    assert set(c[P.SITE].keys()) <= P.ALLOWED_SITE_KEYS and P.REFUSAL_CODE not in c[P.SITE]
    assert list(c[P.ARRAYS].keys()) == [PACKED]
    evaluation = scalar_metrics(c.metric_records[P.EVALUATION])
    assert set(evaluation) <= SITE_METRICS
    # exactly Site.evaluate's answer, k-suppressed: 3 evaluation patients < k = 5, so no AUROC leaves the site
    assert evaluation[M.SUPPRESSED] == 1.0 and evaluation[M.NUM_PATIENTS] == 0.0 and M.AUROC not in evaluation
    same = {k: v for k, v in evaluated.content[P.METRICS].items() if k not in (M.COMPUTE_SECONDS, M.PEAK_RSS_MB)}
    assert {k: v for k, v in evaluation.items() if k not in (M.COMPUTE_SECONDS, M.PEAK_RSS_MB)} == same
    # each record times its own work: the evaluation's seconds are not in the training's
    assert evaluation[M.COMPUTE_SECONDS] >= 0 and scalar_metrics(c.metric_records[P.METRICS])[M.COMPUTE_SECONDS] > 0
    assert M.SUPPRESSED not in c[P.METRICS] and M.AUROC not in c[P.METRICS]


@pytest.mark.usefixtures("alpha_state")
def test_the_evaluation_carries_the_aggregate_when_the_site_has_k_evaluation_patients(tiny_cohort: Path, tmp_path: Path) -> None:
    ctx = site_context(tiny_cohort, tmp_path)
    site_yaml = Path(str(ctx.node_config[P.NC_SITE_CONFIG]))
    site_yaml.write_text(site_yaml.read_text() + "policy: {min_patients_metric: 2}\n")

    reply = build_client_app()(site_message("train"), ctx)

    evaluation = scalar_metrics(reply.content.metric_records[P.EVALUATION])
    assert set(evaluation) <= SITE_METRICS
    # alpha's held-out patients hold both classes: with k = 2 the aggregate leaves the site
    assert evaluation[M.SUPPRESSED] == 0.0 and evaluation[M.NUM_PATIENTS] >= 2 and 0.0 <= evaluation[M.AUROC] <= 1.0


@pytest.mark.usefixtures("alpha_state")
def test_a_failed_evaluation_still_sends_the_update_without_an_evaluation(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client.site import Site

    def broken(self: Site, arrays: dict) -> dict:
        raise OSError("the evaluation set's cache is unreadable")

    monkeypatch.setattr(Site, "evaluate", broken)

    reply = build_client_app()(site_message("train"), site_context(tiny_cohort, tmp_path))

    assert not reply.has_error()
    assert P.ARRAYS in reply.content and P.METRICS in reply.content and P.EVALUATION not in reply.content


@pytest.mark.usefixtures("alpha_state")
def test_a_train_message_that_does_not_ask_gets_no_evaluation(tiny_cohort: Path, tmp_path: Path) -> None:
    reply = build_client_app()(site_message("train", evaluate_first=None), site_context(tiny_cohort, tmp_path))

    assert P.EVALUATION not in reply.content and P.ARRAYS in reply.content


@pytest.mark.usefixtures("alpha_state")
def test_a_site_that_refuses_to_train_still_sends_its_evaluation_once(tiny_cohort: Path, tmp_path: Path) -> None:
    app, ctx = build_client_app(), site_context(tiny_cohort, tmp_path)
    app(site_message("train", evaluate_first=None), ctx)  # round 1 trained and charged, round 0's model not evaluated

    again = app(site_message("train"), ctx)  # round 1 again: the ledger refuses a replay
    same = app(site_message("train"), ctx)
    crafted = site_message("train")  # another model as round 0's: what a coordinator probing the held-out patients sends
    other = {k: v + np.float32(0.1) for k, v in start_arrays().items()}
    crafted.content[P.ARRAYS] = pack(other, layout(other))
    third = app(crafted, ctx)

    assert again.content[P.SITE][P.REFUSAL_CODE] == "replay"
    assert P.ARRAYS not in again.content
    assert set(again.content[P.METRICS].keys()) == {M.EPSILON_RUN, M.EPSILON_TOTAL, M.DELTA, M.NOISE_MULTIPLIER}  # what the round was charged, nothing trained
    assert again.content[P.EVALUATION][M.SUPPRESSED] == 1.0  # a run the site has paid into: round 0's model evaluated
    assert dict(same.content[P.EVALUATION]).keys() == dict(again.content[P.EVALUATION]).keys()  # the same model again: the same answer
    # ... and no other model's under the same run and round
    assert third.content[P.SITE][P.REFUSAL_CODE] == "replay" and P.EVALUATION not in third.content


@pytest.mark.parametrize(("case", "why"), [
    ("flag-is-text", "config['evaluate-first'] must be true or false, got str"),
    ("no-plan", "config['plan-yaml'] must be a non-empty string"),
])
@pytest.mark.usefixtures("alpha_state")
def test_a_malformed_message_is_refused_without_an_evaluation(tiny_cohort: Path, tmp_path: Path, case: str, why: str) -> None:
    msg = site_message("train", evaluate_first="yes" if case == "flag-is-text" else True)
    if case == "no-plan":
        del msg.content[P.CONFIG][P.PLAN_YAML]

    reply = build_client_app()(msg, site_context(tiny_cohort, tmp_path))

    assert reply.content[P.SITE][P.REFUSAL_CODE] == "malformed" and why in str(reply.content[P.SITE][P.REFUSAL_REASON])
    assert set(reply.content.keys()) == {P.SITE}
    assert not (tmp_path / "state" / "ledger" / "privacy-ledger.jsonl").exists()


# --- the coordinator: replies, aggregation, run folder ---------------------------------------------


W = {"w": (2,)}


def train_reply(site: str, patients: float, evaluation: object | None) -> Message:
    from flwr.app import Array, ArrayRecord

    content = RecordDict({
        P.ARRAYS: ArrayRecord({PACKED: Array(np.ones(2, np.float32))}),
        P.METRICS: MetricRecord({M.NUM_PATIENTS: patients, M.TRAIN_LOSS: 0.5}),
        P.SITE: ConfigRecord({P.SITE_NAME: site}),
    })
    if evaluation is not None:
        content[P.EVALUATION] = evaluation  # type: ignore[assignment]
    msg = Message(content=content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = 100 + sum(map(ord, site))  # one node per site (the coordinator pins names to nodes)
    return msg


def strategy() -> PatientFedAvg:
    s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1.0)
    s.expected = W
    return s


@pytest.mark.parametrize(("evaluation", "why"), [
    (MetricRecord({M.AUROC: [0.5, 0.6]}), "metric 'auroc' in the 'evaluation' record is a list, expected one number"),
    (MetricRecord({M.AUROC: float("nan")}), "metric 'auroc' in the 'evaluation' record is NaN"),
    (ConfigRecord({M.AUROC: 0.5}), "record 'evaluation' is a ConfigRecord, expected a MetricRecord"),
])
def test_a_reply_with_a_malformed_evaluation_is_rejected_naming_why(evaluation: object, why: str) -> None:
    s = strategy()

    s.aggregate_train(2, [train_reply("good", 10, MetricRecord({M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0})), train_reply("evil", 10, evaluation)])

    evil = next(r for r in s.log[2].train if r.site == "evil")
    assert evil.error == f"malformed reply rejected by the coordinator: {why}" and evil.evaluation is None
    assert next(r for r in s.log[2].train if r.site == "good").evaluation == {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}


def test_evaluations_from_train_replies_are_averaged_by_patients_for_the_previous_round() -> None:
    s = strategy()
    replies = [
        train_reply("a", 10, MetricRecord({M.SUPPRESSED: 0.0, M.NUM_PATIENTS: 10.0, M.AUROC: 0.9, M.COMPUTE_SECONDS: 0.1})),
        train_reply("b", 10, MetricRecord({M.SUPPRESSED: 0.0, M.NUM_PATIENTS: 30.0, M.AUROC: 0.5, M.COMPUTE_SECONDS: 0.1})),
        train_reply("c", 10, MetricRecord({M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0})),  # below k: left out
        train_reply("d", 10, None),  # did not evaluate
    ]
    s.aggregate_train(2, replies)

    out = s.aggregate_evaluation(1, evaluation_reports(s.log[2].train))

    assert out is not None and out[M.NUM_PATIENTS] == 40 and out[M.AUROC] == pytest.approx(0.6)
    by_site = {r.site: r for r in s.log[1].evaluate}
    assert set(by_site) == {"a", "b", "c", "d"} and by_site["d"].error == "the train reply carried no evaluation of the model it was sent"


def test_a_failed_or_refusing_site_is_named_in_the_previous_rounds_evaluation() -> None:
    train = [SiteReport(site="x", error="the site's client failed"), SiteReport(site="y", refusal_code="budget", refusal_reason="over", evaluation={M.SUPPRESSED: 1.0})]

    reports = {r.site: r for r in evaluation_reports(train)}

    assert reports["x"].error == "the site's client failed" and not reports["x"].metrics
    assert reports["y"].metrics == {M.SUPPRESSED: 1.0} and reports["y"].refusal_code is None


def test_record_evaluation_completes_a_pending_round_and_leaves_its_checkpoint(tmp_path: Path) -> None:
    from server.resume import recorded_rounds

    exp = with_next_round(tiny_experiment())
    folder = RunFolder(tmp_path / "run", exp, "run-x")
    arrays = start_arrays()
    train = RoundLog(train=[SiteReport(site="a", metrics={M.NUM_PATIENTS: 7.0, M.COMPUTE_SECONDS: 0.4}), SiteReport(site="b", metrics={M.NUM_PATIENTS: 6.0})])
    folder.record_round(1, train, {M.NUM_PATIENTS: 7.0}, {}, arrays, True, wall_s=1.0, evaluation_pending=True)
    ckpt = checkpoint_path(tmp_path / "run", 1).read_bytes()
    assert recorded_rounds(tmp_path / "run", 2)[0].evaluation_pending  # metrics.json with a pending round loads

    evaluation = RoundLog(evaluate=[SiteReport(site="a", metrics={M.SUPPRESSED: 0.0, M.NUM_PATIENTS: 5.0, M.AUROC: 0.7, M.COMPUTE_SECONDS: 0.05}),
                                    SiteReport(site="b", error="the train reply carried no evaluation of the model it was sent")])
    rec = folder.record_evaluation(1, evaluation, {M.AUROC: 0.7, M.AUPRC: 0.6, M.EVAL_LOSS: 0.4, M.NUM_PATIENTS: 5.0})

    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec.auroc == stored[0]["auroc"] == 0.7 and stored[0]["evaluation_pending"] is False and stored[0]["wall_s"] == 1.0
    assert stored[0]["sites"]["a"] == {M.NUM_PATIENTS: 7.0, "train_compute_s": 0.4, "eval_auroc": 0.7, "eval_compute_s": 0.05}
    assert stored[0]["sites"]["b"] == {M.NUM_PATIENTS: 6.0, "eval_error": "the train reply carried no evaluation of the model it was sent"}  # why b's is missing
    assert checkpoint_path(tmp_path / "run", 1).read_bytes() == ckpt
    assert recorded_rounds(tmp_path / "run", 2)[0].auroc == 0.7
    with pytest.raises(ValueError, match="Round 1 already has its evaluation"):
        folder.record_evaluation(1, evaluation, {})


def test_secure_aggregation_reports_carry_the_evaluation_under_its_own_prefix() -> None:
    evaluation = {M.SUPPRESSED: 0.0, M.NUM_PATIENTS: 5.0, M.AUROC: 0.7}
    record = secure_records.encode(site_name="a", metrics={M.NUM_PATIENTS: 7.0}, evaluation=evaluation)

    assert {k for k in record if k.startswith(P.EVAL_PREFIX)} == {P.EVAL_PREFIX + k for k in evaluation}
    assert secure_records.decode(record) == ({P.SITE_NAME: "a"}, {M.NUM_PATIENTS: 7.0})
    assert secure_records.decode_evaluation(record) == evaluation
    assert secure_records.decode_evaluation(secure_records.encode(site_name="a", metrics={M.NUM_PATIENTS: 7.0})) is None


def test_round_figures_count_the_evaluations_that_ran_inside_each_round(tmp_path: Path) -> None:
    # with-next-round: round r's train exchange evaluated round r-1's model; round 3 also evaluated its own
    records = [
        {"round": r, "wall_s": 5.0, "sites": {"a": {"train_compute_s": 2.0, "eval_compute_s": 0.1 * r}, "b": {"train_compute_s": 1.0, "eval_compute_s": 0.5}}}
        for r in (1, 2, 3)
    ]
    (tmp_path / "metrics.json").write_text(json.dumps(records))

    assert phase_compute(records, 0, "with-next-round") == ({"a": 2.0, "b": 1.0}, {})
    assert phase_compute(records, 1, "with-next-round") == ({"a": 2.1, "b": 1.5}, {})
    assert phase_compute(records, 2, "with-next-round") == ({"a": pytest.approx(2.2), "b": 1.5}, {"a": pytest.approx(0.3), "b": 0.5})
    figures = _round_figures(tmp_path, evaluation="with-next-round")
    assert figures["evaluation"] == "with-next-round"
    r2, r3 = figures["per_round"][1], figures["per_round"][2]
    assert r2["sites_compute_s"] == 3.6 and r2["wall_minus_critical_path_s"] == 2.9  # 5 - (0.1 + 2.0)
    assert r3["sites_compute_s"] == 4.5 and r3["wall_minus_critical_path_s"] == 2.3  # 5 - (0.2 + 2.0) - 0.5
    assert _round_figures(tmp_path)["per_round"][1]["sites_compute_s"] == 3.7  # separate: the round's own evaluation


# --- whole runs in-process: real sites on a LoopbackGrid (plain, SecAgg+, resume) ------------------


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort with empty ledgers and k = 2 in every site's policy (its evaluation sets
    hold 2-3 patients, so some AUROC can leave a site)."""
    dst = tmp_path_factory.mktemp("next-round") / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("ledger", "approved-plans.json"))
    for path in dst.glob("*/site.yaml"):
        cfg = yaml.safe_load(path.read_text())
        cfg["policy"] = {**cfg.get("policy", {}), "min_patients_metric": 2}
        path.write_text(yaml.safe_dump(cfg))
    return dst


def run_in_process(
    exp: ExperimentConfig, cohort: Path, out: Path, *, run_id: str, console: Console, resume: Any = None, after_round: Callable[[int], None] | None = None,
) -> tuple[dict, RecordingGrid]:
    """(summary, the coordinator's messages) of a run on a LoopbackGrid of the cohort's real sites."""
    from server.bench import LoopbackGrid
    from server.federation import run_federation
    from server.simulate import consortium_signing_key, discover_sites
    from shared import signing

    paths = tuple(str(p.resolve()) for p in discover_sites(cohort))
    grid = RecordingGrid(LoopbackGrid(build_client_app(paths), len(paths)))
    key = signing.load_private(consortium_signing_key(cohort))
    summary = run_federation(grid, exp, out, run_id, console=console, signing_key=key, resume=resume, after_round=after_round)  # type: ignore[arg-type]
    return summary, grid


def text_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def printed_rows(console: Console) -> list[int]:
    """The rounds whose row of the round table the console has printed so far, in order."""
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+(?:-|\d+\.\d{3})\s", text, flags=re.MULTILINE)]


def flags(grid: RecordingGrid) -> list[tuple[int, bool]]:
    """The evaluate-first flag of each train message (plain or SecAgg+'s fitins.config), in order."""
    out = []
    for m in grid.sent:
        cfg = m.content.config_records.get(P.CONFIG) or m.content.config_records.get(P.LEGACY_FITINS_CONFIG)
        if m.metadata.message_type == "train" and cfg is not None and P.SERVER_ROUND in cfg:
            rnd, first = cfg[P.SERVER_ROUND], cfg.get(P.EVALUATE_FIRST, False)
            assert isinstance(rnd, int) and isinstance(first, bool), (rnd, first)
            out.append((rnd, first))
    return out


def test_a_secure_aggregation_run_evaluates_each_model_with_the_next_round(cohort: Path, tmp_path: Path) -> None:
    sa = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=20.0, clipping_range=8.0)
    exp = with_next_round(tiny_experiment(), secure_aggregation=sa)

    console = text_console()
    shown: dict[int, list[int]] = {}

    summary, grid = run_in_process(exp, cohort, tmp_path / "run", run_id="next-secure", console=console,
                                   after_round=lambda rnd: shown.__setitem__(rnd, printed_rows(console)))

    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert shown == {1: [], 2: [1, 2]}  # round 1's row waits for its AUROC, which comes with round 2's replies
    assert grid.count("evaluate") == 3  # only the final model's evaluate message, one per site
    assert sorted(set(flags(grid))) == [(1, False), (2, True)]  # round 2's SecAgg+ messages ask for round 1's evaluation
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for rec in rounds:
        assert rec["evaluation_pending"] is False
        assert all("eval_compute_s" in e for e in rec["sites"].values()), rec  # every site's evaluation of every model arrived
    reports = [secure_records.decode_evaluation(m.content.config_records[P.LEGACY_FITRES_METRICS])
               for m in grid.replies if not m.has_error() and P.LEGACY_FITRES_METRICS in m.content.config_records]
    assert sum(r is not None for r in reports) == 3  # round 2's three masked-stage replies, in fitres.metrics
    assert all(set(r) <= SITE_METRICS for r in reports if r is not None)


def test_a_resumed_run_asks_first_for_the_evaluation_its_last_round_lacks(cohort: Path, tmp_path: Path) -> None:
    from server.resume import load_resume_point
    from server.simulate import consortium_signing_key
    from shared import signing

    exp = with_next_round(tiny_experiment())
    out = tmp_path / "run"

    def crash(rnd: int) -> None:
        if rnd == 1:
            raise RuntimeError("coordinator crashed after round 1")

    with pytest.raises(RuntimeError, match="crashed after round 1"):
        run_in_process(exp, cohort, out, run_id="next-resume", console=text_console(), after_round=crash)
    interrupted = json.loads((out / "metrics.json").read_text())
    assert [(r["round"], r["evaluation_pending"], r["auroc"]) for r in interrupted] == [(1, True, None)]

    point = load_resume_point(out, public_key=signing.load_private(consortium_signing_key(cohort)).public_key())
    console = text_console()
    summary, grid = run_in_process(point.exp, cohort, out, run_id=point.run_id, console=console, resume=point)

    assert summary["status"] == "completed" and summary["resumed_at_round"] == 2
    assert flags(grid) == [(2, True)] * 3 and grid.count("evaluate") == 3
    rounds = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and not any(r["evaluation_pending"] for r in rounds)
    assert all("eval_compute_s" in e for e in rounds[0]["sites"].values())  # round 1's model, evaluated in round 2's train exchange
    assert rounds[0]["wall_s"] == interrupted[0]["wall_s"]
    assert printed_rows(console) == [1, 2]


class WithoutEvaluations(RecordingGrid):
    """Drops the evaluation from every reply to a train message of round ``rnd`` (as if every
    site's train exchange had failed to bring one)."""

    def __init__(self, grid: Any, rnd: int) -> None:
        super().__init__(grid)
        self.rnd = rnd

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        asked = {m.metadata.dst_node_id for m in messages if m.metadata.message_type == "train" and m.content[P.CONFIG].get(P.SERVER_ROUND) == self.rnd}
        for reply in replies:
            if reply.metadata.src_node_id in asked and P.EVALUATION in reply.content:
                del reply.content[P.EVALUATION]
        return replies


def test_a_model_whose_train_exchange_brought_no_evaluation_is_evaluated_by_its_own_message(cohort: Path, tmp_path: Path) -> None:
    from server.bench import LoopbackGrid
    from server.federation import run_federation
    from server.simulate import consortium_signing_key, discover_sites
    from shared import signing

    exp = with_next_round(tiny_experiment())
    paths = tuple(str(p.resolve()) for p in discover_sites(cohort))
    grid = WithoutEvaluations(LoopbackGrid(build_client_app(paths), len(paths)), rnd=2)
    console = text_console()

    summary = run_federation(grid, exp, tmp_path / "run", "next-fallback", console=console, signing_key=signing.load_private(consortium_signing_key(cohort)))  # type: ignore[arg-type]

    assert summary["status"] == "completed"
    assert grid.count("evaluate") == 6  # round 1's model by its own message (3 sites), then the final model's
    evaluate_rounds = sorted({cast(int, m.content.config_records[P.CONFIG][P.SERVER_ROUND]) for m in grid.sent if m.metadata.message_type == "evaluate"})
    assert evaluate_rounds == [1, 2]
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not any(r["evaluation_pending"] for r in rounds)
    assert all("eval_compute_s" in e and "eval_error" not in e for e in rounds[0]["sites"].values())
    assert printed_rows(console) == [1, 2]


# --- one run in Flower's Simulation Engine ------------------------------------------------------------


def simulate_recorded(exp: ExperimentConfig, cohort: Path, tmp_path_factory: pytest.TempPathFactory, run_id: str) -> tuple[Path, dict, RecordingGrid]:
    """A Simulation Engine run of ``exp`` whose Grid records every message sent and every reply."""
    from server.simulate import simulate

    out = tmp_path_factory.mktemp("sim") / "run"
    holder: dict[str, RecordingGrid] = {}

    def wrap(grid: Grid) -> Grid:
        holder["grid"] = RecordingGrid(grid)
        return cast(Grid, holder["grid"])  # duck-typed: the wrapped Grid's own methods

    summary = simulate(exp, cohort, out, run_id=run_id, console=Console(quiet=True), cpus=2, wrap_grid=wrap)
    return out, summary, holder["grid"]


@pytest.fixture(scope="module")
def simulated(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, RecordingGrid]:
    return simulate_recorded(with_next_round(tiny_experiment(), rounds=3), cohort, tmp_path_factory, "next-sim")


def test_a_simulated_run_sends_one_train_exchange_per_round_and_one_final_evaluate(simulated: tuple[Path, dict, RecordingGrid]) -> None:
    _, summary, grid = simulated
    rounds, sites = 3, 3

    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    assert grid.count("train") == rounds * sites and grid.count("evaluate") == sites  # separate mode: 2 × rounds × sites
    assert flags(grid) == [(1, False)] * sites + [(2, True)] * sites + [(3, True)] * sites


def test_a_simulated_run_records_every_rounds_evaluation_and_the_final_models_auroc(simulated: tuple[Path, dict, RecordingGrid]) -> None:
    out, summary, grid = simulated

    rounds = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3] and not any(r["evaluation_pending"] for r in rounds)
    for rec in rounds:
        assert set(rec["sites"]) == {"alpha", "beta", "gamma"}
        assert all("eval_compute_s" in e and "train_compute_s" in e for e in rec["sites"].values()), rec
        assert all(("eval_auroc" in e) != ("eval" in e) for e in rec["sites"].values())  # an AUROC, or that it was suppressed
    assert any(r["auroc"] is not None for r in rounds)
    assert summary["final_federated_auroc"] == next(r["auroc"] for r in reversed(rounds) if r["auroc"] is not None)
    assert json.loads((out / "summary.json").read_text()) == summary
    for reply in grid.replies:
        if reply.metadata.message_type == "train" and not reply.has_error():
            assert set(reply.content.keys()) <= P.ALLOWED_REPLY_RECORDS
            if P.EVALUATION in reply.content:
                assert set(reply.content[P.EVALUATION].keys()) <= SITE_METRICS


@pytest.fixture(scope="module")
def simulated_separate(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, RecordingGrid]:
    exp = tiny_experiment()
    return simulate_recorded(replace(exp, federation=replace(exp.federation, evaluation="separate", rounds=2)), cohort, tmp_path_factory, "separate-sim")


def test_separate_evaluates_each_round_by_its_own_message_as_the_round_ends(simulated_separate: tuple[Path, dict, RecordingGrid]) -> None:
    out, summary, grid = simulated_separate
    rounds, sites = 2, 3

    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    assert grid.count("train") == grid.count("evaluate") == rounds * sites  # two exchanges a round
    assert flags(grid) == [(1, False)] * sites + [(2, False)] * sites  # no train message asks for an evaluation
    phases = [m.metadata.message_type for m in grid.sent if m.metadata.message_type in ("train", "evaluate")]  # (the pre-flight's queries left out)
    assert phases == (["train"] * sites + ["evaluate"] * sites) * rounds  # each round's evaluate right after its training
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [1, 2] and not any(r["evaluation_pending"] for r in records)
    for rec in records:
        assert all(("eval_auroc" in e) != ("eval" in e) and "eval_compute_s" in e for e in rec["sites"].values()), rec
    for reply in grid.replies:
        if reply.metadata.message_type == "train" and not reply.has_error():
            assert P.EVALUATION not in reply.content


@pytest.mark.parametrize("command", ["deployment", "scale"])
def test_the_bench_commands_refuse_an_unknown_evaluation_mode_before_running_anything(tmp_path: Path, command: str) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, ["bench", command, "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--evaluation", "later"])

    assert result.exit_code == 2, result.output
    assert "`federation.evaluation` is 'later'; allowed values are 'separate', 'with-next-round'" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
