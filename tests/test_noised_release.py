"""Noised evaluation releases at a site and at the coordinator: charged once per model, within
the plan's ε, audited, and nothing exact leaves (privacy.metrics_noise_multiplier > 0)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from client.site import Refusal, Site, TrainResult, ledger_public_key
from server.strategy import PatientFedAvg, SiteReport
from shared import metrics as M  # noqa: N812
from shared.config import ExperimentConfig, SiteConfig, load_site
from shared.models import build_model
from shared.params import get_arrays
from shared.privacy import ledger
from shared.privacy import noised_metrics as NM  # noqa: N812
from shared.privacy.accounting import epsilon
from shared.privacy.audit import verify_ledger
from tests.conftest import tiny_experiment

EXACT_KEYS = (M.AUROC, M.AUPRC, M.EVAL_LOSS, M.NUM_PATIENTS, M.TRAIN_LOSS)


def noised_experiment(z: float = 4.0) -> ExperimentConfig:
    return tiny_experiment().with_privacy(metrics_noise_multiplier=z)


@pytest.fixture
def alpha_cfg(tiny_cohort: Path, alpha_state: Path) -> SiteConfig:
    return replace(load_site(tiny_cohort / "alpha" / "site.yaml"), state_dir=alpha_state)


def start_arrays(exp: ExperimentConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The initial model with its parameters moved by ``seed``-dependent noise (models differ by seed)."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in get_arrays(build_model(exp)).items()}


def run_two_rounds(site: Site, run_id: str = "r1") -> list[dict[str, float]]:
    """Two rounds, each model evaluated after the round that made it, as a run does."""
    out = []
    for rnd in (1, 2):
        result = site.train(start_arrays(site.exp, rnd), run_id=run_id, server_round=rnd, total_rounds=2)
        assert isinstance(result, TrainResult)
        assert M.TRAIN_LOSS not in result.metrics  # an exact train loss would bypass the metrics' noise
        model = start_arrays(site.exp, 10 + rnd)
        assert site.reserve_evaluation(model, run_id=run_id, model_round=rnd) is None
        out.append(site.evaluate(model, run_id=run_id, model_round=rnd))
    return out


def test_each_release_is_charged_once_and_the_run_stays_within_its_epsilon(alpha_cfg: SiteConfig) -> None:
    site = Site(alpha_cfg, noised_experiment())
    replies = run_two_rounds(site)
    entries = ledger.read_entries(site.ledger_path)
    assert [(e.kind, e.round) for e in entries] == [("round", 1), ("release", 1), ("round", 2), ("release", 2)]
    target = site.exp.privacy.target_epsilon
    assert target - 0.1 <= entries[-1].epsilon_run <= target * 1.001  # σ was calibrated with the releases in the run
    assert entries[-1].epsilon_run == pytest.approx(epsilon([e.mechanism for e in entries], delta=site.delta))
    exact = Site(replace(alpha_cfg, state_dir=alpha_cfg.state_dir.parent / "other"), tiny_experiment())
    assert entries[0].noise_multiplier > exact.noise_multiplier(2)  # training made room for the releases
    releases = [e for e in entries if e.kind == "release"]
    for reply, release in zip(replies, releases, strict=True):
        assert set(reply) == {M.SUPPRESSED, *NM.STAT_KEYS, M.EPSILON_RUN, M.EPSILON_TOTAL} and reply[M.SUPPRESSED] == 0.0
        assert (reply[M.EPSILON_RUN], reply[M.EPSILON_TOTAL]) == (release.epsilon_run, release.epsilon_total)  # ε after the release, as charged
        assert not set(EXACT_KEYS) & set(reply)
    assert verify_ledger(site.ledger_path, ledger_public_key(alpha_cfg.state_dir)).issues == []


def test_the_same_model_asked_again_gets_the_same_answer_and_no_second_charge(alpha_cfg: SiteConfig) -> None:
    site = Site(alpha_cfg, noised_experiment())
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    first = site.evaluate(model, run_id="r1", model_round=1)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    assert site.evaluate(model, run_id="r1", model_round=1) == first  # the same noise: nothing to average away
    assert [e.kind for e in ledger.read_entries(site.ledger_path)] == ["round", "release"]
    other = site.reserve_evaluation(start_arrays(site.exp, 6), run_id="r1", model_round=1)
    assert isinstance(other, Refusal) and other.code == "evaluation-limit"
    noise = np.array([first[k] for k in NM.STAT_KEYS]) - NM.patient_statistics(*_eval_arrays(site, model))
    assert np.abs(noise).max() > 0.5  # noise of the plan's multiplier was added (z = 4)


def _eval_arrays(site: Site, model: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from client.predict import predict
    from shared.params import set_arrays

    net = build_model(site.exp)
    set_arrays(net, model)
    probs = predict(net, site.eval_set, site.device)
    return site.eval_set.labels.numpy(), probs.numpy(), site.eval_set.mask.numpy()


def test_a_release_beyond_the_planned_ones_is_refused_and_cannot_crowd_out_a_planned_one(alpha_cfg: SiteConfig) -> None:
    """σ is calibrated for one release per trained model (rounds 1..R); the initial model (round
    0) would be an unplanned one, which took the budget of the final model's release."""
    site = Site(alpha_cfg, noised_experiment(z=4.0))
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    extra = site.reserve_evaluation(start_arrays(site.exp, 30), run_id="r1", model_round=0, total_rounds=2)
    assert isinstance(extra, Refusal) and extra.code == "evaluation-limit" and "rounds 1 to 2" in extra.reason
    assert sum(e.kind == "release" for e in ledger.read_entries(site.ledger_path)) == 0
    for rnd in (1, 2):
        if rnd == 2:
            assert isinstance(site.train(start_arrays(site.exp, 2), run_id="r1", server_round=2, total_rounds=2), TrainResult)
        assert site.reserve_evaluation(start_arrays(site.exp, 10 + rnd), run_id="r1", model_round=rnd, total_rounds=2) is None
    assert ledger.read_entries(site.ledger_path)[-1].epsilon_run <= site.exp.privacy.target_epsilon * 1.001


