"""Turn a site's manifest into checked, feature-extracted sessions (the site data report).

Every row is validated and every recording decoded; bad recordings are reported with their
manifest line and skipped. Features go through the content-addressed cache.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from client.audio import AudioProblem, decode
from client.features import FeatureCache, RecordingFeatures, extract
from client.language import language_markers
from client.manifest import Manifest, Problem, SessionRow, label_balance, read_manifest
from client.speech import SAMPLE_RATE, speech_embeddings
from shared.config import FeatureConfig, LanguageConfig, SpeechConfig
from shared.errors import DataError
from shared.markers import ACOUSTIC_MARKERS, N_LANGUAGE


@dataclass(frozen=True)
class PreparedSession:
    row: SessionRow
    features: RecordingFeatures
    audio_sha256: str
    original_rate: int
    text_markers: np.ndarray = field(default_factory=lambda: np.full(N_LANGUAGE, np.nan, np.float32))  # (N_LANGUAGE,), NaN if no transcript
    speech_embedding: np.ndarray | None = None  # (speech.embedding_dim,) from the frozen speech encoder, None when it is off

    @property
    def markers(self) -> np.ndarray:
        """Acoustic then language markers, (N_SESSION,) float32 (see shared.markers)."""
        return np.concatenate([self.features.markers, self.text_markers]).astype(np.float32)


@dataclass
class SiteData:
    """Usable sessions of one site plus everything the data report shows."""

    manifest: Manifest
    sessions: list[PreparedSession] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    cache_hits: int = 0
    text_cache_hits: int = 0
    speech_cache_hits: int = 0

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the dataset for the privacy ledger: manifest bytes + audio hashes + transcript hashes.

        Computed once, after preparation, so every round's ledger entry names the data that
        was actually loaded (not a manifest edited on disk since) without re-reading it."""
        h = hashlib.sha256(self.manifest.path.read_bytes())
        for s in sorted(self.sessions, key=lambda s: s.row.session_id):
            h.update(s.audio_sha256.encode())
            if s.row.transcript is not None:  # a transcript file redacted with the manifest unchanged is other data
                h.update(hashlib.sha256(s.row.transcript.encode()).hexdigest().encode())
        return h.hexdigest()

    def report(self) -> dict[str, object]:
        """Aggregate counts for `site check` (never leaves the site as such)."""
        rows = [s.row for s in self.sessions]
        return {
            "manifest": str(self.manifest.path),
            "rows": self.manifest.total_rows,
            "usable_sessions": len(self.sessions),
            "skipped_rows": self.manifest.total_rows - len(self.sessions),
            "patients": len({r.patient_id for r in rows}),
            "hours_of_audio": round(sum(s.features.seconds for s in self.sessions) / 3600, 3),
            "sample_rates": dict(sorted(Counter(s.original_rate for s in self.sessions).items())),
            "languages": dict(sorted(Counter(r.language for r in rows).items())),
            "labels": dict(sorted(label_balance(rows).items())),
            "errors": sum(p.severity == "error" for p in self.problems),
            "warnings": sum(p.severity == "warning" for p in self.problems),
            "notes": sum(p.severity == "info" for p in self.problems),
            "cache_hits": self.cache_hits,
            "sessions_with_language_markers": sum(bool(np.isfinite(s.text_markers).any()) for s in self.sessions),
            "sessions_with_speech_embeddings": sum(s.speech_embedding is not None for s in self.sessions),
        }


