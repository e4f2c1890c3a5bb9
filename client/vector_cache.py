"""A content-addressed store of one fixed-shape vector per key, at the site.

``<dir>/<key[:2]>/<key>.npy``. Writes are atomic (readers see the old file or the whole new
one); an unreadable entry, or one of the wrong shape, is a miss and is recomputed, never
trusted. Transcript markers and speech embeddings both live in one of these. A write that
fails removes its temporary file; one left by a process killed mid-write is swept away the
next time a cache of that folder opens (:func:`sweep_stale_temps`). Writes go through
:func:`shared.atomic.write_atomically`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from shared.atomic import write_atomically

STALE_TEMP_S = 600.0  # a temporary file this old is a dead writer's: a write takes milliseconds


def sweep_stale_temps(directory: Path, *, older_than_s: float = STALE_TEMP_S) -> int:
    """Remove the ``<directory>/<xx>/*.tmp`` files last written over ``older_than_s`` ago, left
    by a process killed between creating and renaming one; return how many. A younger one may be
    another process's write in progress, so it stays. Nothing here is worth failing for: a file
    that cannot be removed is left for the next sweep."""
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        subfolders = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:  # no cache yet, or not readable: whoever writes to it will say so
        return 0
    for sub in subfolders:
        try:
            temps = [e for e in os.scandir(sub) if e.name.endswith(".tmp") and e.is_file(follow_symlinks=False)]
        except OSError:
            continue
        for entry in temps:
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
    return removed


class VectorCache:
    def __init__(self, directory: Path, shape: tuple[int, ...], *, finite: bool = False) -> None:
        self.dir, self.shape, self.finite = directory, shape, finite  # finite: NaN/Inf entries are misses too
        sweep_stale_temps(directory)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            v = np.load(self._path(key))
        except Exception:  # noqa: BLE001 - missing, truncated, not an .npy: a miss, recomputed and replaced
            return None
        if not isinstance(v, np.ndarray) or v.shape != self.shape or (self.finite and not np.isfinite(v).all()):
            return None
        return v

    def put(self, key: str, value: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda fh: np.save(fh, value))
