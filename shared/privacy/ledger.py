"""The site privacy ledger: append-only JSONL, one entry per (run, round), hash-chained.

Each entry records the mechanism a round applied to one dataset and ε after it; each entry
carries the SHA-256 of the previous one, so editing, deleting, inserting or reordering
entries breaks the chain. The entry is written and fsync'd *before* the update leaves the
site. A final line without its newline is a write that crashed before completing: the update
it describes never left, so readers drop it (no under-count is possible).
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

from shared.errors import PolicyError
from shared.privacy.accounting import SubsampledGaussian

GENESIS = "0" * 64
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LedgerEntry:
    """One accounted round. Plain, immutable and serialisable."""

    version: int
    site: str
    dataset: str  # dataset fingerprint (manifest + audio hashes)
    run_id: str
    round: int
    plan_hash: str
    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    epsilon_run: float  # ε of this run on this dataset after the entry
    epsilon_total: float  # ε of every run on this dataset after the entry
    time: str  # ISO 8601, UTC
    prev_hash: str

    @property
    def mechanism(self) -> SubsampledGaussian:
        return SubsampledGaussian(self.noise_multiplier, self.sample_rate, self.steps)

    def to_line(self) -> str:
        body = asdict(self)
        body["hash"] = entry_hash(body)
        return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


def entry_hash(body: dict[str, object]) -> str:
    """SHA-256 of the canonical JSON of an entry without its own ``hash`` field."""
    clean = {k: v for k, v in body.items() if k != "hash"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_entries(path: Path) -> list[LedgerEntry]:
    """All complete entries, in order; raise :class:`PolicyError` if the chain is broken."""
    if not path.exists():
        return []
    entries: list[LedgerEntry] = []
    prev = GENESIS
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline is an unfinished write (or "")
    for no, line in enumerate(complete, start=1):
        try:
            body = json.loads(line)
            stored = body.pop("hash")
            entry = LedgerEntry(**body)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PolicyError(f"Ledger {path} line {no} is not a valid entry ({exc}); the ledger may have been edited.") from exc
        if entry_hash(asdict(entry)) != stored:
            raise PolicyError(f"Ledger {path} line {no}: the entry's hash does not match its content; it was altered.")
        if entry.prev_hash != prev:
            raise PolicyError(f"Ledger {path} line {no}: the hash chain is broken (an entry was removed, inserted or reordered).")
        prev = stored
        entries.append(entry)
    return entries


def head_hash(entries: list[LedgerEntry]) -> str:
    return entry_hash(asdict(entries[-1])) if entries else GENESIS


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


def append(path: Path, entry: LedgerEntry) -> None:
    """Append one entry and fsync file and folder before returning. Call under :func:`locked`."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(entry.to_line())
        fh.flush()
        os.fsync(fh.fileno())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
