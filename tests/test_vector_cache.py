"""The site's vector caches (language markers, speech embeddings): atomic writes, no leftovers."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest

from client.vector_cache import VectorCache


def test_a_write_that_fails_halfway_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team 17: put() had no cleanup, unlike FeatureCache.put, so a full disk left *.tmp files."""

    def disk_fills(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = VectorCache(tmp_path / "text-0", (3,))
    monkeypatch.setattr("client.vector_cache.np.save", disk_fills)

    with pytest.raises(OSError, match="No space"):
        cache.put("ab" * 32, np.zeros(3, np.float32))

    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def _temp(folder: Path, name: str, age_s: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"half an entry")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_temporary_files_of_a_killed_writer_are_swept_when_the_cache_opens_but_fresh_ones_are_kept(tmp_path: Path) -> None:
    stale = _temp(tmp_path / "text-0" / "ab", "tmpkilled.tmp", age_s=3600)
    fresh = _temp(tmp_path / "text-0" / "ab", "tmpwriting.tmp", age_s=1)  # another process writing now
    entry = _temp(tmp_path / "text-0" / "ab", "ab" * 32 + ".npy", age_s=3600)

    VectorCache(tmp_path / "text-0", (3,))

    assert (stale.exists(), fresh.exists(), entry.exists()) == (False, True, True)


def test_an_entry_that_is_not_a_numpy_file_is_a_miss(tmp_path: Path) -> None:
    cache = VectorCache(tmp_path / "speech-0", (3,), finite=True)
    key = "cd" * 32
    cache.put(key, np.ones(3, np.float32))
    path = tmp_path / "speech-0" / "cd" / f"{key}.npy"
    path.write_bytes(path.read_bytes()[:20])

    assert cache.get(key) is None
