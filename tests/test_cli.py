"""The `fedrelapse` CLI: user mistakes end in a clear message and an exit code, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from server.cli import app
from shared.config import ExperimentConfig, load_experiment
from tests.conftest import ROOT, write_tone

runner = CliRunner()


def test_site_check_prints_the_report_as_json(tiny_cohort: Path) -> None:
    result = runner.invoke(app, ["site", "check", "--manifest", str(tiny_cohort / "beta" / "manifest.csv"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["patients"] == 8 and report["usable_sessions"] == report["rows"] == 56
    assert report["sample_rates"] == {"8000": 56}
    assert set(report["labels"]) == {"0", "1"}


def test_missing_manifest_is_a_data_error_with_exit_code_3(tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "check", "--manifest", str(tmp_path / "none.csv")])
    assert result.exit_code == 3
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_bad_experiment_is_a_config_error_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "exp.yaml"
    bad.write_text("name: x\nprivacy: {accountant: gdp}\n")
    result = runner.invoke(app, ["simulate", "--config", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "allowed values are 'rdp', 'prv'" in result.output


def test_simulate_without_sites_says_how_to_make_them(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--config", "configs/experiment.yaml", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "fedrelapse synth" in result.output


@pytest.mark.parametrize("command", [["bench", "scale", "--data", "{d}", "--out", "{d}/o"], ["bench", "secagg"], ["bench", "deployment", "--data", "{d}", "--out", "{d}/o"]])
@pytest.mark.parametrize("bad", ["3,x", "3,0"])
def test_bench_sizes_that_are_not_positive_whole_numbers_are_a_config_error(command: list[str], bad: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [a.format(d=tmp_path) for a in command] + ["--sites", bad])
    assert result.exit_code == 2 and f"--sites must be comma-separated positive whole numbers such as 3,10,30; got '{bad}'" in result.output


def test_bench_gpu_batches_are_checked_before_anything_runs(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "gpu", "--out", str(tmp_path), "--batches", "8,-1"])
    assert result.exit_code == 2 and "--batches must be comma-separated positive whole numbers" in result.output
    assert not (tmp_path / "gpu.json").exists()


def test_bench_deployment_refuses_an_unknown_clientapp_mode_before_starting_anything(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "deployment", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--clientapp", "threads"])
    assert result.exit_code == 2 and "--clientapp is 'threads'; choose one of both" in result.output
    assert not (tmp_path / "o").exists()


def test_bench_idle_poll_refuses_a_wait_that_is_not_a_number_before_starting_anything(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "idle-poll", "--out", str(tmp_path / "o"), "--polls", "flower,fast"])
    assert result.exit_code == 2 and "--polls must be comma-separated seconds or 'flower'" in result.output
    assert not (tmp_path / "o").exists()


def test_site_check_of_a_header_only_manifest_says_it_has_no_rows(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,session_id,recorded_at,audio_path,transcript_path,language,label\n", encoding="utf-8")
    result = runner.invoke(app, ["site", "check", "--manifest", str(manifest)])
    assert result.exit_code == 3
    assert "no session rows" in result.output and "Traceback" not in result.output


def test_site_check_with_a_state_dir_that_is_a_file_blames_the_state_folder_not_the_recordings(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    write_tone(tmp_path / "audio" / "a.wav")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,session_id,recorded_at,audio_path,language\np1,s1,2026-03-01,audio/a.wav,nb\np1,s2,2026-03-02,audio/a.wav,nb\n", encoding="utf-8")
    (tmp_path / "afile").write_text("", encoding="utf-8")
    result = runner.invoke(app, ["site", "check", "--manifest", str(manifest), "--state-dir", str(tmp_path / "afile")])
    assert result.exit_code == 3
    assert "state folder" in result.output and "afile is a file, not a folder" in result.output
    assert "cannot be read" not in result.output and "Traceback" not in result.output


def _groups(group: typer.Typer) -> list[typer.Typer]:
    return [group, *(g for info in group.registered_groups if info.typer_instance for g in _groups(info.typer_instance))]


def test_no_command_group_prints_local_variables_in_a_crash_report() -> None:
    assert all(g.pretty_exceptions_show_locals is False for g in _groups(app))


def test_an_unexpected_crash_does_not_print_the_rows_it_held(tmp_path: Path) -> None:
    script = (
        "import server.cli as cli\n"
        "@cli.site_app.command('boom')\n"
        "def boom() -> None:\n"
        "    row = {'patient_id': 'PATX0005', 'transcript': 'I feel hopeless'}\n"
        "    raise RuntimeError('unexpected')\n"
        "cli.app(['site', 'boom'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "200"}
    env.pop("_TYPER_STANDARD_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "RuntimeError" in done.stderr + done.stdout
    assert "PATX0005" not in done.stderr + done.stdout and "hopeless" not in done.stderr + done.stdout


@pytest.mark.parametrize("case", ["missing-manifest", "bad-experiment", "audit-missing-key", "audit-missing-ledger"])
def test_with_json_an_error_goes_to_stderr_and_stdout_holds_no_text(tmp_path: Path, case: str) -> None:
    bad = tmp_path / "exp.yaml"
    bad.write_text("name: x\nprivacy: {accountant: gdp}\n")
    ledger = tmp_path / "privacy-ledger.jsonl"
    ledger.write_text("")
    command = {
        "missing-manifest": ["site", "check", "--manifest", str(tmp_path / "none.csv"), "--json"],
        "bad-experiment": ["site", "check", "--manifest", str(tmp_path / "none.csv"), "--experiment", str(bad), "--json"],
        "audit-missing-key": ["audit", "verify", str(ledger), "--public-key", str(tmp_path / "none.pub.pem"), "--json"],
        "audit-missing-ledger": ["audit", "verify", str(tmp_path / "none.jsonl"), "--json"],
    }[case]
    result = runner.invoke(app, command)
    assert result.exit_code != 0
    assert result.stdout == ""  # `… --json > report.json` never fills the file with an error sentence
    assert result.stderr.strip()  # the error itself, for the person at the terminal


@pytest.mark.parametrize("who", ["", "   "])
def test_a_plan_approval_without_an_approver_is_refused_and_nothing_is_recorded(tmp_path: Path, who: str) -> None:
    from client.approval import approve
    from shared.config import load_experiment, load_site
    from shared.errors import ConfigError

    site = tmp_path / "site.yaml"
    site.write_text(f"name: oslo\nmanifest: m.csv\nstate_dir: {tmp_path / 'state'}\n")
    plan = Path(__file__).resolve().parents[1] / "configs" / "experiment.yaml"

    result = runner.invoke(app, ["site", "approve", "--site", str(site), "--plan", str(plan), "--approved-by", who, "--yes"])

    assert result.exit_code != 0 and "--approved-by" in result.output
    with pytest.raises(ConfigError, match="approved-by"):
        approve(load_site(site), load_experiment(plan), approved_by=who)
    assert not (tmp_path / "state" / "approved-plans.json").exists()


def test_plan_with_an_unreachable_epsilon_shows_each_sites_refusal_not_a_traceback(tiny_cohort: Path, tmp_path: Path) -> None:
    from tests.conftest import tiny_experiment

    exp = tmp_path / "exp.yaml"
    exp.write_text(one_site(tiny_experiment()).with_privacy(target_epsilon=0.001).to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(exp), "--data", str(tiny_cohort / "alpha")], env={"COLUMNS": "400"})  # one site: quicker
    assert result.exit_code == 4, result.output
    assert "refuse (budget): Site alpha: `privacy.target_epsilon` ε=0.001 cannot be met" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)


@pytest.mark.parametrize("marker", ["run.json", "summary.json", "checkpoints"])
def test_simulate_into_a_folder_that_holds_a_run_is_refused_before_anything_runs(tmp_path: Path, marker: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if marker == "checkpoints":
        (run / marker).mkdir()
    else:
        (run / marker).write_text("{}")
    result = runner.invoke(app, ["simulate", "--config", "configs/experiment.yaml", "--data", str(tmp_path / "no-cohort"), "--out", str(run)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert f"{run} already holds a run ({marker})" in result.output and f"fedrelapse run --resume {run}" in result.output
    assert sorted(p.name for p in run.iterdir()) == [marker]  # nothing written


def test_two_site_folders_with_the_same_site_name_are_refused_naming_both_files(tmp_path: Path) -> None:
    for folder in ("oslo", "oslo-copy", "bergen"):
        (tmp_path / folder).mkdir()
        name = "bergen" if folder == "bergen" else "oslo"
        (tmp_path / folder / "site.yaml").write_text(f"name: {name}\nmanifest: manifest.csv\n")
    result = runner.invoke(app, ["simulate", "--config", "configs/experiment.yaml", "--data", str(tmp_path), "--out", str(tmp_path / "run")], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'oslo' / 'site.yaml'} and {tmp_path / 'oslo-copy' / 'site.yaml'} both name their site 'oslo'" in result.output
    assert not (tmp_path / "run").exists()


def _ended(status: str) -> dict:
    return {"run_id": "r-1", "status": status, "rounds_completed": 0, "rounds_planned": 2, "final_federated_auroc": None, "wall_time_s": 1.0, "sites": {}}


@pytest.mark.parametrize(("status", "code"), [("completed", 0), ("refused before start", 4), ("incomplete: a round had no usable update", 6)])
def test_simulate_and_run_exit_codes_say_how_the_run_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: str, code: int) -> None:
    import server.resume
    import server.simulate

    monkeypatch.setattr(server.simulate, "simulate", lambda *a, **k: _ended(status))
    simulated = runner.invoke(app, ["simulate", "--config", "configs/experiment.yaml", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert simulated.exit_code == code, simulated.output
    assert f"status: {status}" in " ".join(simulated.output.split())
    monkeypatch.setattr(server.resume, "finished_summary", lambda run: _ended(status))
    monkeypatch.setattr(server.resume, "read_run", lambda run: ("r-1", None))
    reported = runner.invoke(app, ["run", "--resume", str(tmp_path / "run")])  # a finished run: reported with the same code
    assert reported.exit_code == code, reported.output


def test_plan_shows_the_all_time_epsilon_after_the_run_that_the_site_checks_its_cap_against(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import client.site

    class ComposingSite:  # spent 7.99 earlier; this run 7.99; composed under RDP: 11.25, under the cap of 12
        def __init__(self, cfg: object, exp: object) -> None:
            self.cfg, self.train_set, self.sample_rate = cfg, SimpleNamespace(n_patients=20), 0.4

        def plan(self, *, run_id: str, total_rounds: int) -> dict:
            return {"noise_multiplier": 0.8, "epsilon_run": 7.99, "epsilon_spent": 7.99, "epsilon_after": 11.25, "epsilon_remaining": 4.01, "delta": 1e-5, "code": "ok", "reason": ""}

        def data_refusal(self) -> None:
            return None

    monkeypatch.setattr(client.site, "Site", ComposingSite)
    monkeypatch.setattr(client.site, "load_site_data", lambda *a: SimpleNamespace(sessions=[object()]))
    (tmp_path / "site.yaml").write_text("name: bergen\nmanifest: manifest.csv\n")
    (tmp_path / "exp.yaml").write_text(one_site(load_experiment(ROOT / "configs" / "experiment.yaml")).to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "all-time ε after" in result.output
    row = next(line for line in result.output.splitlines() if "bergen" in line)
    assert [c.strip() for c in row.split("│")[1:-1]] == ["bergen", "20", "0.400", "0.800", "7.99", "7.99", "11.25", "4.01", "ok"]


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_a_site_whose_recordings_are_all_shorter_than_min_seconds_is_told_so(tiny_cohort: Path, tmp_path: Path, command: str) -> None:
    from dataclasses import replace

    from tests.conftest import small_site, tiny_experiment

    (tmp_path / "bergen").mkdir()
    small_site(tiny_cohort, tmp_path / "bergen", n_rows=4)
    (tmp_path / "bergen" / "site.yaml").write_text("name: bergen\nmanifest: manifest.csv\n")
    exp = tiny_experiment()
    exp = replace(exp, federation=replace(exp.federation, min_nodes=1), features=replace(exp.features, min_seconds=20.0, max_seconds=30.0))
    (tmp_path / "exp.yaml").write_text(exp.to_yaml())
    args = ["--config", str(tmp_path / "exp.yaml"), "--data", str(tmp_path)] + (["--out", str(tmp_path / "run")] if command == "simulate" else [])
    result = runner.invoke(app, [command, *args], env={"COLUMNS": "400"})
    assert result.exit_code == 3, result.output
    assert "Site bergen: no usable session" in result.output
    assert "4 of its 4 recordings are shorter than `features.min_seconds` (20 s)" in result.output
    assert not (tmp_path / "run").exists()


def test_an_evaluation_suppressed_at_every_site_is_named_in_the_round_row_and_the_status_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import server.cli
    from server.federation import round_table
    from server.run_folder import SUPPRESSED, RoundRecord

    sites = {"bergen": {"epsilon-run": 4.0, "eval": SUPPRESSED}, "oslo": {"epsilon-run": 4.0, "eval": SUPPRESSED}}
    (tmp_path / "metrics.json").write_text(json.dumps([{"round": 1, "auroc": None, "evaluation_pending": False, "sites": sites}]))
    shown = Console(record=True, width=300)
    monkeypatch.setattr(server.cli, "console", shown)
    shown.print(round_table(RoundRecord(round=1, train_loss=0.6, auroc=None, auprc=None, eval_loss=None, patients_trained=10.0, sites=sites), header=True))
    server.cli.print_summary({"run_id": "r-1", "status": "completed", "rounds_completed": 1, "rounds_planned": 1, "final_federated_auroc": None, "wall_time_s": 1.0, "sites": {}}, tmp_path)
    text = shown.export_text()
    assert "suppressed" in text.splitlines()[1] and " - " not in text.splitlines()[1]  # the round's row
    assert "final federated AUROC none: suppressed at every site (fewer than k evaluation patients, or only one class)" in text
    assert "AUROC None" not in text


def test_the_summary_prints_a_stored_refusal_and_site_name_with_markup_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import server.cli

    shown = Console(record=True, width=300)
    monkeypatch.setattr(server.cli, "console", shown)
    summary = {
        "run_id": "r-1", "status": "completed", "rounds_completed": 1, "rounds_planned": 1, "final_federated_auroc": 0.7, "wall_time_s": 1.0,
        "sites": {"[b]beta[/]": {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.1}},
        "refusals": [{"round": 1, "site": "gamma[/]", "code": "budget", "reason": "over budget [/] bye [link=https://evil.example]x[/link]"}],
    }

    server.cli.print_summary(summary, tmp_path)

    text = shown.export_text()
    assert "[b]beta[/]" in text and "refusal: round 1 site gamma[/]: over budget [/] bye [link=https://evil.example]x[/link]" in text


def test_plan_hash_only_prints_the_hash_that_run_json_and_ledgers_record_not_the_files_sha256(tmp_path: Path) -> None:
    import hashlib

    from shared.config import load_experiment

    config = tmp_path / "exp.yaml"
    config.write_text("name: x  # a comment\nfederation: {rounds: 3}\n")
    result = runner.invoke(app, ["plan", "--config", str(config), "--hash-only"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == load_experiment(config).plan_hash() != hashlib.sha256(config.read_bytes()).hexdigest()
    config.write_text("federation:\n  rounds: 3   # same plan, other bytes\nname: x\n")
    assert runner.invoke(app, ["plan", "--config", str(config), "--hash-only"]).output == result.output


def test_evaluate_quick_help_names_every_setting_of_the_quick_grid() -> None:
    from server.evaluate import grid

    names = {s.name for s in grid(quick=True)}
    assert names == {"local/eps=8", "local/eps=inf", "fedavg/eps=8", "fedavg/eps=inf", "centralised/eps=8", "centralised/eps=inf",
                     "fedavg/eps=8/acoustic", "fedavg/eps=8/language", "fedavg/eps=8/fused-nobaseline"}
    help_text = " ".join(runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "local, FedAvg and centralised at ε 8 and ∞, plus three FedAvg ε=8 ablations (acoustic only, language only, no personal baseline)" in help_text


def test_plan_names_a_site_whose_sampling_rate_is_1(tiny_cohort: Path, tmp_path: Path) -> None:
    from tests.conftest import small_site, tiny_experiment

    (tmp_path / "tromso").mkdir()
    small_site(tiny_cohort, tmp_path / "tromso")  # two patients: fewer than batch_patients, so q = 1
    (tmp_path / "tromso" / "site.yaml").write_text("name: tromso\nmanifest: manifest.csv\n")
    (tmp_path / "exp.yaml").write_text(tiny_experiment().to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(tmp_path / "tromso")], env={"COLUMNS": "400"})
    assert "warning: Site tromso: sampling rate q = 1" in " ".join(result.output.split()), result.output


def one_site(exp: ExperimentConfig) -> ExperimentConfig:
    """``exp`` for a consortium of one site (`plan` and `simulate` refuse fewer sites than min_nodes)."""
    from dataclasses import replace

    return replace(exp, federation=replace(exp.federation, min_nodes=1))


def test_plan_refuses_a_site_with_fewer_than_k_training_patients_as_its_rounds_would(tiny_cohort: Path, tmp_path: Path) -> None:
    """The reviewer's 6-patient hospitals: `plan` said ok (exit 0), then every round was refused (exit 6)."""
    from dataclasses import replace

    from tests.conftest import small_site, tiny_experiment

    (tmp_path / "tromso").mkdir()
    small_site(tiny_cohort, tmp_path / "tromso")  # two patients, k = 5 (the site's default policy)
    (tmp_path / "tromso" / "site.yaml").write_text("name: tromso\nmanifest: manifest.csv\n")
    exp = tiny_experiment()
    (tmp_path / "exp.yaml").write_text(one_site(replace(exp, federation=replace(exp.federation, min_patients_metric=5))).to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(tmp_path / "tromso")], env={"COLUMNS": "400"})
    assert result.exit_code == 4, result.output
    assert "refuse (no-data): Site tromso has fewer than k=5 training patients" in " ".join(result.output.split())
    (tmp_path / "exp3.yaml").write_text(replace(exp, federation=replace(exp.federation, min_nodes=3)).to_yaml())
    too_few = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp3.yaml"), "--data", str(tmp_path / "tromso")], env={"COLUMNS": "400"})
    assert too_few.exit_code == 2, too_few.output
    text = " ".join(too_few.output.split())
    assert "tromso" in text.split("plan_hash")[0]  # the site's row is still shown
    assert f"error: {tmp_path / 'tromso'} has 1 site(s) but `federation.min_nodes` is 3, so a run could not start; give --data a folder with at least 3 hospital folders, or lower `federation.min_nodes`" in text