def test_a_policy_that_requires_noised_metrics_sends_nothing_exact(alpha_cfg: SiteConfig) -> None:
    cfg = replace(alpha_cfg, policy=replace(alpha_cfg.policy, require_noised_metrics=True))
    site = Site(cfg, tiny_experiment())  # a plan with exact metrics
    result = site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2)
    assert isinstance(result, TrainResult) and M.TRAIN_LOSS not in result.metrics
    refusal = site.reserve_evaluation(start_arrays(site.exp, 3), run_id="r1", model_round=1)
    assert isinstance(refusal, Refusal) and refusal.code == "metrics-withheld" and "metrics_noise_multiplier" in refusal.reason


def test_plan_counts_the_releases_in_the_runs_epsilon(alpha_cfg: SiteConfig) -> None:
    site = Site(alpha_cfg, noised_experiment())
    out = site.plan(run_id="r1", total_rounds=2)
    assert out["code"] == "ok"
    assert out["epsilon_run"] == pytest.approx(site.exp.privacy.target_epsilon, abs=0.1)


def test_releases_that_leave_no_room_for_training_are_a_budget_refusal_in_the_plan(alpha_cfg: SiteConfig) -> None:
    from shared.errors import UnreachableEpsilonError

    site = Site(alpha_cfg, noised_experiment(z=0.3))
    with pytest.raises(UnreachableEpsilonError, match="noised metric release"):
        site.plan(run_id="r1", total_rounds=2)


def report(site: str, metrics: dict[str, float]) -> SiteReport:
    return SiteReport(site=site, node=hash(site) % 1000, metrics=dict(metrics))


def strategy(z: float) -> PatientFedAvg:
    return PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1, min_patients_metric=2, metrics_noise_multiplier=z)


def test_the_coordinator_pools_noised_statistics_and_keeps_no_exact_figure() -> None:
    rng = np.random.default_rng(0)
    vecs = [np.abs(rng.normal(2.0, 1.0, NM.LENGTH)) for _ in range(3)]
    reports = [report(s, {M.SUPPRESSED: 0.0, **NM.to_metrics(v), M.COMPUTE_SECONDS: 0.1}) for s, v in zip("abc", vecs, strict=True)]
    out = strategy(2.0).aggregate_evaluation(1, reports)
    assert out is not None
    pooled = NM.estimates(np.sum(vecs, axis=0))
    assert out[M.AUROC] == pytest.approx(pooled.auroc) and out[M.AUPRC] == pytest.approx(pooled.auprc)
    for r in reports:  # what the run folder writes: estimates read from what the site sent, flagged
        assert r.metrics[M.NOISED] == 1.0 and not any(k.startswith(NM.STAT_PREFIX) for k in r.metrics)


