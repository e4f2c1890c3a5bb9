"""``flower-supernode`` with a bounded idle poll: Flower's own SuperNode, two waits shortened.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) asks the SuperLink for a
message and, when none is waiting, sleeps a fixed 3 s before asking again; once its ClientApp
runs, it looks for the reply in its own in-memory state every 0.5 s. A site that has just
answered therefore sees the coordinator's next message on average 1.5 s (up to 3 s) late, and
every reply leaves on average 0.25 s after it was ready; and when it pulls a message whose
objects the ServerApp is still pushing, it retries only after 1 s. On 127.0.0.1 with small
models that is most of a round (``fedrelapse bench deployment``, BENCHMARKS.md).

Run as ``python -P -m client.supernode_main --idle-poll-s S --idle-growth G <flower-supernode arguments>``.
Before it starts Flower's own entry point (``flwr.supernode.cli.flower_supernode``, the
``flower-supernode`` script, with the same arguments: TLS, node key and isolation flags are
Flower's), it replaces the ``time`` name inside that one module with :class:`BoundedTime`:

* the idle loop's first wait after a message is ``S`` seconds (``idle_poll_s`` in site.yaml);
  each further empty look waits ``G`` times longer (``idle_poll_growth``, default 1.25), up to
  Flower's 3 s, and the next message starts again at ``S``. Each look is one TLS request to the SuperLink
  (≈ 2–3 ms of its CPU, measured): a constant 0.25 s would cost a 100-site SuperLink about
  one core when idle, the growth keeps it near Flower's own rate (one look per 3 s per site)
  once a site has waited ≈ 13 s, while a message that follows soon after the last one is
  still seen within ``S`` + 25 % of the wait;
* the local waits (the SuperNode's look for its ClientApp's reply in its own memory) take
  at most ``LOCAL_WAIT_S``;

and it rebinds the module's ``pull_objects`` so that a missing object is asked for again
after 0.05 s, doubling from there as before (shared/flower_pulls.py), and its
``_pull_and_store_message`` so that a pulled message restarts the idle wait at ``S``. Nothing
else in Flower or in this process changes; no Flower file is edited.

Guard: the patch is applied only when the installed Flower still has that loop
(:func:`patch_reason`); otherwise this process warns and runs Flower's SuperNode unchanged,
exactly as the plain ``flower-supernode`` script would (slower, never wrong).

Imports only the standard library and shared/flower_pulls.py until it hands over to Flower:
keep it that way.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import time
from collections.abc import Callable
from types import ModuleType

from shared.flower_pulls import shorten_first_retry

FLOWER_MODULE = "flwr.supernode.start_client_internal"
IDLE_LOOP_FUNCTION = "start_client_internal"  # the function whose `time.sleep(3)` is the idle poll
PULL_FUNCTION = "_pull_and_store_message"  # returns a run id when it pulled a message, None when there was none
IDLE_GROWTH = 1.25  # default: each empty look waits this much longer than the last, up to Flower's 3 s (site.yaml idle_poll_growth)
GROWTH_RANGE = (1.0, 4.0)  # site.yaml's idle_poll_growth bounds
# The loop this module shortens, as Flower 1.42 writes it: no message pulled -> sleep 3 s.
_IDLE_LOOP = re.compile(r"if run_id is None:\s*(?:#[^\n]*\n\s*)*time\.sleep\(3\)")
LOCAL_WAIT_S = 0.02  # the SuperNode's waits for its own ClientApp's reply (in-memory looks, no network)
IDLE_POLL_RANGE_S = (0.05, 3.0)  # site.yaml's idle_poll_s bounds: ≤ 20 requests/s per site; 3 s is Flower's own
FLAG = "--idle-poll-s"
GROWTH_FLAG = "--idle-growth"


class BoundedTime:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep`` is bounded.

    ``sleep(s)`` called from :data:`IDLE_LOOP_FUNCTION` (the idle poll) waits ``idle_poll_s``
    after :meth:`message_pulled`, then ``growth`` times longer at each call, never more than
    ``s`` (Flower's 3 s); from anywhere else in that module (the waits for the local reply)
    ``min(s, local_wait_s)``. Every other attribute is the real ``time`` module's.
    """

    def __init__(
        self, *, idle_poll_s: float, local_wait_s: float = LOCAL_WAIT_S, growth: float = IDLE_GROWTH, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        low, high = IDLE_POLL_RANGE_S
        if not low <= idle_poll_s <= high:
            raise ValueError(f"The SuperNode idle poll must be between {low} and {high} seconds, got {idle_poll_s!r}; set idle_poll_s in site.yaml.")
        if not local_wait_s > 0:
            raise ValueError(f"The SuperNode's local wait must be positive seconds, got {local_wait_s!r}.")
        if not GROWTH_RANGE[0] <= growth <= GROWTH_RANGE[1]:
            raise ValueError(f"The idle poll's growth per empty look must be between {GROWTH_RANGE[0]:g} and {GROWTH_RANGE[1]:g}, got {growth!r}; set idle_poll_growth in site.yaml.")
        self.idle_poll_s, self.local_wait_s, self.growth, self._sleep = idle_poll_s, local_wait_s, growth, sleep
        self.next_idle_s = idle_poll_s  # the idle loop's next wait

    def message_pulled(self) -> None:
        """A message arrived: the next one may follow soon, so look promptly again."""
        self.next_idle_s = self.idle_poll_s

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1).f_code.co_name  # noqa: SLF001 - which of Flower's loops is waiting
        if caller == IDLE_LOOP_FUNCTION:
            wait = min(seconds, self.next_idle_s)
            self.next_idle_s = min(seconds, self.next_idle_s * self.growth)
        else:
            wait = min(seconds, self.local_wait_s)
        self._sleep(wait)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def patch_reason(module: ModuleType) -> str | None:
    """Why :func:`patch` cannot bound ``module``'s waits, or None when it can."""
    if getattr(module, "time", None) is not time:
        return f"{module.__name__} has no `time` module name to replace"
    func = getattr(module, IDLE_LOOP_FUNCTION, None)
    if not callable(func):
        return f"{module.__name__} has no {IDLE_LOOP_FUNCTION}()"
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError) as exc:
        return f"the source of {module.__name__}.{IDLE_LOOP_FUNCTION}() cannot be read ({exc})"
    if not _IDLE_LOOP.search(source):
        return f"{module.__name__}.{IDLE_LOOP_FUNCTION}() no longer has the `if run_id is None: time.sleep(3)` idle loop"
    if not callable(getattr(module, PULL_FUNCTION, None)) or f"run_id = {PULL_FUNCTION}(" not in source:
        return f"{module.__name__}.{IDLE_LOOP_FUNCTION}() no longer pulls with {PULL_FUNCTION}()"
    return None


