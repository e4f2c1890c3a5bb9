"""Consortium keys: CA-signed TLS certificate, private keys 0600 and never overwritten."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from server.cli import app
from server.keys import make_ca, make_server, make_site, verify_chain

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

    with pytest.raises(CryptoError, match="refusing to overwrite"):
        make_site(tmp_path, "oslo")


def test_keys_cli_creates_the_layout_and_explains_where_files_go(tmp_path: Path) -> None:
    for args in (["keys", "ca"], ["keys", "server"], ["keys", "site", "bergen"]):
        result = runner.invoke(app, [*args, "--keys", str(tmp_path)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "sites" / "bergen" / "node.key").exists()
    again = runner.invoke(app, ["keys", "ca", "--keys", str(tmp_path)])
    assert again.exit_code == 5 and "refusing to overwrite" in again.output


def test_server_and_site_start_commands_use_tls_and_the_installed_apps(tmp_path: Path) -> None:
    make_ca(tmp_path)
    make_server(tmp_path)
    site = tmp_path / "site.yaml"
    site.write_text("name: oslo\nmanifest: m.csv\n")
    server = runner.invoke(app, ["server", "start", "--keys", str(tmp_path), "--dry-run"])
    assert server.exit_code == 0, server.output
    assert "--ssl-certfile" in server.output and "--insecure" not in server.output and "--disable-runtime-dependency-installation" in server.output
    node = runner.invoke(app, ["site", "start", "--site", str(site), "--superlink", "coord:9092", "--ca", str(tmp_path / "ca" / "ca.pem"), "--dry-run"])
    assert node.exit_code == 0, node.output
    assert "--root-certificates" in node.output and "site-config=" in node.output and "--insecure" not in node.output
    refused = runner.invoke(app, ["site", "start", "--site", str(site), "--superlink", "coord:9092"])
    assert refused.exit_code != 0 and "--ca" in refused.output
