"""Remove from the site's caches what no current manifest row uses (``site check --prune``).

The caches under ``<state_dir>/features`` are content-addressed and never shrink on their own:
a patient removed from the manifest (consent withdrawn) keeps their features, language markers
and speech embeddings there, and a change of feature settings leaves a whole tree of every
recording's features behind. Pruning keeps exactly what the checked data uses:

- ``<settings hash>/``: this plan's features, kept for the recordings of usable sessions; the
  folders of other feature settings are removed whole (rebuilt from the audio if used again);
- ``text-<hash>/``: language markers, kept for the transcripts of usable sessions;
- ``speech-<hash>/``: speech embeddings, kept for the recordings of usable sessions;
- ``<state_dir>/timelines/``: clinician timelines (``site timeline``), kept for patients with a
  usable session (a file whose name is no patient's timeline name is left alone).

Files and folders of any other name are left alone. What it returns are counts only: never a
key, a path or an id.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from client.features import FeatureCache
from client.language import MarkerCache
from client.prepare import SiteData, voiced_seconds
from shared.config import FeatureConfig
from shared.errors import DataError

_SETTINGS = re.compile(r"[0-9a-f]{16}")  # FeatureConfig.cache_key()
_TEXT, _SPEECH = re.compile(r"text-[0-9a-f]{16}"), re.compile(r"speech-[0-9a-f]{16}")


@dataclass(frozen=True)
class Pruned:
    """What one prune removed, as counts (printed by ``site check --prune``)."""

    feature_entries: int  # recordings' features, in this plan's settings folder
    settings_folders: int  # folders of other feature settings, removed whole
    language_marker_entries: int
    speech_embeddings: int
    timeline_files: int = 0  # a patient's .html and .png under <state_dir>/timelines

    @property
    def total(self) -> int:
        return self.feature_entries + self.settings_folders + self.language_marker_entries + self.speech_embeddings + self.timeline_files


def prune_caches(data: SiteData, cfg: FeatureConfig, cache_root: Path, *, timelines: Path | None = None) -> Pruned:
    """Remove every cache entry under ``cache_root`` that no usable session of ``data`` (checked
    with feature settings ``cfg``) uses, and from ``timelines`` (the site's timeline folder) the
    timelines of patients without one; return how many of each kind were removed."""
    try:
        pruned = _prune(data, cfg, cache_root)
        return replace(pruned, timeline_files=_prune_timelines(data, timelines)) if timelines is not None else pruned
    except OSError as exc:
        raise DataError(
            f"Pruning the feature cache {cache_root} stopped: {exc.strerror or exc}. Some entries may be left; let the user that runs"
            " fedrelapse write to the state folder (or delete the folder named), then run `fedrelapse site check --prune` again."
        ) from None


def _prune(data: SiteData, cfg: FeatureConfig, cache_root: Path) -> Pruned:
    audio = {s.audio_sha256 for s in data.sessions}
    text = {MarkerCache.key(s.row.transcript, s.row.language, voiced_seconds(s.features)) for s in data.sessions if s.row.transcript}
    current = FeatureCache(cache_root, cfg).dir.name
    features = folders = markers = embeddings = 0
    for folder in _folders(cache_root):
        if folder.name == current:
            features += _prune_entries(folder, ".npz", audio)
        elif _SETTINGS.fullmatch(folder.name):
            features += sum(1 for _ in folder.glob("*/*.npz"))
            shutil.rmtree(folder)
            folders += 1
        elif _TEXT.fullmatch(folder.name):
            markers += _prune_entries(folder, ".npy", text)
        elif _SPEECH.fullmatch(folder.name):
            embeddings += _prune_entries(folder, ".npy", audio)
    return Pruned(features, folders, markers, embeddings)


def _prune_timelines(data: SiteData, folder: Path) -> int:
    """Remove ``<folder>/<name>.html|.png`` whose ``name`` is a timeline name (as ``site timeline``
    writes them) of no patient with a usable session; other files stay."""
    from client.timeline import timeline_name

    if not folder.is_dir():
        return 0
    keep = {timeline_name(s.row.patient_id) for s in data.sessions}
    removed = 0
    for entry in sorted(folder.iterdir()):
        if entry.suffix in (".html", ".png") and entry.is_file() and not entry.is_symlink() and entry.stem not in keep and _is_timeline_name(entry.stem):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _is_timeline_name(stem: str) -> bool:
    """Whether ``stem`` is a name :func:`client.timeline.timeline_name` gives some patient id."""
    return bool(stem) and re.fullmatch(r"(?:[^\W]|[-_.]|%[0-9A-F]{2})+(?:~[0-9a-f]{16})?", stem) is not None and not stem.startswith(".")


def _folders(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())


def _prune_entries(folder: Path, suffix: str, keep: set[str]) -> int:
    """Remove ``<folder>/<xx>/<key><suffix>`` for keys not in ``keep``, then the emptied ``<xx>`` folders."""
    removed = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        for entry in sub.glob(f"*{suffix}"):
            if entry.stem not in keep:
                entry.unlink(missing_ok=True)
                removed += 1
        if not any(sub.iterdir()):
            with contextlib.suppress(OSError):  # another process just wrote into it
                sub.rmdir()
    return removed
