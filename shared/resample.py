"""Cached band-limited resampling (torchaudio), shared by the site and the synthesiser."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchaudio.transforms as T  # noqa: N812

# torchaudio's windowed-sinc filter bank for orig -> new Hz has (new/g) x (orig/g + 2*width)
# coefficients for g = gcd(orig, new) (see filter_size): 76 000 for 44100 -> 16000 (441:160), but
# 178 million for a coprime pair such as 11127 -> 16000, whose construction took 4.5 GiB and then
# failed. A pair above this many is refused: every usual rate is far below (11025 -> 16000, the
# largest, has 291 000), and so is the rare 44056 Hz (11 million: +354 MiB, 1.2 s to build once).
MAX_FILTER_SIZE = 16 * 1024 * 1024


def filter_size(orig: int, new: int) -> int:
    """Coefficients of torchaudio's resampling filter bank for ``orig`` -> ``new`` Hz (its defaults:
    lowpass_filter_width 6, rolloff 0.99); building it briefly needs several times as many float64s."""
    g = math.gcd(orig, new)
    a, b = orig // g, new // g
    width = math.ceil(6 * a / (min(a, b) * 0.99))
    return b * (a + 2 * width)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> T.Resample:
    """One windowed-sinc kernel per rate pair (building it costs more than applying it)."""
    return T.Resample(orig, new)


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Resample mono float32 ``x`` (n,) from ``orig`` Hz to ``new`` Hz; ValueError for a rate
    pair whose filter bank would be huge (see :data:`MAX_FILTER_SIZE`)."""
    if orig == new:
        return x
    if filter_size(orig, new) > MAX_FILTER_SIZE:
        raise ValueError(f"Resampling {orig} Hz to {new} Hz needs a filter bank of {filter_size(orig, new):,} coefficients, above the {MAX_FILTER_SIZE:,} allowed; use a common rate.")
    with torch.no_grad():
        return _resampler(orig, new)(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
