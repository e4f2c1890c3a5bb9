"""A wrong `--data` folder and an unreachable `--ray-address`: one sentence that says what was
found and what to do, the exit code, and nothing written (no run folder, no empty `--out`)."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.simulate import check_ray_address
from shared.errors import FederationError
from tests.conftest import ROOT

runner = CliRunner()
EXPERIMENT = ROOT / "configs" / "experiment.yaml"


def _run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    return result.exit_code, " ".join(result.output.split())


def _commands(data: Path, tmp_path: Path) -> dict[str, list[object]]:
    return {
        "simulate": ["simulate", "--config", EXPERIMENT, "--data", data, "--out", tmp_path / "sim-out"],
        "plan": ["plan", "--config", EXPERIMENT, "--data", data],
        "evaluate": ["evaluate", "--config", EXPERIMENT, "--data", data, "--out", tmp_path / "ev-out", "--quick"],
    }


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "sim-out").exists() and not (tmp_path / "ev-out").exists()


@pytest.mark.parametrize("command", ["simulate", "plan", "evaluate"])
def test_a_folder_that_does_not_exist_is_named_as_such(tmp_path: Path, command: str) -> None:
    data = tmp_path / "cohrot"
    code, out = _run(*_commands(data, tmp_path)[command])
    assert code == 2, out
    assert f"The cohort folder {data} does not exist; check the path" in out
    assert f"fedrelapse synth --config configs/cohort.yaml --out {data}" in out
    _assert_nothing_written(tmp_path)
    assert not data.exists()


@pytest.mark.parametrize("command", ["simulate", "plan", "evaluate"])
def test_a_run_folder_is_named_as_one_with_its_cohort(tmp_path: Path, command: str) -> None:
    data = tmp_path / "runs" / "exp1"
    data.mkdir(parents=True)
    (data / "run.json").write_text("{}")
    (data / "simulation.json").write_text(json.dumps({"engine": "simulation", "data": "/srv/cohort"}))
    code, out = _run(*_commands(data, tmp_path)[command])
    assert code == 2, out
    assert f"{data} is a run folder (it has run.json), not a cohort; --data wants the cohort folder" in out
    assert "this run's cohort is /srv/cohort." in out
    assert "synth" not in out  # never advise writing a synthetic cohort into a run folder
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["simulate", "plan", "evaluate"])
def test_a_folder_with_other_content_lists_it_and_the_expected_layout(tmp_path: Path, command: str) -> None:
    data = tmp_path / "hospitals"
    (data / "bergen").mkdir(parents=True)
    (data / "bergen" / "manifest.csv").write_text("patient_id\n")
    (data / "notes.txt").write_text("x")
    code, out = _run(*_commands(data, tmp_path)[command])
    assert code == 2, out
    assert f"No <hospital>/site.yaml under {data} (it holds bergen/, notes.txt)" in out
    assert f"one <hospital>/site.yaml per hospital (e.g. {data / 'bergen' / 'site.yaml'})" in out
    assert "synth" not in out
    _assert_nothing_written(tmp_path)


def test_an_empty_folder_suggests_synth(tmp_path: Path) -> None:
    data = tmp_path / "empty"
    data.mkdir()
    code, out = _run(*_commands(data, tmp_path)["evaluate"])
    assert code == 2, out
    assert f"The cohort folder {data} is empty; make a synthetic cohort there with `fedrelapse synth --config configs/cohort.yaml --out {data}`" in out
    _assert_nothing_written(tmp_path)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_cohort(tmp_path: Path) -> Path:
    """Three site.yaml files (their data is never read: the address is checked first)."""
    data = tmp_path / "cohort"
    for name in ("alpha", "beta", "gamma"):
        (data / name).mkdir(parents=True)
        (data / name / "site.yaml").write_text(f"name: {name}\nmanifest: manifest.csv\nstate_dir: state\n")
    return data


@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_an_unreachable_ray_address_is_one_sentence_exit_6_and_writes_no_run_folder(tmp_path: Path, scheme: str) -> None:
    address = f"{scheme}127.0.0.1:{_unused_port()}"
    out_dir = tmp_path / "runs" / "rayaddr"
    code, out = _run("simulate", "--config", EXPERIMENT, "--data", _fake_cohort(tmp_path), "--out", out_dir, "--ray-address", address)
    assert code == 6, out
    assert out.startswith(f"error: Cannot reach the Ray cluster at {address} (")
    assert "ray start --head" in out and "leave out --ray-address" in out and "Traceback" not in out
    assert not out_dir.exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "cohort" / "alpha" / "state").exists()  # the sites' data was not touched either


def test_an_address_that_is_not_one_is_a_usage_error() -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="is not an address"):
        check_ray_address("ray://head:port")


def test_a_host_that_does_not_answer_is_named_with_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    def silent(address: tuple[str, int], timeout: float) -> socket.socket:
        assert address == ("head.example", 10001) and timeout == 0.5
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(FederationError, match=r"Cannot reach the Ray cluster at ray://head\.example \(no answer within 0\.5 s\)"):
        check_ray_address("ray://head.example", timeout_s=0.5)  # Ray Client's default port


@pytest.mark.parametrize(("address", "expected"), [("ray://[::1]", ("::1", 10001)), ("[::1]:6380", ("::1", 6380)), ("ray://head:10002", ("head", 10002)), ("head", ("head", 6379))])
def test_ipv6_and_default_ports_are_parsed(monkeypatch: pytest.MonkeyPatch, address: str, expected: tuple[str, int]) -> None:
    """`ray://[::1]` was refused as "not an address" (the port split inside the brackets)."""
    tried: list[tuple[str, int]] = []

    def answering(target: tuple[str, int], timeout: float) -> contextlib.nullcontext[None]:
        tried.append(target)
        return contextlib.nullcontext()

    monkeypatch.setattr(socket, "create_connection", answering)
    check_ray_address(address)
    assert tried == [expected]
