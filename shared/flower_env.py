"""Flower's usage telemetry, off in every Flower process fedrelapse starts.

Flower 1.42 posts an event to https://telemetry.flower.ai whenever a SuperLink, SuperNode,
ClientApp or simulation starts or stops (``flwr.supercore.telemetry``) unless
``FLWR_TELEMETRY_ENABLED=0``, which it reads once, when that module is first imported. A site
connects to nobody but its coordinator (docs/runbook-hospital-it.md, "Outbound traffic"), so
every environment fedrelapse gives a Flower process sets it, whatever the caller's says.
"""

from __future__ import annotations

import os
import sys

TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


def without_flower_telemetry(env: dict[str, str]) -> dict[str, str]:
    """``env`` with Flower's telemetry off, for a Flower process started with it."""
    return {**env, TELEMETRY_ENV: "0"}


def disable_flower_telemetry_here() -> None:
    """Flower's telemetry off in this process (in-process simulation) and in the processes it starts
    (Ray workers); also when ``flwr.supercore.telemetry`` was already imported with it on."""
    os.environ[TELEMETRY_ENV] = "0"
    loaded = sys.modules.get("flwr.supercore.telemetry")
    if loaded is not None:
        loaded.FLWR_TELEMETRY_ENABLED = "0"  # type: ignore[attr-defined]  # read at each event()
