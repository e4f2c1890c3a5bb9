"""The Simulation Engine's message dispatch: same messages as Flower's sweep, linear cost."""

from __future__ import annotations

import threading
import time
from queue import Queue
from typing import cast
from uuid import uuid4

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState

from server import sim_dispatch
from server.reply_poll import PromptGrid
from server.sim_dispatch import (
    in_flight_state,
    linear_dispatch,
    pending_messages,
    round_messages,
    simulation_link,
    supports_linear_dispatch,
    sweep_cost_ms,
)
from server.sim_wake import reply_signal, state_signals


class CountingStore(dict):
    """The LinkState's message store, counting full passes over it."""

    passes = 0

    def keys(self):  # Flower's get_message_ins walks list(store.keys())
        CountingStore.passes += 1
        return super().keys()

    def items(self):
        CountingStore.passes += 1
        return super().items()


def delivered(msgs: list[Message]) -> set[tuple[int, int]]:
    return {(m.metadata.dst_node_id, cast(int, m.content.config_records["c"]["k"])) for m in msgs}


def flowers_sweep(state: LinkState, mapping: dict[int, int]) -> list[Message]:
    return [m for node in mapping for m in state.get_message_ins(node_id=node, limit=1)]


def test_one_pass_delivers_what_flowers_per_node_sweep_delivers() -> None:
    ours, mapping = in_flight_state(12, messages_per_site=2)
    theirs, their_mapping = in_flight_state(12, messages_per_site=2)
    index = {node: i for i, node in enumerate(mapping)}
    their_index = {node: i for i, node in enumerate(their_mapping)}

    for _ in range(3):  # first messages, second messages, then nothing is left
        got = {(index[n], k) for n, k in delivered(pending_messages(ours, frozenset(mapping)))}
        expected = {(their_index[n], k) for n, k in delivered(flowers_sweep(theirs, their_mapping))}
        assert got == expected
    assert got == set()


def test_delivered_messages_are_marked_and_never_handed_out_twice() -> None:
    state, mapping = in_flight_state(5)

    first = pending_messages(state, frozenset(mapping))

    assert len(first) == 5 and all(m.metadata.delivered_at for m in first)
    assert pending_messages(state, frozenset(mapping)) == []
    assert state.get_message_ins(node_id=next(iter(mapping)), limit=1) == []  # Flower agrees


def test_only_messages_to_the_given_nodes_are_delivered() -> None:
    state, mapping = in_flight_state(6)
    some = frozenset(list(mapping)[:2])

    assert {m.metadata.dst_node_id for m in pending_messages(state, some)} == set(some)


def test_an_expired_message_is_dropped_not_delivered() -> None:
    state, mapping = in_flight_state(3, ttl=0.05)
    time.sleep(0.1)

    assert pending_messages(state, frozenset(mapping)) == []
    assert state.message_ins_store == {}


@pytest.mark.parametrize("n_nodes", [10, 100])
def test_a_dispatch_pass_walks_the_store_once_whatever_the_number_of_sites(n_nodes: int) -> None:
    # Arrange: a round in flight (every message delivered, replies not yet pulled), as the
    # dispatcher sees it for the whole duration of the sites' training.
    state, mapping = in_flight_state(n_nodes)
    pending_messages(state, frozenset(mapping))
    state.message_ins_store = CountingStore(state.message_ins_store)
    checked: list[int] = []
    original_check = state._check_stored_messages  # noqa: SLF001

    def counting_check(ids: set[str], run_id: int | None = None) -> None:
        checked.append(len(ids))
        original_check(ids, run_id)

    state._check_stored_messages = counting_check  # noqa: SLF001

    CountingStore.passes = 0
    pending_messages(state, frozenset(mapping))
    ours = (CountingStore.passes, sum(checked))
    CountingStore.passes, checked[:] = 0, []
    flowers_sweep(state, mapping)
    theirs = (CountingStore.passes, sum(checked))

    assert ours == (1, 0)  # one pass; nothing pending, so nothing to validate
    assert theirs == (n_nodes, n_nodes * n_nodes)  # Flower: a pass and N validations per node


def test_linear_dispatch_is_installed_for_the_pinned_flower_and_restored_after() -> None:
    original = vce_api.add_messages_to_queue
    state, _ = in_flight_state(2)
    assert supports_linear_dispatch(state)

    with linear_dispatch() as installed:
        assert installed and vce_api.add_messages_to_queue is not original

    assert vce_api.add_messages_to_queue is original


