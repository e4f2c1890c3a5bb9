"""Wake-ups instead of fixed sleeps between the Simulation Engine's threads.

In simulation the coordinator (ServerApp thread), Flower's message dispatcher and its reply
injector share one in-memory LinkState. Two of them used to wait by sleeping: the dispatcher
looked for new messages every ``DISPATCH_PERIOD_S`` and the coordinator for replies every
``SIMULATION_POLL_S`` (0.02 s each), so every train or evaluate phase waited on average
10 ms before its first message reached an actor and 10 ms after its last reply was stored:
about 40 ms of a 3-site round's 110 ms overhead (quiet machine, BENCHMARKS.md).

:func:`state_signals` makes the state set an Event whenever a message for the sites or a
site's reply is stored; the two waiters wait on it, with their period kept as a backstop, so
a phase starts and ends as soon as there is something to do. Only the in-memory LinkState
of the pinned Flower (the one :mod:`server.sim_dispatch` supports) is given signals.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_ATTR = "_fedrelapse_signals"
_install_lock = threading.Lock()


@dataclass(frozen=True)
class StateSignals:
    """Events a LinkState sets after each store (waiters clear them before they look)."""

    messages: threading.Event  # a message for the sites was stored (the dispatcher waits on it)
    replies: threading.Event  # a site's reply was stored (the coordinator waits on it)


def _notifying(store: Callable[[Any], Any], event: threading.Event) -> Callable[[Any], Any]:
    @functools.wraps(store)
    def stored(message: Any) -> Any:
        try:
            return store(message)
        finally:  # also after a refused store: a waiter that looks finds nothing new, and waits again
            event.set()

    return stored


def state_signals(state: Any) -> StateSignals:
    """The signals of an in-memory LinkState, installed on first use (once per state, thread-safe).

    Wraps this instance's ``store_message_ins`` and ``store_message_res`` (the class and
    every other state are untouched); what they store and return is unchanged.
    """
    with _install_lock:
        signals = getattr(state, _ATTR, None)
        if signals is None:
            signals = StateSignals(messages=threading.Event(), replies=threading.Event())
            state.store_message_ins = _notifying(state.store_message_ins, signals.messages)
            state.store_message_res = _notifying(state.store_message_res, signals.replies)
            setattr(state, _ATTR, signals)
    return signals


def reply_signal(grid: Any) -> threading.Event | None:
    """The Event set when a reply reaches ``grid``'s LinkState, or None where the grid has no
    in-memory state (the Deployment Engine: replies are polled over the network)."""
    from server.sim_dispatch import supports_linear_dispatch

    state = getattr(grid, "state", None)
    return state_signals(state).replies if state is not None and supports_linear_dispatch(state) else None
