"""Hospital IT and DPO commands given a folder for a file, a file for a folder, a key with a
passphrase or a file this user may not read: a sentence naming the file and an exit code,
never a traceback; and paths are printed as they are (rich markup such as `[backup]` kept).

The machine that runs the suite may run as root, which reads every file, so permission
problems are raised where the file is opened (monkeypatch) instead of by chmod.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from typer.testing import CliRunner

from client.site import ledger_path, site_key_paths
from server.cli import app
from shared import signing
from shared.errors import CryptoError
from tests.conftest import ROOT, write_tone

runner = CliRunner()


def _site(tmp_path: Path, state: str = "state") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"name: oslo\nmanifest: manifest.csv\nstate_dir: {state}\n")
    return path


def _run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    return result.exit_code, " ".join(result.output.split())


def _encrypted_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def _denied(monkeypatch: pytest.MonkeyPatch, target: Path, method: str) -> None:
    """``Path.<method>`` on ``target`` raises PermissionError, as it does for a user who may not read it."""
    original = getattr(Path, method)

    def guarded(self: Path, *args: object, **kwargs: object) -> object:
        if self == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, guarded)


def test_site_init_with_a_state_dir_that_is_a_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    code, out = _run("site", "init", "--site", _site(tmp_path, state="afile"))
    assert code == 5 and f"{tmp_path / 'afile'} is a file, not a folder" in out, out


@pytest.mark.parametrize("command", ["init", "budget"])
def test_a_ledger_key_with_a_passphrase_is_a_crypto_error_that_says_how_to_remove_it(tmp_path: Path, command: str) -> None:
    site = _site(tmp_path)
    priv, _ = site_key_paths(tmp_path / "state")
    _encrypted_key(priv)
    args = ["site", "init", "--site", site] if command == "init" else ["site", "budget", "--site", site, "--set-total-cap", "5", "--reason", "DPO"]
    code, out = _run(*args)
    assert code == 5 and f"{priv} is protected by a passphrase" in out and "openssl pkey" in out, out


@pytest.mark.parametrize("command", ["site-init", "site-check-experiment", "site-approve-plan"])
def test_a_folder_given_for_a_yaml_file_is_a_config_error(tmp_path: Path, command: str) -> None:
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    args = {
        "site-init": ["site", "init", "--site", folder],
        "site-check-experiment": ["site", "check", "--manifest", tmp_path / "m.csv", "--experiment", folder],
        "site-approve-plan": ["site", "approve", "--site", _site(tmp_path), "--plan", folder, "--approved-by", "IT", "--yes"],
    }[command]
    code, out = _run(*args)
    assert code == 2 and f"Config file {folder} is a folder; give the YAML file itself" in out, out


def test_a_config_file_this_user_may_not_read_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path)
    _denied(monkeypatch, site, "read_text")
    code, out = _run("site", "init", "--site", site)
    assert code == 2 and f"Config file {site} cannot be read by this user (Permission denied)" in out, out


@pytest.mark.parametrize("command", ["verify", "report"])
def test_a_folder_given_as_the_public_key_is_a_crypto_error(tmp_path: Path, command: str) -> None:
    ledger = tmp_path / "privacy-ledger.jsonl"
    ledger.write_text("")
    extra = ["--out", tmp_path / "r.html"] if command == "report" else []
    code, out = _run("audit", command, ledger, *extra, "--public-key", tmp_path)
    assert code == 5 and f"{tmp_path} is a folder; give the key file itself" in out, out


def test_site_init_where_this_user_may_not_create_the_key_folder_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path)
    keys = tmp_path / "state" / "keys"
    _denied(monkeypatch, keys, "mkdir")
    code, out = _run("site", "init", "--site", site)
    assert code == 5 and f"{keys / 'ledger-ed25519.pem'} cannot be created (Permission denied)" in out, out
    assert "the user the site runs as" in out


def _site_with_ledger(tmp_path: Path) -> Path:
    site = _site(tmp_path)
    assert _run("site", "budget", "--site", site, "--set-total-cap", "5", "--reason", "DPO")[0] == 0
    return site


def test_site_budget_with_a_ledger_this_user_may_not_read_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site_with_ledger(tmp_path)
    led = ledger_path(tmp_path / "state")
    _denied(monkeypatch, led, "read_bytes")
    code, out = _run("site", "budget", "--site", site)
    assert code == 4 and f"The ledger {led} cannot be read (Permission denied)" in out and "the site's user" in out, out


def test_a_cap_change_with_a_ledger_key_this_user_may_not_read_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site_with_ledger(tmp_path)
    priv, _ = site_key_paths(tmp_path / "state")
    _denied(monkeypatch, priv, "read_bytes")
    code, out = _run("site", "budget", "--site", site, "--set-total-cap", "4", "--reason", "DPO")
    assert code == 5 and f"{priv} cannot be read by this user (Permission denied)" in out, out


def test_a_permission_problem_no_check_names_is_still_a_sentence_with_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path)
    lock = tmp_path / "state" / "approved-plans.json.lock"

    def denied(file: object, *args: object, **kwargs: object) -> object:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    monkeypatch.setattr("shared.privacy.ledger.open", denied, raising=False)  # the approvals lock, as another user's state folder denies it
    code, out = _run("site", "approve", "--site", site, "--plan", ROOT / "configs" / "experiment.yaml", "--approved-by", "IT", "--yes")
    assert code == 1 and f"{lock}: Permission denied. Run fedrelapse as the user that owns these files" in out, out


def test_a_key_path_that_runs_through_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(CryptoError, match=rf"{tmp_path / 'afile' / 'x.pem'} cannot be read: {tmp_path / 'afile'} is a file, not a folder"):
        signing.load_private(tmp_path / "afile" / "x.pem")


def test_audit_verify_prints_a_path_with_brackets_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "ledgers [backup]"
    folder.mkdir()
    (folder / "privacy-ledger.jsonl").write_text("")
    code, out = _run("audit", "verify", folder / "privacy-ledger.jsonl")
    assert f"{folder / 'privacy-ledger.jsonl'}: PROBLEMS FOUND" in out, out  # no public key given


def test_site_check_report_prints_a_manifest_path_with_brackets_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "site [old]"
    (folder / "audio").mkdir(parents=True)
    write_tone(folder / "audio" / "a.wav")
    manifest = folder / "manifest.csv"
    manifest.write_text("patient_id,session_id,recorded_at,audio_path,language\np1,s1,2026-03-01,audio/a.wav,nb\n", encoding="utf-8")
    code, out = _run("site", "check", "--manifest", manifest, "--state-dir", tmp_path / "state")
    assert str(manifest) in out, out
    assert json.loads(runner.invoke(app, ["site", "check", "--manifest", str(manifest), "--state-dir", str(tmp_path / "state"), "--json"]).stdout)["manifest"] == str(manifest)


@pytest.mark.parametrize("given", ["ledger-folder", "state-dir"])
def test_audit_verify_given_a_folder_suggests_the_privacy_ledger_not_the_release_log(tmp_path: Path, given: str) -> None:
    led = ledger_path(tmp_path / "state")
    led.parent.mkdir(parents=True)
    led.write_text("")
    (led.parent / "evaluation-releases.jsonl").write_text("")  # sorts first; another format: verifying it is a false tamper alarm
    folder = led.parent if given == "ledger-folder" else tmp_path / "state"
    code, out = _run("audit", "verify", folder)
    assert code == 2 and f"{folder} is a folder; give the ledger file itself, e.g. {led}." in out, out


@pytest.mark.parametrize("option", ["--set-run-cap", "--set-total-cap"])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_an_invalid_cap_is_a_usage_error_not_a_ledger_failure(tmp_path: Path, option: str, value: str) -> None:
    """It exited 4, which the DPO runbook documents as "the ledger fails its integrity check"."""
    site = _site(tmp_path)
    code, out = _run("site", "budget", "--site", site, option, value, "--reason", "x")
    assert code == 2 and f"{option} is {value}; give a positive, finite ε" in out, out
    assert not ledger_path(tmp_path / "state").exists()


def test_a_reason_without_a_cap_change_is_a_usage_error(tmp_path: Path) -> None:
    """It was silently ignored (exit 0): the DPO believed a change was recorded."""
    code, out = _run("site", "budget", "--site", _site(tmp_path), "--reason", "A. Berg (DPO): annual review")
    assert code == 2 and "--reason goes with --set-total-cap or --set-run-cap" in out, out
    assert not ledger_path(tmp_path / "state").exists()


@pytest.mark.parametrize("how", ["site-init", "cap-change", "first-round"])
def test_a_lost_ledger_key_is_never_replaced_while_the_ledger_holds_entries(tmp_path: Path, how: str) -> None:
    """`site init` made a new key silently, after which every old entry failed its signature check."""
    from types import SimpleNamespace

    from client.site import Site
    from shared.config import load_site
    from shared.errors import PolicyError

    site = _site_with_ledger(tmp_path)
    priv, pub = site_key_paths(tmp_path / "state")
    old_pub = pub.read_bytes()
    priv.unlink()
    if how != "first-round":  # the first round also checks the ledger with the public key, which it still has
        pub.unlink()
    if how == "first-round":  # the path a training round takes
        with pytest.raises(PolicyError, match="restore|Restore"):
            Site.signing_key(SimpleNamespace(cfg=load_site(site)))  # type: ignore[arg-type]
    else:
        args = ["site", "init", "--site", site] if how == "site-init" else ["site", "budget", "--site", site, "--set-run-cap", "4", "--reason", "DPO"]
        code, out = _run(*args)
        assert code == 4 and f"The site's ledger signing key {priv} is missing but the ledger" in out and "from the site's backup" in out, out
    assert not priv.exists() and (pub.read_bytes() == old_pub if how == "first-round" else not pub.exists())


def test_site_check_prints_each_problem_on_one_line_when_stdout_is_not_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`site check > r.txt` wrapped problems at 80 columns (41 problems became 106 lines), so a
    grep by manifest line found half a message."""
    from server import cli

    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False))  # as redirected to a file
    rows = "".join(f"p{i},s{i},2026-03-01,audio/a_recording_with_a_rather_long_name_number_{i}.wav,nb\n" for i in range(1, 4))
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,session_id,recorded_at,audio_path,language\n" + rows, encoding="utf-8")

    result = runner.invoke(app, ["site", "check", "--manifest", str(manifest), "--state-dir", str(tmp_path / "state")])

    lines = result.stdout.splitlines()
    for i in range(1, 4):
        assert f"error: m.csv:{i + 1} [audio_path] 'audio/a_recording_with_a_rather_long_name_number_{i}.wav' does not exist; row skipped" in lines, result.stdout
    assert max(len(line) for line in lines if "│" in line) <= 80  # the report table still fits the width