@pytest.mark.parametrize(
    ("z", "metrics", "words"),
    [
        (2.0, {M.SUPPRESSED: 0.0, M.NUM_PATIENTS: 10.0, M.AUROC: 0.7}, "exact metric"),
        (2.0, {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}, "suppressed exact evaluation"),
        (2.0, {M.SUPPRESSED: 0.0, **NM.to_metrics(np.full(NM.LENGTH, 1e7))}, "within ±"),
        (2.0, {M.SUPPRESSED: 0.0, **NM.to_metrics(np.ones(NM.LENGTH)), M.AUROC: 0.9}, "exact metric 'auroc'"),
        (0.0, {M.SUPPRESSED: 0.0, **NM.to_metrics(np.ones(NM.LENGTH))}, "plan asks for exact metrics"),
        (2.0, {M.SUPPRESSED: 0.0, **NM.to_metrics(np.ones(NM.LENGTH)), M.EPSILON_RUN: 3.0}, "must come together"),
        (2.0, {M.SUPPRESSED: 0.0, **NM.to_metrics(np.ones(NM.LENGTH)), M.EPSILON_RUN: 3.0, M.EPSILON_TOTAL: 2.0}, "is below"),
    ],
)
def test_evaluations_of_the_wrong_kind_are_rejected_not_written(z: float, metrics: dict[str, float], words: str) -> None:
    reports = [report("a", metrics)]
    assert strategy(z).aggregate_evaluation(1, reports) is None
    assert reports[0].error is not None and words in reports[0].error and reports[0].metrics == {}


