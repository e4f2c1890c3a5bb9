"""What `fedrelapse site start` (with or without --dry-run) and `site init` check before anything runs.

Each problem is a :class:`~shared.errors.CryptoError` naming the file, the option or site.yaml
field it came from and what to do, so a SuperNode never starts with a key or certificate that
would only fail later (a garbage ca.pem gave ``ssl.SSLError: no start line`` and a SuperNode
that looked healthy but never connected; a wrong coordinator key was found at the first round).
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from shared import signing
from shared.config import SiteConfig
from shared.errors import CryptoError

COORDINATOR_KEY_IS = (
    "the coordinator's model-signing public key (model-signing.pub.pem, made by `fedrelapse keys server`; "
    "the coordinator admin gives it to every site)"
)


def check_private_key_mode(path: Path, what: str) -> None:
    """Refuse a private key that users other than its owner may read or write."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return  # the caller says what a missing file (or a file where a folder should be) means
    if mode & 0o077:
        raise CryptoError(
            f"{what} {path} has mode {mode:04o}: other users on this host can read it. A private key must be readable "
            f"by its owner only; run `chmod 600 {path}` and try again."
        )


def check_ca(path: Path) -> None:
    """The consortium CA certificate given with ``--ca``: a readable PEM CA certificate, currently valid."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise CryptoError(f"CA certificate {path} (--ca) is missing; ask the coordinator admin for the consortium ca.pem.") from None
    except IsADirectoryError:
        raise CryptoError(f"--ca {path} is a folder; give the consortium ca.pem file itself.") from None
    except ValueError:
        raise CryptoError(
            f"--ca {path} is not a PEM certificate; it must be the consortium ca.pem from the coordinator admin "
            f"(`fedrelapse keys ca`), a text file that starts with -----BEGIN CERTIFICATE-----."
        ) from None
    ca = certs[0]
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CryptoError(
            f"--ca {path} is a certificate but not a CA certificate (perhaps the coordinator's server.pem); "
            f"give the consortium ca.pem from the coordinator admin."
        )
    if ca.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise CryptoError(f"The CA certificate {path} (--ca) expired on {ca.not_valid_after_utc:%Y-%m-%d}; ask the coordinator admin for the current ca.pem.")


def check_node_key(path: Path) -> None:
    """This site's node key given with ``--node-key``: owner-only, an OpenSSH EC private key (what
    flower-supernode reads; anything else ends it with exit code 302)."""
    check_private_key_mode(path, "Node key (--node-key)")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise CryptoError(f"Node key {path} (--node-key) is missing; ask the coordinator admin for this site's node.key (`fedrelapse keys site NAME`).") from None
    except IsADirectoryError:
        raise CryptoError(f"--node-key {path} is a folder; give this site's node.key file itself.") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError(
            f"--node-key {path} is not an unencrypted OpenSSH EC private key; it must be this site's node.key from the "
            f"coordinator admin (`fedrelapse keys site NAME`), a file that starts with -----BEGIN OPENSSH PRIVATE KEY-----."
        )


def coordinator_key(cfg: SiteConfig, site_yaml: str = "site.yaml") -> Ed25519PublicKey | None:
    """The key that verifies every global model (site.yaml's ``coordinator_public_key``), None if
    the field is not set; a missing or wrong file is an error saying what the key is."""
    path = cfg.coordinator_public_key
    if path is None:
        return None
    field = f"{site_yaml}'s `coordinator_public_key`"
    return signing.load_public(
        path,
        missing=f"{field} is {path}, which does not exist. It must be {COORDINATOR_KEY_IS}; copy it to this host and point coordinator_public_key at it.",
        what=f"{COORDINATOR_KEY_IS}, named by {field}",
    )
