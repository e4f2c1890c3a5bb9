"""The DPO's view of a site's privacy budget, and signed cap changes."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from client.site import ledger_path, ledger_public_key, new_ledger_key, site_key_paths
from shared import signing
from shared.config import SiteConfig
from shared.errors import PolicyError
from shared.privacy import ledger
from shared.privacy.accounting import epsilon


def budget_status(cfg: SiteConfig) -> dict[str, Any]:
    """Spent and remaining ε per run and overall, at the policy's δ, from the verified ledger."""
    path = ledger_path(cfg.state_dir)
    try:
        entries = ledger.read_entries(path, ledger_public_key(cfg.state_dir))
    except OSError as exc:
        raise PolicyError(_ledger_os_error(cfg, path, exc, "read")) from None
    delta = cfg.policy.delta
    charged = [e for e in entries if e.charged]  # training rounds and noised metric releases
    cap_total, cap_run = ledger.current_caps(entries, cap_total=cfg.policy.epsilon_cap_total, cap_run=cfg.policy.epsilon_cap_run)
    runs = []
    for run_id in dict.fromkeys(e.run_id for e in charged):
        mine = [e for e in charged if e.run_id == run_id]
        runs.append({
            "run_id": run_id, "rounds": sum(e.kind == "round" for e in mine), "releases": sum(e.kind == "release" for e in mine),
            "epsilon": epsilon([e.mechanism for e in mine], delta=delta, accountant=mine[-1].accountant),
        })
    spent = epsilon([e.mechanism for e in charged], delta=delta, accountant=charged[-1].accountant) if charged else 0.0  # the ledger's accountant, as per run
    return {
        "ledger": str(path), "entries": len(entries), "head": ledger.head_hash(entries), "delta": delta, "runs": runs,
        "epsilon_spent": spent, "cap_total": cap_total, "cap_run": cap_run, "epsilon_remaining": max(0.0, cap_total - spent),
    }


def change_caps(cfg: SiteConfig, *, cap_total: float | None, cap_run: float | None, note: str) -> None:
    """Append a signed policy entry that raises or lowers the caps from now on."""
    for name, value in (("total", cap_total), ("run", cap_run)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PolicyError(f"The {name} cap must be a positive, finite ε (e.g. 10), got {value}.")
    priv, _ = site_key_paths(cfg.state_dir)
    key = signing.load_private(priv) if priv.exists() else new_ledger_key(cfg.state_dir)
    path = ledger_path(cfg.state_dir)
    try:
        with ledger.locked(path):
            entries = ledger.read_entries(path, key.public_key())
            entry = ledger.LedgerEntry(
                kind="policy", site=cfg.name, dataset="", delta=cfg.policy.delta, cap_total=cap_total, cap_run=cap_run, note=note,
                time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), key_id=signing.fingerprint(key.public_key()),
                prev_hash=ledger.head_hash(entries),
            )
            ledger.append(path, entry, key)
    except OSError as exc:
        raise PolicyError(_ledger_os_error(cfg, path, exc, "written")) from None


def _ledger_os_error(cfg: SiteConfig, path: Path, exc: OSError, doing: str) -> str:
    """The sentence for a ledger this user cannot read or write (another user's file, a file in the way, a full disk)."""
    where = f" on {exc.filename}" if exc.filename and str(exc.filename) != str(path) else ""
    return (
        f"The ledger {path} cannot be {doing} ({exc.strerror or exc}{where}). Run `fedrelapse site budget` as the site's user, "
        f"who owns {cfg.state_dir}; {'nothing was changed' if doing == 'read' else 'the cap change was not recorded'}. "
        f"To read a copy elsewhere, use `fedrelapse audit verify`."
    )
