"""Real processes on 127.0.0.1 (TLS, SuperNode authentication): a rotated-out, revoked site key
can no longer join while the site's new key can; and a researcher's bundle that carries code
is refused by the site's pinned ClientApp, its code never runs, and the researcher is told why."""

from __future__ import annotations

import time
from pathlib import Path

from typer.testing import CliRunner

from server.cli import app
from server.deployment import APP_DIR, LocalConsortium
from server.keys import make_ca, make_server

# The researcher's ServerApp (runs at the coordinator, which is not what we pin) asks every
# connected site to run the researcher's ClientApp and prints what comes back.
RESEARCHER_SERVER = """import time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"cfg": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train") for n in nodes]
    for reply in grid.send_and_receive(msgs, timeout=60):
        print("REPLY", reply.metadata.src_node_id, reply.error.reason if reply.has_error() else "CONTENT", flush=True)
"""
RESEARCHER_CLIENT = """from pathlib import Path
Path({marker!r}).write_text("researcher code ran at the site")
from flwr.clientapp import ClientApp
app = ClientApp()
"""


def _researcher_app(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    text = (APP_DIR / "pyproject.toml").read_text()
    text = text.replace('serverapp = "server.app:app"', 'serverapp = "researcher_server:app"').replace('clientapp = "client.app:app"', 'clientapp = "researcher_client:app"')
    (folder / "pyproject.toml").write_text(text)
    (folder / "researcher_server.py").write_text(RESEARCHER_SERVER)
    (folder / "researcher_client.py").write_text(RESEARCHER_CLIENT.format(marker=str(marker)))
    return folder


def _wait_for(path: Path, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def test_revoked_key_cannot_join_rotated_key_can_and_a_bundle_with_code_never_runs(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_ca(keys)
    make_server(keys)
    site = tmp_path / "alpha.yaml"
    site.write_text(f"name: alpha\nmanifest: {tmp_path / 'manifest.csv'}\nstate_dir: {tmp_path / 'alpha'}\n")
    marker = tmp_path / "researcher-code-ran"
    researcher = _researcher_app(tmp_path / "researcher-app", marker)
    logs = tmp_path / "flower" / "logs"

    with LocalConsortium(tmp_path / "flower", [site], keys=keys, node_auth=True) as consortium:
        assert _wait_for(logs / "supernode-0.log", "SuperNode ID:", 30)  # admitted with its first key
        old_pub = keys / "sites" / "alpha" / "node.pub"
        first_key_pem = old_pub.read_bytes()
        [old_node_id] = consortium.registry.find(old_pub)

        # Rotate the site's key at the running SuperLink: register the new key, revoke the old one.
        rotated = CliRunner().invoke(app, ["keys", "site", "alpha", "--keys", str(keys), "--rotate", "--superlink", f"127.0.0.1:{consortium.superlink_port}"],
                                     terminal_width=300)
        assert rotated.exit_code == 0, rotated.output
        [retired_pub] = (keys / "sites" / "alpha").glob("node.pub.retired-*")
        assert retired_pub.read_bytes() == first_key_pem and f"node {old_node_id} unregistered" in rotated.output
        assert consortium.registry.find(retired_pub) == [] and len(consortium.registry.find(old_pub)) == 1
        status = {n.node_id: n.status for n in consortium.registry.nodes()}
        assert status[old_node_id] == "unregistered"
        link = ["--keys", str(keys), "--superlink", f"127.0.0.1:{consortium.superlink_port}"]
        again = CliRunner().invoke(app, ["server", "register-site", "alpha", *link], terminal_width=300)
        assert again.exit_code == 0 and "already registered" in again.output, again.output  # idempotent
        twice = CliRunner().invoke(app, ["server", "revoke-site", "alpha", *link, "--public-key", str(retired_pub)], terminal_width=300)
        assert twice.exit_code != 0 and "nothing was revoked" in twice.output, twice.output  # never a silent no-op

        retired_key = retired_pub.with_name(retired_pub.name.replace("node.pub", "node.key"))
        revoked, revoked_log = consortium.start_supernode(site, "revoked-key", wait=False, auth_key=retired_key)
        renewed, renewed_log = consortium.start_supernode(site, "rotated-key", auth_key=keys / "sites" / "alpha" / "node.key")
        assert _wait_for(renewed_log, "SuperNode ID:", 30), renewed_log.read_text(errors="replace")[-2000:]

        # A researcher submits a bundle whose ClientApp is their own code.
        proc = consortium.submit(tmp_path / "unused.yaml", tmp_path / "run", timeout_s=150, app_dir=researcher)
        time.sleep(1)
        revoked_alive = revoked.poll() is None

    revoked_text = revoked_log.read_text(errors="replace")
    assert "SuperNode ID:" not in revoked_text, revoked_text[-2000:]  # the revoked key never joins again
    assert revoked_alive or "Exit Code" in revoked_text, revoked_text[-2000:]
    output = proc.stdout + proc.stderr
    assert not marker.exists(), "the site ran code shipped in the researcher's bundle"
    assert output.count("REPLY ") == 1, output[-3000:]  # the researcher hears back from the site, no timeout ...
    assert f"REPLY {old_node_id} " not in output  # ... and the revoked node is given no work
    assert "installed, pinned ClientApp" in output and "researcher_client.py" in output, output[-3000:]
    assert "CONTENT" not in output
    site_log = renewed_log.read_text(errors="replace")
    assert "BundleRefused" in site_log, site_log[-3000:]
