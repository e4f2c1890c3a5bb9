"""Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM during `fedrelapse simulate`.

The run stops within seconds, not after ``federation.round_timeout_s``: Ray is shut down, one
sentence says where the run stands, the exit code is 130, and the run folder is left as a
coordinator crash leaves it, so `fedrelapse run --resume` finishes it with no site charged
twice (a site that accounted the round that was cut off refuses it as a replay).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.site import ledger_path
from server.interrupt import EXIT_INTERRUPTED, StopRequested, interrupted, stop_on_signals
from server.reply_poll import PromptGrid
from shared.config import load_site
from shared.privacy import ledger
from tests.conftest import ROOT, tiny_experiment

SITES = ("alpha", "beta", "gamma")
EXIT_WITHIN_S = 60.0  # round_timeout_s is 1800 s: the old coordinator waited for it


class IdleGrid:
    """A Grid whose sites never answer."""

    def __init__(self) -> None:
        self.pushed = 0

    def push_messages(self, messages: object) -> list[str]:
        self.pushed += 1
        return ["m1"]

    def pull_messages(self, ids: object) -> list[object]:
        return []

    def get_node_ids(self) -> list[int]:
        return []


def test_a_stop_ends_the_wait_for_replies_at_once() -> None:
    stop = threading.Event()
    grid = PromptGrid(IdleGrid(), poll_s=0.05, stop=stop)  # type: ignore[arg-type]
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(StopRequested):
        grid.send_and_receive([], timeout=600)
    assert time.monotonic() - started < 5
    with pytest.raises(StopRequested):  # the wait for sites to connect asks get_node_ids
        grid.get_node_ids()


def test_a_signal_before_the_federation_raises_keyboard_interrupt_then_only_sets_the_stop() -> None:
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stopper:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stopper.stop.is_set()
        stopper.stop.clear()
        stopper.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert stopper.stop.is_set()
    assert signal.getsignal(signal.SIGINT) is before


def test_the_interrupt_message_names_the_last_round_and_the_resume_command(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps([{"round": 1}, {"round": 2}]))
    exc = interrupted(tmp_path, folder_written=True)
    assert exc.exit_code == EXIT_INTERRUPTED == 130
    assert str(exc) == f"Interrupted after round 2; continue with `fedrelapse run --resume {tmp_path}`."
    assert "before round 1" in str(interrupted(tmp_path / "none", folder_written=True))
    assert "nothing was written" in str(interrupted(tmp_path, folder_written=False))


@pytest.fixture
def cohort(tiny_cohort: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny cohort with empty ledgers."""
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("ledger", "approved-plans.json"))
    return dst


def _experiment_yaml(folder: Path) -> Path:
    exp = tiny_experiment()  # round_timeout_s stays 1800 s
    path = folder / "experiment.yaml"
    path.write_text(replace(exp, federation=replace(exp.federation, rounds=3)).to_yaml(), encoding="utf-8")
    return path


