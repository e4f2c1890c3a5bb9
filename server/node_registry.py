"""Which SuperNode keys the SuperLink admits: register, find by public key, revoke.

Wraps `flwr supernode register|unregister` (Flower 1.42's Control API) and, because
`flwr supernode list` does not print public keys, lists nodes with Flower's own Control API
client to find the node that holds a given site key. Each call uses a private Flower
configuration (``$FLWR_HOME/config.toml``) naming one SuperLink connection, so the admin's
own `~/.flwr` is never read or changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import FederationError
from shared.flower_env import without_flower_telemetry
from shared.signing import read_key

CONNECTION = "fedrelapse"
_REVOKED = frozenset({"unregistered", "deleted"})


@dataclass(frozen=True)
class NodeEntry:
    """One SuperNode the SuperLink knows."""

    node_id: int
    status: str  # registered | online | offline | unregistered
    public_key_pem: bytes  # SubjectPublicKeyInfo PEM, as Flower stores it


def write_connection(home: Path, *, address: str, ca: Path | None, name: str = CONNECTION) -> Path:
    """Write ``home/config.toml`` with one default SuperLink connection (TLS unless ``ca`` is None)."""
    home.mkdir(parents=True, exist_ok=True)
    transport = f'root-certificates = "{ca.resolve()}"\n' if ca is not None else "insecure = true\n"
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{transport}')
    return path


def public_key_pem(public_key: Path) -> bytes:
    """A site's OpenSSH node.pub as the PEM bytes the SuperLink stores."""
    key = read_key(
        public_key, serialization.load_ssh_public_key, ec.EllipticCurvePublicKey,
        missing=f"{public_key} does not exist; create the site's key with `fedrelapse keys site NAME`.",
        malformed=f"{public_key} is not an OpenSSH public key",
        wrong_type=f"{public_key} is not a NIST EC key; Flower node authentication needs one (`fedrelapse keys site`).",
    )
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class NodeRegistry:
    """The SuperLink's node registry, reached through its Control API."""

    home: Path  # FLWR_HOME holding config.toml (see write_connection)
    connection: str = CONNECTION

    def _env(self) -> dict[str, str]:
        return without_flower_telemetry({**os.environ, "FLWR_HOME": str(self.home)})

    def _flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        here = Path(sys.executable).parent / "flwr"
        exe = str(here) if here.exists() else shutil.which("flwr")
        if exe is None:
            raise FederationError("`flwr` is not installed in this environment; run deploy/setup.sh.")
        return subprocess.run([exe, *args], env=self._env(), capture_output=True, text=True, timeout=60, check=False)

    def register(self, public_key: Path) -> int:
        """Admit the holder of ``public_key``; return the new node id."""
        public_key_pem(public_key)  # a clear error before Flower's
        proc = self._flwr("supernode", "register", str(public_key), self.connection, "--format", "json")
        try:
            return int(_json_reply(proc.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise FederationError(f"Registering {public_key} with the SuperLink failed: {(proc.stdout + proc.stderr)[-600:]}") from None

    def nodes(self) -> list[NodeEntry]:
        """Every node the SuperLink knows, revoked ones included."""
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection
        from flwr.proto.control_pb2 import ListNodesRequest

        with _flwr_home(self.home):
            try:
                client = init_http_client_from_connection(read_superlink_connection(self.connection))
                try:
                    res = client.ListNodes(ListNodesRequest())
                finally:
                    client.close()
            except Exception as exc:  # noqa: BLE001 - Flower raises click, grpc and httpx errors here
                raise FederationError(f"Could not list the SuperLink's nodes through connection {self.connection!r} in {self.home}: {exc}") from None
        return [NodeEntry(int(n.node_id), str(n.status), bytes(n.public_key)) for n in res.nodes_info]

    def find(self, public_key: Path) -> list[int]:
        """Ids of the nodes still admitted with this public key."""
        pem = public_key_pem(public_key)
        return [n.node_id for n in self.nodes() if n.public_key_pem.strip() == pem.strip() and n.status not in _REVOKED]

    def unregister(self, node_id: int) -> None:
        proc = self._flwr("supernode", "unregister", str(node_id), self.connection, "--format", "json")
        if proc.returncode != 0 or _json_reply(proc.stdout).get("success") is not True:
            raise FederationError(f"Unregistering node {node_id} failed: {(proc.stdout + proc.stderr)[-600:]}")

    def revoke(self, public_key: Path) -> list[int]:
        """Unregister every node admitted with ``public_key``; return their ids.

        After this the SuperLink refuses that key (a node still connected with it loses its
        session). Raises when no admitted node holds the key, so a typo is never silent.
        """
        ids = self.find(public_key)
        if not ids:
            raise FederationError(f"No node registered at the SuperLink holds the key {public_key}; nothing was revoked (check the site name and --superlink).")
        for node_id in ids:
            self.unregister(node_id)
        return ids


def _json_reply(stdout: str) -> dict[str, Any]:
    """The JSON object `flwr ... --format json` prints (pretty-printed, possibly after other lines)."""
    start = stdout.find("{")
    try:
        reply = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}
    return reply if isinstance(reply, dict) else {}


@contextlib.contextmanager
def _flwr_home(home: Path) -> Iterator[None]:
    """FLWR_HOME for Flower's in-process CLI helpers, restored afterwards."""
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old
