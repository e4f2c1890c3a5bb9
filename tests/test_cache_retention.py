"""Pruning the site's caches: what no current manifest row uses is removed (consent withdrawn)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from client.cache_retention import prune_caches
from client.features import FeatureCache
from client.language import MarkerCache
from client.prepare import prepare_site, voiced_seconds
from shared.config import FeatureConfig, LanguageConfig
from shared.markers import N_LANGUAGE
from tests.conftest import write_tone

COLS = ["patient_id", "session_id", "recorded_at", "audio_path", "transcript", "language", "label"]


def _manifest(folder: Path, n: int) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(COLS)
        for i in range(n):
            w.writerow([f"p{i}", f"s{i}", "2026-03-01T09:30", f"audio/r{i}.wav", f"Setning nummer {i}.", "nb", "0"])
    return path


def _site(folder: Path, n: int = 4) -> tuple[Path, Path]:
    (folder / "audio").mkdir()
    for i in range(n):
        write_tone(folder / "audio" / f"r{i}.wav", amp=0.1 + 0.05 * i)
    return _manifest(folder, n), folder / "state" / "features"


def _vector_entries(root: Path, prefix: str) -> set[str]:
    return {p.stem for p in root.glob(f"{prefix}-*/*/*.npy")}


def test_pruning_removes_the_features_markers_and_embeddings_of_sessions_no_longer_listed(tmp_path: Path) -> None:
    """Red team d16: after two sessions left the manifest (consent withdrawn) all four feature entries stayed."""
    manifest, root = _site(tmp_path)
    everyone = prepare_site(manifest, FeatureConfig(), root)
    for s in everyone.sessions:  # what the language and speech steps had cached for every session
        MarkerCache(root, "transformer:x", LanguageConfig()).put(MarkerCache.key(s.row.transcript or "", s.row.language, voiced_seconds(s.features)), np.zeros(N_LANGUAGE, np.float32))
        np.save(_entry(root / "speech-0123456789abcdef", s.audio_sha256), np.ones(8, np.float32))
    _manifest(tmp_path, 2)  # p2 and p3 withdrawn
    kept = prepare_site(manifest, FeatureConfig(), root)

    pruned = prune_caches(kept, FeatureConfig(), root)

    assert (pruned.feature_entries, pruned.language_marker_entries, pruned.speech_embeddings, pruned.settings_folders) == (2, 2, 2, 0)
    cache = FeatureCache(root, FeatureConfig())
    assert {p.stem for p in cache.dir.glob("*/*.npz")} == {s.audio_sha256 for s in kept.sessions}
    assert _vector_entries(root, "speech") == {s.audio_sha256 for s in kept.sessions}
    assert len(_vector_entries(root, "text")) == 2
    assert prepare_site(manifest, FeatureConfig(), root).cache_hits == 2  # what is still listed stays cached
    assert prune_caches(kept, FeatureConfig(), root).total == 0


def test_pruning_removes_the_folders_of_other_feature_settings_and_leaves_unknown_files(tmp_path: Path) -> None:
    """Red team d16: an n_mels change left a second settings tree with every recording's features."""
    manifest, root = _site(tmp_path, n=2)
    prepare_site(manifest, FeatureConfig(n_mels=40), root)
    data = prepare_site(manifest, FeatureConfig(), root)
    (root / "README.txt").write_text("not the cache's\n", encoding="utf-8")

    pruned = prune_caches(data, FeatureConfig(), root)

    assert (pruned.settings_folders, pruned.feature_entries) == (1, 2)
    assert sorted(p.name for p in root.iterdir()) == sorted([FeatureConfig().cache_key(), "README.txt"])


def _entry(folder: Path, key: str) -> Path:
    (folder / key[:2]).mkdir(parents=True, exist_ok=True)
    return folder / key[:2] / f"{key}.npy"


def test_pruning_removes_the_timelines_of_patients_no_longer_listed_and_leaves_other_files(tmp_path: Path) -> None:
    from client.timeline import timeline_name

    manifest, root = _site(tmp_path, n=3)
    data = prepare_site(manifest, FeatureConfig(), root)
    timelines = tmp_path / "state" / "timelines"
    timelines.mkdir()
    for pid in ("p0", "p1", "p2", "alpha.p7", "wi/th\u00e6"):  # p0..p2 listed; the others withdrawn
        for suffix in (".html", ".png"):
            (timelines / (timeline_name(pid) + suffix)).write_text("timeline")
    (timelines / "notes.txt").write_text("IT's own file")
    (timelines / ".hidden.html").write_text("not a timeline name")
    _manifest(tmp_path, 2)  # p2's consent withdrawn: the manifest lists p0 and p1 only
    kept = prepare_site(manifest, FeatureConfig(), root)
    assert len(data.sessions) == 3 and len(kept.sessions) == 2

    pruned = prune_caches(kept, FeatureConfig(), root, timelines=timelines)

    assert pruned.timeline_files == 6
    assert sorted(p.name for p in timelines.iterdir()) == [".hidden.html", "notes.txt", "p0.html", "p0.png", "p1.html", "p1.png"]
    assert prune_caches(kept, FeatureConfig(), root, timelines=timelines).timeline_files == 0


def test_pruning_removes_the_old_plain_name_timeline_of_an_upper_case_id_and_keeps_its_new_one(tmp_path: Path) -> None:
    """Older versions named P0001's timeline P0001.html; it is now P0001~<hash>.html (one file per
    patient where upper/lower case are not told apart), and --prune removes the old file."""
    from types import SimpleNamespace

    from client.cache_retention import _prune_timelines
    from client.timeline import timeline_name

    data = SimpleNamespace(sessions=[SimpleNamespace(row=SimpleNamespace(patient_id=pid)) for pid in ("P0001", "p0002")])
    for name in ("P0001", timeline_name("P0001"), "p0002"):
        (tmp_path / f"{name}.html").write_text("timeline")

    assert _prune_timelines(data, tmp_path) == 1  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{timeline_name('P0001')}.html", "p0002.html"])
