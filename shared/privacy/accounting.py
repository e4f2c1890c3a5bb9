"""Pure privacy accounting over Opacus' accountants.

A mechanism is a small frozen value; ε is a function of the sequence of mechanisms applied
to one dataset. The Poisson-subsampled Gaussian mechanism of DP-SGD (Abadi et al. 2016,
§3.1) is accounted with Rényi DP (Mironov 2017; Mironov, Talwar & Zhang 2019) or the PRV
accountant (Gopi, Lee & Wutschitz 2021), both as implemented by Opacus.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from shared.errors import UnreachableEpsilonError

ACCOUNTANTS = ("rdp", "prv")
# Rényi orders: Opacus' defaults stop at 63, where the optimum sits for small ε (Opacus then
# warns that the bound is loose); extending the grid only ever tightens the bound.
RDP_ALPHAS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 100, 128, 160, 200, 256, 320, 400, 512])


@dataclass(frozen=True)
class SubsampledGaussian:
    """``steps`` DP-SGD steps with noise multiplier σ at Poisson sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}.")


def epsilon(events: Iterable[SubsampledGaussian], *, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after all ``events`` (0.0 when there are none).

    Events with the same (σ, q) are composed as one event with their steps added: the same
    mechanism applied n + m times, so the result is unchanged, but the cost no longer grows
    with the number of rounds in a site's ledger (a run repeats one (σ, q) every round).
    """
    _check(accountant)
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps > 0:
            merged[(e.noise_multiplier, e.sample_rate)] = merged.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    if not history:
        return 0.0
    # Opacus is imported when first needed: a site's evaluate-only process never pays its ~2 s import.
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        # What Opacus' RDPAccountant computes (RDP adds up over composed mechanisms), with
        # each mechanism's RDP curve memoised: a ledger re-accounts the same rounds often.
        total = np.sum([_rdp_curve(*h) for h in history], axis=0)
        with _largest_order_quiet():
            eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ALPHAS), rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def _largest_order_quiet() -> Iterator[None]:
    """Without Opacus' "Optimal order is the largest alpha" UserWarning: at a small ε (a huge σ)
    the best order is the last of :data:`RDP_ALPHAS`, where the bound is loose only upwards (ε
    over-counted, the safe side), and the warning, printed once per site and σ search, told a
    researcher nothing they could act on; `fedrelapse plan` says when σ is so large instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


@functools.lru_cache(maxsize=65536)
def _rdp_curve(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(RDP_ALPHAS)))
    curve.flags.writeable = False
    return curve


class FullSamplingWarning(UserWarning):
    """q = 1: every patient is in every step, so there is no amplification by subsampling."""


def warn_full_sampling(sample_rate: float, *, site: str = "", stacklevel: int = 2) -> None:
    """Warn, naming ``site``, when q = 1. Each site's message differs, so Python's once-per-
    message filter shows one per site and process instead of one for all sites."""
    if sample_rate == 1.0:
        warnings.warn(full_sampling_message(site), FullSamplingWarning, stacklevel=stacklevel + 1)


def full_sampling_message(site: str = "") -> str:
    """What a q = 1 site is told (and the researcher, where the site is known)."""
    who = f"Site {site}" if site else "A site"
    return (
        f"{who}: sampling rate q = 1 (training.batch_patients ≥ its training patients): every patient is in every DP-SGD step, "
        f"so there is no amplification by subsampling and σ must be much larger for the same ε; lower training.batch_patients "
        f"or give the site more patients."
    )


def calibrate_noise(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str = "rdp", site: str = "",
    fixed: tuple[SubsampledGaussian, ...] = (),
) -> float:
    """Smallest σ (to Opacus' tolerance) so ``steps`` steps at rate q spend ``target_epsilon``.

    ``fixed``: mechanisms the run applies besides its DP-SGD steps, whose noise is set already
    (a plan's noised metric releases, :mod:`shared.privacy.noised_metrics`); σ is then the
    smallest that makes the steps and these together spend ``target_epsilon``.

    Memoised per process: a site asks the same question every round of a run, and each answer
    is a bisection of ~20 RDP evaluations (most of a small site's round time). ``site`` names
    the site in the :class:`FullSamplingWarning` given when q = 1.

    Raises :class:`UnreachableEpsilonError` when no σ reaches ``target_epsilon``: converting
    RDP to (ε, δ) costs at least :func:`rdp_epsilon_floor` (≈ 0.0084 at δ = 1e-5 with our
    orders) however much noise is added, so a plan with a smaller ε can never be met; that
    case is refused at once, without a σ search.
    """
    _check(accountant)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
    warn_full_sampling(sample_rate, site=site, stacklevel=2)
    fixed = tuple(f for f in fixed if f.steps > 0)
    if fixed:
        return _calibrate_beside(float(target_epsilon), float(target_delta), float(sample_rate), int(steps), accountant, fixed)
    return _calibrate(float(target_epsilon), float(target_delta), float(sample_rate), int(steps), accountant)