def prepare_site(
    manifest_path: Path,
    cfg: FeatureConfig,
    cache_root: Path,
    *,
    language: LanguageConfig | None = None,
    speech: SpeechConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SiteData:
    """Validate the manifest, decode each recording and extract (or load) its features;
    with ``language``, add each session's transcript markers (batched, cached); with an enabled
    ``speech``, each recording's frozen-encoder embedding (cached; decoded again only on a miss)."""
    manifest = read_manifest(manifest_path)
    data = SiteData(manifest=manifest, problems=list(manifest.problems))
    cache = _feature_cache(cache_root, cfg)
    total = len(manifest.rows)
    digests: dict[int, str] = {}  # manifest line -> SHA-256 of its recording's bytes
    for i, row in enumerate(manifest.rows):
        session = _prepare_recording(row, cfg, cache, cache_root, data, digests)
        if session is not None:
            data.sessions.append(session)
        if progress:
            progress(i + 1, total)
    _one_recording_one_session(manifest.rows, digests, data)
    with _state_folder(cache_root, every_error=False):  # language and speech caches live there too
        if language is not None and data.sessions:
            add_language_markers(data, language, cache_root)
        if speech is not None and speech.enabled and data.sessions:
            add_speech_embeddings(data, speech, cache_root, min_seconds=cfg.min_seconds)
    data.problems.sort(key=lambda p: (p.line or 0, p.field))
    return data


def _prepare_recording(row: SessionRow, cfg: FeatureConfig, cache: FeatureCache, cache_root: Path, data: SiteData, digests: dict[int, str]) -> PreparedSession | None:
    """One row's features (from the cache, or decoded and cached), or None with its problem in
    ``data``; the recording's hash goes into ``digests`` (by line) even when it cannot be used.

    Only reading the recording is blamed on the row; a failure to write the cache is the state
    folder's and raises :class:`DataError` (see :func:`_state_folder`)."""
    try:
        digest = digests[row.line] = FeatureCache.audio_hash(row.audio_path)
        feats = cache.get(digest)
        cached = feats is not None
        if feats is None:
            feats = extract(decode(row.audio_path, target_rate=cfg.sample_rate, min_seconds=cfg.min_seconds), cfg)
    except AudioProblem as exc:
        data.problems.append(Problem(row.line, "audio_path", f"{row.audio_path.name} {exc}; row skipped"))
        return None
    except OSError as exc:
        data.problems.append(Problem(row.line, "audio_path", f"{row.audio_path.name} cannot be read ({exc.strerror}); row skipped"))
        return None
    if cached:
        data.cache_hits += 1
    else:
        with _state_folder(cache_root, every_error=True):
            cache.put(digest, feats)
    for severity, note in feats.notes:
        data.problems.append(Problem(row.line, "audio_path", note, severity))
    return PreparedSession(row, feats, digest, feats.original_rate)


def _one_recording_one_session(rows: list[SessionRow], digests: dict[int, str], data: SiteData) -> None:
    """Skip, with an error naming both lines, a row whose recording (same bytes) an earlier row
    already lists. Under another patient_id the two ids may be one person, who would then be two
    privacy units (twice the sensitivity the guarantee assumes), so every session of both ids is
    skipped until the manifest gives the recording one patient. The manifest's text cannot show
    this; the recordings' hashes, computed here for the feature cache, can."""
    first: dict[str, SessionRow] = {}
    skipped: dict[int, Problem] = {}
    shared: list[tuple[SessionRow, SessionRow]] = []
    for row in rows:
        digest = digests.get(row.line)
        earlier = first.setdefault(digest, row) if digest is not None else row
        if earlier is row:
            continue
        if earlier.patient_id == row.patient_id:
            skipped[row.line] = Problem(row.line, "audio_path", (
                f"is the same recording (identical content) as line {earlier.line} (session {earlier.session_id!r});"
                " one recording is one session, so this row is skipped: list it once"
            ))
        else:
            shared.append((earlier, row))
    for a, b in shared:
        for this, other in ((a, b), (b, a)):
            skipped[this.line] = Problem(this.line, "audio_path", (
                f"is the same recording (identical content) as line {other.line}, which lists it under patient {other.patient_id!r};"
                f" if {this.patient_id!r} and {other.patient_id!r} are one person, they would count as two patients in the privacy"
                " guarantee, so every session of both is skipped: list each recording under the one patient_id of its speaker"
            ))
        for r in rows:
            if r.patient_id in (a.patient_id, b.patient_id) and r.line not in skipped:
                other_id = b.patient_id if r.patient_id == a.patient_id else a.patient_id
                skipped[r.line] = Problem(r.line, "patient_id", (
                    f"patient {r.patient_id!r} shares a recording with patient {other_id!r} (lines {a.line} and {b.line});"
                    " every session of both is skipped until each recording is listed under one patient_id"
                ))
    data.problems.extend(skipped.values())
    data.sessions = [s for s in data.sessions if s.row.line not in skipped]


def _feature_cache(cache_root: Path, cfg: FeatureConfig) -> FeatureCache:
    """The feature cache, once its folder exists and takes a file (so a bad state folder fails
    before any recording is decoded, and is never blamed on one)."""
    cache = FeatureCache(cache_root, cfg)
    with _state_folder(cache_root, every_error=True):
        cache.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache.dir):
            pass
    return cache


