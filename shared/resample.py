"""Cached band-limited resampling (torchaudio), shared by the site and the synthesiser."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torchaudio.transforms as T  # noqa: N812


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> T.Resample:
    """One windowed-sinc kernel per rate pair (building it costs more than applying it)."""
    return T.Resample(orig, new)


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Resample mono float32 ``x`` (n,) from ``orig`` Hz to ``new`` Hz."""
    if orig == new:
        return x
    with torch.no_grad():
        return _resampler(orig, new)(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
