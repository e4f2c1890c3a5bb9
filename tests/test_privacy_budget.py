"""Budgets sites enforce and DPOs audit: policy caps, signed ledgers, independent verification."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from client.budget import budget_status, change_caps
from client.site import Refusal, Site, TrainResult, site_key_paths
from server.cli import app
from shared import signing
from shared.config import SitePolicy, load_site
from shared.errors import PolicyError
from shared.models import build_model
from shared.params import get_arrays
from shared.privacy import ledger
from shared.privacy.accounting import SubsampledGaussian, epsilon
from shared.privacy.audit import independent_epsilon, verify_ledger
from tests.conftest import tiny_experiment

runner = CliRunner()


def make_site(tiny_cohort: Path, tmp_path: Path, **policy: Any) -> Site:
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    return Site(replace(cfg, state_dir=tmp_path / "state", policy=replace(SitePolicy(), **policy)), tiny_experiment())


def arrays() -> dict[str, np.ndarray]:
    return dict(get_arrays(build_model(tiny_experiment())))


def train_rounds(site: Site, run_id: str, rounds: int) -> list[TrainResult | Refusal]:
    return [site.train(arrays(), run_id=run_id, server_round=r, total_rounds=rounds) for r in range(1, rounds + 1)]


@pytest.fixture
def trained(tiny_cohort: Path, tmp_path: Path, alpha_state: Path) -> Site:
    site = make_site(tiny_cohort, tmp_path)
    train_rounds(site, "run-a", 2)
    return site


@pytest.mark.usefixtures("alpha_state")
def test_all_time_cap_refuses_a_run_that_would_cross_it(tiny_cohort: Path, tmp_path: Path) -> None:
    site = make_site(tiny_cohort, tmp_path, epsilon_cap_total=9.0)
    assert all(isinstance(r, TrainResult) for r in train_rounds(site, "run-a", 2))  # ε = 8
    second = site.train(arrays(), run_id="run-b", server_round=1, total_rounds=2)
    assert isinstance(second, Refusal) and second.code == "budget" and "all-time cap 9" in second.reason
    planned = site.plan(run_id="run-c", total_rounds=2)
    assert planned["code"] == "budget" and planned["epsilon_remaining"] == pytest.approx(9.0 - cast(float, planned["epsilon_spent"]))


@pytest.mark.usefixtures("alpha_state")
def test_minimum_sigma_in_policy_refuses_weak_noise(tiny_cohort: Path, tmp_path: Path) -> None:
    site = make_site(tiny_cohort, tmp_path, min_noise_multiplier=50.0)
    result = site.train(arrays(), run_id="r", server_round=1, total_rounds=2)
    assert isinstance(result, Refusal) and result.code == "min-sigma"
    assert not site.ledger_path.exists() or not ledger.read_entries(site.ledger_path)


@pytest.mark.usefixtures("alpha_state")
def test_a_min_sigma_refusal_advises_what_raises_sigma_and_following_it_is_accepted(tiny_cohort: Path, tmp_path: Path) -> None:
    """For a fixed ε the σ a plan needs grows with its steps and with q: the refusal must not
    advise fewer rounds or steps (the reviewer's 1 round x 1 step x 1 patient plan, σ ≈ 0.5)."""
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    policy = replace(SitePolicy(), min_noise_multiplier=0.55)

    def planned(rounds: int, steps: int, batch: int, epsilon: float = 8.0) -> dict:
        exp = tiny_experiment()
        exp = replace(exp, federation=replace(exp.federation, rounds=rounds), training=replace(exp.training, local_steps=steps, batch_patients=batch))
        return Site(replace(cfg, state_dir=tmp_path / "state", policy=policy), exp.with_privacy(target_epsilon=epsilon)).plan(run_id="r", total_rounds=rounds)

    refused = planned(1, 1, 1)
    assert refused["code"] == "min-sigma" and refused["noise_multiplier"] < 0.55
    assert "more rounds or local steps, a larger `training.batch_patients`, or a smaller ε" in str(refused["reason"])
    assert "fewer" not in str(refused["reason"])
    for advice in (planned(5, 10, 1), planned(1, 1, 3), planned(1, 1, 1, epsilon=2.0)):  # each direction the refusal names
        assert advice["code"] == "ok" and advice["noise_multiplier"] > refused["noise_multiplier"], advice


def test_sigma_grows_with_steps_and_sampling_rate_for_the_reviewers_min_sigma_plan() -> None:
    """/tmp/rw/cfg/minsigma2.yaml on the demo cohort: bergen, 32 training patients, batch 1, 1 x 1 step, ε 8."""
    from shared.privacy.accounting import calibrate_noise

    def sigma(steps: int, batch: int, eps: float = 8.0) -> float:
        return calibrate_noise(target_epsilon=eps, target_delta=1e-5, sample_rate=batch / 32, steps=steps)

    assert sigma(1, 1) < 0.5  # refused by the default policy minimum
    assert sigma(5 * 10, 1) > 0.5 and sigma(1, 8) > 0.5 and sigma(1, 1, eps=4.0) > 0.5


def test_dpo_cap_change_is_a_signed_ledger_entry_that_takes_effect(trained: Site) -> None:
    change_caps(trained.cfg, cap_total=1.0, cap_run=None, note="DPO Kari N.: pause after audit")
    status = budget_status(trained.cfg)
    assert status["cap_total"] == 1.0 and status["epsilon_remaining"] == 0.0
    entries = ledger.read_entries(trained.ledger_path, signing.load_public(site_key_paths(trained.cfg.state_dir)[1]))
    assert entries[-1].kind == "policy" and "pause after audit" in entries[-1].note
    refused = trained.train(arrays(), run_id="run-b", server_round=1, total_rounds=2)
    assert isinstance(refused, Refusal) and refused.code == "budget"


def test_budget_reports_spend_per_run(trained: Site) -> None:
    status = budget_status(trained.cfg)
    assert [r["run_id"] for r in status["runs"]] == ["run-a"] and status["runs"][0]["rounds"] == 2
    assert status["epsilon_spent"] == pytest.approx(8.0, rel=0.01)


def test_clean_ledger_verifies_and_epsilon_matches_an_independent_accountant(trained: Site) -> None:
    report = verify_ledger(trained.ledger_path, signing.load_public(site_key_paths(trained.cfg.state_dir)[1]))
    assert report.ok, report.issues
    assert [c.round for c in report.checks] == [1, 2]  # every round entry is recomputed
    for c in report.checks:
        assert c.rdp == pytest.approx(c.recorded_total, rel=0.02) and c.rdp_run == pytest.approx(c.recorded_run, rel=0.02)
    last = report.checks[-1]
    assert last.pld <= last.recorded_total * 1.001  # PLD at the newest entry only (it takes seconds)
    assert np.isnan(report.checks[0].pld)


def _rewrite(site: Site, lines: list[str]) -> None:
    site.ledger_path.write_text("".join(lines), encoding="utf-8")


def _resigned(site: Site, lines: list[str], index: int, **changes: object) -> list[str]:
    """The ledger's lines with entry ``index`` changed and it and every later entry re-chained and re-signed
    with the site's own key: what buggy site software (not an outsider) could write."""
    return _resigned_with(signing.load_private(site_key_paths(site.cfg.state_dir)[0]), lines, index, **changes)


def _resigned_with(key: Ed25519PrivateKey, lines: list[str], index: int, **changes: object) -> list[str]:
    """:func:`_resigned` with the signing key given."""
    out, prev = list(lines[:index]), json.loads(lines[index - 1])["hash"] if index else ledger.GENESIS
    for i, line in enumerate(lines[index:]):
        body = {k: v for k, v in json.loads(line).items() if k not in ("hash", "signature")} | (changes if i == 0 else {}) | {"prev_hash": prev}
        entry = ledger.LedgerEntry(**body)
        out.append(entry.to_line(key))
        prev = entry.hash
    return out


@pytest.mark.parametrize("case", ["epsilon-run", "mid-run-total"])
def test_audit_verify_checks_every_entrys_recorded_epsilon(trained: Site, case: str) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    if case == "epsilon-run":  # validly signed, but the run's ε under-recorded in every entry
        lines = _resigned(trained, lines, 0, epsilon_run=1.0)
        lines = _resigned(trained, lines, 1, epsilon_run=1.0)
    else:  # round 1's all-time ε under-recorded; the run's last entry is right
        lines = _resigned(trained, lines, 0, epsilon_total=0.5)
    _rewrite(trained, lines)
    report = verify_ledger(trained.ledger_path, signing.load_public(site_key_paths(trained.cfg.state_dir)[1]))
    assert not report.ok and report.issues[0].line == 1 and "an under-count" in report.issues[0].message, report.issues


@pytest.mark.parametrize(("target", "accountant"), [(1.0, "rdp"), (0.5, "rdp"), (60.0, "rdp"), (0.5, "prv")])
def test_a_ledger_written_as_the_site_writes_it_verifies_at_small_and_large_epsilon(tmp_path: Path, target: float, accountant: str) -> None:
    """Early rounds of a small-ε run (ε ≈ 0.1, where the best Rényi order lies between dp-accounting's
    defaults), a large ε (where RDP's small orders give no bound) and PRV's 0.01 accuracy must not fail a clean ledger."""
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.privacy.accounting import calibrate_noise

    key, path, prev = Ed25519PrivateKey.generate(), tmp_path / "privacy-ledger.jsonl", ledger.GENESIS
    delta, q, rounds, steps = 1e-5, 0.1, 50 if target < 10 else 5, 5
    sigma = calibrate_noise(target_epsilon=target, target_delta=delta, sample_rate=q, steps=rounds * steps, accountant=accountant)
    for r in (1, 2, 3):  # what Site.train records for rounds 1-3
        eps = epsilon([SubsampledGaussian(sigma, q, steps)] * r, delta=delta, accountant=accountant)
        entry = ledger.LedgerEntry(site="oslo", dataset="d", run_id="run-1", round=r, accountant=accountant, delta=delta, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                   max_grad_norm=1.0, epsilon_run=eps, epsilon_total=eps, time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), prev_hash=prev)
        ledger.append(path, entry, key)
        prev = entry.hash
    report = verify_ledger(path, key.public_key())
    assert report.ok, (sigma, report.issues)


