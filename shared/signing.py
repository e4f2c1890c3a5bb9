"""Ed25519 signing keys for sites (ledger entries) and the coordinator (models, later).

Keys are PEM files; private keys are written 0600 and never leave their host. The public
half is what a DPO or the consortium needs to verify signatures offline.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import CryptoError


def generate(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Create a key pair; refuse to overwrite an existing private key."""
    if private_path.exists():
        raise CryptoError(
            f"{private_path} already exists and is never overwritten; nothing was changed. To replace it, move it away "
            f"deliberately and keep it: what it signed verifies only with its public key {public_path.name}, and whoever "
            f"verifies (the DPO for a ledger key, every site for the model-signing key) needs the new public key."
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise CryptoError(_cannot_create(private_path, exc)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    write_public(key, public_path)
    return key


def write_public(key: Ed25519PrivateKey, public_path: Path) -> Path:
    """Write the public half of ``key`` (PEM); e.g. to rebuild a lost .pub.pem from its private key."""
    try:
        public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        raise CryptoError(_cannot_create(public_path, exc)) from None
    return public_path


def _cannot_create(path: Path, exc: OSError) -> str:
    """Why a key file cannot be written, and what to do, in one sentence."""
    blocker = _file_in_the_way(path.parent)
    why = f"{blocker} is a file, not a folder: move it or change the path" if blocker else exc.strerror or str(exc)
    return (
        f"{path} cannot be created ({why}). Run the command as the user the site runs as (for coordinator keys, the "
        f"coordinator's admin user), who must be able to write to {path.parent}."
    )


def _cannot_read(path: Path, exc: OSError) -> str:
    """Why a key file cannot be read (it exists, or a folder on its path is not one), and what to do."""
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder; give the key file itself."
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        return f"{path} cannot be read: {blocker} is a file, not a folder; check the path."
    if isinstance(exc, PermissionError):
        return (
            f"{path} cannot be read by this user ({exc.strerror}); run the command as the user that owns the key "
            f"(e.g. the site's service user). Do not make a private key readable by others."
        )
    return f"{path} cannot be read ({exc.strerror or exc}); check the path."


def _file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists but is not a folder, if any."""
    return next((p for p in [*reversed(folder.parents), folder] if os.path.exists(p) and not os.path.isdir(p)), None)


def read_key(path: Path, load: Callable[[bytes], object], expected: type, *, missing: str, malformed: str, wrong_type: str) -> Any:
    """A key file parsed by ``load``, or a CryptoError saying what is wrong and what to do."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CryptoError(missing) from None
    except OSError as exc:
        raise CryptoError(_cannot_read(path, exc)) from None
    try:
        key = load(data)
    except TypeError:  # the only one with password=None: "Password was not given but private key is encrypted"
        raise CryptoError(
            f"{path} is protected by a passphrase, and fedrelapse reads keys without one (the file's mode, 0600, protects it). "
            f"Write it without the passphrase with `openssl pkey -in {path} -out <new file>` (it asks for the passphrase), "
            f"`chmod 600` the new file and put it in place of {path}."
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"{malformed} ({exc}).") from exc
    if not isinstance(key, expected):
        raise CryptoError(wrong_type)
    return key


def load_private(path: Path) -> Ed25519PrivateKey:
    return read_key(
        path, lambda b: serialization.load_pem_private_key(b, password=None), Ed25519PrivateKey,
        missing=f"Signing key {path} does not exist; run `fedrelapse site init` first.",
        malformed=f"{path} is not a PEM private key", wrong_type=f"{path} is not an Ed25519 key.",
    )


def load_public(path: Path, *, missing: str | None = None, what: str | None = None) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file.

    The errors assume a site's ledger public key (what a DPO verifies with) unless the caller
    says otherwise: ``missing`` replaces the sentence for a file that does not exist, and
    ``what`` names the key the file should hold (e.g. the coordinator's model-signing key).
    """
    should_be = f"; it should be {what}." if what else "."
    return read_key(
        path, serialization.load_pem_public_key, Ed25519PublicKey,
        missing=missing or f"Public key {path} does not exist; ask the site for its ledger public key.",
        malformed=f"{path} is not a PEM public key" + (f"; it should be {what}" if what else ""), wrong_type=f"{path} is not an Ed25519 public key{should_be}",
    )


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode()


def verify(key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short hex id of a public key, for logs and reports."""
    import hashlib

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
