"""`fedrelapse site start` (and --dry-run) and `site init` check keys and certificates before
anything runs: a bad file ends with a sentence naming it and a non-zero exit, never a SuperNode
that looks healthy but cannot connect, or a key other users can read."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.keys import make_ca, make_server, make_site
from shared import signing
from shared.errors import CryptoError

runner = CliRunner()


@pytest.fixture
def consortium(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(keys folder, this site's node.key, its site.yaml pointing at the coordinator's key)."""
    make_ca(tmp_path)
    make_server(tmp_path)
    priv, _ = make_site(tmp_path, "oslo")
    site = tmp_path / "site.yaml"
    site.write_text(f"name: oslo\nmanifest: m.csv\nstate_dir: {tmp_path / 'state'}\ncoordinator_public_key: {tmp_path / 'server' / 'model-signing.pub.pem'}\n")
    return tmp_path, priv, site


def start(site: Path, *, ca: Path, node_key: Path, dry_run: bool = True) -> list[str]:
    return ["site", "start", "--site", str(site), "--superlink", "coord:9092", "--ca", str(ca), "--node-key", str(node_key), *(["--dry-run"] if dry_run else [])]


def test_a_good_site_starts_and_the_dry_run_line_is_one_shell_command(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    result = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=priv), terminal_width=300)
    assert result.exit_code == 0, result.output
    words = shlex.split(result.stdout.splitlines()[0])
    assert words[0] == "env" and words[1].startswith("PATH=" + str((keys / "state" / "bin").resolve()))
    assert f"site-config=\"{site.resolve()}\"" in words  # Flower's --node-config value, exactly as site start passes it
    assert "coordinator_public_key" not in result.output  # set: no warning


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_garbage_ca_is_refused_before_the_supernode_starts(consortium: tuple[Path, Path, Path], dry_run: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, priv, site = consortium
    bad = keys / "bad.pem"
    bad.write_text("not a certificate\n")
    started: list[list[str]] = []

    def execve(exe: str, argv: list[str], env: dict[str, str]) -> NoReturn:  # the SuperNode is never really started
        started.append(argv)
        sys.exit(0)

    monkeypatch.setattr(os, "execve", execve)
    result = runner.invoke(app, start(site, ca=bad, node_key=priv, dry_run=dry_run), terminal_width=300)
    assert started == [] and result.exit_code == CryptoError.exit_code
    assert "--ca" in result.output and str(bad) in result.output and "BEGIN CERTIFICATE" in result.output


def test_the_servers_certificate_given_as_the_ca_is_refused(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    result = runner.invoke(app, start(site, ca=keys / "server" / "server.pem", node_key=priv), terminal_width=300)
    assert result.exit_code == CryptoError.exit_code and "not a CA certificate" in result.output


def test_a_node_key_that_is_not_an_openssh_ec_key_is_refused(consortium: tuple[Path, Path, Path]) -> None:
    keys, _, site = consortium
    bad = keys / "node.key"
    bad.write_text("garbage\n")
    bad.chmod(0o600)
    result = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=bad), terminal_width=300)
    assert result.exit_code == CryptoError.exit_code and "--node-key" in result.output and "OPENSSH PRIVATE KEY" in result.output


def test_a_node_key_other_users_can_read_is_refused_with_the_chmod_to_run(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    priv.chmod(0o644)
    result = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=priv), terminal_width=300)
    assert result.exit_code == CryptoError.exit_code and f"chmod 600 {priv}" in result.output and "0644" in result.output


def test_a_ledger_key_other_users_can_read_is_refused_at_site_init_and_site_start(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    assert runner.invoke(app, ["site", "init", "--site", str(site)]).exit_code == 0
    ledger_key = keys / "state" / "keys" / "ledger-ed25519.pem"
    ledger_key.chmod(0o644)

    init = runner.invoke(app, ["site", "init", "--site", str(site)], terminal_width=300)
    started = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=priv), terminal_width=300)

    for result in (init, started):
        assert result.exit_code == CryptoError.exit_code and f"chmod 600 {ledger_key}" in result.output


def test_a_missing_coordinator_key_is_refused_at_start_naming_the_field_and_what_the_key_is(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    (keys / "server" / "model-signing.pub.pem").unlink()
    result = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=priv), terminal_width=300)
    text = " ".join(result.output.split())
    assert result.exit_code == CryptoError.exit_code
    assert "coordinator_public_key" in text and str(site) in text and "model-signing public key" in text
    assert "ledger public key" not in text


def test_a_coordinator_key_that_is_not_a_public_key_is_refused_at_start(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    site.write_text(site.read_text().replace("model-signing.pub.pem", "server.pem"))
    result = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=priv), terminal_width=300)
    assert result.exit_code == CryptoError.exit_code and "model-signing public key" in " ".join(result.output.split())


def test_a_site_without_a_coordinator_key_is_warned_that_models_are_not_verified(consortium: tuple[Path, Path, Path]) -> None:
    keys, priv, site = consortium
    site.write_text("\n".join(line for line in site.read_text().splitlines() if "coordinator_public_key" not in line) + "\n")
    result = runner.invoke(app, start(site, ca=keys / "ca" / "ca.pem", node_key=priv), terminal_width=300)
    assert result.exit_code == 0 and "coordinator_public_key" in result.stderr and "coordinator_public_key" not in result.stdout


def test_site_init_rebuilds_a_missing_ledger_public_key_from_the_private_key(consortium: tuple[Path, Path, Path]) -> None:
    keys, _, site = consortium
    assert runner.invoke(app, ["site", "init", "--site", str(site)]).exit_code == 0
    pub = keys / "state" / "keys" / "ledger-ed25519.pub.pem"
    before = pub.read_bytes()
    pub.unlink()

    result = runner.invoke(app, ["site", "init", "--site", str(site)], terminal_width=300)

    assert result.exit_code == 0, result.output
    assert pub.read_bytes() == before and "rebuilt" in result.output
    assert signing.fingerprint(signing.load_public(pub)) in result.output
