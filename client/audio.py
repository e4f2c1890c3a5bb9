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


class AudioProblem(Exception):
    """A recording that cannot be used; the message is a full sentence for the report."""


@dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # (n,) float32 mono at `sample_rate`
    sample_rate: int
    original_rate: int
    seconds: float
    notes: tuple[str, ...]


def decode(path: Path, *, target_rate: int, min_seconds: float) -> Decoded:
    """Read ``path``, mix to mono, resample to ``target_rate`` and check it is usable."""
    try:
        info = sf.info(str(path))
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioProblem(f"cannot be decoded ({exc}); re-export it as WAV or FLAC") from exc
    notes: list[str] = []
    if data.shape[0] == 0:
        raise AudioProblem("is empty (0 samples)")
    if info.frames > 0 and data.shape[0] < info.frames:
        raise AudioProblem(f"is truncated: header says {info.frames} samples, only {data.shape[0]} present")
    if data.shape[1] > 1:
        notes.append(f"{data.shape[1]} channels mixed to mono")
    x = data.mean(axis=1)  # (n,)
    seconds = x.shape[0] / rate
    if seconds < min_seconds:
        raise AudioProblem(f"is too short ({seconds:.2f} s < {min_seconds} s)")
    if not np.isfinite(x).all():
        raise AudioProblem("holds NaN or infinite samples")
    peak = float(np.max(np.abs(x)))
    if peak < SILENCE_PEAK:
        raise AudioProblem(f"is silent (peak {peak:.1e} of full scale)")
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    if clipped >= CLIP_REFUSE:
        raise AudioProblem(f"is clipped: {clipped:.1%} of samples at full scale; record at a lower gain")
    if clipped >= CLIP_WARN:
        notes.append(f"mildly clipped ({clipped:.2%} of samples at full scale)")
    if rate != target_rate:
        x = resample(x, rate, target_rate)
        notes.append(f"resampled {rate} Hz -> {target_rate} Hz")
    return Decoded(x.astype(np.float32, copy=False), target_rate, rate, seconds, tuple(notes))