@pytest.fixture(scope="module")
def fresh_cohort(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort with empty ledgers (a module of its own: its runs charge these)."""
    import shutil

    dst = tmp_path_factory.mktemp("noised") / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("ledger", "approved-plans.json"))
    return dst


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("evaluation", ["with-next-round", "separate", "secagg"])
def test_a_federated_run_with_noised_metrics_reports_auroc_and_charges_every_release(fresh_cohort: Path, tmp_path: Path, evaluation: str) -> None:
    """The real ClientApp of each site behind an in-process grid (plain, or SecAgg+ with the
    evaluation riding in the masked round's reply): every model's evaluation arrives noised, the
    round table gets a pooled AUROC, and each site's ledger holds one release per model, within
    the plan's ε, and verifies."""
    from shared.config import SecureAggregationConfig
    from tests.test_evaluate_with_next_round import run_in_process

    exp = noised_experiment(z=2.0)
    if evaluation == "secagg":
        sa = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=20.0, clipping_range=8.0)
        exp = replace(exp, federation=replace(exp.federation, evaluation="with-next-round", secure_aggregation=sa))
    else:
        exp = replace(exp, federation=replace(exp.federation, evaluation=evaluation))
    run_id = f"noised-{evaluation}"
    console = Console(file=io.StringIO(), width=200)
    summary, grid = run_in_process(exp, fresh_cohort, tmp_path / "run", run_id=run_id, console=console)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["privacy"]["metrics_noise_multiplier"] == 2.0
    assert "Noised metrics (privacy.metrics_noise_multiplier 2)" in console.file.getvalue()  # type: ignore[attr-defined]
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 2-3 held-out patients a site: the pooled histograms may hold no weight after noise (AUROC None, said so in the table)
    assert all(r["auroc"] is None or 0.0 <= r["auroc"] <= 1.0 for r in rounds)
    for r in rounds:
        assert r["train_loss"] is None and r["eval_loss"] is None
        for site, entry in r["sites"].items():
            assert entry.get("eval", "").startswith("noised"), (site, entry)
    for reply in grid.replies:  # nothing exact left any site
        for name in ("metrics", "evaluation"):
            record = reply.content.metric_records.get(name) if not reply.has_error() else None
            assert not set(EXACT_KEYS) - {M.NUM_PATIENTS} & set(record or {}), (name, dict(record or {}))
    for name in ("alpha", "beta", "gamma"):
        cfg = load_site(fresh_cohort / name / "site.yaml")
        path = cfg.state_dir / "ledger" / ledger.LEDGER_FILE
        mine = [e for e in ledger.read_entries(path) if e.run_id == run_id]
        assert sorted((e.kind, e.round) for e in mine) == [("release", 1), ("release", 2), ("round", 1), ("round", 2)]
        assert mine[-1].epsilon_run <= exp.privacy.target_epsilon * 1.001
        assert verify_ledger(path, ledger_public_key(cfg.state_dir)).issues == []
        # the summary shows ε after the run's last release (it came after the last round) and a head that covers it
        assert summary["sites"][name]["epsilon"] == pytest.approx(mine[-1].epsilon_run)
        assert summary["sites"][name]["ledger_head"] == ledger.head_hash(ledger.read_entries(path))


def test_the_audit_report_and_site_budget_count_releases_in_epsilon(alpha_cfg: SiteConfig) -> None:
    from client.budget import budget_status
    from shared.privacy.report import _site_paragraph, build_report, render_html

    site = Site(alpha_cfg, noised_experiment())
    run_two_rounds(site)
    entries = ledger.read_entries(site.ledger_path)
    status = budget_status(alpha_cfg)
    assert status["runs"] == [{"run_id": "r1", "rounds": 2, "releases": 2, "epsilon": pytest.approx(entries[-1].epsilon_run)}]
    assert status["epsilon_spent"] == pytest.approx(entries[-1].epsilon_total)
    pub = alpha_cfg.state_dir / "keys" / "ledger-ed25519.pub.pem"
    data = build_report([site.ledger_path], public_key=pub if pub.exists() else None, policy=alpha_cfg.policy, title="t")
    (led,) = data.ledgers
    assert led.issues == [] and led.epsilon_spent == pytest.approx(entries[-1].epsilon_total)
    assert [r.label for r in led.rounds] == ["1", "1: noised metrics", "2", "2: noised metrics"]
    assert "2 rounds and 2 noised metric releases" in _site_paragraph(led)
    assert "1: noised metrics" in render_html(data)


def test_the_summary_line_says_the_final_auroc_is_noised(tmp_path: Path) -> None:
    from server.cli import _final_auroc

    assert _final_auroc({"final_federated_auroc": 0.7, "privacy": {"enabled": True, "metrics_noise_multiplier": 4.0}}, tmp_path) == "0.700 (noised, z = 4)"
    assert _final_auroc({"final_federated_auroc": 0.7, "privacy": {"enabled": True}}, tmp_path) == "0.700"


def test_secure_mode_draws_the_metrics_noise_from_the_keystream_and_repeats_it(alpha_cfg: SiteConfig) -> None:
    site = Site(alpha_cfg, noised_experiment().with_privacy(metrics_noise_multiplier=4.0, secure_mode=True))
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    first = site.evaluate(model, run_id="r1", model_round=1)
    assert site.evaluate(model, run_id="r1", model_round=1) == first
    noise = np.array([first[k] for k in NM.STAT_KEYS]) - NM.patient_statistics(*_eval_arrays(site, model))
    assert noise.std() > 1.0  # z = 4 noise, from the ChaCha20 stream (deterministic in the site's secret, run, round and model)


# --- red-team findings (the review of this feature), each a test that failed on its first version ---


def test_the_same_model_under_another_noise_level_is_refused_not_answered(alpha_cfg: SiteConfig) -> None:
    """z = 4 then z = 8 on the same draws gave 2·v4 − v8 = the exact statistics."""
    site = Site(alpha_cfg, noised_experiment(z=4.0))
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    site.evaluate(model, run_id="r1", model_round=1)
    other = Site(alpha_cfg, noised_experiment(z=8.0))
    refusal = other.reserve_evaluation(model, run_id="r1", model_round=1)
    assert isinstance(refusal, Refusal) and refusal.code == "evaluation-limit" and "another plan" in refusal.reason
    assert [e.kind for e in ledger.read_entries(site.ledger_path)] == ["round", "release"]


def test_the_same_model_after_the_data_changed_is_refused_not_answered(alpha_cfg: SiteConfig, tmp_path: Path) -> None:
    """A patient removed from the manifest, then the same evaluate again: the difference of the
    two answers was that patient's exact contribution."""
    import csv
    import shutil

    folder = tmp_path / "alpha"
    shutil.copytree(alpha_cfg.manifest.parent, folder, ignore=shutil.ignore_patterns("state", "ledger"))
    manifest = folder / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    cfg = replace(alpha_cfg, manifest=manifest)
    site = Site(cfg, noised_experiment())
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    gone = rows[-1]["patient_id"]
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["patient_id"] != gone)
    changed = Site(cfg, noised_experiment())
    refusal = changed.reserve_evaluation(model, run_id="r1", model_round=1)
    assert isinstance(refusal, Refusal) and refusal.code == "evaluation-limit" and "on its data as it is now" in refusal.reason


