"""σ calibrations kept in the site's state folder, so a fresh process does not redo them.

On the Deployment Engine every message runs in a new ClientApp process, so the in-process
memo of :func:`shared.privacy.accounting.calibrate_noise` never helps there, and the
bisection (~20 RDP evaluations) was most of a site's round. A stored σ is never trusted
blindly: before use it is re-checked with one ε evaluation, and a σ that would spend more
than the target (a damaged or edited file), or so much less that it is not what the search
gives (more noise than the plan needs: an edit, or a calibration by an older, coarser search),
is discarded and recalibrated.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.atomic import AS_OPEN, write_atomically
from shared.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon, epsilon_tolerance, warn_full_sampling

FILE = "sigma-cache.json"


def calibrated_sigma(
    state_dir: Path, *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str, site: str = "",
    fixed: tuple[SubsampledGaussian, ...] = (),
) -> float:
    """Smallest σ for ``steps`` steps at rate q to spend ``target_epsilon`` (cached on disk, verified),
    beside the ``fixed`` mechanisms (noised metric releases, as in :func:`calibrate_noise`).

    At q = 1 it warns (a :class:`FullSamplingWarning` naming ``site``) whether or not the σ
    came from the cache, so a stored calibration does not hide the warning."""
    fixed = tuple(f for f in fixed if f.steps > 0)
    plain = [float(target_epsilon), float(target_delta), float(sample_rate), int(steps), accountant]
    key = json.dumps(plain if not fixed else [*plain, [[f.noise_multiplier, f.sample_rate, f.steps] for f in fixed]])  # keys of plans without releases as before
    path = state_dir / FILE
    stored = _read(path)
    sigma = stored.get(key)
    if isinstance(sigma, float) and sigma > 0:
        spent = epsilon([SubsampledGaussian(sigma, sample_rate, steps), *fixed], delta=target_delta, accountant=accountant)
        if target_epsilon - epsilon_tolerance(target_epsilon) <= spent <= target_epsilon:
            warn_full_sampling(sample_rate, site=site)  # calibrate_noise, which warns, is not called
            return sigma
    sigma = calibrate_noise(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps, accountant=accountant, site=site, fixed=fixed)
    stored[key] = sigma
    _write(path, stored)
    return sigma


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, sort_keys=True).encode("utf-8")
    write_atomically(path, lambda fh: fh.write(text), mode=AS_OPEN)  # atomic: concurrent processes of one site never see half a file
