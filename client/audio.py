"""Decode recordings with soundfile and say exactly what is wrong with a bad one.

A bad recording raises :class:`AudioProblem` (the caller records it and skips the row);
fixable oddities (another sample rate, stereo, mild clipping) are fixed and returned as
notes so the site report can show them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from shared.resample import MAX_FILTER_SIZE, filter_size, resample

SILENCE_PEAK = 1e-3  # full scale; below this the recording is silent
CLIP_LEVEL = 0.999
CLIP_WARN = 0.001  # share of samples at full scale that earns a warning
CLIP_REFUSE = 0.05  # ... and that makes the recording unusable


# A float recording's samples lie within ±1; one far beyond is damage, not loudness (a sample of
# 1e30 overflowed the log-mel power to NaN). Between 1 and this, they count as clipped.
OVER_RANGE = 4.0
MIN_RATE, MAX_RATE = 4000, 384000  # Hz; a rate outside is a damaged header (2 Hz made 96 KB 6.7 hours)
COMMON_RATES = "8000, 11025, 16000, 22050, 32000, 44100 or 48000 Hz"
CROP_MARGIN_S = 0.1  # read past max_seconds, far more than the resampling filter's half-width

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


def decode(path: Path, *, target_rate: int, min_seconds: float, max_seconds: float | None = None) -> Decoded:
    """Read ``path``, mix to mono, resample to ``target_rate`` and check it is usable.

    With ``max_seconds``, only about that much of the recording (a little more, so the resampled
    samples up to ``max_seconds`` are those of the whole recording) is read and resampled, for a
    caller that crops to it anyway; ``seconds`` is still the whole recording's length."""
    info, data, rate = _read(path, max_seconds)
    notes: list[tuple[str, str]] = []
    if data.shape[0] == 0:
        raise AudioProblem("is empty (0 samples)")
    frames = data.shape[0] if max_seconds is None else max(info.frames, data.shape[0])
    declared = _wav_declared_bytes(path)
    present = frames * data.shape[1] * _bytes_per_sample(info.subtype)
    if declared is not None and present and present < declared:
        raise AudioProblem(f"is truncated: its header declares {declared} bytes of audio, only {present} are present")
    if data.shape[1] > 1:
        notes.append(("info", f"{data.shape[1]} channels mixed to mono"))
    x = data.mean(axis=1)  # (n,)
    seconds = frames / rate
    if seconds < min_seconds:
        raise AudioProblem(f"{TOO_SHORT} ({seconds:.2f} s < {min_seconds} s)")
    if not np.isfinite(x).all():
        raise AudioProblem("holds NaN or infinite samples")
    peak = float(np.max(np.abs(x)))
    if peak > OVER_RANGE:
        raise AudioProblem(
            f"holds samples far beyond full scale (peak {peak:.3g}, more than {OVER_RANGE:g} times full scale): a damaged"
            " floating-point recording; copy it again from its source, or re-export it as 16-bit WAV or FLAC"
        )
    if peak < SILENCE_PEAK:
        raise AudioProblem(f"is silent (peak {peak:.1e} of full scale)")
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    if clipped >= CLIP_REFUSE:
        raise AudioProblem(f"is clipped: {clipped:.1%} of samples at full scale; record at a lower gain")
    if clipped >= CLIP_WARN:
        notes.append(("warning", f"mildly clipped ({clipped:.2%} of samples at full scale)"))
    if rate != target_rate:
        try:
            x = resample(x, rate, target_rate)
        except Exception as exc:  # out of memory, say: one recording's problem, not the whole check's
            raise AudioProblem(f"cannot be resampled from {rate} Hz to {target_rate} Hz ({type(exc).__name__}: {str(exc)[:200]}); re-export it at {target_rate} Hz") from exc
        notes.append(("info", f"resampled {rate} Hz -> {target_rate} Hz"))
    return Decoded(x.astype(np.float32, copy=False), target_rate, rate, seconds, tuple(notes))


def _read(path: Path, max_seconds: float | None) -> tuple[Any, np.ndarray, int]:
    """(info, samples (n, channels) float32, rate); any failure to decode is an AudioProblem, and
    so is a sample rate that cannot be resampled at a reasonable cost (checked before reading)."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises TypeError, ValueError, ... besides its own errors
        raise AudioProblem(_undecodable(path, exc)) from exc
    rate = int(info.samplerate)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioProblem(
            f"has a sample rate of {rate} Hz, outside the {MIN_RATE}-{MAX_RATE} Hz a recording may have (a damaged header?);"
            f" re-export it at a common rate ({COMMON_RATES})"
        )
    size = max(filter_size(rate, t) for t in (8000, 16000))  # the feature rates; the speech encoder's is 16000
    if size > MAX_FILTER_SIZE:
        raise AudioProblem(
            f"has a sample rate of {rate} Hz, which cannot be converted to 8000 or 16000 Hz at a reasonable cost (its"
            f" filter would have {size:,} coefficients, more than {MAX_FILTER_SIZE:,}); re-export it at a common rate ({COMMON_RATES})"
        )
    frames = -1 if max_seconds is None else int(math.ceil((max_seconds + CROP_MARGIN_S) * rate))
    try:
        data, _ = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioProblem(_undecodable(path, exc)) from exc
    return info, data, rate


def _undecodable(path: Path, exc: Exception) -> str:
    if path.suffix.lower() in (".raw", ".pcm") or "samplerate must be specified" in str(exc):
        return "is headerless RAW audio (no sample rate or sample format), which is not supported; re-export it as WAV or FLAC"
    return f"cannot be decoded ({type(exc).__name__}: {str(exc)[:200]}); re-export it as WAV or FLAC"


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