@pytest.mark.parametrize("label", [-1, 0, 3, 10**12])
def test_a_model_round_outside_the_plans_rounds_is_refused_and_not_charged(alpha_cfg: SiteConfig, label: int) -> None:
    site = Site(alpha_cfg, noised_experiment())
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    refusal = site.reserve_evaluation(start_arrays(site.exp, 5), run_id="r1", model_round=label, total_rounds=2)
    assert isinstance(refusal, Refusal) and refusal.code == "evaluation-limit" and "rounds 1 to 2" in refusal.reason
    assert [e.kind for e in ledger.read_entries(site.ledger_path)] == ["round"]


def test_a_release_charged_before_a_crash_is_not_reused_by_a_plan_with_less_noise(alpha_cfg: SiteConfig) -> None:
    """The ledger entry (z = 4) was written, the claim was not; a z = 0.25 plan then asked."""
    site = Site(alpha_cfg, noised_experiment(z=4.0))
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    from shared.model_signing import model_digest

    with ledger.locked(site.ledger_path):  # the entry, no claim
        assert site._charge_release(ledger.read_entries(site.ledger_path), run_id="r1", model_round=1, model=model_digest(model)) is None
    cheap = Site(alpha_cfg, noised_experiment(z=4.0).with_privacy(metrics_noise_multiplier=0.25, target_epsilon=60.0))
    refusal = cheap.reserve_evaluation(start_arrays(site.exp, 5), run_id="r1", model_round=1)
    assert isinstance(refusal, Refusal) and refusal.code == "evaluation-limit" and "noise multiplier 4" in refusal.reason
    other_model = site.reserve_evaluation(start_arrays(site.exp, 6), run_id="r1", model_round=1)  # the entry names the model it charged
    assert isinstance(other_model, Refusal) and other_model.code == "evaluation-limit"
    same = site.reserve_evaluation(model, run_id="r1", model_round=1)  # the plan and model it was charged for: answered, not charged again
    assert same is None and [e.kind for e in ledger.read_entries(site.ledger_path)] == ["round", "release"]


def test_a_noised_reply_carries_no_time_or_memory_figures(alpha_cfg: SiteConfig) -> None:
    from client.app import _evaluation

    site = Site(alpha_cfg, noised_experiment())
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    reply = _evaluation(site, model, run_id="r1", model_round=1)
    assert M.COMPUTE_SECONDS not in reply and M.PEAK_RSS_MB not in reply


@pytest.mark.parametrize(
    ("vector", "words"),
    [
        (np.concatenate([np.full(NM.BINS, -100.0), np.ones(NM.BINS)]), "lies within"),  # cancelling the other sites' relapse histogram (σ = 2.8)
        (np.full(NM.LENGTH, 100.0), "sum to"),  # 2,000 patients' worth from a site that can hold out at most 431
    ],
)
def test_a_site_cannot_outweigh_its_patients_or_cancel_the_others(vector: np.ndarray, words: str) -> None:
    reports = [report("a", {M.SUPPRESSED: 0.0, **NM.to_metrics(vector)})]
    assert strategy(2.0).aggregate_evaluation(1, reports) is None
    assert reports[0].error is not None and words in reports[0].error


def test_audit_flags_a_release_whose_epsilon_was_not_counted(alpha_cfg: SiteConfig) -> None:
    import dataclasses

    site = Site(alpha_cfg, noised_experiment())
    run_two_rounds(site)
    entries = ledger.read_entries(site.ledger_path)
    key = site.signing_key()
    forged_path = alpha_cfg.state_dir / "forged.jsonl"
    prev = ledger.GENESIS
    for e in entries:
        if e.kind == "release" and e.round == 2:  # records the ε of the round before it: the release not counted
            e = dataclasses.replace(e, epsilon_run=entries[2].epsilon_run, epsilon_total=entries[2].epsilon_total)
        e = dataclasses.replace(e, prev_hash=prev)
        ledger.append(forged_path, e, key)
        prev = e.hash
    issues = verify_ledger(forged_path, key.public_key()).issues
    assert any("no more than before it" in i.message for i in issues), issues