def _interrupt(cohort: Path, out: Path, sig: signal.Signals) -> tuple[int, str, float]:
    """Start `fedrelapse simulate` in its own process group (SIGINT at its default action, as
    in a terminal), send ``sig`` to the group once round 1's checkpoint exists; return
    (exit code, output, seconds from the signal to the exit)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--config", str(_experiment_yaml(cohort.parent)), "--data", str(cohort), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "round-001.safetensors").exists():
            assert proc.poll() is None, f"simulate ended before round 1's checkpoint:\n{proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "no round 1 checkpoint within 600 s"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=EXIT_WITHIN_S)
        return proc.returncode, output, time.monotonic() - sent
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        pytest.fail(f"still running {EXIT_WITHIN_S:.0f} s after {sig.name}:\n{output[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _ledger_rounds(cohort: Path, site: str, run_id: str) -> list[int]:
    entries = ledger.read_entries(ledger_path(load_site(cohort / site / "site.yaml").state_dir))
    return [e.round for e in entries if e.kind == "round" and e.run_id == run_id]


def _assert_interrupted(rc: int, output: str, seconds: float, out: Path) -> None:
    assert rc == 130, output[-3000:]
    flat = " ".join(output.split())
    assert f"Interrupted after round 1; continue with `fedrelapse run --resume {out}`." in flat, output[-3000:]
    assert "Traceback" not in output and "ActorDiedError" not in output and "Error" not in output, output[-3000:]
    assert seconds < EXIT_WITHIN_S
    assert not (out / "summary.json").exists()
    assert {"run.json", "config.yaml", "metrics.json", "simulation.json"} <= {p.name for p in out.iterdir()}


# Not marked slow: the one end-to-end proof that Ctrl-C ends a run (two runs of the tiny cohort in fresh processes, about 75 s on a loaded 2-core machine)
def test_ctrl_c_stops_the_run_promptly_and_run_resume_finishes_it_without_charging_twice(cohort: Path, tmp_path: Path) -> None:
    from server.cli import app, run_exit_code

    out = tmp_path / "run"
    rc, output, seconds = _interrupt(cohort, out, signal.SIGINT)
    _assert_interrupted(rc, output, seconds, out)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    charged_before = {s: _ledger_rounds(cohort, s, run_id) for s in SITES}
    assert all(rounds[:1] == [1] for rounds in charged_before.values()), charged_before

    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert result.exit_code == run_exit_code(summary), result.output
    assert summary["rounds_completed"] == 3 and summary["resumed_at_round"] == 2
    assert {s: _ledger_rounds(cohort, s, run_id) for s in SITES} == {s: [1, 2, 3] for s in SITES}  # once each, never twice
    rounds = json.loads((out / "metrics.json").read_text())
    replayed = {s for s, e in rounds[1]["sites"].items() if e.get("refused", {}).get("code") == "replay"}
    assert replayed == {s for s in SITES if 2 in charged_before[s]}  # the round cut off: those already charged refused it
    if replayed != set(SITES):  # some site trained round 2 on resume: the run completed
        assert summary["status"] == "completed" and result.exit_code == 0


@pytest.mark.slow  # one run of the tiny cohort in a fresh process: about 40 s on a loaded 2-core machine
def test_sigterm_to_the_process_group_stops_the_run_the_same_way(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, output, seconds = _interrupt(cohort, out, signal.SIGTERM)
    _assert_interrupted(rc, output, seconds, out)


def test_ctrl_c_during_a_bench_suite_part_stops_the_suite_not_just_the_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part's error is recorded and the next part runs; a stopped simulation is not such an
    error: one Ctrl-C used to leave `bench all` running its remaining simulations."""
    import server.bench
    from server.bench_suite import run_all
    from server.interrupt import RunInterrupted
    from shared.config import load_experiment

    ran: list[str] = []

    def stopped(*_: object, **__: object) -> dict:
        ran.append("dp_step")
        raise RunInterrupted("Interrupted after round 1; continue with `fedrelapse run --resume RUN`.")

    monkeypatch.setattr(server.bench, "dp_step_ratio", stopped)

    def profile(*_: object, **__: object) -> dict:
        ran.append("dp_step_profile")
        return {}

    monkeypatch.setattr(server.bench, "dp_step_profile", profile)

    with pytest.raises(RunInterrupted):
        run_all(load_experiment(Path("configs/experiment.yaml")), tmp_path / "out", data=tmp_path, quick=True, only=("dp_step", "dp_step_profile"), say=lambda _: None)
    assert ran == ["dp_step"]


@pytest.mark.parametrize("created", [True, False])
def test_an_interrupted_new_run_removes_its_folder_only_if_it_made_it(tmp_path: Path, created: bool) -> None:
    """A folder the researcher made beforehand (its ownership or ACLs on a shared disk chosen) stays."""
    from server.simulate import SIM_INFO, _keep_interrupted_folder

    out = tmp_path / "results"
    out.mkdir()
    (out / SIM_INFO).write_text("{}")

    assert _keep_interrupted_folder(out, new_run=True, created=created) is False
    assert not (out / SIM_INFO).exists()
    assert out.exists() is not created
