"""Aggregation as pure functions: the patient-weighted average (FedAvg) and a server-side
Adam step on the averaged update (FedAdam, Reddi et al. 2021, "Adaptive Federated
Optimization"). FedProx is a client-side term (``training.prox_mu``); the server averages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

Arrays = OrderedDict[str, np.ndarray]


def weighted_average(updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
    """Σ w_i x_i / Σ w_i per array (weights: the sites' training patient counts)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"Need one weight per update; got {len(updates)} updates and {len(weights)} weights.")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("The weights of a federated average must sum to a positive number.")
    return OrderedDict((k, sum((w * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)), np.zeros((), np.float64)).astype(np.float32) / np.float32(total)) for k in updates[0])


class ServerAdam:
    """x <- x + η m / (√v + τ) with m, v the moments of Δ = average - x (the pseudo-gradient).

    Integer buffers (e.g. counters) are replaced by the average, never stepped."""

    def __init__(self, *, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, current: dict[str, np.ndarray], average: dict[str, np.ndarray]) -> Arrays:
        out: Arrays = OrderedDict()
        for k, x in current.items():
            if not np.issubdtype(x.dtype, np.floating):
                out[k] = average[k]
                continue
            delta = average[k].astype(np.float64) - x.astype(np.float64)
            m = self.beta1 * self.m.get(k, np.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.beta2 * self.v.get(k, np.zeros_like(delta)) + (1 - self.beta2) * delta**2
            self.m[k], self.v[k] = m, v
            out[k] = (x + self.lr * m / (np.sqrt(v) + self.tau)).astype(x.dtype)
        return out


def server_step(optimizer: ServerAdam | None, current: dict[str, np.ndarray], average: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The new global model: the average itself (FedAvg/FedProx) or a FedAdam step towards it."""
    return average if optimizer is None else optimizer.step(current, average)


def make_server_optimizer(name: str, *, lr: float) -> ServerAdam | None:
    if name == "none":
        return None
    if name == "adam":
        return ServerAdam(lr=lr)
    raise ValueError(f"Unknown server optimizer {name!r}; choose none or adam.")