def test_a_repeat_gets_the_answer_that_was_sent_even_after_the_noise_secret_was_lost(alpha_cfg: SiteConfig) -> None:
    """Recomputed, the repeat came from another held-out split and other noise: a second,
    uncharged answer about the same patients (L2 36 apart in the review's script)."""
    site = Site(alpha_cfg, noised_experiment())
    assert isinstance(site.train(start_arrays(site.exp), run_id="r1", server_round=1, total_rounds=2), TrainResult)
    model = start_arrays(site.exp, 5)
    assert site.reserve_evaluation(model, run_id="r1", model_round=1) is None
    first = site.evaluate(model, run_id="r1", model_round=1)
    (alpha_cfg.state_dir / "noise-seed.key").unlink()
    again = Site(alpha_cfg, noised_experiment())
    assert again.reserve_evaluation(model, run_id="r1", model_round=1) is None
    assert again.evaluate(model, run_id="r1", model_round=1) == first
    assert [e.kind for e in ledger.read_entries(site.ledger_path)] == ["round", "release"]


def test_an_honest_site_with_a_large_held_out_share_is_not_rejected() -> None:
    """max_weight caps training patients; with eval_fraction 0.7 a site trains on 1,000 and holds out 1,400 (rejected 2000 of 2000 at z = 4 before)."""
    strat = PatientFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_nodes=1, node_wait_timeout_s=1, max_weight=1000.0, metrics_noise_multiplier=4.0, eval_fraction=0.7)
    rng = np.random.default_rng(0)
    counts = np.zeros(NM.LENGTH)
    counts[:NM.BINS] = 700.0 / NM.BINS
    counts[NM.BINS:] = 700.0 / NM.BINS
    for _ in range(200):
        vec = NM.noised(counts, noise_multiplier=4.0, generator=rng)
        assert strat.evaluation_problem({M.SUPPRESSED: 0.0, **NM.to_metrics(vec)}) is None


def test_the_report_counts_rounds_and_releases_apart(alpha_cfg: SiteConfig) -> None:
    from shared.privacy.report import build_report, render_html, rounds_count

    site = Site(alpha_cfg, noised_experiment())
    run_two_rounds(site)
    data = build_report([site.ledger_path], public_key=None, policy=alpha_cfg.policy, title="t")
    assert rounds_count(data.ledgers[0].rounds) == "2 + 2 releases"
    html = render_html(data)
    assert "2 + 2 releases" in html and "noised metrics" in html and "unless a run noised them" in html


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("evaluation", ["with-next-round", "separate"])
def test_a_site_that_withholds_its_evaluation_says_why_to_the_researcher(tiny_cohort: Path, tmp_path: Path, evaluation: str) -> None:
    """A policy with require_noised_metrics under an exact plan: before, the researcher saw 'the
    train reply carried no evaluation' (with-next-round) or nothing at all (separate)."""
    import shutil

    import yaml

    from tests.test_evaluate_with_next_round import run_in_process

    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort, ignore=shutil.ignore_patterns("ledger", "approved-plans.json"))
    path = cohort / "alpha" / "site.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["policy"] = {**cfg.get("policy", {}), "require_noised_metrics": True}
    path.write_text(yaml.safe_dump(cfg))
    exp = replace(tiny_experiment(), federation=replace(tiny_experiment().federation, evaluation=evaluation))
    console = Console(file=io.StringIO(), width=200)
    summary, _ = run_in_process(exp, cohort, tmp_path / "run", run_id=f"withheld-{evaluation}", console=console)
    assert summary["status"] == "completed"
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for r in rounds:
        assert r["sites"]["alpha"]["eval_error"].startswith("refused (metrics-withheld): Site alpha sends evaluations only noised"), r["sites"]["alpha"]
    assert "site alpha sent no evaluation of round 1's model: refused (metrics-withheld)" in console.file.getvalue()  # type: ignore[attr-defined]
