"""The coordinator's wait for the sites' replies, polling the SuperLink every ``poll_s`` seconds.

Flower 1.42's Deployment-Engine Grid (``flwr.superlink.grid.http_grid``) sleeps 3 s between
two looks for replies, so every train or evaluate phase ends on average 1.5 s (up to 3 s)
after the last site answered: on 127.0.0.1 with small models that is most of a round
(``fedrelapse bench deployment``). :class:`PromptGrid` wraps any Grid and replaces only
``send_and_receive`` with the same push-then-pull loop at ``federation.reply_poll_s``; a
look is one small local RPC. Everything else is the wrapped Grid's own.

In the Simulation Engine the replies land in an in-memory LinkState in this very process;
given that state's ``wake`` Event (:func:`server.sim_wake.reply_signal`), the wait ends as
soon as a reply is stored instead of at the next poll (``poll_s`` stays as the backstop).

A reply is visible at the SuperLink before the SuperNode has pushed all its objects; the Grid
then retries the missing ones only after 1 s. :func:`prompt_reply_pulls` makes that first
retry 0.05 s (shared/flower_pulls.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from server.interrupt import check_stop
from shared.flower_pulls import shorten_first_retry


def prompt_reply_pulls() -> str | None:
    """The Deployment Engine Grid retries a reply's missing objects after 0.05 s, not 1 s;
    returns None, or why Flower's Grid was left as is."""
    from flwr.superlink.grid import http_grid

    return shorten_first_retry(http_grid, "pull_objects")


class PromptGrid:
    """A Grid whose ``send_and_receive`` looks for replies every ``poll_s`` seconds, and
    whenever ``wake`` is set (by the in-memory LinkState when a reply is stored). When ``stop``
    is set (Ctrl-C or SIGTERM, :mod:`server.interrupt`), a wait for replies or for sites ends
    within ``poll_s`` with :class:`server.interrupt.StopRequested`."""

    def __init__(self, grid: Grid, *, poll_s: float, wake: threading.Event | None = None, stop: threading.Event | None = None) -> None:
        if not poll_s > 0:
            raise ValueError(f"The reply poll interval must be positive seconds, got {poll_s!r}; set federation.reply_poll_s.")
        # Without a LinkState's signal, an Event nobody sets: waiting on it is a plain pause of poll_s.
        self._grid, self.poll_s, self._wake = grid, poll_s, wake if wake is not None else threading.Event()
        self._stop = stop
        self.looks = 0  # pulls made (tests)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped Grid's connected nodes (the wait for sites asks every 0.5 s: a stop is seen there)."""
        check_stop(self._stop)
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull until each has a reply or ``timeout`` seconds passed (None: no limit)."""
        check_stop(self._stop)
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            check_stop(self._stop)
            self._wake.clear()  # before the look: a reply stored during it ends the next wait at once
            self.looks += 1
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._wake.wait(self.poll_s if left is None else min(self.poll_s, left))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