_FULL, _DENIED = {errno.ENOSPC, errno.EDQUOT}, {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def _state_folder(cache_root: Path, *, every_error: bool) -> Iterator[None]:
    """Turn an OSError of the caches under ``cache_root`` into one DataError about the state folder.

    With ``every_error`` false only errors that name a file under ``cache_root`` or say the disk
    is full count as the state folder's; others (a missing model file, say) pass through."""
    try:
        yield
    except OSError as exc:
        if every_error or exc.errno in _FULL or _is_under(exc.filename, cache_root):
            raise _state_folder_error(cache_root, exc) from None
        raise


def _state_folder_error(cache_root: Path, exc: OSError) -> DataError:
    """One sentence about the state folder; it names no recording (it may reach the coordinator)."""
    blocker = _file_in_the_way(cache_root)
    if blocker is not None:
        why = f"{blocker} is a file, not a folder"
    elif exc.errno in _FULL:
        why = "the disk is full"
    elif exc.errno in _DENIED:
        why = f"this user may not write there: {exc.strerror}"
    else:
        why = exc.strerror or str(exc)
    return DataError(
        f"The site's state folder cannot hold the feature cache {cache_root} ({why}). This is not a problem"
        " of the recordings: point state_dir in site.yaml (or --state-dir of `fedrelapse site check`) at a"
        " writable folder with free space, or fix this one, then try again."
    )


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists but is not a folder, if any."""
    return next((p for p in [*reversed(path.parents), path] if p.exists() and not p.is_dir()), None)


def _is_under(filename: object, folder: Path) -> bool:
    if not isinstance(filename, str | os.PathLike):
        return False
    return Path(filename).resolve().is_relative_to(folder.resolve())


_DURATION, _SPEECH_RATIO = ACOUSTIC_MARKERS.index("duration_s"), ACOUSTIC_MARKERS.index("speech_ratio")


def voiced_seconds(features: RecordingFeatures) -> float:
    """Voiced time of a recording: the language markers' rate denominator, and part of their cache key."""
    return float(features.markers[_DURATION] * features.markers[_SPEECH_RATIO])


def add_language_markers(data: SiteData, cfg: LanguageConfig, cache_root: Path) -> None:
    """Fill each session's ``text_markers`` from its transcript (NaN where there is none)."""
    voiced = [voiced_seconds(s.features) for s in data.sessions]
    values, hits = language_markers([s.row.transcript for s in data.sessions], [s.row.language for s in data.sessions], voiced, cfg, cache_root=cache_root)
    data.sessions = [replace(s, text_markers=v) for s, v in zip(data.sessions, values, strict=True)]
    data.text_cache_hits = hits



def add_speech_embeddings(data: SiteData, cfg: SpeechConfig, cache_root: Path, *, min_seconds: float) -> None:
    """Fill each session's ``speech_embedding`` from the frozen speech encoder (16 kHz audio)."""
    rows = [s.row for s in data.sessions]
    values, hits = speech_embeddings(
        [s.audio_sha256 for s in data.sessions],
        lambda i: decode(rows[i].audio_path, target_rate=SAMPLE_RATE, min_seconds=min_seconds, max_seconds=cfg.max_seconds).samples,  # the encoder crops to max_seconds
        cfg,
        cache_root=cache_root,
    )
    data.sessions = [replace(s, speech_embedding=v) for s, v in zip(data.sessions, values, strict=True)]
    data.speech_cache_hits = hits