def test_a_complete_last_entry_counts_whether_or_not_its_newline_is_there(trained: Site) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    _rewrite(trained, [*lines[:-1], lines[-1].rstrip("\n")])  # only the final newline removed (it used to hide the last round)
    pub = signing.load_public(site_key_paths(trained.cfg.state_dir)[1])
    report = verify_ledger(trained.ledger_path, pub)
    assert report.ok and len(report.entries) == 2, report.issues
    assert budget_status(trained.cfg)["epsilon_spent"] == pytest.approx(8.0, rel=0.01)  # not the 1-round figure
    assert isinstance(trained.train(arrays(), run_id="run-b", server_round=1, total_rounds=4), TrainResult)  # the next append keeps it
    assert [(e.run_id, e.round) for e in ledger.read_entries(trained.ledger_path, pub)] == [("run-a", 1), ("run-a", 2), ("run-b", 1)]


def test_a_last_entry_cut_short_is_not_counted_by_the_site_but_reported_by_the_audit(trained: Site) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    _rewrite(trained, [*lines[:-1], lines[-1][:-2]])  # "}\n" cut off: what a crash mid-write leaves, or an edit hiding the entry
    pub = signing.load_public(site_key_paths(trained.cfg.state_dir)[1])
    assert len(ledger.read_entries(trained.ledger_path, pub)) == 1  # the site: a crashed write's update never left
    report = verify_ledger(trained.ledger_path, pub)
    assert not report.ok and report.issues[0].line == 2 and "unfinished line" in report.issues[0].message


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("duplicate-key", "canonical"),  # a planted "hash" key: json keeps the last, the runbook's grep finds the first
        ("spaces", "canonical"),
        ("crlf", "canonical"),
        ("number-line", "a JSON int, not an object"),
        ("string-line", "a JSON str, not an object"),
        ("not-utf8", "not UTF-8"),
        ("steps-as-text", "field 'steps'"),
        ("round-as-text", "field 'round'"),
        ("time-as-number", "field 'time'"),
        ("sigma-null", "field 'noise_multiplier'"),
        ("signature-number", "field 'signature'"),
        ("nan-cap", "not a finite number"),
        ("unknown-field", "unknown field"),
        ("overlong-line", "longer than any entry"),  # checked before JSON parsing
        ("deep-nesting", "nested too deeply"),  # RecursionError in json
        ("5000-digit-number", "digits"),  # ValueError in json
        ("huge-int-sigma", "field 'noise_multiplier' is an integer of 401 digits"),  # OverflowError later
        ("huge-int-epsilon", "field 'epsilon_total' is an integer"),
        ("huge-steps", "field 'steps'"),  # OverflowError inside dp-accounting
        ("too-many-steps", "not a step count"),
        ("naive-time", "with a timezone"),  # TypeError comparing datetimes
        ("time-not-iso", "field 'time'"),
    ],
)
def test_malformed_or_non_canonical_lines_are_reported_by_line_never_crash(trained: Site, tamper: str, problem: str, tmp_path: Path) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    body = json.loads(lines[0])
    canonical = lambda b: json.dumps(b, sort_keys=True, separators=(",", ":")) + "\n"  # noqa: E731
    raw = {
        "duplicate-key": '{"hash":"' + "f" * 64 + '",' + lines[0][1:],
        "spaces": json.dumps(body, sort_keys=True) + "\n",
        "crlf": lines[0].replace("\n", "\r\n"),
        "number-line": "42\n",
        "string-line": '"x"\n',
        "not-utf8": None,
        "steps-as-text": canonical(body | {"steps": str(body["steps"])}),
        "round-as-text": canonical(body | {"round": "1"}),
        "time-as-number": canonical(body | {"time": 12345}),
        "sigma-null": canonical(body | {"noise_multiplier": None}),
        "signature-number": canonical(body | {"signature": 5}),
        "nan-cap": canonical(body | {"cap_run": float("nan")}),
        "unknown-field": canonical(body | {"extra": 1}),
        "overlong-line": "[" * 70_000 + "\n",
        "deep-nesting": "[" * 5_000 + "]" * 5_000 + "\n",
        "5000-digit-number": canonical(body)[:-2] + ',"zz":' + "9" * 5_000 + "}\n",
        "huge-int-sigma": canonical(body | {"noise_multiplier": 10**400}),
        "huge-int-epsilon": canonical(body | {"epsilon_total": 10**400}),
        "huge-steps": canonical(body | {"steps": 10**30}),
        "too-many-steps": canonical(body | {"steps": 2 * 10**9}),
        "naive-time": canonical(body | {"time": "2025-01-01T00:05:00"}),
        "time-not-iso": canonical(body | {"time": "yesterday"}),
    }[tamper]
    if raw is None:
        trained.ledger_path.write_bytes(lines[0].replace('"kind"', '"k\xff"').encode("latin-1") + "".join(lines[1:]).encode())
    else:
        _rewrite(trained, [raw, *lines[1:]])
    pub = site_key_paths(trained.cfg.state_dir)[1]
    result = runner.invoke(app, ["audit", "verify", str(trained.ledger_path), "--public-key", str(pub), "--json"])
    assert result.exit_code == 1, result.output
    issues = json.loads(result.output)[0]["issues"]
    assert issues[0]["line"] == 1 and problem in issues[0]["problem"], issues
    with pytest.raises(PolicyError, match="line 1"):  # the site refuses (code `ledger`) instead of crashing
        budget_status(trained.cfg)


