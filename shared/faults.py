"""Injected faults for tests of crash, restart, stall and resume (Simulation Engine only).

A :class:`FaultPlan` is passed through the Python API (``server.simulate.simulate(...,
faults=...)``) into the ClientApp and ServerApp built for one simulation; no command-line
option, YAML key or environment variable can switch one on, so a deployed site or
coordinator never runs with faults. Every injected fault is logged as such.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("fedrelapse.faults")

SITE_FAULTS = ("crash", "crash-after-accounting", "stall")


class InjectedCrash(RuntimeError):
    """A crash a test asked for (site or coordinator); never raised outside a FaultPlan."""


@dataclass(frozen=True, kw_only=True)
class SiteFault:
    """One site misbehaving in one training round.

    kind: ``crash`` (the ClientApp dies before training: nothing is charged),
    ``crash-after-accounting`` (dies after the ledger entry was written and before the
    update is sent, then starts again with empty memory, as a restarted process would), or
    ``stall`` (trains, then holds its reply for ``stall_s`` seconds).
    """

    site: str
    round: int
    kind: str
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SITE_FAULTS:
            raise ValueError(f"Unknown site fault {self.kind!r}; choose one of {', '.join(SITE_FAULTS)}.")
        if self.round < 1:
            raise ValueError(f"A site fault needs a round >= 1, got {self.round}.")
        if self.kind == "stall" and self.stall_s <= 0:
            raise ValueError("A stall needs stall_s > 0 seconds.")


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """Faults to inject in one simulated run."""

    sites: tuple[SiteFault, ...] = ()
    coordinator_crash_after_round: int | None = None  # the ServerApp dies once this round is recorded

    def site_fault(self, site: str, server_round: int) -> SiteFault | None:
        return next((f for f in self.sites if f.site == site and f.round == server_round), None)

    def before_training(self, site: str, server_round: int) -> None:
        """Called by the ClientApp's train handler before the site trains."""
        fault = self.site_fault(site, server_round)
        if fault is not None and fault.kind == "crash":
            log.warning("injected fault: site %s crashes in round %d before training", site, server_round)
            raise InjectedCrash(f"injected fault: site {site} crashed in round {server_round}")

    def after_training(self, site: str, server_round: int) -> None:
        """Called by the ClientApp's train handler after training, before the reply is sent."""
        fault = self.site_fault(site, server_round)
        if fault is None:
            return
        if fault.kind == "crash-after-accounting":
            log.warning("injected fault: site %s crashes in round %d after accounting; it restarts empty", site, server_round)
            raise InjectedCrash(f"injected fault: site {site} crashed in round {server_round} after writing its ledger entry")
        if fault.kind == "stall":
            log.warning("injected fault: site %s holds its round-%d reply for %.0f s", site, server_round, fault.stall_s)
            time.sleep(fault.stall_s)

    def after_round(self, server_round: int) -> None:
        """Called by the round loop once a round is recorded in the run folder."""
        if self.coordinator_crash_after_round == server_round:
            log.warning("injected fault: the coordinator crashes after round %d", server_round)
            raise InjectedCrash(f"injected fault: the coordinator crashed after round {server_round}")
