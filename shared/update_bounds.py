"""How far one round of a plan's local training can move any parameter, whatever the data.

The coordinator checks each site's trained model against it: a model that moved a parameter
further than the plan's optimiser can in ``local_steps`` steps did not come from that training
(a bug, a corrupted reply or a poisoning site), and averaging it would let one site drag the
global model anywhere the ±range check still allows.

Adam (Kingma & Ba 2015, as ``torch.optim.Adam`` implements it: bias-corrected, no weight decay,
``eps`` only shrinking the step) moves a parameter at step t by ``lr · |m̂_t| / (√v̂_t + eps)``,
and by Cauchy–Schwarz over the gradient history

    |m_t| / √v_t ≤ (1 − β1)/√(1 − β2) · √(Σ_{k<t} (β1²/β2)^k)        (β1² < β2),

whatever the gradients are, clipped and noised or not. With the bias corrections
``√(1 − β2^t)/(1 − β1^t)`` this per-step factor is 1 at t = 1 and rises towards ≈ 7.27 for the
default betas (0.9, 0.999) (:func:`adam_step_factor`); the gradients that reach it exist (the
equality case), so the bound is tight step by step. A site makes a fresh optimiser for every
round (``client.site.Site.train``), so a round of T steps moves a parameter by at most ``lr ·
Σ_{t≤T} factor(t)`` (:func:`max_parameter_move`).

Plain or momentum SGD has no such bound (a DP gradient's Gaussian noise is unbounded), so
:func:`max_parameter_move` gives None for it and only the value-range check applies.

Pure functions of the plan; no state.
"""

from __future__ import annotations

import functools
import math

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which client.dp_train.make_optimizer uses


def adam_step_factor(t: int, *, beta1: float = ADAM_BETAS[0], beta2: float = ADAM_BETAS[1]) -> float:
    """The largest ``|m̂_t| / √v̂_t`` any gradients give at Adam's step ``t`` (from 1): that step
    moves a parameter by at most this many learning rates."""
    if t < 1:
        raise ValueError(f"Adam's steps count from 1, got {t}.")
    if not (0 <= beta1 < 1 and 0 < beta2 < 1 and beta1 * beta1 < beta2):
        raise ValueError(f"Adam betas ({beta1}, {beta2}) have no step bound: need 0 ≤ β1 < 1, 0 < β2 < 1 and β1² < β2.")
    r = beta1 * beta1 / beta2
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt((1 - r**t) / (1 - r)) * math.sqrt(1 - beta2**t) / (1 - beta1**t)


@functools.lru_cache(maxsize=64)
def adam_round_factor(steps: int) -> float:
    """``Σ_{t=1..steps} adam_step_factor(t)``: the most learning rates a fresh Adam moves a parameter in ``steps`` steps."""
    return math.fsum(adam_step_factor(t) for t in range(1, steps + 1))


def max_parameter_move(*, optimizer: str, learning_rate: float, local_steps: int) -> float | None:
    """The most one round of local training (a fresh optimiser, ``local_steps`` steps at
    ``learning_rate``) can change any single parameter, or None when the optimiser gives no
    bound (``sgd``)."""
    if local_steps < 0 or not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"A round of {local_steps} steps at learning rate {learning_rate!r} has no move bound.")
    if optimizer == "adam":
        return learning_rate * adam_round_factor(local_steps)
    if optimizer == "sgd":
        return None
    raise ValueError(f"Unknown optimizer {optimizer!r}; choose adam or sgd.")