def test_a_missing_public_key_file_does_not_switch_the_signature_check_off(trained: Site, tmp_path: Path) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    mallory = signing.generate(tmp_path / "m.pem", tmp_path / "m.pub")
    forged, prev = [], ledger.GENESIS
    for line in lines:  # the whole chain rebuilt consistently, without the site's key
        entry = ledger.LedgerEntry(**{k: v for k, v in json.loads(line).items() if k not in ("hash", "signature")} | {"noise_multiplier": 5.0, "prev_hash": prev})
        forged.append(entry.to_line(mallory))
        prev = entry.hash
    _rewrite(trained, forged)
    priv, pub = site_key_paths(trained.cfg.state_dir)
    pub.unlink()
    with pytest.raises(PolicyError, match="signature does not verify"):
        budget_status(trained.cfg)  # checked with the private key's public half
    with pytest.raises(PolicyError, match="signature does not verify"):
        trained.plan(run_id="run-b", total_rounds=2)
    priv.unlink()
    with pytest.raises(PolicyError, match="signing key is missing"):
        budget_status(trained.cfg)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_cap_must_be_a_positive_finite_epsilon(trained: Site, value: str) -> None:
    with pytest.raises(PolicyError, match="positive, finite"):
        change_caps(trained.cfg, cap_total=float(value), cap_run=None, note="x")
    with pytest.raises(PolicyError, match="positive, finite"):
        change_caps(trained.cfg, cap_total=None, cap_run=float(value), note="x")
    assert len(ledger.read_entries(trained.ledger_path)) == 2  # nothing was written


