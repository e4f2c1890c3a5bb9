"""The site privacy ledger: append-only JSONL per dataset, hash-chained and Ed25519-signed.

One ``round`` entry per (run, round) records the mechanism applied to the dataset and ε after
it; ``policy`` entries record a DPO raising or lowering a cap. Each entry carries the SHA-256
of the previous one and the site key's signature over its own hash, so editing, deleting,
inserting or reordering entries is detected, and nobody without the site key can forge one.
A round's entry is written and fsync'd *before* the update leaves the site. A final line
without its newline is a write that crashed before completing: the update it describes never
left, so readers drop it (no under-count is possible).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import PolicyError
from shared.privacy.accounting import SubsampledGaussian
from shared.signing import sign, verify

GENESIS = "0" * 64
FORMAT_VERSION = 2
KINDS = ("round", "policy")


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
    wall_time_s: float = 0.0  # local training time of the round
    key_id: str = ""  # fingerprint of the signing key
    prev_hash: str

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
        return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


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
    against each entry's *stored* hash so one bad entry does not hide the next.
    """
    if not path.exists():
        return [], []
    entries: list[tuple[int, LedgerEntry]] = []
    issues: list[Issue] = []
    prev = GENESIS
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the tail after the last newline is an unfinished write
    for no, line in enumerate(lines, start=1):
        try:
            body = json.loads(line)
            stored, signature = body.pop("hash"), body.pop("signature")
            entry = LedgerEntry(**body)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            issues.append(Issue(no, f"not a valid ledger entry ({exc})"))
            continue
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
    the new entry; its update never left the site, so nothing is under-counted.
    """
    if path.exists() and path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":  # rare: only after a crash, so reading the file is fine
                data = path.read_bytes()
                fh.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(entry.to_line(key))
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
