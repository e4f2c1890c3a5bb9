"""Ctrl-C (SIGINT) and SIGTERM during `fedrelapse simulate` / `run --resume`: stop promptly, resumable.

Flower's Simulation Engine runs the coordinator (ServerApp) in a thread of its own while the
main thread serves the Ray actors. A KeyboardInterrupt in the main thread used to shut Ray
down under the coordinator, which then waited up to ``federation.round_timeout_s`` for
replies that could no longer come (and Python waits for that thread before it exits).

:func:`stop_on_signals` instead turns the signal into a stop request (a
:class:`threading.Event`); the coordinator's Grid (:class:`server.reply_poll.PromptGrid`)
looks at it while it waits for replies or for sites to connect and raises
:class:`StopRequested` there. The ServerApp thread ends, Flower stops its runtime and shuts
Ray down, and the caller reports :class:`RunInterrupted`. What the run folder holds is what a
coordinator crash leaves: one signed checkpoint and record per round finished, so
`fedrelapse run --resume RUN` continues it (a site that already accounted the round that was
cut off refuses it there as a replay and is not charged twice).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from shared.errors import FedrelapseError

EXIT_INTERRUPTED = 130  # the shell's convention for a command ended by SIGINT (128 + 2)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised in the coordinator's thread when a stop was requested (Ctrl-C or SIGTERM)."""


class RunInterrupted(FedrelapseError):
    """The run was stopped by Ctrl-C or SIGTERM; the run folder can be resumed."""

    exit_code = EXIT_INTERRUPTED


def check_stop(stop: threading.Event | None) -> None:
    """Raise :class:`StopRequested` when ``stop`` is set."""
    if stop is not None and stop.is_set():
        raise StopRequested("stop requested (Ctrl-C or SIGTERM)")


class Stopper:
    """The stop request of one run. ``deferred`` False (preparing the sites): a signal raises
    KeyboardInterrupt in the main thread at once, as Python's default does; True (the
    federation is running): it only sets :attr:`stop`, which the coordinator's Grid checks."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.deferred = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        already = self.stop.is_set()
        self.stop.set()
        # the Ray actors a terminal's Ctrl-C reaches too die with tracebacks that say nothing useful
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        if not self.deferred and not already:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def install(self) -> None:
        """Make SIGINT and SIGTERM call :meth:`handle` (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    @contextmanager
    def reclaimed_after_ray_init(self) -> Iterator[None]:
        """Install the handlers again right after ``ray.init``: the Ray driver replaces SIGTERM's
        with ``sys.exit(15)`` and its C++ core installs a failure handler that aborts the process
        (exit -6, stack dump) on SIGTERM. Flower's Ray backend calls ``ray.init`` in the main thread."""
        import ray

        original = ray.init

        @functools.wraps(original)
        def init(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                if threading.current_thread() is threading.main_thread():
                    self.install()

        ray.init = init
        try:
            yield
        finally:
            ray.init = original


@contextmanager
def stop_on_signals() -> Iterator[Stopper]:
    """While inside, SIGINT and SIGTERM go to a :class:`Stopper` (a second signal while a stop
    is under way is ignored, so shutting Ray down is not cut short). Outside the main thread
    no handler can be installed: the stopper is returned and only ``stop.set()`` stops the run."""
    stopper = Stopper()
    if threading.current_thread() is not threading.main_thread():
        yield stopper
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopper.install()
    try:
        yield stopper
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def last_recorded_round(out: Path) -> int:
    """The last round in ``out/metrics.json`` (0 when none was recorded or it cannot be read)."""
    try:
        rounds = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        return max((int(r["round"]) for r in rounds), default=0)
    except (OSError, ValueError, TypeError, KeyError):
        return 0


def interrupted(out: Path, *, folder_written: bool) -> RunInterrupted:
    """The one-sentence report of a run stopped by a signal."""
    if not folder_written:
        return RunInterrupted(f"Interrupted before the run started; nothing was written to {out}.")
    done = last_recorded_round(out)
    where = f"after round {done}" if done else "before round 1 finished"
    return RunInterrupted(f"Interrupted {where}; continue with `fedrelapse run --resume {out}`.")