def test_simulate_with_fewer_sites_than_min_nodes_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "oslo").mkdir()
    (tmp_path / "oslo" / "site.yaml").write_text("name: oslo\nmanifest: manifest.csv\n")
    result = runner.invoke(app, ["simulate", "--config", "configs/experiment.yaml", "--data", str(tmp_path / "oslo"), "--out", str(tmp_path / "run")], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "has 1 site(s) but `federation.min_nodes` is 3, so a run could not start; give --data a folder with at least 3 hospital folders, or lower `federation.min_nodes` in the experiment YAML." in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_plan_at_a_tiny_epsilon_prints_no_opacus_warning_and_says_the_model_will_learn_almost_nothing(tiny_cohort: Path, tmp_path: Path) -> None:
    import warnings

    from tests.conftest import tiny_experiment

    (tmp_path / "exp.yaml").write_text(one_site(tiny_experiment()).with_privacy(target_epsilon=0.02).to_yaml())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(tiny_cohort / "alpha")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "largest alpha" in str(w.message)], [str(w.message) for w in caught]
    assert "will learn almost nothing" in " ".join(result.output.split())


def test_site_check_json_gives_each_problem_with_its_severity(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    write_tone(tmp_path / "audio" / "a.wav")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,session_id,recorded_at,audio_path,language,ward\np1,s1,2026-03-01,audio/a.wav,nb,x\np1,s2,2026-03-02,audio/none.wav,nb,x\n", encoding="utf-8")
    result = runner.invoke(app, ["site", "check", "--manifest", str(manifest), "--state-dir", str(tmp_path / "state"), "--json"])
    issues = json.loads(result.stdout)["issues"]
    assert {(i["field"], i["severity"]) for i in issues} >= {("audio_path", "error"), ("header", "warning")}, issues
    assert all(set(i) == {"line", "field", "severity", "problem"} for i in issues)


def _withdrawal_site(tmp_path: Path) -> tuple[Path, Path]:
    """A site of three patients (one recording each) and an experiment without a sentence encoder."""
    (tmp_path / "audio").mkdir()
    rows = []
    for i, who in enumerate(("kari-0001", "ola-0002", "withdrawn-0003")):
        write_tone(tmp_path / "audio" / f"{who}.wav", amp=0.1 + 0.1 * i)
        rows.append(f"{who},{who}-s1,2026-03-01,audio/{who}.wav,nb")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,session_id,recorded_at,audio_path,language\n" + "\n".join(rows) + "\n", encoding="utf-8")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("name: t\nlanguage: {encoder: none}\n", encoding="utf-8")
    return manifest, experiment


def test_site_check_prune_removes_the_features_of_withdrawn_patients_and_prints_only_counts(tmp_path: Path) -> None:
    """Red team d16: no command removed the cached features of a patient whose rows left the manifest."""
    import re

    from client.features import FeatureCache

    manifest, experiment = _withdrawal_site(tmp_path)
    check = ["site", "check", "--manifest", str(manifest), "--experiment", str(experiment), "--state-dir", str(tmp_path / "state")]
    assert runner.invoke(app, check).exit_code == 0
    digest = {who: FeatureCache.audio_hash(tmp_path / "audio" / f"{who}.wav") for who in ("kari-0001", "ola-0002", "withdrawn-0003")}
    lines = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # consent withdrawn: the row is removed
    timelines = tmp_path / "state" / "timelines"
    timelines.mkdir()
    for who in ("kari-0001", "withdrawn-0003"):  # as `site timeline` names them
        (timelines / f"{who}.html").write_text("timeline")
        (timelines / f"{who}.png").write_text("timeline")

    result = runner.invoke(app, [*check, "--prune"])
    again = runner.invoke(app, [*check, "--prune", "--json"])

    assert result.exit_code == 0, result.output
    assert re.search(r"pruned_feature_entries\s*│\s*1\s*│", result.output), result.output
    assert re.search(r"pruned_timeline_files\s*│\s*2\s*│", result.output), result.output
    assert sorted(p.name for p in timelines.iterdir()) == ["kari-0001.html", "kari-0001.png"]
    assert "withdrawn" not in result.output and digest["withdrawn-0003"][:12] not in result.output
    assert sorted(p.stem for p in (tmp_path / "state" / "features").rglob("*.npz")) == sorted([digest["kari-0001"], digest["ola-0002"]])
    report = json.loads(again.output[again.output.index("{"):])
    assert {k: v for k, v in report.items() if k.startswith("pruned_")} == {
        "pruned_feature_entries": 0, "pruned_settings_folders": 0, "pruned_language_marker_entries": 0, "pruned_speech_embeddings": 0, "pruned_timeline_files": 0,
    }


def test_site_check_prune_without_an_experiment_is_refused_and_removes_nothing(tmp_path: Path) -> None:
    """Without the plan's feature settings the check would take the built-in ones for current and remove the plan's folder."""
    manifest, experiment = _withdrawal_site(tmp_path)
    state = tmp_path / "state"
    runner.invoke(app, ["site", "check", "--manifest", str(manifest), "--experiment", str(experiment), "--state-dir", str(state)])
    before = sorted(state.rglob("*"))

    result = runner.invoke(app, ["site", "check", "--manifest", str(manifest), "--state-dir", str(state), "--prune"])

    assert result.exit_code == 2 and "--experiment" in result.output and "Traceback" not in result.output
    assert sorted(state.rglob("*")) == before


def _commands(cmd: object, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    import click

    out: list[tuple[tuple[str, ...], object]] = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += _commands(sub, (*path, name))
    return out


def test_no_help_text_has_a_hard_line_break_inside_a_paragraph() -> None:
    """In rich markup mode typer joins the first paragraph's lines but keeps the others' line breaks,
    then wraps at the terminal width: a docstring wrapped by hand printed raggedly (`plan --help`)."""
    import inspect

    ragged = [" ".join(path) for path, cmd in _commands(typer.main.get_command(app))
              if any("\n" in para for para in inspect.cleandoc(cmd.help or "").split("\n\n"))]  # type: ignore[attr-defined]
    assert ragged == []


def _runbook_exit_codes() -> set[int]:
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "runbook-researcher.md").read_text(encoding="utf-8")
    table = text[text.index("## Exit codes"):].split("\n## ")[0]
    return {int(line.split("|")[1]) for line in table.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}


def _exit_code_paragraph(command: str) -> str:
    out = CliRunner().invoke(app, [command, "--help"], terminal_width=1000).output
    return " ".join(out[out.index("Exit code"):].split("╭")[0].split())


@pytest.mark.parametrize("command", ["simulate", "run"])
def test_simulate_and_run_help_list_every_exit_code_of_the_runbook_table(command: str) -> None:
    import re

    from server.interrupt import RunInterrupted
    from shared.errors import ConfigError, CryptoError, DataError, FederationError, PolicyError

    codes = _runbook_exit_codes()
    assert codes == {0} | {e.exit_code for e in (ConfigError, DataError, PolicyError, CryptoError, FederationError, RunInterrupted)}
    said = _exit_code_paragraph(command)
    assert {int(c) for c in re.findall(r"\b(\d+) (?:the|a|stopped)\b", said)} == codes, said  # was 0, 4 and 6 only
    assert said == _exit_code_paragraph("simulate")  # one text for both


def test_the_runbook_lists_every_bench_command_and_which_have_quick() -> None:
    import click

    from tests.conftest import ROOT

    bench = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    text = (ROOT / "docs" / "runbook-researcher.md").read_text(encoding="utf-8")
    block = text[text.index("## Benchmarks"):].split("```bash\n", 1)[1].split("```", 1)[0]
    listed = {line.split()[2]: "--quick" in line for line in block.splitlines() if line.startswith("fedrelapse bench ")}
    has_quick = {name: any(isinstance(p, click.Option) and "--quick" in p.opts for p in cmd.params) for name, cmd in bench.commands.items()}
    assert listed == has_quick  # was missing ledger and speech-encoder, and scale's --quick


def test_plan_with_noised_metrics_says_they_are_charged_and_refuses_a_noise_that_leaves_nothing_for_training(tiny_cohort: Path, tmp_path: Path) -> None:
    from tests.conftest import tiny_experiment

    (tmp_path / "exp.yaml").write_text(one_site(tiny_experiment()).with_privacy(metrics_noise_multiplier=4.0).to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(tiny_cohort / "alpha")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "metrics: noised (privacy.metrics_noise_multiplier 4)" in " ".join(result.output.split())
    (tmp_path / "exp.yaml").write_text(one_site(tiny_experiment()).with_privacy(metrics_noise_multiplier=0.2).to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(tiny_cohort / "alpha")], env={"COLUMNS": "400"})
    assert result.exit_code == 4, result.output
    assert "refuse (budget)" in result.output and "noised metric release(s)" in " ".join(result.output.split())


def test_plan_names_a_site_whose_policy_withholds_its_evaluation_from_this_plan(tiny_cohort: Path, tmp_path: Path) -> None:
    import shutil

    import yaml

    from tests.conftest import tiny_experiment

    site = tmp_path / "alpha"
    shutil.copytree(tiny_cohort / "alpha", site, ignore=shutil.ignore_patterns("state"))
    cfg = yaml.safe_load((site / "site.yaml").read_text())
    cfg["policy"] = {**cfg.get("policy", {}), "require_noised_metrics": True}
    cfg["state_dir"] = str(tmp_path / "state")
    for key in ("ca_cert", "model_public_key"):
        if isinstance(cfg.get(key), str) and not Path(cfg[key]).is_absolute():
            cfg[key] = str((tiny_cohort / "alpha" / cfg[key]).resolve())
    (site / "site.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "exp.yaml").write_text(one_site(tiny_experiment()).to_yaml())
    result = runner.invoke(app, ["plan", "--config", str(tmp_path / "exp.yaml"), "--data", str(site)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "Site alpha will train but send no evaluation and no train loss (its policy has require_noised_metrics: true" in " ".join(result.output.split())
