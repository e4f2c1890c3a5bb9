"""Atomic file writes, for the site and the coordinator alike.

:func:`write_atomically` writes a temporary file in the target's folder and renames it over the
target (``os.replace``): a reader sees the old file or the whole new one, never half of one. A
write that fails (a full disk, a value that cannot be serialised) removes its temporary file
and leaves the old file as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PRIVATE = 0o600  # the owner's only: what tempfile.mkstemp gives, and the default here
AS_OPEN = None  # as open() creates a file: 0o666 less the umask


def write_atomically(path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False, mode: int | None = PRIVATE, prefix: str = "tmp") -> None:
    """Write ``path`` through a temporary file in its folder and ``os.replace``; ``write(fh)``
    fills it. On any failure (a full disk, an exception in ``write``) the temporary file is
    removed, ``path`` is left as it was and the error is raised.

    ``durable``: the file and its folder are also fsynced, so the new file is on disk when this
    returns (a crash leaves the old file or the new one, never an empty one). ``mode``: the new
    file's permission bits, exactly, whatever the umask (default 0o600); :data:`AS_OPEN` (None):
    0o666 less the umask, as ``open()`` or ``Path.write_text`` would create it. The temporary
    file is ``<folder>/<prefix><random>.tmp`` and has those bits before anything is written to it
    (a ``prefix`` starting with ``.`` hides it from a plain ``ls``). The folder must exist.
    """
    fd, tmp = _create_temp(path.parent, prefix, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _create_temp(folder: Path, prefix: str, mode: int) -> tuple[int, Path]:
    """A new file ``<folder>/<prefix><random>.tmp`` opened for writing, created with ``mode`` less
    the umask (as :func:`tempfile.mkstemp` does with 0o600, which takes no mode)."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode), tmp
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
    raise FileExistsError(f"No free temporary file name in {folder} after 100 tries.")
