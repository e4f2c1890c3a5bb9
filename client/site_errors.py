"""What a site sends about its own failures: the exception's class and a reference, never its text.

An exception's message at a site can name a patient (``transcripts/PATX0005-SESSX0005-1.txt``),
a transcript or a path under the data root, and Flower forwards ``str(exception)`` of a
crashed ClientApp to the coordinator, which stores it in the run folder. So the site sends
only a patient-free sentence with the exception's class and a short reference.

The SuperNode's log is no place for that text either (docs/STYLE, "Logs": never a patient id,
a path under the data root, or a transcript; it ends up in journald, Docker logs, a log
collector). Under the reference the site logs :func:`loggable`: each exception's class and
where it was raised, our own errors' sentences with local paths withheld, an OSError's errno
and its words without the file name, and no other exception's text. The details that name a
file or a row are for the site's own CLI, which IT runs on purpose: `fedrelapse site check`.
Standard library only (and :mod:`shared.errors`): the site worker imports this before Flower.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import traceback
from pathlib import Path

from shared.errors import FedrelapseError

log = logging.getLogger("fedrelapse.site")

# An absolute POSIX path (at least two components), as it appears in an error message.
_ABS_PATH = re.compile(r"~/[^\s'\"`,;)]+|(?<![\w.~])(?<!<state_dir>)/(?:[^\s'\"`/]+/)+[^\s'\"`,;)]*")  # ~/... too; not after the <state_dir> placeholder
PATH_WITHHELD = "<local path withheld>"
STATE_DIR = "<state_dir>"  # the site's state folder in a log line: the file inside it is named, the folder is not
_TEXT_WITHHELD = "(its text is withheld: it may name a patient, a transcript or a file under the data root)"


def new_reference() -> str:
    """A short id that ties what the coordinator sees to the site's log line (8 hex digits)."""
    return secrets.token_hex(4)


def withheld(exc: BaseException, *, site: str, doing: str, state_dir: Path | None = None, data_root: Path | None = None) -> str:
    """Log ``exc`` here (:func:`loggable`) under a new reference and return the sentence the coordinator may see instead.

    ``site`` is the site's name (or "this site" when its site.yaml could not be read) and
    ``doing`` says what failed ("its ClientApp, handling a train message"); neither holds
    patient data. The returned text names the exception's class and the log reference only.
    ``state_dir`` and ``data_root`` (the manifest's folder), where known, are withheld whole
    from the log even where a space in them would end an ordinary path.
    """
    ref = new_reference()
    log.error("site=%s reference %s: %s failed (patient data and local paths withheld; `fedrelapse site check` shows data problems in full):\n%s",
              site, ref, doing, loggable(exc, state_dir=state_dir, data_root=data_root))
    return (
        f"Site {site}: {doing} failed with {type(exc).__name__}. The details stay at the site (they may name "
        f"patients or local files); its IT finds the error in the SuperNode log under reference {ref}."
    )


def without_paths(text: str) -> str:
    """``text`` with every absolute local path replaced by a placeholder (a last line of defence
    for refusal reasons: a sentence written for the researcher must not carry the site's paths)."""
    return _ABS_PATH.sub(PATH_WITHHELD, text)


def redacted(text: str, *, state_dir: Path | None = None, data_root: Path | None = None) -> str:
    """``text`` as a site may log it: the state folder shown as ``<state_dir>`` (a ledger file is
    still named by its place in it); the data folder, even with spaces in its name, and what
    follows it up to the next space, quote or comma, and every other absolute path, withheld.
    A file name with a space in it keeps its tail, and a relative path is not recognised: this
    is only for sentences our own code wrote (they name files, never a patient)."""
    for folder, keep_rest in ((state_dir, True), (data_root, False)):
        if folder is None:
            continue
        for spelling in sorted({str(folder), str(folder.absolute()), str(folder.resolve())}, key=len, reverse=True):
            if keep_rest:
                text = re.sub(re.escape(spelling) + r"(?=[/\s'\"`,;)]|$)", STATE_DIR, text)
            else:
                text = re.sub(re.escape(spelling) + r"(?:/[^\s'\"`,;)]*)?", PATH_WITHHELD, text)
    return without_paths(text)


OUR_SENTENCES = frozenset({"client.patient_layers.UnsupportedLayerError"})
"""Error classes of ours outside :class:`FedrelapseError` whose text is our own sentence naming a
setting, never data (AudioProblem is not one: it may quote a decoder's words)."""


def _message(exc: BaseException, state_dir: Path | None, data_root: Path | None) -> str:
    # our own sentence (FedrelapseError, or e.g. UnsupportedLayerError saying which setting to change: files and
    # lines, never a patient or a transcript), or an out-of-memory error (sizes, not data): what IT must know
    if isinstance(exc, (FedrelapseError, MemoryError)) or _qualified(exc) in OUR_SENTENCES or type(exc).__name__ == "OutOfMemoryError":
        return redacted(str(exc), state_dir=state_dir, data_root=data_root)
    if isinstance(exc, OSError) and exc.errno is not None:  # the error, without the file it names
        return f"[Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"
    if isinstance(exc, ImportError) and exc.name:  # a missing module names code, not data: what IT must install
        return f"no module named {exc.name!r}"
    if isinstance(exc, BaseExceptionGroup):  # which errors it holds (each member's text is withheld alike)
        return f"{len(exc.exceptions)} errors: {', '.join(_qualified(e) for e in exc.exceptions)}; {_TEXT_WITHHELD}"
    return _TEXT_WITHHELD


def loggable(exc: BaseException, *, state_dir: Path | None = None, data_root: Path | None = None) -> str:
    """``exc`` and its causes as a traceback that names no patient, transcript or local path.

    Each exception keeps its class and its frames (file, line and function of our and the
    libraries' code; not the source lines); its message is kept only for our own errors
    (:class:`FedrelapseError` and :data:`OUR_SENTENCES`) and out-of-memory errors, with paths
    withheld (:func:`redacted`); an OSError keeps its errno and words, an ImportError the
    module's name, an exception group its members' classes. Any other exception's text (a
    decoder naming the recording it was given, a KeyError holding a patient id) is withheld:
    it is for `fedrelapse site check` at the site."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    lines: list[str] = []
    following = ""
    for err, link in reversed(chain):  # the root cause first, as Python prints it
        if following:
            lines += ["", following, ""]
        frames = traceback.StackSummary.extract(traceback.walk_tb(err.__traceback__), lookup_lines=False)
        lines += ["Traceback (most recent call last):", *(f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames)] if frames else []
        lines.append(f"{_qualified(err)}: {_message(err, state_dir, data_root)}")
        following = link
    return "\n".join(lines)


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
