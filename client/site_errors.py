"""What a site sends about its own failures: the exception's class and a reference, never its text.

An exception's message at a site can name a patient (``transcripts/PATX0005-SESSX0005-1.txt``),
a transcript or a path under the data root, and Flower forwards ``str(exception)`` of a
crashed ClientApp to the coordinator, which stores it in the run folder. So the site logs
the full error locally under a short reference and sends only a patient-free sentence with
the exception's class and that reference; the site's IT finds the details in the SuperNode
log by the reference. Standard library only: the site worker imports this before Flower.
"""

from __future__ import annotations

import logging
import re
import secrets

log = logging.getLogger("fedrelapse.site")

# An absolute POSIX path (at least two components), as it appears in an error message.
_ABS_PATH = re.compile(r"~/[^\s'\"`,;)]+|(?<![\w.~])/(?:[^\s'\"`/]+/)+[^\s'\"`,;)]*")  # ~/... too
PATH_WITHHELD = "<local path withheld>"


def new_reference() -> str:
    """A short id that ties what the coordinator sees to the site's log line (8 hex digits)."""
    return secrets.token_hex(4)


def withheld(exc: BaseException, *, site: str, doing: str) -> str:
    """Log ``exc`` in full here and return the sentence the coordinator may see instead.

    ``site`` is the site's name (or "this site" when its site.yaml could not be read) and
    ``doing`` says what failed ("its ClientApp, handling a train message"); neither holds
    patient data. The returned text names the exception's class and the log reference only.
    """
    ref = new_reference()
    log.error("site=%s reference %s: %s failed; this full error stays at the site", site, ref, doing, exc_info=exc)
    return (
        f"Site {site}: {doing} failed with {type(exc).__name__}. The details stay at the site (they may name "
        f"patients or local files); its IT finds them in the SuperNode log under reference {ref}."
    )


def without_paths(text: str) -> str:
    """``text`` with every absolute local path replaced by a placeholder (a last line of defence
    for refusal reasons: a sentence written for the researcher must not carry the site's paths)."""
    return _ABS_PATH.sub(PATH_WITHHELD, text)
