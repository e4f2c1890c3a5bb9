"""Message dispatch for Flower's Simulation Engine that is linear in the number of sites.

Flower 1.42's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) hands
messages to the site actors from a thread that, every 0.1 s, asks the in-memory LinkState
``get_message_ins(node_id, limit=1)`` once per node; each call walks every stored message
and re-validates it. A round's N messages stay stored (delivered) until their replies are
pulled, so each sweep costs N × N validations: 0.3 ms at 10 sites, 28 ms at 100 and 256 ms
at 300 on this project's 2-core bench machine, i.e. a quarter of a core at 100 sites and
more than a whole core at 300, taken (with the GIL) from the coordinator and the site
actors for the whole round. :func:`pending_messages` finds the same messages in one pass.

:func:`linear_dispatch` swaps it in for the duration of one simulation and restores Flower's
loop afterwards. It needs the in-memory LinkState internals of the pinned Flower
(``deploy/requirements.lock``); with any other LinkState, or a Flower whose internals
differ, Flower's own loop is kept and a warning says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message

log = logging.getLogger("fedrelapse.simulate")

DISPATCH_PERIOD_S = 0.1  # Flower's own period between sweeps
_STATE_INTERNALS = ("lock", "message_ins_store", "_check_stored_messages")


def supports_linear_dispatch(state: Any) -> bool:
    """Whether ``state`` is a LinkState whose internals :func:`pending_messages` relies on."""
    from flwr.server.superlink.linkstate import InMemoryLinkState

    return isinstance(state, InMemoryLinkState) and all(hasattr(state, name) for name in _STATE_INTERNALS)


def pending_messages(state: Any, nodes: Collection[int]) -> list[Message]:
    """Undelivered messages to ``nodes``, at most one per node, marked delivered.

    The same messages Flower's per-node ``get_message_ins(node_id, limit=1)`` sweep returns,
    found in one pass over the store: each stored message is looked at once, and only the
    chosen ones are validated by Flower's own check, which drops expired or out-of-federation
    messages (that node then gets its next message one period later; Flower's sweep would
    look further at once). Delivered messages are re-checked by the coordinator's pull.
    """
    from flwr.supercore.date import now

    with state.lock:
        chosen: dict[int, str] = {}  # node id -> message id, first undelivered in store order
        for msg_id, msg in list(state.message_ins_store.items()):
            meta = msg.metadata
            if meta.delivered_at == "" and meta.dst_node_id in nodes and meta.dst_node_id not in chosen:
                chosen[meta.dst_node_id] = msg_id
        if not chosen:
            return []
        state._check_stored_messages(set(chosen.values()))  # noqa: SLF001 - Flower's validation, not a copy of it
        out = [m for i in chosen.values() if (m := state.message_ins_store.get(i)) is not None]
        delivered_at = now().isoformat()
        for msg in out:
            msg.metadata.delivered_at = delivered_at
    return out


def add_messages_to_queue(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in for Flower's ``vce_api.add_messages_to_queue``: one pass per period, not one per node."""
    nodes = frozenset(nodes_mapping)
    while not f_stop.is_set():
        for msg in pending_messages(state, nodes):
            queue.put(msg)
        f_stop.wait(DISPATCH_PERIOD_S)


@contextmanager
def linear_dispatch() -> Iterator[bool]:
    """Use :func:`add_messages_to_queue` in Flower's simulation runtime inside this block.

    Yields whether it is in use. Flower's loop is restored on exit, whatever happens.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or not callable(original):
        log.warning("This Flower has no vce_api.add_messages_to_queue; its own message dispatch is kept (quadratic in the number of sites).")
        yield False
        return

    def dispatch(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        if supports_linear_dispatch(state):
            add_messages_to_queue(state, queue, nodes_mapping, f_stop)
        else:
            log.warning("The simulation's LinkState is a %s, not the in-memory one; Flower's own message dispatch is kept (quadratic in the number of sites).", type(state).__name__)
            original(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = dispatch
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
