"""Flower's object pulls with a short first retry, for the three pulls that race a push.

In Flower 1.42 a message becomes visible before its objects (the model's arrays) have all
arrived: the SuperNode starts the ClientApp task before it has pulled the message's objects
from the SuperLink, the SuperNode may see an instruction while the ServerApp is still pushing
its objects, and the ServerApp may see a reply while the SuperNode is still pushing it. Each
puller (``flwr.supercore.inflatable.inflatable_utils.pull_objects``) then waits
``PULL_INITIAL_BACKOFF`` = 1 s (±20 %) before it asks again, doubling up to 10 s, even when the
object arrives a few milliseconds later: with a site worker that starts a task in ~0.1 s this
added ≈1 s to most messages (``fedrelapse bench deployment``, BENCHMARKS.md).

:func:`shorten_first_retry` rebinds the pull function's name inside one calling module (the
SuperNode loop, the ClientApp runtime, the ServerApp's Grid) to the same function with a first
retry after ``initial_backoff_s``. Over the network (SuperNode <-> SuperLink) the retries still
double up to Flower's 10-s cap with Flower's limits on tries (500) and total time (2 h), so a
slow link costs at most a few more small requests than before. The ClientApp's pull from its
own SuperNode (127.0.0.1) also caps the retry at ``LOCAL_RETRY_CAP_S``, so it sees the objects
within 0.1 s of their arrival however long the SuperNode's own download takes; it then has no
limit on tries (500 short tries would end Flower's patience after 50 s), only Flower's 2 h.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType

FIRST_RETRY_S = 0.05  # the first retry of an object pull; Flower's: 1 s. Retries double from here.
LOCAL_RETRY_CAP_S = 0.1  # the longest retry of a pull from this host's own SuperNode; Flower's: 10 s
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")  # Flower's pullers that take initial_backoff


def shorten_first_retry(module: ModuleType, name: str, *, initial_backoff_s: float = FIRST_RETRY_S, backoff_cap_s: float | None = None) -> str | None:
    """Make ``module.<name>`` retry a missing object first after ``initial_backoff_s`` and, with
    ``backoff_cap_s`` (local pulls only), never wait longer than that between tries.

    Returns None, or why ``module`` was left as is (no such function, or it lacks one of the
    arguments used: a Flower whose pulls changed). Calling it twice does not stack.
    """
    if not initial_backoff_s > 0:
        raise ValueError(f"The first retry of an object pull must be positive seconds, got {initial_backoff_s!r}.")
    if backoff_cap_s is not None and not backoff_cap_s >= initial_backoff_s:
        raise ValueError(f"The longest retry of an object pull ({backoff_cap_s!r} s) must be at least its first ({initial_backoff_s!r} s).")
    if name not in PULL_FUNCTIONS:
        raise ValueError(f"{name!r} is not one of Flower's object pullers ({', '.join(PULL_FUNCTIONS)}).")
    func = getattr(module, name, None)
    original: Callable[..., object] | None = getattr(func, "fedrelapse_original", func)
    if not callable(original):
        return f"{module.__name__} has no {name}()"
    try:
        params = inspect.signature(original).parameters
    except (TypeError, ValueError) as exc:
        return f"the signature of {module.__name__}.{name}() cannot be read ({exc})"
    settings: dict[str, float | None] = {"initial_backoff": initial_backoff_s}
    if backoff_cap_s is not None:
        settings.update(backoff_cap=backoff_cap_s, max_tries_per_object=None)  # None: only Flower's max_time bounds the wait
    missing = [arg for arg in settings if arg not in params]
    if missing:
        return f"{module.__name__}.{name}() takes no {', '.join(missing)}"
    bounded = functools.partial(original, **settings)
    bounded.fedrelapse_original = original  # type: ignore[attr-defined]
    setattr(module, name, bounded)
    return None
