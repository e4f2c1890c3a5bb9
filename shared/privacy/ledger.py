"""The site privacy ledger: append-only JSONL per dataset, hash-chained and Ed25519-signed.

One ``round`` entry per (run, round) records the mechanism applied to the dataset and ε after
it; a ``release`` entry records a noised evaluation of run R's model after round r (the Gaussian
mechanism, :mod:`shared.privacy.noised_metrics`; its ``round`` is r), composed into ε like a
round; ``policy`` entries record a DPO raising or lowering a cap. Each entry carries the SHA-256
of the previous one and the site key's signature over its own hash, so editing, deleting,
inserting or reordering entries is detected, and nobody without the site key can forge one.
A round's entry is written and fsync'd once the round has passed the site's checks and
*before* its training touches any patient's data, so a round that then diverges, crashes or is
killed stays charged (a retry is refused as a replay) and no update can leave uncharged. A
final line without its newline that is not a complete entry is a write that crashed before
completing: its round was never trained, so readers drop it, and ``fedrelapse audit verify``
reports it (cutting a last entry short looks the same). A complete entry is counted whether or
not its newline is there, and every line must be byte for byte the canonical JSON written here.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import PolicyError
from shared.privacy.accounting import SubsampledGaussian
from shared.signing import sign, verify

GENESIS = "0" * 64
FORMAT_VERSION = 2
KINDS = ("round", "release", "policy")
CHARGED = ("round", "release")  # the kinds whose mechanism counts in ε
LEDGER_FILE = "privacy-ledger.jsonl"  # <state_dir>/ledger/<this>: the file `fedrelapse audit verify` checks


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One accounted round, or one policy change. Plain, immutable and serialisable."""

    version: int = FORMAT_VERSION
    kind: str = "round"
    site: str
    dataset: str  # dataset fingerprint (manifest + audio hashes)
    run_id: str = ""
    round: int = 0
    plan_hash: str = ""
    accountant: str = "rdp"
    delta: float
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    max_grad_norm: float = 0.0
    epsilon_run: float = 0.0  # ε of this run on this dataset after the entry
    epsilon_total: float = 0.0  # ε of every run on this dataset after the entry
    cap_total: float | None = None  # policy entries: the all-time cap from now on
    cap_run: float | None = None  # policy entries: the per-run cap from now on
    note: str = ""  # policy entries: who changed what and why
    time: str  # ISO 8601, UTC
    wall_time_s: float = 0.0  # 0.0: the entry is written before the round trains (entries of earlier versions, written after training, hold its seconds)
    key_id: str = ""  # fingerprint of the signing key
    prev_hash: str

    @property
    def charged(self) -> bool:
        """Whether this entry's mechanism counts in ε (a training round or a noised release)."""
        return self.kind in CHARGED

    @property
    def mechanism(self) -> SubsampledGaussian:
        return SubsampledGaussian(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def hash(self) -> str:
        return entry_hash(asdict(self))

    def to_line(self, key: Ed25519PrivateKey) -> str:
        body = asdict(self)
        body["hash"] = entry_hash(body)
        body["signature"] = sign(key, body["hash"].encode())
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"  # a NaN/∞ entry fails here, not at every later read


def entry_hash(body: dict[str, object]) -> str:
    """SHA-256 of the canonical JSON of an entry without its ``hash`` and ``signature``."""
    clean = {k: v for k, v in body.items() if k not in ("hash", "signature")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Issue:
    line: int
    message: str


def parse(path: Path, public_key: Ed25519PublicKey | None = None) -> tuple[list[LedgerEntry], list[Issue]]:
    """Every complete entry and every integrity problem (chain, hash, signature, format)."""
    numbered, issues = parse_numbered(path, public_key)
    return [e for _, e in numbered], issues


def parse_numbered(path: Path, public_key: Ed25519PublicKey | None = None) -> tuple[list[tuple[int, LedgerEntry]], list[Issue]]:
    """Like :func:`parse`, with each entry's line number in the file.

    Parsing continues past a problem so an auditor sees all of them; the chain is checked
    against each entry's *stored* hash so one bad entry does not hide the next. A line must be
    exactly the canonical JSON this module writes (sorted keys, no spaces, ``\\n`` ends), with
    every field of its declared type: the bytes are what the hash chain and the runbook's
    head check stand on. A last line without its newline counts as an entry when it is a
    complete one (an entry is never dropped because its newline is missing); otherwise it is
    an unfinished write and is not counted (:func:`unfinished_tail` reports it).
    """
    if not path.exists():
        return [], []
    entries: list[tuple[int, LedgerEntry]] = []
    issues: list[Issue] = []
    prev = GENESIS
    *lines, tail = path.read_bytes().split(b"\n")
    if tail and isinstance(_parse_line(tail), tuple):
        lines.append(tail)  # a complete entry whose newline is missing: counted
    for no, raw in enumerate(lines, start=1):
        parsed = _parse_line(raw)
        if isinstance(parsed, str):
            issues.append(Issue(no, parsed))
            continue
        entry, stored, signature = parsed
        if entry.kind not in KINDS:
            issues.append(Issue(no, f"unknown entry kind {entry.kind!r}"))
        if entry_hash(asdict(entry)) != stored:
            issues.append(Issue(no, "the entry's content does not match its hash: it was altered"))
        if entry.prev_hash != prev:
            issues.append(Issue(no, "the hash chain is broken: an entry before it was removed, inserted, reordered or altered"))
        if public_key is not None and not verify(public_key, stored.encode(), signature):
            issues.append(Issue(no, "the signature does not verify with the site's public key"))
        prev = stored
        entries.append((no, entry))
    return entries, issues


def unfinished_tail(path: Path) -> tuple[int, int] | None:
    """(line number, bytes) of a last line that has no newline and is not a complete entry, or None.

    A crash while appending leaves one, and its update never left the site, so no reader
    counts it; but cutting a file's last entry short looks the same, so an audit reports it.
    """
    if not path.exists():
        return None
    *lines, tail = path.read_bytes().split(b"\n")
    if not tail or isinstance(_parse_line(tail), tuple):
        return None
    return len(lines) + 1, len(tail)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {}  # field -> the JSON types it may hold, from LedgerEntry's annotations
for _f in fields(LedgerEntry):
    _FIELD_TYPES[_f.name] = {"int": (int,), "str": (str,), "float": (int, float), "float | None": (int, float, type(None))}[str(_f.type)]


MAX_LINE_BYTES = 64 * 1024  # a real entry is well under 2 KiB: a longer line is refused before JSON parsing
MAX_INT = 2**53  # integers (and integers in float fields) must be below this in magnitude: exact as floats, never overflowing
MAX_STEPS = 10**9  # far above any real round's optimizer steps; larger values overflow the accountant


def _parse_line(raw: bytes) -> tuple[LedgerEntry, str, str] | str:
    """(entry, stored hash, signature) of one ledger line, or why it is not a valid entry.

    Hostile input (a huge line, deep nesting, a 5,000-digit number, an integer too large for
    a float, a time without a timezone) is a problem of its line, never an exception.
    """
    if len(raw) > MAX_LINE_BYTES:
        return f"not a valid ledger entry (the line is {len(raw)} bytes, longer than any entry: at most {MAX_LINE_BYTES})"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not a valid ledger entry (not UTF-8 text: {exc.reason} at byte {exc.start})"
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not a valid ledger entry (not JSON: {exc.msg} at column {exc.colno})"
    except RecursionError:
        return "not a valid ledger entry (not JSON an entry can hold: nested too deeply)"
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return f"not a valid ledger entry (not JSON an entry can hold: {exc})"
    if not isinstance(body, dict):
        return f"not a valid ledger entry (a JSON {type(body).__name__}, not an object)"
    for key in ("hash", "signature"):
        if not isinstance(body.get(key), str):
            return f"not a valid ledger entry (field {key!r} is missing or not a string)"
    fields_ = {k: v for k, v in body.items() if k not in ("hash", "signature")}
    unknown, missing = sorted(set(fields_) - set(_FIELD_TYPES)), sorted(k for k in _REQUIRED if k not in fields_)
    if unknown or missing:
        return f"not a valid ledger entry ({'unknown field(s) ' + ', '.join(map(repr, unknown)) if unknown else 'missing field(s) ' + ', '.join(map(repr, missing))})"
    for key, value in fields_.items():
        if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[key]):
            return f"not a valid ledger entry (field {key!r} is {value!r}, not of its type)"
        if isinstance(value, float) and not math.isfinite(value):
            return f"not a valid ledger entry (field {key!r} is {value!r}, not a finite number)"
        if isinstance(value, int) and abs(value) >= MAX_INT:
            return f"not a valid ledger entry (field {key!r} is an integer of {len(str(abs(value)))} digits, too large: at most 2**53)"
    if not 0 <= fields_.get("steps", 0) <= MAX_STEPS:
        return f"not a valid ledger entry (field 'steps' is {fields_['steps']!r}, not a step count from 0 to {MAX_STEPS})"
    try:
        when = dt.datetime.fromisoformat(fields_["time"])
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or when.utcoffset() is None:
        return f"not a valid ledger entry (field 'time' is {fields_['time']!r}, not an ISO 8601 time with a timezone)"
    if json.dumps(body, sort_keys=True, separators=(",", ":")) != text:
        return "the line is not the canonical form the site writes (key order, spacing, duplicate keys or line ends were changed): it was edited"
    return LedgerEntry(**fields_), body["hash"], body["signature"]


_REQUIRED = tuple(f.name for f in fields(LedgerEntry) if f.default is MISSING)


def read_entries(path: Path, public_key: Ed25519PublicKey | None = None) -> list[LedgerEntry]:
    """All complete entries; raise :class:`PolicyError` on any integrity problem."""
    entries, issues = parse(path, public_key)
    if issues:
        first = issues[0]
        raise PolicyError(f"Ledger {path} line {first.line}: {first.message}. The site refuses to train until a DPO has checked it (`fedrelapse audit verify`).")
    return entries


def head_hash(entries: list[LedgerEntry]) -> str:
    return entries[-1].hash if entries else GENESIS


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One writer at a time per ledger (advisory lock on a sidecar file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append(path: Path, entry: LedgerEntry, key: Ed25519PrivateKey) -> None:
    """Append one signed entry and fsync file and folder before returning. Call under :func:`locked`.

    A partial last line (a write that crashed) is cut off first, so it cannot glue itself to
    the new entry; its round never trained (the site trains only after the append returns), so
    nothing is under-counted. A complete last entry without its newline gets the newline
    instead: readers count it.
    """
    if path.exists() and path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":  # rare: only after a crash, so reading the file is fine
                data = path.read_bytes()
                if isinstance(_parse_line(data[data.rfind(b"\n") + 1 :]), tuple):
                    fh.write(b"\n")  # a complete entry that lost only its newline: it is counted, so it stays
                else:
                    fh.truncate(data.rfind(b"\n") + 1)
    append_durably(path, entry.to_line(key).encode("utf-8"))


def append_durably(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Append ``data`` to ``path`` (created with ``mode``, less the umask) and fsync the file and
    its folder: on disk when this returns, whatever crashes next."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    with os.fdopen(fd, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def current_caps(entries: list[LedgerEntry], *, cap_total: float, cap_run: float) -> tuple[float, float]:
    """Caps in force: the site.yaml values unless a later policy entry changed them."""
    for e in entries:
        if e.kind == "policy":
            cap_total = e.cap_total if e.cap_total is not None else cap_total
            cap_run = e.cap_run if e.cap_run is not None else cap_run
    return cap_total, cap_run
