"""Faults in a real Simulation Engine run, then `fedrelapse run --resume` after a coordinator crash.

One 3-round run with injected faults: in round 1 site beta crashes before training; in round
2 site gamma crashes after writing its ledger entry (and restarts with empty memory) while
site alpha trains but holds its reply past `round_timeout_s`; the coordinator then dies after
round 2. The run is resumed and finishes round 3. Every site's ledger must hold exactly one
entry per round it trained, and the ε of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from client.site import ledger_path, site_key_paths
from server.simulate import resume_simulation, simulate
from shared import signing
from shared.config import ExperimentConfig, load_site
from shared.faults import FaultPlan, InjectedCrash, SiteFault
from shared.privacy import ledger
from shared.privacy.accounting import SubsampledGaussian, epsilon
from shared.privacy.audit import verify_ledger
from tests.conftest import tiny_experiment

ROUND_TIMEOUT_S = 45.0  # well above a tiny round on a loaded 2-core machine (about 10 s)
STALL_S = ROUND_TIMEOUT_S + 10  # alpha's reply comes 10 s after the round has closed
RUN_ID = "faults-run"


def experiment() -> ExperimentConfig:
    exp = tiny_experiment()
    # The pre-flight waits for the longer of the two timeouts: Ray actors start and load data then.
    return replace(exp, federation=replace(exp.federation, rounds=3, round_timeout_s=ROUND_TIMEOUT_S, node_wait_timeout_s=300))


FAULTS = FaultPlan(
    sites=(
        SiteFault(site="beta", round=1, kind="crash"),
        SiteFault(site="gamma", round=2, kind="crash-after-accounting"),
        SiteFault(site="alpha", round=2, kind="stall", stall_s=STALL_S),
    ),
    coordinator_crash_after_round=2,
)


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny cohort with empty ledgers: budgets are not shared with other tests."""
    dst = tmp_path_factory.mktemp("faults") / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("ledger", "approved-plans.json"))
    return dst


