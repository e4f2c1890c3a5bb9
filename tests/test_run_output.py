"""What a run shows a researcher: the console (wide and unwrapped when it is a file or a CI
log, whole site names in the round table, the round table's header on a resumed run) and the
run folder's plot and summary when no round completed or DP was off."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from server.cli import app
from server.run_folder import RoundRecord, RunFolder
from tests.conftest import tiny_experiment

runner = CliRunner()
SIX = ["alpha-000", "alpha-003", "beta-001", "beta-004", "gamma-002", "gamma-005"]  # `bench all --quick`'s sites: `alpha-0…` twice at 80 columns


def _record(rnd: int, auroc: float | None, sites: list[str], eps: float = 5.79) -> RoundRecord:
    return RoundRecord(round=rnd, train_loss=0.64, auroc=auroc, auprc=None, eval_loss=None, patients_trained=12.0, sites={s: {"epsilon-run": eps} for s in sites})


# metrics.png (finding 6 and 13)


def test_the_auroc_axis_reaches_an_auroc_below_0_4_and_marks_chance() -> None:
    from server.run_folder import metrics_figure

    fig = metrics_figure([_record(1, 0.35, ["bergen"]), _record(2, 0.392, ["bergen"]), _record(3, 0.61, ["bergen"])])
    auroc = fig.axes[1]
    low, high = auroc.get_ylim()
    assert low <= 0.35 - 0.01 and high == 1.0  # the ε = 1 run's round 1 is on the figure
    chance = [line for line in auroc.get_lines() if np.asarray(line.get_ydata()).tolist() == [0.5, 0.5]]
    assert len(chance) == 1 and chance[0].get_linestyle() == "--"
    legend = auroc.get_legend()
    assert legend is not None and "chance (0.5)" in [t.get_text() for t in legend.get_texts()]


def test_an_auroc_axis_of_good_rounds_keeps_its_usual_range() -> None:
    from server.run_folder import metrics_figure

    fig = metrics_figure([_record(1, 0.7, ["bergen"]), _record(2, None, ["bergen"])])
    assert fig.axes[1].get_ylim() == (0.4, 1.0)


def test_with_dp_off_the_epsilon_panel_says_so_instead_of_empty_axes() -> None:
    from server.run_folder import metrics_figure

    fig = metrics_figure([_record(1, 0.7, ["bergen"])], private=False)
    assert any("DP off" in t.get_text() for t in fig.axes[2].texts)
    assert not fig.axes[2].get_lines()


def test_a_run_refused_before_start_writes_no_plot_of_empty_panels(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run", tiny_experiment(), "r-1")
    summary = run.finish(status="refused before start")
    assert summary["status"] == "refused before start"
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_a_run_whose_every_round_was_refused_writes_no_plot(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run", tiny_experiment(), "r-1")
    run.rounds.append(replace(_record(1, None, []), sites={"bergen": {"refused": {"code": "no-data", "reason": "fewer than k"}}}, updated=False))
    run.finish(status="incomplete: a round had no usable update")
    assert not (tmp_path / "run" / "metrics.png").exists()
    run2 = RunFolder(tmp_path / "run2", tiny_experiment(), "r-2")
    run2.rounds.append(_record(1, 0.7, ["bergen"]))
    run2.finish(status="completed")
    assert (tmp_path / "run2" / "metrics.png").stat().st_size > 0


def test_the_summary_of_a_run_without_dp_reports_no_target_epsilon(tmp_path: Path) -> None:
    exp = tiny_experiment()
    off = RunFolder(tmp_path / "off", exp.with_privacy(enabled=False), "r-1").finish(status="completed")
    assert off["privacy"] == {"enabled": False, "target_epsilon": None, "target_delta": None}
    on = RunFolder(tmp_path / "on", exp, "r-2").finish(status="completed")
    assert on["privacy"] == {"enabled": True, "target_epsilon": exp.privacy.target_epsilon, "target_delta": exp.privacy.target_delta}


# the console (findings 7, 10 and 13)


def test_a_console_that_writes_to_a_file_is_wide_unless_columns_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.console import PIPED_WIDTH, output_console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert output_console(file=io.StringIO()).width == PIPED_WIDTH
    assert output_console(file=io.StringIO(), width=90).width == 90
    monkeypatch.setenv("COLUMNS", "120")
    assert output_console(file=io.StringIO()).width == 120


def _ended(sites: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"run_id": "fedrelapse-demo-20250101T000000Z", "status": status, "rounds_completed": 2, "rounds_planned": 2, "final_federated_auroc": 0.773,
            "wall_time_s": 37.3, "sites": sites, "refusals": []}


def test_simulate_printed_to_a_file_keeps_every_site_name_whole_and_the_status_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.simulate
    from server.federation import round_table

    def fake_simulate(exp: object, data: Path, out: Path, *, console: Console, **_: object) -> dict[str, Any]:
        for rnd in (1, 2):  # as the ServerApp prints the round table, on the command's console
            console.print(round_table(_record(rnd, 0.7, SIX), rnd == 1))
        console.print("Evaluation with the next round: each round's row prints when the next round's replies bring its AUROC; "
                      "the final model is evaluated by one last evaluate message.", soft_wrap=True)
        return _ended({s: {"epsilon": 5.79, "delta": 1e-5, "noise_multiplier": 1.2} for s in SIX})

    monkeypatch.setattr(server.simulate, "simulate", fake_simulate)
    result = runner.invoke(app, ["simulate", "--config", "configs/experiment.yaml", "--data", str(tmp_path), "--out", str(tmp_path / "run")], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "train loss" in line)
    assert all(f"ε {s}" in header for s in SIX)  # not `ε alpha-0…` twice
    assert "…" not in result.output
    status = [line for line in lines if line.startswith("status:")]
    assert status == ["status: completed · rounds 2/2 · final federated AUROC 0.773 · wall time 37.3 s"]
    assert any(line.startswith("Evaluation with the next round:") and line.endswith("one last evaluate message.") for line in lines)


def test_the_round_table_never_shortens_a_site_name_even_on_a_narrow_terminal() -> None:
    from server.federation import show_round

    shown = Console(file=io.StringIO(), width=80, record=True)
    show_round(shown, _record(1, None, SIX), header=True)
    text = shown.export_text()
    assert all(f"ε {s}" in text for s in SIX) and "…" not in text


def test_a_resumed_run_prints_the_round_tables_header_with_its_first_row() -> None:
    from server.federation import RoundPrinter

    shown = Console(file=io.StringIO(), width=200, record=True)
    rows = RoundPrinter(shown)
    for rnd in (4, 5):  # rounds 1-3 ran before the coordinator stopped
        rows.show(_record(rnd, 0.7, ["bergen", "oslo"]))
    lines = [line for line in shown.export_text().splitlines() if line.strip()]
    assert "round" in lines[0] and "ε bergen" in lines[0] and "ε oslo" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["4", "5"]


def test_the_preflight_line_of_a_resumed_run_says_the_earlier_rounds_are_already_charged() -> None:
    from server.federation import preflight_line

    metrics = {"epsilon-run": 8.0, "noise-multiplier": 1.96, "epsilon-remaining": 11.61}
    assert preflight_line("bergen", metrics).strip() == "plan: site bergen would spend ε=8.00 (σ=1.96), all-time budget left 11.61"
    resumed = preflight_line("bergen", metrics, resumed_at=5)
    assert "would spend" not in resumed and "this run's total ε=8.00" in resumed and "rounds 1–4 already charged" in resumed


def test_a_run_in_which_no_site_trained_prints_one_line_not_an_empty_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.cli

    shown = Console(file=io.StringIO(), width=200, record=True)
    monkeypatch.setattr(server.cli, "console", shown)
    server.cli.print_summary(_ended({}, status="refused before start"), tmp_path)
    text = shown.export_text()
    assert "no site trained in this run" in text
    assert "ε spent (this run)" not in text


class _RefusingSite:
    """A site of `plan` that refuses with a long reason (min-sigma), or accepts."""

    def __init__(self, cfg: Any, exp: object) -> None:
        self.cfg, self.train_set, self.sample_rate = cfg, SimpleNamespace(n_patients=20), 0.4

    def plan(self, *, run_id: str, total_rounds: int) -> dict[str, Any]:
        if self.cfg.name.startswith("alpha"):
            return {"code": "min-sigma", "reason": f"Site {self.cfg.name}: this run needs σ=0.417, below the site minimum 0.5; ask for a smaller ε."}
        return {"noise_multiplier": 1.2, "epsilon_run": 8.0, "epsilon_spent": 0.0, "epsilon_after": 8.0, "epsilon_remaining": 30.0, "delta": 1e-5, "code": "ok", "reason": ""}

    def data_refusal(self) -> None:  # enough training patients
        return None


def test_plan_printed_to_a_file_shows_whole_headers_and_each_refusal_on_one_line_under_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.site

    monkeypatch.setattr(client.site, "Site", _RefusingSite)
    monkeypatch.setattr(client.site, "load_site_data", lambda *a: SimpleNamespace(sessions=[object()]))
    for name in SIX:
        (tmp_path / name).mkdir()
        (tmp_path / name / "site.yaml").write_text(f"name: {name}\nmanifest: manifest.csv\n")
    result = runner.invoke(app, ["plan", "--config", "configs/experiment.yaml", "--data", str(tmp_path)], env={"COLUMNS": None})
    assert result.exit_code == 4, result.output
    assert "all-time ε after" in result.output and "all-time left now" in result.output and "training patients" in result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if line.count("│") > 2}
    assert rows["alpha-000"][-1] == "refuse (min-sigma)" and rows["beta-001"][-1] == "ok"
    assert set(SIX) <= set(rows)
    reasons = [line for line in result.output.splitlines() if line.startswith("refuse (min-sigma): Site alpha")]
    assert reasons == [f"refuse (min-sigma): Site {s}: this run needs σ=0.417, below the site minimum 0.5; ask for a smaller ε." for s in ("alpha-000", "alpha-003")]


# the deployed ServerApp (finding 11)


def _deployed_main_fails_early(tmp_path: Path) -> None:
    from server.app import build_server_app
    from shared.errors import FedrelapseError

    with pytest.raises((FedrelapseError, OSError)):  # the experiment file is missing: main stops, Flower's logger already set
        build_server_app()(None, SimpleNamespace(run_config={"experiment": str(tmp_path / "missing.yaml"), "out": str(tmp_path / "run")}))  # type: ignore[arg-type]


def test_the_deployed_serverapp_shows_only_flowers_warnings_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flwr = logging.getLogger("flwr")
    monkeypatch.setattr(flwr, "level", logging.INFO)
    monkeypatch.delenv("FEDRELAPSE_FLOWER_LOG", raising=False)
    _deployed_main_fails_early(tmp_path)
    assert flwr.level == logging.WARNING
    monkeypatch.setenv("FEDRELAPSE_FLOWER_LOG", "debug")
    _deployed_main_fails_early(tmp_path)
    assert flwr.level == logging.DEBUG


def test_an_unknown_flower_log_level_falls_back_to_warnings() -> None:
    from server.app import flower_log_level

    assert flower_log_level({"FEDRELAPSE_FLOWER_LOG": "chatty"}) == logging.WARNING
    assert flower_log_level({"FEDRELAPSE_FLOWER_LOG": "INFO"}) == logging.INFO
    assert flower_log_level({}) == logging.WARNING


def test_summary_json_of_a_refused_run_is_still_read_by_resume(tmp_path: Path) -> None:
    from server.resume import summary_problem

    RunFolder(tmp_path / "run", tiny_experiment().with_privacy(enabled=False), "r-1").finish(status="refused before start")
    assert summary_problem(json.loads((tmp_path / "run" / "summary.json").read_text())) is None


# a deployed `run --resume` (finding 8)

_FAKE_FLWR_RUN = """
import json, sys, time
from pathlib import Path
run = Path(sys.argv[1])
time.sleep(0.5)
rounds = json.loads((run / "metrics.json").read_text())
rounds.append(dict(rounds[-1], round=3))
(run / "metrics.json").write_text(json.dumps(rounds))
time.sleep(0.5)
(run / "summary.json").write_text(sys.argv[2])
"""


def test_a_deployed_resume_says_where_it_resumes_and_prints_each_round_as_it_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import server.cli
    import server.deployment
    from tests.test_resume_checks import crashed_run, deployed

    run, _ = crashed_run(tmp_path, with_site=True)  # rounds 1 and 2 of 3 recorded
    deployed(run, tmp_path / "data" / "consortium" / "model-signing.key")
    (tmp_path / "keys" / "ca").mkdir(parents=True)
    (tmp_path / "keys" / "ca" / "ca.pem").write_text("not read: flwr run is replaced")
    summary = {"run_id": "run-x", "experiment": "x", "status": "completed", "rounds_completed": 3, "rounds_planned": 3, "final_federated_auroc": None,
               "final_federated_auprc": None, "privacy": {"enabled": True, "target_epsilon": 8.0, "target_delta": 1e-5}, "sites": {}, "refusals": [],
               "rounds_not_updated": [], "wall_time_s": 1.0, "resumed_at_round": 3}
    monkeypatch.setattr(server.deployment, "flwr_run_argv", lambda *a: [sys.executable, "-c", _FAKE_FLWR_RUN, str(run), json.dumps(summary)])
    monkeypatch.setattr(server.cli, "FOLLOW_POLL_S", 0.1, raising=False)
    result = runner.invoke(app, ["run", "--resume", str(run), "--superlink", "127.0.0.1:9092", "--keys", str(tmp_path / "keys")], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("resuming run run-x at round 3 of 3 on SuperLink 127.0.0.1:9092 (flwr run)")
    header = next(i for i, line in enumerate(lines) if "train loss" in line)
    assert "ε alpha" in lines[header] and lines[header + 1].split()[0] == "3"  # round 3's row, under its header, before the summary
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in ("1", "2", "3")] == ["3"]  # rounds 1-2 are not repeated
    assert any(line.startswith("status: completed") for line in lines[header + 2:])


def test_sigterm_during_a_deployed_resume_stops_flwr_run_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM used to kill the command at once (exit 143), leaving `flwr run` running and its
    temporary FLWR_HOME behind; Ctrl-C left the child running too."""
    import os
    import signal
    import sys
    import threading

    import server.cli
    import server.deployment
    from tests.test_resume_checks import crashed_run, deployed

    run, _ = crashed_run(tmp_path, with_site=True)
    deployed(run, tmp_path / "data" / "consortium" / "model-signing.key")
    (tmp_path / "keys" / "ca").mkdir(parents=True)
    (tmp_path / "keys" / "ca" / "ca.pem").write_text("not read: flwr run is replaced")
    pid_file = tmp_path / "flwr-run.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    monkeypatch.setattr(server.deployment, "flwr_run_argv", lambda *a: [sys.executable, "-c", sleeper])
    monkeypatch.setattr(server.cli, "FOLLOW_POLL_S", 0.05, raising=False)

    def terminate_once_flwr_run_started() -> None:
        for _ in range(400):
            if pid_file.exists() and pid_file.read_text():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_flwr_run_started, daemon=True).start()
    result = runner.invoke(app, ["run", "--resume", str(run), "--superlink", "127.0.0.1:9092", "--keys", str(tmp_path / "keys")], env={"COLUMNS": None})

    assert result.exit_code == 130, result.output
    assert "Interrupted while following the resumed run" in " ".join(result.output.split())
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(child, 0)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was put back