def rdp_epsilon_floor(*, delta: float) -> float:
    """The least ε the ``rdp`` accountant can certify at ``delta``, however much noise is added.

    Opacus converts an RDP curve to (ε, δ) as min over orders α of
    ``rdp(α) − (log δ + log α)/(α − 1) + log((α − 1)/α)`` (Balle et al. 2020); RDP is never
    negative, so the value at ``rdp = 0`` bounds every σ's ε from below (≈ 0.0084 at δ = 1e-5
    with :data:`RDP_ALPHAS`). A pure function of δ and the orders: no RDP evaluation.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    orders = np.asarray(RDP_ALPHAS)
    return float(np.min(-(np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)))


def epsilon_tolerance(target_epsilon: float) -> float:
    """How far below ``target_epsilon`` the σ search may stop: Opacus' 0.01, or 1 % of the
    target when that is smaller. Opacus' bisection stops once the ε of its σ is within its
    tolerance below the target, and an absolute 0.01 is no precision at a small target: at
    ε = 0.01 it returned the first power-of-two σ under the target (1280, spending 0.0089,
    where σ = 720 spends 0.0099), at ε = 0.1 a σ 7 % above the one needed (65 vs 60.6). Noise
    beyond the one needed costs utility and buys no privacy the plan asked for. From ε = 1 up
    the rule is Opacus' own, so the σ of such plans is unchanged."""
    return min(0.01, 0.01 * target_epsilon)


@functools.lru_cache(maxsize=1024)
def _calibrate(target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if accountant == "rdp" and target_epsilon <= rdp_epsilon_floor(delta=target_delta):
        # Certainly unreachable: Opacus would learn it by doubling σ up to its MAX_SIGMA, and RDP
        # at σ ≈ 1e5–1e6 costs seconds an evaluation (25 s in all at q = 0.5 on a 2-core machine).
        raise UnreachableEpsilonError(_unreachable(target_epsilon, target_delta, sample_rate, steps, accountant))
    try:
        with _largest_order_quiet():
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=epsilon_tolerance(target_epsilon),
                    **({"alphas": list(RDP_ALPHAS)} if accountant == "rdp" else {}),
                )
            )
    except ValueError as exc:
        if "budget is too low" not in str(exc):  # Opacus' words when σ would exceed its MAX_SIGMA
            raise
        raise UnreachableEpsilonError(_unreachable(target_epsilon, target_delta, sample_rate, steps, accountant)) from None


@functools.lru_cache(maxsize=1024)
def _calibrate_beside(target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str, fixed: tuple[SubsampledGaussian, ...]) -> float:
    """:func:`_calibrate` with ``fixed`` mechanisms composed beside the steps: Opacus' search
    (``get_noise_multiplier``: double σ until ε is at most the target, then bisect until it is
    within :func:`epsilon_tolerance` below it) over :func:`epsilon` of the whole composition."""
    from opacus.accountants.utils import MAX_SIGMA

    alone = epsilon(fixed, delta=target_delta, accountant=accountant)
    if alone >= target_epsilon:
        releases = sum(f.steps for f in fixed)
        raise UnreachableEpsilonError(
            f"`privacy.target_epsilon` ε={target_epsilon:g} cannot be met: the plan's {releases} noised metric release(s) "
            f"(`privacy.metrics_noise_multiplier` {fixed[0].noise_multiplier:g}) alone spend ε={alone:.3g} at δ={target_delta:g}, "
            f"leaving nothing for training. Raise `privacy.metrics_noise_multiplier`, raise `privacy.target_epsilon`, or evaluate nothing "
            f"(`federation.fraction_evaluate: 0`)."
        )
    spent = lambda sigma: epsilon([SubsampledGaussian(sigma, sample_rate, steps), *fixed], delta=target_delta, accountant=accountant)  # noqa: E731
    low, high, eps_high = 0.0, 10.0, math.inf
    with _largest_order_quiet():
        while eps_high > target_epsilon:
            high *= 2
            if high > MAX_SIGMA:
                raise UnreachableEpsilonError(_unreachable(target_epsilon, target_delta, sample_rate, steps, accountant))
            eps_high = spent(high)
        while target_epsilon - eps_high > epsilon_tolerance(target_epsilon):
            mid = (low + high) / 2
            eps = spent(mid)
            if eps < target_epsilon:
                high, eps_high = mid, eps
            else:
                low = mid
    return high


def _unreachable(target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str) -> str:
    """Why no σ reaches ``target_epsilon``, with the smallest ε this accountant can certify."""
    from opacus.accountants.utils import MAX_SIGMA

    try:
        if accountant == "rdp":  # the infimum over every σ, in closed form (ε at σ = MAX_SIGMA took seconds)
            floor = rdp_epsilon_floor(delta=target_delta)
            least = f"; however much noise is added it spends at least ε ≈ {floor:.3g}"
        else:
            with warnings.catch_warnings():  # "optimal order is the largest alpha": exactly the point here
                warnings.simplefilter("ignore")
                floor = epsilon([SubsampledGaussian(float(MAX_SIGMA), sample_rate, steps)], delta=target_delta, accountant=accountant)
            least = f"; even with σ = {MAX_SIGMA:g} it spends ε ≈ {floor:.3g}"
        fix = f"Raise `privacy.target_epsilon` above {floor:.2g}; fewer rounds or local steps lower the noise needed but not this floor"
    except Exception:  # noqa: BLE001 - the explanation must not hide the refusal itself
        least, fix = "", "Raise `privacy.target_epsilon`"
    return (
        f"`privacy.target_epsilon` ε={target_epsilon:g} cannot be met: no noise multiplier makes {steps} DP-SGD steps "
        f"(federation.rounds × training.local_steps) at sampling rate q={sample_rate:.3g} spend so little at δ={target_delta:g} "
        f"with the {accountant} accountant{least}. {fix}."
    )