@pytest.mark.parametrize("tamper", ["edit", "delete-first", "reorder", "insert", "forge"])
def test_every_kind_of_tampering_is_detected_by_audit_verify(trained: Site, tamper: str, tmp_path: Path) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    if tamper == "edit":  # lower σ's record to hide spending; hash left as it was
        body = json.loads(lines[0])
        body["epsilon_total"] = 0.1
        lines[0] = json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"
    elif tamper == "delete-first":
        lines = lines[1:]
    elif tamper == "reorder":
        lines = lines[::-1]
    elif tamper == "insert":
        lines = [lines[0], lines[0], *lines[1:]]
    else:  # an attacker without the site key rewrites an entry and re-hashes it with their own key
        mallory = signing.generate(tmp_path / "m.pem", tmp_path / "m.pub")
        entry = ledger.LedgerEntry(**{k: v for k, v in json.loads(lines[1]).items() if k not in ("hash", "signature")} | {"noise_multiplier": 99.0})
        lines[1] = entry.to_line(mallory)
    trained.ledger_path.write_text("".join(lines))
    pub = site_key_paths(trained.cfg.state_dir)[1]
    result = runner.invoke(app, ["audit", "verify", str(trained.ledger_path), "--public-key", str(pub)])
    assert result.exit_code == 1, result.output
    assert "PROBLEMS FOUND" in result.output


