"""Every writer that replaces a file does it through shared.atomic.write_atomically: a failed
write leaves the old file as it was and no temporary file; each keeps its file's permissions."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from shared.atomic import AS_OPEN, write_atomically


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _rename_fails(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def _write_json(path: Path) -> None:
    from server.run_folder import write_json

    write_json(path, {"round": 2})


def _sigma_cache(path: Path) -> None:
    from client.sigma_cache import _write

    _write(path, {"key": 1.5})


def _checkpoint(path: Path) -> None:
    from shared.params import save_checkpoint

    save_checkpoint(path, {"w": np.ones(3, np.float32)}, {"round": "2"})


def _evaluation_report(path: Path) -> None:
    from server.evaluate import write_report

    harness = SimpleNamespace(sites=[])
    write_report(path.parent, SimpleNamespace(name="e", federation=SimpleNamespace(rounds=1)), harness, [], quick=True, final=False)  # type: ignore[arg-type]


def _launcher(path: Path) -> None:
    from client.pinned_app import write_launcher

    write_launcher(path.parent)


WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {  # name: (the file it writes, how)
    "run folder json": ("metrics.json", _write_json),
    "sigma cache": ("sigma-cache.json", _sigma_cache),
    "checkpoint": ("round-002.safetensors", _checkpoint),
    "evaluation report": ("evaluation.json", _evaluation_report),
    "launcher": ("flwr-clientapp", _launcher),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """Before: run_folder.write_json, the σ cache, save_checkpoint, the evaluation report and the
    launcher left their temporary file behind when the write or the rename failed."""
    # Arrange: an old file, and a rename that fails (as after a full disk or a read-only remount)
    name, write = WRITERS[writer]
    path = tmp_path / name
    path.write_bytes(b"old contents")
    monkeypatch.setattr(os, "replace", _rename_fails)

    # Act
    with pytest.raises(OSError, match="cross-device"):
        write(path)

    # Assert
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert path.read_bytes() == b"old contents"


@pytest.mark.parametrize("bad", [float("nan"), object()], ids=["nan", "not-json"])
def test_run_folder_json_that_cannot_be_serialised_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, bad: object) -> None:
    """Before: json.dump raised halfway into the temporary file, which stayed behind."""
    from server.run_folder import write_json

    path = tmp_path / "metrics.json"
    write_json(path, [{"round": 1}])

    with pytest.raises((ValueError, TypeError)):
        write_json(path, [{"round": 1}, {"round": 2, "auroc": bad}])

    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert json.loads(path.read_text(encoding="utf-8")) == [{"round": 1}]


@pytest.mark.parametrize(("writer", "mode"), [
    ("run folder json", 0o600),  # as tempfile.mkstemp gave
    ("checkpoint", 0o600),  # as safetensors' save_file gave
    ("sigma cache", 0o666),  # as Path.write_text gave: less the umask
    ("evaluation report", 0o666),
    ("launcher", 0o755),  # set with chmod, whatever the umask
])
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_each_writer_keeps_its_files_permissions(tmp_path: Path, writer: str, mode: int, mask: int) -> None:
    name, write = WRITERS[writer]
    with umask(mask):
        write(tmp_path / name)
    expected = mode if writer == "launcher" else mode & ~mask
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_atomically_sets_the_mode_exactly_or_as_open_would(tmp_path: Path) -> None:
    with umask(0o077):
        write_atomically(tmp_path / "exact", lambda fh: fh.write(b"x"), mode=0o640)
        write_atomically(tmp_path / "private", lambda fh: fh.write(b"x"))
        write_atomically(tmp_path / "as-open", lambda fh: fh.write(b"x"), mode=AS_OPEN)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"exact": 0o640, "private": 0o600, "as-open": 0o600}
    with umask(0o022):
        write_atomically(tmp_path / "as-open", lambda fh: fh.write(b"y"), mode=AS_OPEN)
    assert stat.S_IMODE((tmp_path / "as-open").stat().st_mode) == 0o644


def test_write_atomically_names_its_temporary_file_with_the_prefix_and_cleans_up_on_failure(tmp_path: Path) -> None:
    seen: list[str] = []

    def fails(fh: object) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        raise ValueError("cannot serialise")

    (tmp_path / "page.html").write_bytes(b"old")
    with pytest.raises(ValueError, match="serialise"):
        write_atomically(tmp_path / "page.html", fails, prefix=".page.html.")

    assert len(seen) == 2 and any(n.startswith(".page.html.") and n.endswith(".tmp") for n in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"] and (tmp_path / "page.html").read_bytes() == b"old"


def test_write_atomically_needs_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "missing" / "f", lambda fh: fh.write(b"x"))
    assert not (tmp_path / "missing").exists()
