"""Consortium key and certificate tooling (Python `cryptography`, no openssl shell-outs).

Layout under a keys folder (coordinator side)::

    ca/ca.key, ca/ca.pem                 consortium CA (keep ca.key offline)
    server/server.key, server/server.pem coordinator TLS certificate, signed by the CA
    server/model-signing.key/.pub.pem    Ed25519 key signing each global model
    sites/<name>/node.key, node.pub      a site's SuperNode key pair (NIST P-256, for node auth)
    sites/<name>/node.key.retired-<UTC>  a rotated-out pair, kept (0600) until it is revoked

Private keys are written 0600 with O_EXCL (never overwritten silently); rotation renames the
old pair aside before writing the new one. `keys ca` and `keys server` check everything (hosts,
existing files, the CA key and its passphrase) and sign before they write the first file, and
take back what they wrote if writing fails part-way: a refused command can simply be run again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared import signing
from shared.errors import ConfigError, CryptoError

VALID_DAYS = 825


def _refuse_existing(paths: tuple[Path, ...], if_exists: str) -> None:
    """Stop before anything is written when one of ``paths`` is already there."""
    for path in paths:
        if path.exists():
            raise CryptoError(f"{path} already exists and is never overwritten; nothing was changed. {if_exists}")


def _write_new(path: Path, data: bytes, mode: int, *, if_exists: str) -> Path:
    """Write a file that must not exist yet (O_EXCL); ``if_exists``: what to do instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CryptoError(f"{path} already exists and is never overwritten; nothing was changed. {if_exists}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, *, if_exists: str, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    """Write a new private key 0600; an existing one is never overwritten (``if_exists``: what to do instead)."""
    _write_new(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()), 0o600, if_exists=if_exists)


@contextlib.contextmanager
def _all_or_nothing(folder: Path) -> Iterator[list[Path]]:
    """Collects the paths a command creates; if it fails part-way they are removed again (and
    ``folder`` if this made it and it is left empty), so a retry is never refused by half of a
    key pair (e.g. a server.key without its certificate)."""
    made_folder = not folder.exists()
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in reversed(written):
            path.unlink(missing_ok=True)
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _load_ca(keys: Path, passphrase: bytes | None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's private key and certificate, checked to belong together; every problem is a
    CryptoError that says what to do (nothing has been written when it is raised)."""
    key_path, cert_path = keys / "ca" / "ca.key", keys / "ca" / "ca.pem"
    if not key_path.exists():
        if cert_path.exists():
            raise CryptoError(
                f"{key_path} is not there, though {cert_path} is: the CA key is kept offline. Run `fedrelapse keys server` "
                f"where ca.key is, or put it back in {key_path.parent} for this one command and move it offline again. "
                f"Do not run `fedrelapse keys ca`: a new CA is a new consortium. Nothing was written."
            )
        raise CryptoError(f"{key_path} does not exist; create the CA first with `fedrelapse keys ca`. Nothing was written.")
    try:
        data = key_path.read_bytes()
    except OSError as exc:
        raise CryptoError(f"{key_path} cannot be read ({exc.strerror}); run the command as the account that owns it. Nothing was written.") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        if passphrase is None:
            raise CryptoError(
                f"{key_path} is protected by a passphrase. Run the command again with --ask-ca-passphrase and type it "
                f"(it is used for this signature only, never stored). Nothing was written."
            ) from None
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise CryptoError(f"The passphrase does not decrypt {key_path}; type the one it was encrypted with. Nothing was written.") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"{key_path} is not a PEM private key ({exc}); it should be the CA key `fedrelapse keys ca` wrote. Nothing was written.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError(f"{key_path} is not an EC private key; it should be the CA key `fedrelapse keys ca` wrote. Nothing was written.")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise CryptoError(f"{cert_path} is missing beside {key_path}; copy it back (every site holds the same ca.pem). Nothing was written.") from None
    except ValueError as exc:
        raise CryptoError(f"{cert_path} is not a PEM certificate ({exc}); copy the consortium's ca.pem back (every site holds it). Nothing was written.") from None
    if cert.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise CryptoError(f"{key_path} is not the key of the CA in {cert_path}; a certificate it signed would not be trusted by the sites. Nothing was written.")
    return key, cert


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")  # one part of a host name (letters, digits, '-'; '_' as some hosts use)


def _bad_host(host: str, why: str) -> ConfigError:
    return ConfigError(
        f"--host {host!r} cannot be named in a TLS certificate: {why}. Give each DNS name or IP address the sites connect "
        f"to (parts of letters, digits and '-' between dots; an international name such as sykehus-ø.no is fine). Nothing was written."
    )


def _dns_name(host: str) -> str:
    """``host`` as a certificate's DNS name holds it (IDNA-encoded if international), or a ConfigError."""
    import idna  # a declared dependency (pyproject.toml, pinned in deploy/requirements.lock); UTS #46, unlike the stdlib codec

    dns = host[:-1] if host.endswith(".") else host  # a fully qualified name's final dot
    if not dns.strip():
        raise _bad_host(host, "it is empty")
    if not dns.isascii():
        try:
            dns = idna.encode(dns, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise _bad_host(host, f"it is not a valid international domain name ({exc})") from None
    odd = next((c for c in dns if not (c.isalnum() or c in "-_.")), None)
    if odd is not None:
        hint = " (the port goes to `fedrelapse server start --port`, not here)" if odd == ":" else ""
        raise _bad_host(host, f"it holds {odd!r}, which a host name cannot{hint}")
    if len(dns) > 253:
        raise _bad_host(host, f"it is {len(dns)} characters long as a DNS name; at most 253 are allowed")
    for label in dns.split("."):
        if not label:
            raise _bad_host(host, "it has an empty part between dots")
        if len(label) > 63:
            raise _bad_host(host, f"its part {label!r} is {len(label)} characters long; at most 63 are allowed")
        if not _LABEL.fullmatch(label):
            raise _bad_host(host, f"its part {label!r} starts or ends with '-'")
        if label.lower().startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as exc:
                raise _bad_host(host, f"its part {label!r} is not a valid encoded international name ({exc})") from None
    return dns


def certificate_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    """The subject alternative names for ``hosts``: IP addresses as they are, DNS names as a
    certificate holds them, IDNA-encoded (UTS #46, as resolvers and browsers do: ``sykehus-ø.no``
    becomes ``xn--sykehus--d5a.no``). A host no certificate can hold is a ConfigError."""
    if not hosts:
        raise ConfigError("Give at least one --host (a DNS name or IP address the sites connect to). Nothing was written.")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        name = x509.IPAddress(ip) if ip is not None else x509.DNSName(_dns_name(host))
        if name not in names:
            names.append(name)
    return names


def names_in(cert_pem: Path) -> list[str]:
    """The host names and IP addresses a certificate lists (what the sites may give as --superlink)."""
    sans = x509.load_pem_x509_certificate(cert_pem.read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in sans]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrelapse consortium"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(keys: Path, *, name: str = "fedrelapse consortium CA") -> Path:
    """Create the consortium CA; return the path of its certificate. An existing ca.key or
    ca.pem (the key may be kept offline) is never replaced."""
    key_path, cert_path = keys / "ca" / "ca.key", keys / "ca" / "ca.pem"
    if_exists = (
        f"There is no rotate command for the CA, because a new CA is a new consortium: every site's ca.pem, the coordinator's "
        f"certificate and every site's node key would have to be replaced. Only if that is what you want, move the folder "
        f"{keys / 'ca'} away deliberately (keep it until every site runs with the new ca.pem), run `fedrelapse keys ca` again, "
        f"then reissue the coordinator's certificate (`fedrelapse keys server`) and give every site the new ca.pem."
    )
    _refuse_existing((key_path, cert_path), if_exists)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    with _all_or_nothing(keys / "ca") as written:
        _write_private(key_path, key, if_exists=if_exists)
        written.append(key_path)
        written.append(_write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, if_exists=if_exists))
    return cert_path


def make_server(keys: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), ca_passphrase: bytes | None = None) -> Path:
    """Coordinator TLS certificate for ``hosts`` (DNS names, international ones IDNA-encoded, or
    IPs), signed by the CA (``ca_passphrase``: for a ca.key encrypted with one); plus the
    coordinator's Ed25519 model-signing key unless it exists. Returns the certificate path.

    Every check (hosts, existing files, the CA) runs and the certificate is signed before the
    first file is written; a failure while writing removes what this call wrote."""
    names = certificate_names(hosts)
    folder = keys / "server"
    key_path, cert_path = folder / "server.key", folder / "server.pem"
    if_exists = (
        f"To reissue the coordinator's TLS certificate (e.g. for another --host), move {key_path} and {cert_path} away "
        f"deliberately and run `fedrelapse keys server` again, then restart the SuperLink; sites need nothing new while the CA "
        f"is the same. The model-signing key beside them is kept (a new one would have to be copied to every site)."
    )
    _refuse_existing((key_path, cert_path), if_exists)
    ca_key, ca_cert = _load_ca(keys, ca_passphrase)
    key = ec.generate_private_key(ec.SECP256R1())
    first = str(names[0].value)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(first if len(first) <= 64 else "fedrelapse coordinator"))  # a common name holds at most 64
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    signing_key, signing_pub = folder / "model-signing.key", folder / "model-signing.pub.pem"
    with _all_or_nothing(folder) as written:
        _write_private(key_path, key, if_exists=if_exists)
        written.append(key_path)
        written.append(_write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, if_exists=if_exists))
        if not signing_key.exists():  # as signing.generate, but each file is taken back if the next one fails
            model_key = Ed25519PrivateKey.generate()
            pem = model_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            written.append(_write_new(signing_key, pem, 0o600, if_exists="It appeared while this command ran; run it again."))
            written.append(signing.write_public(model_key, signing_pub))
    return cert_path


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
