"""Decode recordings with soundfile and say exactly what is wrong with a bad one.

A bad recording raises :class:`AudioProblem` (the caller records it and skips the row);
fixable oddities (another sample rate, stereo, mild clipping) are fixed and returned as
notes so the site report can show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from shared.resample import resample

SILENCE_PEAK = 1e-3  # full scale; below this the recording is silent
CLIP_LEVEL = 0.999
CLIP_WARN = 0.001  # share of samples at full scale that earns a warning
CLIP_REFUSE = 0.05  # ... and that makes the recording unusable


TOO_SHORT = "is too short"  # starts the report's reason for a recording under features.min_seconds (counted where a site has no usable session)


class AudioProblem(Exception):
    """A recording that cannot be used; the message is a full sentence for the report."""


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # (n,) float32 mono at `sample_rate`
    sample_rate: int
    original_rate: int
    seconds: float
    notes: tuple[tuple[str, str], ...]  # (severity, text): "info" = fixed, "warning" = kept but odd


def decode(path: Path, *, target_rate: int, min_seconds: float) -> Decoded:
    """Read ``path``, mix to mono, resample to ``target_rate`` and check it is usable."""
    try:
        info = sf.info(str(path))
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioProblem(f"cannot be decoded ({exc}); re-export it as WAV or FLAC") from exc
    notes: list[tuple[str, str]] = []
    if data.shape[0] == 0:
        raise AudioProblem("is empty (0 samples)")
    declared = _wav_declared_bytes(path)
    present = data.shape[0] * data.shape[1] * _bytes_per_sample(info.subtype)
    if declared is not None and present and present < declared:
        raise AudioProblem(f"is truncated: its header declares {declared} bytes of audio, only {present} are present")
    if data.shape[1] > 1:
        notes.append(("info", f"{data.shape[1]} channels mixed to mono"))
    x = data.mean(axis=1)  # (n,)
    seconds = x.shape[0] / rate
    if seconds < min_seconds:
        raise AudioProblem(f"{TOO_SHORT} ({seconds:.2f} s < {min_seconds} s)")
    if not np.isfinite(x).all():
        raise AudioProblem("holds NaN or infinite samples")
    peak = float(np.max(np.abs(x)))
    if peak < SILENCE_PEAK:
        raise AudioProblem(f"is silent (peak {peak:.1e} of full scale)")
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    if clipped >= CLIP_REFUSE:
        raise AudioProblem(f"is clipped: {clipped:.1%} of samples at full scale; record at a lower gain")
    if clipped >= CLIP_WARN:
        notes.append(("warning", f"mildly clipped ({clipped:.2%} of samples at full scale)"))
    if rate != target_rate:
        x = resample(x, rate, target_rate)
        notes.append(("info", f"resampled {rate} Hz -> {target_rate} Hz"))
    return Decoded(x.astype(np.float32, copy=False), target_rate, rate, seconds, tuple(notes))



def _bytes_per_sample(subtype: str) -> int:
    return {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}.get(subtype, 0)


def _wav_declared_bytes(path: Path) -> int | None:
    """Size of the WAV 'data' chunk as its header declares it (libsndfile silently reads
    what is present, so a truncated copy would otherwise pass). None for non-WAV files."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                return size if size not in (0, 0xFFFFFFFF) else None  # streaming writers leave 0/-1
            fh.seek(size + (size & 1), 1)