def test_audit_verify_exits_zero_on_a_clean_ledger(trained: Site) -> None:
    pub = site_key_paths(trained.cfg.state_dir)[1]
    result = runner.invoke(app, ["audit", "verify", str(trained.ledger_path), "--public-key", str(pub), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out[0]["ok"] and out[0]["entries"] == 2


def test_append_after_a_crashed_partial_write_keeps_the_ledger_readable(trained: Site) -> None:
    with trained.ledger_path.open("a") as fh:
        fh.write('{"kind": "round", "run_id": "run-a", "rou')  # crash mid-write: no newline
    assert isinstance(trained.train(arrays(), run_id="run-z", server_round=1, total_rounds=2), TrainResult)
    entries = ledger.read_entries(trained.ledger_path)
    assert [(e.run_id, e.round) for e in entries] == [("run-a", 1), ("run-a", 2), ("run-z", 1)]


def test_a_broken_ledger_stops_training_until_checked(trained: Site) -> None:
    lines = trained.ledger_path.read_text().splitlines(keepends=True)
    trained.ledger_path.write_text("".join(lines[1:]))
    with pytest.raises(Exception, match="hash chain is broken"):
        trained.train(arrays(), run_id="run-b", server_round=1, total_rounds=2)


def test_independent_accountants_agree_with_opacus_on_a_grid() -> None:
    for sigma in (0.8, 1.2, 2.0):
        for q in (0.05, 0.2):
            for steps in (10, 100):
                ours = epsilon([SubsampledGaussian(sigma, q, steps)], delta=1e-5)
                rdp, pld = independent_epsilon([(sigma, q, steps)], 1e-5)
                assert rdp == pytest.approx(ours, rel=0.02), (sigma, q, steps)
                assert pld <= ours * 1.001


@pytest.mark.usefixtures("alpha_state")
def test_a_plan_without_dp_is_refused_unless_the_policy_allows_it(tiny_cohort: Path, tmp_path: Path) -> None:
    site = make_site(tiny_cohort, tmp_path)
    site.exp = tiny_experiment().with_privacy(enabled=False)
    result = site.train(arrays(), run_id="r", server_round=1, total_rounds=2)
    assert isinstance(result, Refusal) and result.code == "no-dp"
    assert site.plan(run_id="r", total_rounds=2)["code"] == "no-dp"


def test_lowering_the_run_cap_in_the_ledger_raises_the_noise(trained: Site) -> None:
    before = cast(float, trained.plan(run_id="next", total_rounds=2)["noise_multiplier"])
    change_caps(trained.cfg, cap_total=None, cap_run=2.0, note="DPO: tighter per-run cap")
    after = trained.plan(run_id="next", total_rounds=2)
    assert cast(float, after["noise_multiplier"]) > before and after["code"] == "ok"
    assert after["epsilon_run"] == pytest.approx(2.0, rel=0.02)


def test_audit_rdp_curves_equal_dp_accountings_own_composition() -> None:
    """verify_ledger adds one memoised curve per (q, σ) times its steps instead of composing
    every entry twice through RdpAccountant (26.5 s for 200 entries): the figures must not change."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    from shared.privacy.accounting import RDP_ALPHAS
    from shared.privacy.audit import _rdp_epsilon, _rdp_per_step

    history = [(0.3, 1.1, 40), (0.05, 0.8, 500), (0.3, 1.1, 40), (1.0, 4.0, 7)]
    acc = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ALPHAS))
    curve = np.zeros(len(RDP_ALPHAS))
    for q, sigma, steps in history:
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
        curve = curve + steps * _rdp_per_step(q, sigma)
        for delta in (1e-5, 1e-7):
            assert _rdp_epsilon(curve, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)


def test_a_ledger_of_under_counted_entries_is_flagged_throughout_with_a_few_pld_evaluations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry recording ε = 0 (forged, or `bench ledger`'s) made one PLD evaluation per entry
    and level (seconds each, growing with the rounds): hours for 10⁴ entries. An earlier entry's
    PLD ε is a floor for every later one, so each is flagged without a new evaluation."""
    from server.bench import ledger_throughput
    from shared import signing
    from shared.privacy import audit

    ledger_throughput(tmp_path, 120)  # 120 signed rounds in 3 runs of 50, 50 and 20, every ε recorded as 0
    calls: list[int] = []
    pld = audit._pld

    def counted(mechanisms: dict, delta: float) -> float:
        calls.append(sum(mechanisms.values()))
        return pld(mechanisms, delta)

    monkeypatch.setattr(audit, "_pld", counted)
    report = verify_ledger(tmp_path / "ledger.jsonl", signing.load_public(tmp_path / "k.pub.pem"))

    flagged = {i.line for i in report.issues if "an under-count" in i.message}
    assert flagged == set(range(1, 121))
    assert len(calls) <= 3 + 2  # the first entry (all rounds, its run), each later run's first entry, the newest entry


# A prv site's ledger over three runs: run-c repeats run-a's (σ, q), so its per-run PLD figures
# are ones verification has already computed, and the all-rounds figures mix two (σ, q).
PRV_RUNS = (("run-a", 1.1, 0.2, 8), ("run-b", 2.0, 0.1, 8), ("run-c", 1.1, 0.2, 4))


def _prv_ledger_lines(key: Ed25519PrivateKey, runs: tuple[tuple[str, float, float, int], ...], *, steps: int = 5, delta: float = 1e-5) -> list[str]:
    """Signed lines as a prv site writes them (client/site.py): each entry's ε from Opacus' PRV
    accountant over every round so far and over its run's rounds so far."""
    import datetime as dt

    lines, prev, history, start = [], ledger.GENESIS, [], dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for run_id, sigma, q, rounds in runs:
        mine = []
        for r in range(1, rounds + 1):
            step = SubsampledGaussian(sigma, q, steps)
            mine.append(step)
            history.append(step)
            entry = ledger.LedgerEntry(site="oslo", dataset="d", run_id=run_id, round=r, accountant="prv", delta=delta, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                       max_grad_norm=1.0, epsilon_run=epsilon(mine, delta=delta, accountant="prv"), epsilon_total=epsilon(history, delta=delta, accountant="prv"),
                                       time=(start + dt.timedelta(minutes=len(history))).isoformat(), prev_hash=prev)
            lines.append(entry.to_line(key))
            prev = entry.hash
    return lines


@pytest.fixture(scope="module")
def prv_ledger() -> tuple[Ed25519PrivateKey, list[str]]:
    key = Ed25519PrivateKey.generate()
    return key, _prv_ledger_lines(key, PRV_RUNS)


def _pld_of_entries(entries: list[ledger.LedgerEntry]) -> float:
    """A fresh PLDAccountant's ε (independent_epsilon) of these entries' mechanisms, merged per (σ, q) in order of appearance."""
    steps: dict[tuple[float, float], int] = {}
    for e in entries:
        steps[(e.noise_multiplier, e.sample_rate)] = steps.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    return independent_epsilon([(s, q, n) for (s, q), n in steps.items()], entries[-1].delta)[1]


def test_audit_pld_figures_equal_a_fresh_pld_accountants() -> None:
    """verify_ledger builds each (σ, q) step's PLD once and memoises each figure instead of a new
    PLDAccountant per query (~1 s each): the figures must be that accountant's, for one (σ, q)
    and for two composed in either order, at several step counts and δ."""
    from shared.privacy.audit import _pld

    for mechanisms in ({(1.1, 0.2): 5}, {(2.0, 0.1): 400}, {(1.1, 0.2): 60, (2.0, 0.1): 30}, {(2.0, 0.1): 30, (1.1, 0.2): 60}):
        for delta in (1e-5, 1e-7):
            fresh = independent_epsilon([(s, q, n) for (s, q), n in mechanisms.items()], delta)[1]
            assert _pld(mechanisms, delta) == pytest.approx(fresh, rel=1e-12), (mechanisms, delta)
            assert _pld(dict(mechanisms), delta) == pytest.approx(fresh, rel=1e-12)  # the memoised figure


def test_memoised_rdp_and_pld_figures_equal_fresh_accountants_including_no_noise_and_no_sampling() -> None:
    """The report's run figures come from memoised_epsilon: both must be a fresh RdpAccountant's
    and PLDAccountant's, also where a step has no noise (ε = ∞) or samples no one (adds nothing)."""
    from shared.privacy.audit import memoised_epsilon

    for mechanisms in ({(1.1, 0.2): 5}, {(1.1, 0.2): 60, (2.0, 0.1): 30}, {(2.0, 0.1): 30, (1.1, 0.2): 0}, {(1.1, 0.0): 5, (2.0, 0.1): 30}, {(0.0, 0.2): 5, (2.0, 0.1): 30}, {}):
        fresh = independent_epsilon([(s, q, n) for (s, q), n in mechanisms.items()], 1e-5)
        assert memoised_epsilon(mechanisms, 1e-5) == pytest.approx(fresh, rel=1e-12), mechanisms


def test_an_honest_prv_ledger_of_several_runs_verifies_building_each_step_pld_once(prv_ledger: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Most entries of a prv ledger are below RDP, so each is checked against PLD; a fresh
    PLDAccountant per check built each step's PLD every time (most of its ~1 s). The PLD figures
    verification reports must still be a fresh accountant's."""
    from dp_accounting.pld import privacy_loss_distribution

    key, lines = prv_ledger
    path = tmp_path / "privacy-ledger.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    built: list[object] = []
    build = privacy_loss_distribution.from_gaussian_mechanism

    def counted(*args: object, **kwargs: object) -> object:
        built.append(args)
        return build(*args, **kwargs)

    monkeypatch.setattr(privacy_loss_distribution, "from_gaussian_mechanism", counted)
    report = verify_ledger(path, key.public_key())
    monkeypatch.undo()

    assert report.ok, report.issues
    assert len(built) <= 2  # one per (σ, q), at most (none where an earlier test built them)
    with_pld = [(i, c) for i, c in enumerate(report.checks) if not np.isnan(c.pld)]
    assert [c.round for _, c in with_pld] == [8, 8, 4]  # each run's last entry (prv), the newest among them
    for i, c in with_pld:
        assert c.pld == pytest.approx(_pld_of_entries(report.entries[: i + 1]), rel=1e-12)


def test_the_report_over_a_prv_ledger_adds_no_pld_evaluation_to_verification_and_keeps_fresh_figures(prv_ledger: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DPO report recomputed each run's ε with a fresh PLDAccountant (0.3–1 s a run) after
    verification had computed the same PLD figure at the run's last entry; it now reuses it. Its
    run figures must still be fresh accountants' (RDP and PLD)."""
    from dp_accounting.pld import privacy_loss_distribution

    from shared.privacy import audit
    from shared.privacy.report import build_report

    key, lines = prv_ledger
    path = tmp_path / "privacy-ledger.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    public_key = signing.write_public(key, tmp_path / "k.pub.pem")
    composed: list[int] = []
    self_compose = privacy_loss_distribution.PrivacyLossDistribution.self_compose

    def counted(pld: object, count: int, *args: object, **kwargs: object) -> object:
        composed.append(count)
        return self_compose(pld, count, *args, **kwargs)

    monkeypatch.setattr(privacy_loss_distribution.PrivacyLossDistribution, "self_compose", counted)
    audit._pld_of.cache_clear()
    verify_ledger(path, key.public_key())
    by_verification = len(composed)
    audit._pld_of.cache_clear()
    composed.clear()
    data = build_report([path], public_key=public_key, policy=None, title="t")
    monkeypatch.undo()

    (led,) = data.ledgers
    assert led.ok, led.issues
    assert len(composed) == by_verification
    entries = ledger.read_entries(path)
    for run in led.runs:
        mine = [e for e in entries if e.run_id == run.run_id]
        assert run.independent_pld == pytest.approx(_pld_of_entries(mine), rel=1e-12), run.run_id
        assert run.independent_rdp == pytest.approx(independent_epsilon([(mine[0].noise_multiplier, mine[0].sample_rate, sum(e.steps for e in mine))], 1e-5)[0], rel=1e-12)


@pytest.mark.parametrize("field", ["epsilon_total", "epsilon_run"])
def test_an_under_counted_prv_entry_in_the_middle_of_a_long_ledger_is_flagged(prv_ledger: tuple, tmp_path: Path, field: str) -> None:
    """An entry of run-b that records ε just under its PLD figure (by more than the 0.1 % allowed),
    yet above its own entry before (so neither order nor an earlier PLD floor gives it away), is
    flagged: the memoised figures must be exact where it matters."""
    key, lines = prv_ledger
    entries = [ledger.LedgerEntry(**{k: v for k, v in json.loads(line).items() if k not in ("hash", "signature")}) for line in lines]
    index = 10  # round 3 of run-b (0-based 10: run-a has 8 rounds)
    assert (entries[index].run_id, entries[index].round) == ("run-b", 3)
    counted = entries[: index + 1] if field == "epsilon_total" else [e for e in entries[: index + 1] if e.run_id == "run-b"]
    lowest_honest = _pld_of_entries(counted) * (1 - 1e-3)
    before = getattr(entries[index - 1], field)
    assert before < lowest_honest
    path = tmp_path / "privacy-ledger.jsonl"
    path.write_text("".join(_resigned_with(key, lines, index, **{field: (before + lowest_honest) / 2})), encoding="utf-8")

    report = verify_ledger(path, key.public_key())

    assert [(i.line, "an under-count" in i.message) for i in report.issues] == [(index + 1, True)], report.issues
