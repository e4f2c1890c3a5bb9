"""Consortium key and certificate tooling (Python `cryptography`, no openssl shell-outs).

Layout under a keys folder (coordinator side)::

    ca/ca.key, ca/ca.pem                 consortium CA (keep ca.key offline)
    server/server.key, server/server.pem coordinator TLS certificate, signed by the CA
    server/model-signing.key/.pub.pem    Ed25519 key signing each global model
    sites/<name>/node.key, node.pub      a site's SuperNode key pair (NIST P-256, for node auth)
    sites/<name>/node.key.retired-<UTC>  a rotated-out pair, kept (0600) until it is revoked

Private keys are written 0600 with O_EXCL (never overwritten silently); rotation renames the
old pair aside before writing the new one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared import signing
from shared.errors import CryptoError

VALID_DAYS = 825


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, *, if_exists: str, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    """Write a new private key 0600; an existing one is never overwritten (``if_exists``: what to do instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CryptoError(f"{path} already exists and is never overwritten; nothing was changed. {if_exists}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CryptoError(f"{path} does not exist; create the CA first with `fedrelapse keys ca`.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError(f"{path} is not an EC private key.")
    return key


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrelapse consortium"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(keys: Path, *, name: str = "fedrelapse consortium CA") -> Path:
    """Create the consortium CA; return the path of its certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(keys / "ca" / "ca.key", key, if_exists=(
        f"There is no rotate command for the CA, because a new CA is a new consortium: every site's ca.pem, the coordinator's "
        f"certificate and every site's node key would have to be replaced. Only if that is what you want, move the folder "
        f"{keys / 'ca'} away deliberately (keep it until every site runs with the new ca.pem), run `fedrelapse keys ca` again, "
        f"then reissue the coordinator's certificate (`fedrelapse keys server`) and give every site the new ca.pem."
    ))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    out = keys / "ca" / "ca.pem"
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def make_server(keys: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Path:
    """Coordinator TLS certificate for ``hosts`` (DNS names or IPs), signed by the CA; plus the
    coordinator's Ed25519 model-signing key. Returns the certificate path."""
    ca_key = _load_key(keys / "ca" / "ca.key")
    ca_cert = x509.load_pem_x509_certificate((keys / "ca" / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(keys / "server" / "server.key", key, if_exists=(
        f"To reissue the coordinator's TLS certificate (e.g. for another --host), move {keys / 'server' / 'server.key'} and "
        f"{keys / 'server' / 'server.pem'} away deliberately and run `fedrelapse keys server` again, then restart the SuperLink; "
        f"sites need nothing new while the CA is the same. The model-signing key beside them is kept (a new one would "
        f"have to be copied to every site)."
    ))
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = keys / "server" / "server.pem"
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    signing_key = keys / "server" / "model-signing.key"
    if not signing_key.exists():
        signing.generate(signing_key, keys / "server" / "model-signing.pub.pem")
    return out


def _site_folder(keys: Path, name: str) -> Path:
    if not name.replace("-", "").replace("_", "").isalnum():
        raise CryptoError(f"Site name {name!r} may hold only letters, digits, '-' and '_'.")
    return keys / "sites" / name


def make_site(keys: Path, name: str) -> tuple[Path, Path]:
    """A site's SuperNode key pair (NIST P-256, as Flower's node authentication expects)."""
    folder = _site_folder(keys, name)
    key = ec.generate_private_key(ec.SECP256R1())
    priv = folder / "node.key"
    _write_private(priv, key, fmt=serialization.PrivateFormat.OpenSSH,  # the format flower-supernode reads
                   if_exists=f"To replace site {name}'s key, rotate it: `fedrelapse keys site {name} --rotate` (section 7b of the hospital-IT runbook).")
    pub = folder / "node.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


def rotate_site(keys: Path, name: str, *, now: dt.datetime | None = None) -> tuple[Path, Path]:
    """Retire a site's node key pair (renamed ``*.retired-<UTC time>``) and write a new one.

    Returns the retired public key (to revoke at the SuperLink) and the new public key (to
    register). Nothing is overwritten: a retired name that already exists is an error.
    """
    folder = _site_folder(keys, name)
    priv, pub = folder / "node.key", folder / "node.pub"
    if not priv.is_file() or not pub.is_file():
        raise CryptoError(f"{folder} holds no node.key/node.pub to rotate; create the site's key with `fedrelapse keys site {name}`.")
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    old_priv, old_pub = folder / f"node.key.retired-{stamp}", folder / f"node.pub.retired-{stamp}"
    for path in (old_priv, old_pub):
        if path.exists():
            raise CryptoError(f"{path} already exists; wait a second and rotate again (a retired key is never overwritten).")
    priv.rename(old_priv)
    pub.rename(old_pub)
    make_site(keys, name)
    return old_pub, pub


def verify_chain(ca_pem: Path, cert_pem: Path) -> bool:
    """True when ``cert_pem`` is signed by the CA in ``ca_pem`` and is currently valid."""
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # cryptography raises InvalidSignature or ValueError
        return False
    now = dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
