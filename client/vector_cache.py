"""A content-addressed store of one fixed-shape vector per key, at the site.

``<dir>/<key[:2]>/<key>.npy``. Writes are atomic (readers see the old file or the whole new
one); an unreadable entry, or one of the wrong shape, is a miss and is recomputed, never
trusted. Transcript markers and speech embeddings both live in one of these.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class VectorCache:
    def __init__(self, directory: Path, shape: tuple[int, ...], *, finite: bool = False) -> None:
        self.dir, self.shape, self.finite = directory, shape, finite  # finite: NaN/Inf entries are misses too

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            v = np.load(self._path(key))
        except (OSError, ValueError):
            return None
        if v.shape != self.shape or (self.finite and not np.isfinite(v).all()):
            return None
        return v

    def put(self, key: str, value: np.ndarray) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, value)
        os.replace(tmp, p)
