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
from tests.conftest import write_tone

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
