"""Message dispatch for Flower's Simulation Engine that is linear in the number of sites.

Flower 1.42's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) hands
messages to the site actors from a thread that, every 0.1 s, asks the in-memory LinkState
``get_message_ins(node_id, limit=1)`` once per node; each call walks every stored message
and re-validates it. A round's N messages stay stored (delivered) until their replies are
pulled, so each sweep costs N × N validations: 0.3 ms at 10 sites, 28 ms at 100 and 256 ms
at 300 on this project's 2-core bench machine, i.e. a quarter of a core at 100 sites and
three quarters at 300, taken (with the GIL) from the coordinator and the site actors for
the whole round. :func:`pending_messages` finds the same messages in one pass.

:func:`linear_dispatch` swaps it in for the duration of one simulation and restores Flower's
loop afterwards. Being one cheap pass, it also sweeps 5× as often (every 0.02 s), and it wakes
as soon as the coordinator stores a message (:mod:`server.sim_wake`), so a message no longer
waits for the next sweep (Flower's: 50 ms on average; 3 simulated sites, quiet machine: round
wall ÷ Σ site compute 1.15-1.18× at 0.02 s vs 1.21-1.39× at 0.1 s, interleaved). It needs the in-memory LinkState internals of the pinned Flower
(``deploy/requirements.lock``); with any other LinkState, or a Flower whose internals
differ, Flower's own loop is kept and a warning says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message

from server.sim_wake import state_signals

log = logging.getLogger("fedrelapse.simulate")

DISPATCH_PERIOD_S = 0.02  # Flower's own period between sweeps is 0.1 s
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
    """Drop-in for Flower's ``vce_api.add_messages_to_queue``: one pass per wake-up, not one per node.

    It wakes as soon as the coordinator stores a message (:mod:`server.sim_wake`), and at the
    latest every ``DISPATCH_PERIOD_S`` (messages a pass left for later, and the stop flag).
    """
    nodes = frozenset(nodes_mapping)
    stored = state_signals(state).messages
    while not f_stop.is_set():
        stored.clear()  # before the pass: a message stored during it wakes the next wait at once
        for msg in pending_messages(state, nodes):
            queue.put(msg)
        stored.wait(DISPATCH_PERIOD_S)


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


# --- measuring it (benchmarks and tests) -----------------------------------------------------


def simulation_link(n_sites: int) -> tuple[Any, dict[int, int]]:
    """The coordinator's Grid over an in-memory LinkState as the Simulation Engine builds them,
    with ``n_sites`` registered; returns (grid, node id -> partition id). ``grid.state`` is the
    LinkState the dispatcher reads."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    run_id, task_id = 7, 9
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID  # as run_simulation sets them
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)  # FLWR_IN_MEMORY_DB_NAME: its run and task tables are set directly below
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id, run.federation_id = task_id, NOOP_FEDERATION_ID
    state.run_ids[run_id] = RunRecord(run=run)
    state.task_store[task_id] = Task(task_id=task_id, run_id=run_id)
    mapping = vce_api._register_nodes(n_sites, factory)  # noqa: SLF001 - how the Simulation Engine registers its sites
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, mapping


def round_messages(mapping: dict[int, int], *, messages_per_site: int = 1, ttl: float | None = None) -> list[Message]:
    """One round's messages to every node of ``mapping`` (content ``c.k`` = message number)."""
    from flwr.app import ConfigRecord, MessageType, RecordDict

    return [
        Message(content=RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=node, message_type=MessageType.TRAIN, ttl=ttl)
        for k in range(messages_per_site) for node in mapping
    ]


def in_flight_state(n_sites: int, *, messages_per_site: int = 1, ttl: float | None = None) -> tuple[Any, dict[int, int]]:
    """An in-memory LinkState as the Simulation Engine builds it, with ``n_sites`` registered
    and one round's messages pushed to them; returns (state, node id -> partition id)."""
    grid, mapping = simulation_link(n_sites)
    list(grid.push_messages(round_messages(mapping, messages_per_site=messages_per_site, ttl=ttl)))
    return grid.state, mapping


def sweep_cost_ms(n_sites: int, *, repeats: int = 10) -> dict[str, float]:
    """CPU milliseconds of one dispatch sweep while a round of ``n_sites`` messages is in
    flight (all delivered, no reply pulled yet: what the dispatcher sees for the whole round),
    for Flower's per-node sweep and for :func:`pending_messages`. Flower sweeps every 0.1 s."""
    state, mapping = in_flight_state(n_sites)
    nodes = frozenset(mapping)
    pending_messages(state, nodes)  # deliver the round
    out: dict[str, float] = {}
    for name, sweep in (("flower", lambda: [state.get_message_ins(node_id=n, limit=1) for n in mapping]), ("linear", lambda: pending_messages(state, nodes))):
        started = time.process_time()
        for _ in range(repeats):
            sweep()
        out[name] = round((time.process_time() - started) / repeats * 1e3, 3)
    return out
