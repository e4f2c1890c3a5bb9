"""Per-recording features: a normalised log-mel image and prosodic markers.

Extraction runs once per recording; results live in a content-addressed cache at the site
(key = SHA-256 of the audio bytes + hash of the feature config), so rounds, runs and
re-checks never redo it. Features never leave the site.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.transforms as T  # noqa: N812

from client.audio import AudioProblem, Decoded
from client.vector_cache import sweep_stale_temps
from shared.atomic import write_atomically
from shared.config import FeatureConfig
from shared.markers import N_ACOUSTIC


@dataclass(frozen=True)
class RecordingFeatures:
    mel: np.ndarray  # (n_mels, n_frames) float16, per-band mean removed, fixed n_frames
    markers: np.ndarray  # (N_ACOUSTIC,) float32, see shared.markers.ACOUSTIC_MARKERS
    seconds: float
    original_rate: int = 0
    notes: tuple[tuple[str, str], ...] = ()  # decoder notes, replayed on cache hits


def n_frames(cfg: FeatureConfig) -> int:
    """Frames of the fixed-length log-mel input."""
    return int(round(cfg.max_seconds * 1000 / cfg.hop_ms))


def extract(decoded: Decoded, cfg: FeatureConfig) -> RecordingFeatures:
    """Compute the log-mel image and the acoustic markers of one decoded recording."""
    sr = decoded.sample_rate
    x = torch.from_numpy(decoded.samples)  # (n,)
    win = int(sr * cfg.win_ms / 1000)
    hop = int(sr * cfg.hop_ms / 1000)
    with torch.no_grad():
        mel = _mel_transform(sr, win, hop, cfg.n_mels)(x)  # (n_mels, frames)
    logmel = torch.log(mel + 1e-6)  # (n_mels, frames)
    logmel = logmel - logmel.mean(dim=1, keepdim=True)  # cepstral-mean style channel normalisation
    fixed = torch.zeros(cfg.n_mels, n_frames(cfg))
    k = min(fixed.shape[1], logmel.shape[1])
    fixed[:, :k] = logmel[:, :k] / 4.0
    mel_image, markers = fixed.numpy().astype(np.float16), prosodic_markers(x, sr, cfg)
    if not (np.isfinite(mel_image).all() and np.isfinite(markers).all()):  # never cached, never trained on
        raise AudioProblem("gives non-finite features (NaN or infinite values: extreme sample values overflowed); copy it again from its source, or re-export it as 16-bit WAV or FLAC")
    return RecordingFeatures(mel_image, markers, decoded.seconds, decoded.original_rate, decoded.notes)


def prosodic_markers(x: torch.Tensor, sr: int, cfg: FeatureConfig) -> np.ndarray:
    """Pause, rate, pitch and energy markers from an energy VAD and an NCCF pitch track."""
    hop = int(sr * cfg.hop_ms / 1000)
    frames = x[: (x.shape[0] // hop) * hop].reshape(-1, hop)  # (F, hop)
    energy = 10 * torch.log10(frames.pow(2).mean(dim=1) + 1e-10).numpy()  # (F,) dB
    floor, top = np.percentile(energy, 10), np.percentile(energy, 97)
    voiced = energy > floor + 0.35 * (top - floor)  # (F,) bool
    voiced = _close_gaps(voiced, max_gap=max(1, int(cfg.min_pause_ms / cfg.hop_ms) - 1))
    idx = np.flatnonzero(voiced)
    out = np.zeros(N_ACOUSTIC, dtype=np.float32)
    if idx.size < 3:
        return out
    region = voiced[idx[0] : idx[-1] + 1]
    sec = cfg.hop_ms / 1000
    region_s = region.size * sec
    pauses = _runs(~region)
    pauses = pauses[pauses * sec * 1000 >= cfg.min_pause_ms]
    voiced_s = max(float(region.sum()) * sec, sec)
    smooth = np.convolve(energy, np.ones(3) / 3, mode="same")
    peaks = (smooth[1:-1] > smooth[:-2]) & (smooth[1:-1] >= smooth[2:]) & voiced[1:-1]
    peaks &= smooth[1:-1] > floor + 0.5 * (top - floor)
    f0, strength = pitch_track(frames, sr)  # (F,), (F,)
    pitched = voiced & (strength > 0.5)
    if pitched.sum() < 3:
        pitched = voiced
    st = 12 * np.log2(np.clip(f0[pitched], 50, 500) / 100.0)
    q10, q25, q50, q75, q90 = np.percentile(st, [10, 25, 50, 75, 90])
    out[:] = (
        region_s,
        voiced_s / region_s,
        pauses.size / (region_s / 60),
        float(pauses.mean() * sec) if pauses.size else 0.0,
        float(pauses.sum() * sec) / region_s,
        float(peaks.sum()) / voiced_s,
        q50,
        (q75 - q25) / 1.349,
        q90 - q10,
        float(energy[voiced].std()),
    )
    return out


def pitch_track(frames: torch.Tensor, sr: int, fmin: float = 60.0, fmax: float = 400.0) -> tuple[np.ndarray, np.ndarray]:
    """F0 per frame by normalised autocorrelation over two-frame windows, all frames at once.

    torchaudio's ``detect_pitch_frequency`` loops over every lag in Python (0.18 s for a
    12 s recording here); this does the same NCCF-style peak pick with one batched FFT.
    Returns (f0 in Hz, peak strength in [0, 1]) for each of the F frames.
    """
    win = torch.cat([frames, torch.roll(frames, -1, dims=0)], dim=1)  # (F, 2*hop): 40 ms windows
    win = win - win.mean(dim=1, keepdim=True)
    n = win.shape[1]
    spec = torch.fft.rfft(win * torch.hann_window(n), n=2 * n)
    ac = torch.fft.irfft(spec.abs().pow(2), n=2 * n)[:, :n]  # (F, n)
    ac = ac / ac[:, :1].clamp(min=1e-10)
    lo, hi = int(sr / fmax), min(int(sr / fmin), n - 1)
    peak, lag = ac[:, lo:hi].max(dim=1)
    return (sr / (lag + lo).float()).numpy(), peak.clamp(0, 1).numpy()


@functools.lru_cache(maxsize=16)
def _mel_transform(sr: int, win: int, hop: int, n_mels: int) -> T.MelSpectrogram:
    return T.MelSpectrogram(sr, n_fft=_next_pow2(win), win_length=win, hop_length=hop, n_mels=n_mels)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _runs(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


def _close_gaps(mask: np.ndarray, *, max_gap: int) -> np.ndarray:
    """Fill False runs of at most ``max_gap`` frames between True frames (not pauses)."""
    out = mask.copy()
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[::2], edges[1::2]
    for gap_start, gap_end in zip(ends[:-1], starts[1:], strict=True):
        if gap_end - gap_start <= max_gap:
            out[gap_start:gap_end] = True
    return out


_SEVERITIES = ("error", "warning", "info")  # of a decoder note (client.manifest.Problem.severity)


class FeatureCache:
    """Content-addressed store: ``<root>/<config hash>/<sha[:2]>/<sha>.npz``. Opening it sweeps
    away the temporary files of a process killed mid-write (:func:`sweep_stale_temps`)."""

    def __init__(self, root: Path, cfg: FeatureConfig) -> None:
        self.dir = root / cfg.cache_key()
        self.cfg = cfg
        sweep_stale_temps(self.dir)

    @staticmethod
    def audio_hash(path: Path) -> str:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npz"

    def get(self, digest: str) -> RecordingFeatures | None:
        """The cached features, or None (a miss: they are extracted again and the entry replaced)
        when there are none, or the entry cannot be read (truncated, not an .npz) or holds what
        extraction with these settings never writes (see :meth:`_usable`)."""
        p = self._path(digest)
        if not p.exists():
            return None
        try:
            with np.load(p) as z:
                notes = tuple(tuple(n.split("\t", 1)) for n in z["notes"].tolist())
                feats = RecordingFeatures(z["mel"], z["markers"], float(z["seconds"]), int(z["rate"]), notes)
            return feats if self._usable(feats) else None
        except Exception:  # noqa: BLE001 - BadZipFile, EOFError, a missing array, text where numbers belong...: recomputed, never trusted
            return None

    def _usable(self, feats: RecordingFeatures) -> bool:
        """Whether a cached entry could have come from :func:`extract` with these settings: the
        shapes, finite values, a duration of at least ``min_seconds`` (the decoder's check, which a
        hit skips) and (severity, text) notes."""
        return (
            feats.mel.shape == (self.cfg.n_mels, n_frames(self.cfg))
            and feats.markers.shape == (N_ACOUSTIC,)
            and bool(np.isfinite(feats.mel).all() and np.isfinite(feats.markers).all())
            and math.isfinite(feats.seconds)
            and feats.seconds >= self.cfg.min_seconds
            and feats.original_rate > 0
            and all(len(n) == 2 and n[0] in _SEVERITIES for n in feats.notes)
        )

    def put(self, digest: str, feats: RecordingFeatures) -> None:
        notes = np.array(["\t".join(n) for n in feats.notes], dtype=str)
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(  # a full disk keeps no half-written entry
            path,
            lambda fh: np.savez(fh, mel=feats.mel, markers=feats.markers, seconds=np.float32(feats.seconds), rate=np.int32(feats.original_rate), notes=notes),
        )