def test_the_installed_loop_feeds_the_queue_until_stopped() -> None:
    state, mapping = in_flight_state(4)
    queue: Queue[Message] = Queue()
    stop = threading.Event()

    with linear_dispatch():
        worker = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue, mapping, stop))
        worker.start()
        deadline = time.monotonic() + 5
        while queue.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        worker.join(timeout=5)

    assert not worker.is_alive()
    assert {queue.get().metadata.dst_node_id for _ in range(4)} == set(mapping)


def test_another_linkstate_keeps_flowers_own_loop() -> None:
    class OtherState:
        """A LinkState that is not the in-memory one (e.g. SQL): only its public API is used."""

        def __init__(self, stop: threading.Event) -> None:
            self.asked: list[int] = []
            self.stop = stop

        def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
            self.asked.append(node_id)
            self.stop.set()  # one sweep is enough to see whose loop ran
            return []

    stop = threading.Event()
    other = OtherState(stop)
    assert not supports_linear_dispatch(other)

    with linear_dispatch():
        vce_api.add_messages_to_queue(other, Queue(), {11: 0, 12: 1}, stop)  # type: ignore[arg-type]  # a stand-in with only the public API

    assert other.asked == [11, 12]  # Flower's per-node calls, through the public API


def test_the_sweep_benchmark_reports_both_loops() -> None:
    cost = sweep_cost_ms(20, repeats=2)

    assert set(cost) == {"flower", "linear"} and all(v >= 0 for v in cost.values())


# --- wake-ups (server.sim_wake): a stored message or reply is acted on at once ----------------


def test_a_message_stored_while_the_dispatcher_waits_reaches_the_queue_before_the_next_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: a sweep period far longer than the test may take, so only the wake-up can deliver.
    monkeypatch.setattr(sim_dispatch, "DISPATCH_PERIOD_S", 60.0)
    grid, mapping = simulation_link(3)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    loop = threading.Thread(target=sim_dispatch.add_messages_to_queue, args=(grid.state, queue, mapping, stop), daemon=True)
    loop.start()
    time.sleep(0.2)  # the loop has made its first (empty) pass and waits

    # Act
    started = time.monotonic()
    list(grid.push_messages(round_messages(mapping)))
    got = [queue.get(timeout=10) for _ in mapping]
    took = time.monotonic() - started
    stop.set()
    state_signals(grid.state).messages.set()  # end the wait now rather than in 60 s
    loop.join(timeout=10)

    # Assert
    assert {m.metadata.dst_node_id for m in got} == set(mapping)
    assert took < 10 and not loop.is_alive()


def test_signals_are_installed_once_per_state_and_leave_what_is_stored_unchanged() -> None:
    grid, mapping = simulation_link(2)
    signals = state_signals(grid.state)

    ids = list(grid.push_messages(round_messages(mapping)))

    assert state_signals(grid.state) is signals
    assert signals.messages.is_set() and not signals.replies.is_set()
    assert len(ids) == 2 and set(ids) == set(grid.state.message_ins_store)
    assert state_signals(simulation_link(2)[0].state) is not signals  # another simulation, other events


def test_the_coordinator_wakes_when_a_reply_is_stored_not_at_its_next_poll() -> None:
    # Arrange: a coordinator that would otherwise look again only after 60 s, and a site
    # thread that answers every message it is handed 0.1 s later, as the reply injector does.
    grid, mapping = simulation_link(3)
    prompt = PromptGrid(grid, poll_s=60.0, wake=reply_signal(grid))

    def site() -> None:
        deadline = time.monotonic() + 10
        answered = 0
        while answered < len(mapping) and time.monotonic() < deadline:
            for msg in pending_messages(grid.state, frozenset(mapping)):
                time.sleep(0.1)
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's simulation worker does
                assert grid.state.store_message_res(reply)
                answered += 1
            time.sleep(0.01)

    worker = threading.Thread(target=site, daemon=True)
    worker.start()

    # Act
    started = time.monotonic()
    replies = list(prompt.send_and_receive(round_messages(mapping), timeout=30))
    took = time.monotonic() - started
    worker.join(timeout=10)

    # Assert: every reply, long before the 60-s poll, and a look per wake-up rather than a busy loop
    assert {r.metadata.src_node_id for r in replies} == set(mapping)
    assert took < 10
    assert prompt.looks <= 2 * len(mapping) + 1


def test_a_grid_without_an_in_memory_state_gets_no_reply_signal() -> None:
    class NetworkGrid:  # the Deployment Engine's grid: replies come over the network
        pass

    grid, _ = simulation_link(1)

    assert reply_signal(NetworkGrid()) is None
    assert reply_signal(grid) is state_signals(grid.state).replies
