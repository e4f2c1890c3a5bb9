"""Consortium keys: CA-signed TLS certificate, private keys 0600 and never overwritten."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import NoReturn

import pytest
from cryptography import x509
from typer.testing import CliRunner

from server.cli import app
from server.keys import make_ca, make_server, make_site, verify_chain
from tests.conftest import dry_run_command

runner = CliRunner()


def test_server_certificate_chains_to_the_consortium_ca_and_names_its_hosts(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert = make_server(tmp_path, hosts=("coordinator.example.org", "127.0.0.1"))
    assert verify_chain(ca, cert)
    other = make_ca(tmp_path / "other")
    assert not verify_chain(other, cert)  # a different CA does not vouch for it
    sans = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_private_keys_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server(tmp_path)
    priv, pub = make_site(tmp_path, "oslo")
    for key in (tmp_path / "ca" / "ca.key", tmp_path / "server" / "server.key", tmp_path / "server" / "model-signing.key", priv):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert pub.read_text().startswith("ecdsa-sha2-nistp256 ")
    from shared.errors import CryptoError

    with pytest.raises(CryptoError, match="never overwritten.*keys site oslo --rotate"):
        make_site(tmp_path, "oslo")


def test_a_second_keys_ca_or_keys_server_says_what_to_do_instead_of_a_rotate_command_that_does_not_exist(tmp_path: Path) -> None:
    assert runner.invoke(app, ["keys", "ca", "--keys", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["keys", "server", "--keys", str(tmp_path)]).exit_code == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    ca = runner.invoke(app, ["keys", "ca", "--keys", str(tmp_path)], terminal_width=400)
    server = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path)], terminal_width=400)

    ca_text, server_text = " ".join(ca.output.split()), " ".join(server.output.split())
    assert ca.exit_code != 0 and server.exit_code != 0
    assert "rotate it explicitly" not in ca_text + server_text
    assert f"move the folder {tmp_path / 'ca'} away deliberately" in ca_text and "new consortium" in ca_text and "new ca.pem" in ca_text
    assert "away deliberately" in server_text and "sites need nothing new" in server_text
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing was changed


def test_keys_cli_creates_the_layout_and_explains_where_files_go(tmp_path: Path) -> None:
    for args in (["keys", "ca"], ["keys", "server"], ["keys", "site", "bergen"]):
        result = runner.invoke(app, [*args, "--keys", str(tmp_path)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "sites" / "bergen" / "node.key").exists()
    again = runner.invoke(app, ["keys", "ca", "--keys", str(tmp_path)])
    assert again.exit_code == 5 and "never overwritten" in again.output


def test_rotation_keeps_the_old_pair_aside_and_writes_a_new_one(tmp_path: Path) -> None:
    import datetime as dt

    from server.keys import rotate_site
    from shared.errors import CryptoError

    priv, pub = make_site(tmp_path, "oslo")
    old_priv_bytes, old_pub_bytes = priv.read_bytes(), pub.read_bytes()
    when = dt.datetime(2026, 11, 26, 1, 2, 3, tzinfo=dt.UTC)
    retired, new_pub = rotate_site(tmp_path, "oslo", now=when)
    assert retired.name == "node.pub.retired-20261126T010203Z" and retired.read_bytes() == old_pub_bytes
    retired_priv = retired.with_name("node.key.retired-20261126T010203Z")
    assert retired_priv.read_bytes() == old_priv_bytes and stat.S_IMODE(retired_priv.stat().st_mode) == 0o600
    assert new_pub == pub and pub.read_bytes() != old_pub_bytes and stat.S_IMODE(priv.stat().st_mode) == 0o600
    with pytest.raises(CryptoError, match="never overwritten"):  # same second: the retired pair is not clobbered
        rotate_site(tmp_path, "oslo", now=when)
    assert retired.read_bytes() == old_pub_bytes and pub.read_bytes() != old_pub_bytes
    with pytest.raises(CryptoError, match="keys site bergen"):
        rotate_site(tmp_path, "bergen")


def test_keys_site_rotate_cli_says_what_to_register_and_revoke(tmp_path: Path) -> None:
    assert runner.invoke(app, ["keys", "site", "oslo", "--keys", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["keys", "site", "oslo", "--keys", str(tmp_path), "--rotate"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "server register-site oslo" in result.output and "server revoke-site oslo" in result.output and "node.pub.retired-" in result.output
    assert len(list((tmp_path / "sites" / "oslo").glob("node.*.retired-*"))) == 2
    misuse = runner.invoke(app, ["keys", "site", "bergen", "--keys", str(tmp_path), "--superlink", "x:1"])
    assert misuse.exit_code != 0 and "--rotate" in misuse.output


def test_server_start_turns_supernode_authentication_on_and_says_what_to_do_next(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server(tmp_path)
    server = runner.invoke(app, ["server", "start", "--keys", str(tmp_path), "--dry-run"], terminal_width=300)
    assert server.exit_code == 0, server.output
    argv = dry_run_command(server.stdout)
    assert argv[0].endswith("flower-superlink") and "--enable-supernode-auth" in argv and "--ssl-certfile" in argv
    assert "--insecure" not in argv and "--disable-runtime-dependency-installation" in argv
    assert "fedrelapse server register-site NAME" in server.output  # the operator's next step
    off = runner.invoke(app, ["server", "start", "--keys", str(tmp_path), "--no-node-auth", "--dry-run"], terminal_width=300)
    assert off.exit_code == 0 and "--enable-supernode-auth" not in dry_run_command(off.stdout) and "authentication is OFF" in off.output
    plain = runner.invoke(app, ["server", "start", "--insecure", "--dry-run"])
    assert plain.exit_code != 0 and "--no-node-auth" in plain.output  # node auth cannot silently drop with TLS
    loopback = runner.invoke(app, ["server", "start", "--insecure", "--no-node-auth", "--dry-run"])
    assert loopback.exit_code == 0 and "--insecure" in dry_run_command(loopback.stdout)


def test_server_start_finds_flowers_scripts_without_an_activated_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ca(tmp_path)
    make_server(tmp_path)
    started: list[tuple[str, dict[str, str]]] = []
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as from cron or systemd: the venv is not activated
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # the caller's own setting does not turn it back on

    def execve(exe: str, argv: list[str], env: dict[str, str]) -> NoReturn:
        started.append((exe, env))
        sys.exit(0)

    def execv(exe: str, argv: list[str]) -> NoReturn:  # never really started
        started.append((exe, dict(os.environ)))
        sys.exit(0)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(os, "execv", execv)

    result = runner.invoke(app, ["server", "start", "--keys", str(tmp_path)], terminal_width=300)

    assert result.exit_code == 0, result.output
    (exe, env), = started
    assert Path(exe).name == "flower-superlink"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # where flower-superexec is
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert (Path(sys.executable).parent / "flower-superexec").exists()


def test_site_start_uses_tls_its_node_key_and_the_pinned_clientapp(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server(tmp_path)
    priv, _ = make_site(tmp_path, "oslo")
    site = tmp_path / "site.yaml"
    site.write_text(f"name: oslo\nmanifest: m.csv\nstate_dir: {tmp_path / 'state'}\n")
    node = runner.invoke(app, ["site", "start", "--site", str(site), "--superlink", "coord:9092", "--ca", str(tmp_path / "ca" / "ca.pem"),
                               "--node-key", str(priv), "--dry-run"], terminal_width=300)
    assert node.exit_code == 0, node.output
    argv = dry_run_command(node.stdout)
    assert argv[argv.index("--root-certificates") + 1] == str((tmp_path / "ca" / "ca.pem").resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(priv.resolve())
    assert "--insecure" not in argv and any(a.startswith("site-config=") for a in argv)
    assert (tmp_path / "state" / "bin" / "flwr-clientapp").is_file() and "flwr-clientapp:" in node.stdout
    no_key = runner.invoke(app, ["site", "start", "--site", str(site), "--superlink", "coord:9092", "--ca", str(tmp_path / "ca" / "ca.pem")])
    assert no_key.exit_code != 0 and "--node-key" in no_key.output
    refused = runner.invoke(app, ["site", "start", "--site", str(site), "--superlink", "coord:9092"])
    assert refused.exit_code != 0 and "--ca" in refused.output


def test_site_start_runs_the_site_worker_by_default_and_can_switch_it_off(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(f"name: oslo\nmanifest: m.csv\nstate_dir: {tmp_path / 'state'}\n")
    start = ["site", "start", "--site", str(site), "--superlink", "127.0.0.1:9092", "--insecure", "--dry-run"]
    launcher = tmp_path / "state" / "bin" / "flwr-clientapp"

    worker = runner.invoke(app, start, terminal_width=300)
    worker_text = launcher.read_text()
    per_message = runner.invoke(app, [*start, "--clientapp", "per-message"], terminal_width=300)
    per_message_text = launcher.read_text()
    unknown = runner.invoke(app, [*start, "--clientapp", "threads"], terminal_width=300)

    assert worker.exit_code == 0 and "(worker)" in worker.stdout, worker.output
    assert "client.site_launcher" in worker_text and repr(str((tmp_path / "state" / "worker").resolve())) in worker_text
    assert per_message.exit_code == 0 and "(per-message)" in per_message.stdout
    assert "from client.pinned_app import main" in per_message_text and "site_launcher" not in per_message_text
    assert unknown.exit_code != 0 and "per-message" in unknown.output


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _encrypt(path: Path, passphrase: bytes) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), None)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(passphrase)))


def test_keys_server_puts_an_international_host_in_the_certificate_idna_encoded_and_says_the_name_sites_use(tmp_path: Path) -> None:
    make_ca(tmp_path)

    result = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path), "--host", "Sykehus-ø.no", "--host", "127.0.0.1"], terminal_width=300)

    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "server" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["xn--sykehus--d5a.no"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert verify_chain(tmp_path / "ca" / "ca.pem", tmp_path / "server" / "server.pem")
    assert "xn--sykehus--d5a.no" in result.output  # the name the sites give as --superlink


@pytest.mark.parametrize("host", ["", " ", "coordinator example.org", "-coordinator.example.org", "a..b", "ø" * 70 + ".no", "coordinator.example.org:9092", "*.example.org"])
def test_keys_server_refuses_a_host_the_certificate_cannot_hold_before_writing_anything(tmp_path: Path, host: str) -> None:
    make_ca(tmp_path)
    before = _files(tmp_path)

    result = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path), "--host", "localhost", "--host", host], terminal_width=300)

    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "--host" in text and "nothing was written" in text.lower() and isinstance(result.exception, SystemExit)  # a message, no traceback
    assert _files(tmp_path) == before and not (tmp_path / "server").exists()
    long_name = "coordinator." + "a" * 60 + ".example.org"  # longer than a certificate's 64-character common name
    again = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path), "--host", long_name])
    assert again.exit_code == 0, again.output  # nothing half-written blocks the corrected command


def test_a_passphrase_protected_ca_key_is_asked_for_instead_of_a_traceback(tmp_path: Path) -> None:
    make_ca(tmp_path)
    _encrypt(tmp_path / "ca" / "ca.key", b"offline-pass")
    before = _files(tmp_path)

    plain = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path)], terminal_width=300)
    wrong = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path), "--ask-ca-passphrase"], input="nope\n", terminal_width=300)

    assert plain.exit_code == 5 and isinstance(plain.exception, SystemExit), plain.output
    assert "passphrase" in plain.output and "--ask-ca-passphrase" in plain.output
    assert wrong.exit_code == 5 and "does not decrypt" in " ".join(wrong.output.split()), wrong.output
    assert _files(tmp_path) == before
    right = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path), "--ask-ca-passphrase"], input="offline-pass\n")
    assert right.exit_code == 0, right.output
    assert verify_chain(tmp_path / "ca" / "ca.pem", tmp_path / "server" / "server.pem")


def test_with_ca_key_kept_offline_keys_server_asks_for_it_and_keys_ca_keeps_the_consortiums_ca_pem(tmp_path: Path) -> None:
    make_ca(tmp_path)
    (tmp_path / "ca" / "ca.key").unlink()  # moved offline, as advised
    ca_pem = (tmp_path / "ca" / "ca.pem").read_bytes()

    server = runner.invoke(app, ["keys", "server", "--keys", str(tmp_path)], terminal_width=300)
    ca = runner.invoke(app, ["keys", "ca", "--keys", str(tmp_path)], terminal_width=300)

    server_text = " ".join(server.output.split())
    assert server.exit_code == 5 and "offline" in server_text and "create the CA first" not in server_text
    assert not (tmp_path / "server").exists()
    assert ca.exit_code == 5 and "never overwritten" in ca.output
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == ca_pem and not (tmp_path / "ca" / "ca.key").exists()


def test_keys_server_that_fails_half_way_takes_back_the_files_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import signing

    make_ca(tmp_path)

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(signing, "write_public", disk_full)  # the last file: model-signing.pub.pem
    with pytest.raises(OSError, match="No space"):
        make_server(tmp_path)
    assert not (tmp_path / "server").exists()  # server.key, server.pem, model-signing.key taken back
    monkeypatch.undo()
    assert make_server(tmp_path).is_file()  # the retry is not refused


@pytest.mark.parametrize("role", ["server", "site"])
def test_the_dry_run_line_turns_flowers_telemetry_off(tmp_path: Path, role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Natively, Flower's SuperLink and SuperNode post usage events to telemetry.flower.ai unless
    FLWR_TELEMETRY_ENABLED=0; the site promises it connects to its coordinator only."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    site = tmp_path / "site.yaml"
    site.write_text(f"name: oslo\nmanifest: m.csv\nstate_dir: {tmp_path / 'state'}\n")
    args = {"server": ["server", "start", "--insecure", "--no-node-auth", "--dry-run"],
            "site": ["site", "start", "--site", str(site), "--superlink", "127.0.0.1:9092", "--insecure", "--dry-run"]}[role]

    result = runner.invoke(app, args, terminal_width=300)

    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[0]
    assert line.startswith("env ") and " FLWR_TELEMETRY_ENABLED=0 " in line, line
    assert dry_run_command(result.stdout)[0].endswith(("flower-superlink", sys.executable))