def _restarting(pull: Callable[..., int | None], shim: BoundedTime) -> Callable[..., int | None]:
    """``pull`` (Flower's ``_pull_and_store_message``) that restarts the idle wait when it got a message."""
    @functools.wraps(pull)
    def pull_and_store_message(*args: object, **kwargs: object) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            shim.message_pulled()
        return run_id

    return pull_and_store_message


def patch(module: ModuleType, *, idle_poll_s: float, growth: float = IDLE_GROWTH) -> str | None:
    """Bound ``module``'s waits (see :class:`BoundedTime`); returns None, or why it was left as is."""
    shim = BoundedTime(idle_poll_s=idle_poll_s, growth=growth)  # a bad value is an error even where the patch cannot apply
    reason = patch_reason(module)
    if reason is None:
        module.time = shim  # type: ignore[attr-defined]
        setattr(module, PULL_FUNCTION, _restarting(getattr(module, PULL_FUNCTION), shim))
    return reason


def split_argv(argv: list[str]) -> tuple[float, float, list[str]]:
    """``(idle_poll_s, growth, the flower-supernode arguments)`` from this module's command line
    (``--idle-poll-s S`` first, then optionally ``--idle-growth G``, then Flower's arguments)."""
    if len(argv) < 2 or argv[0] != FLAG:
        raise SystemExit(f"usage: python -m client.supernode_main {FLAG} SECONDS [{GROWTH_FLAG} FACTOR] <flower-supernode arguments>")
    values, rest = {FLAG: argv[1], GROWTH_FLAG: str(IDLE_GROWTH)}, argv[2:]
    if len(rest) >= 2 and rest[0] == GROWTH_FLAG:
        values[GROWTH_FLAG], rest = rest[1], rest[2:]
    try:
        return float(values[FLAG]), float(values[GROWTH_FLAG]), rest
    except ValueError:
        raise SystemExit(f"{FLAG} and {GROWTH_FLAG} must be numbers, got {values[FLAG]!r} and {values[GROWTH_FLAG]!r}.") from None


def run(argv: list[str], *, module: ModuleType | None = None, entry: Callable[[], None] | None = None) -> None:
    """Bound the SuperNode's waits (or warn why not), then run Flower's SuperNode on ``argv``."""
    idle_poll_s, growth, rest = split_argv(argv)
    target = module if module is not None else importlib.import_module(FLOWER_MODULE)
    try:
        reason = patch(target, idle_poll_s=idle_poll_s, growth=growth)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if reason is None:
        print(f"fedrelapse: SuperNode idle poll every {idle_poll_s:g} s after a message, {growth:g}x longer per empty look up to Flower's 3 s; "
              f"local reply checks every {LOCAL_WAIT_S:g} s.", file=sys.stderr, flush=True)
        pulls = shorten_first_retry(target, "pull_objects")
        if pulls is not None:
            print(f"fedrelapse: WARNING: {pulls}; a message may wait 1 s for its objects (Flower's own first retry).", file=sys.stderr, flush=True)
    else:
        version = getattr(sys.modules.get("flwr"), "__version__", "unknown")
        print(f"fedrelapse: WARNING: cannot bound the SuperNode idle poll: {reason} (Flower {version}); running Flower's SuperNode unchanged "
              f"(it asks for messages every 3 s, so rounds are slower). Pin the Flower version in deploy/requirements.lock or update client/supernode_main.py.",
              file=sys.stderr, flush=True)
    if entry is None:
        from flwr.supernode.cli import flower_supernode

        entry = flower_supernode
    sys.argv = ["flower-supernode", *rest]
    entry()


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