@pytest.fixture(scope="module")
def interrupted(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("run") / "faults-run"
    with pytest.raises(InjectedCrash, match="coordinator crashed after round 2"):
        simulate(experiment(), cohort, out, run_id=RUN_ID, console=Console(quiet=True), cpus=2, faults=FAULTS)
    return out, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def resumed(interrupted: tuple[Path, list[dict]]) -> tuple[Path, dict]:
    out, _ = interrupted
    return out, resume_simulation(out, console=Console(quiet=True), cpus=2)


def rounds_in_ledger(cohort: Path, site: str) -> list[int]:
    entries = ledger.read_entries(ledger_path(load_site(cohort / site / "site.yaml").state_dir))
    return [e.round for e in entries if e.kind == "round" and e.run_id == RUN_ID]


def test_the_interrupted_run_left_two_rounds_and_no_summary(interrupted: tuple[Path, list[dict]]) -> None:
    out, rounds = interrupted
    assert [r["round"] for r in rounds] == [1, 2]
    assert not (out / "summary.json").exists()
    assert (out / "checkpoints" / "round-002.safetensors").is_file()


def test_a_site_crash_mid_round_leaves_the_round_to_the_others_and_names_the_site(interrupted: tuple[Path, list[dict]]) -> None:
    _, rounds = interrupted
    r1 = rounds[0]
    assert r1["updated"] is True
    assert "crashed or lost" in r1["sites"]["beta"]["error"] and "site beta crashed in round 1" in r1["sites"]["beta"]["error"]
    assert "File " not in r1["sites"]["beta"]["error"]  # no traceback from the site in the run folder
    assert {s for s, e in r1["sites"].items() if "epsilon-run" in e} == {"alpha", "gamma"}
    assert r1["patients_trained"] == sum(r1["sites"][s]["num-patients"] for s in ("alpha", "gamma"))


def test_a_stalled_site_is_left_out_and_named_without_holding_up_the_round(interrupted: tuple[Path, list[dict]], cohort: Path) -> None:
    _, rounds = interrupted
    r2 = rounds[1]
    alpha = r2["sites"]["alpha"]
    assert "no reply within `federation.round_timeout_s`" in alpha["error"] and "epsilon-run" not in alpha
    assert r2["updated"] is True and "epsilon-run" in r2["sites"]["beta"]
    # alpha did train round 2 (its ledger says so) and would have replied STALL_S later: the
    # round was closed at the timeout instead of waiting for it.
    assert 2 in rounds_in_ledger(cohort, "alpha")


def test_a_site_that_crashed_after_accounting_restarts_and_rejoins_with_its_ledger_intact(resumed: tuple[Path, dict], cohort: Path) -> None:
    out, _ = resumed
    rounds = json.loads((out / "metrics.json").read_text())
    assert "crashed in round 2 after writing its ledger entry" in rounds[1]["sites"]["gamma"]["error"]
    assert "epsilon-run" in rounds[2]["sites"]["gamma"]  # rejoined in round 3
    assert rounds_in_ledger(cohort, "gamma") == [1, 2, 3]  # round 2 was accounted although its update never left
    cfg = load_site(cohort / "gamma" / "site.yaml")
    report = verify_ledger(ledger_path(cfg.state_dir), signing.load_public(site_key_paths(cfg.state_dir)[1]))
    assert report.ok, report.issues


ROUND_EVALUATION = {"auroc", "auprc", "eval_loss", "evaluation_pending"}  # a round record's fields that its evaluation sets
SITE_EVALUATION = {"eval", "eval_auroc", "eval_error", "eval_compute_s"}  # likewise in each site's entry


def _training_part(record: dict) -> dict:
    """A metrics.json round record without what its evaluation adds."""
    sites = {site: {k: v for k, v in entry.items() if k not in SITE_EVALUATION} for site, entry in record["sites"].items()}
    return {**{k: v for k, v in record.items() if k not in ROUND_EVALUATION}, "sites": sites}


def test_resume_after_a_coordinator_crash_spends_each_round_once_and_the_uninterrupted_epsilon(
    interrupted: tuple[Path, list[dict]], resumed: tuple[Path, dict], cohort: Path
) -> None:
    _, before = interrupted
    out, summary = resumed
    assert summary["run_id"] == RUN_ID and summary["status"] == "completed"
    assert summary["rounds_completed"] == 3 and summary["resumed_at_round"] == 3
    after = json.loads((out / "metrics.json").read_text())
    # Rounds 1 and 2 were not run again: round 1's record is as the crash left it, and round 2's
    # (with-next-round, the default) only gained its evaluation, from the resumed round 3's replies.
    assert after[0] == before[0] and after[2]["round"] == 3
    assert before[1]["evaluation_pending"] is True and after[1]["evaluation_pending"] is False
    assert _training_part(after[1]) == _training_part(before[1])
    assert {s for s, e in after[2]["sites"].items() if "epsilon-run" in e} == {"alpha", "beta", "gamma"}
    assert {s: rounds_in_ledger(cohort, s) for s in ("alpha", "beta", "gamma")} == {"alpha": [1, 2, 3], "beta": [2, 3], "gamma": [1, 2, 3]}
    for name in ("alpha", "beta", "gamma"):
        cfg = load_site(cohort / name / "site.yaml")
        entries = ledger.read_entries(ledger_path(cfg.state_dir), signing.load_public(site_key_paths(cfg.state_dir)[1]))
        # one uninterrupted 3-round run: the same σ and q (calibrated for the whole run), 3 rounds of steps
        whole = SubsampledGaussian(entries[0].noise_multiplier, entries[0].sample_rate, 3 * experiment().training.local_steps)
        uninterrupted = epsilon([whole], delta=entries[0].delta, accountant=entries[0].accountant)
        if name == "beta":  # missed round 1 (crashed before training): spent less, never more
            assert entries[-1].epsilon_run < uninterrupted
        else:
            assert entries[-1].epsilon_run == pytest.approx(uninterrupted, rel=1e-6)
            assert entries[-1].epsilon_total == pytest.approx(uninterrupted, rel=1e-6)  # nothing else was ever charged
        assert summary["sites"][name]["epsilon"] == pytest.approx(entries[-1].epsilon_run)


def test_resuming_a_finished_run_says_so_and_changes_nothing(resumed: tuple[Path, dict], cohort: Path) -> None:
    from server.cli import app

    out, _ = resumed
    watched = [out / "summary.json", out / "metrics.json", *(ledger_path(load_site(cohort / s / "site.yaml").state_dir) for s in ("alpha", "beta", "gamma"))]
    before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in watched}
    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "has already finished" in " ".join(result.output.split()) and "nothing to resume" in result.output
    assert {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in watched} == before
