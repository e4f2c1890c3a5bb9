"""The move bound the coordinator checks trained models against holds for every gradient
sequence Adam can be given, and is reached by the worst one (so it is not loose)."""

from __future__ import annotations

import pytest
import torch

from shared.update_bounds import adam_round_factor, adam_step_factor, max_parameter_move


def _adam_moves(grads: torch.Tensor) -> torch.Tensor:
    """Each step's move of parameters (columns) under a fresh torch Adam at learning rate 1, (T, D)."""
    p = torch.zeros(grads.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0)
    moves = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        moves.append((p.detach() - before).abs())
    return torch.stack(moves)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_the_worst_gradients_reach_the_bound_and_no_step_exceeds_it(steps: int) -> None:
    b1, b2 = 0.9, 0.999
    worst = torch.tensor([[(b1 / b2) ** (steps - i)] for i in range(1, steps + 1)], dtype=torch.float64)  # Cauchy–Schwarz's equality case
    moves = _adam_moves(worst)[:, 0]
    assert float(moves.sum()) == pytest.approx(adam_round_factor(steps), rel=1e-6)
    assert float(moves[-1]) == pytest.approx(adam_step_factor(steps), rel=1e-6)


def test_random_heavy_tailed_gradients_never_move_a_parameter_further() -> None:
    gen = torch.Generator().manual_seed(0)
    steps = 30
    grads = torch.randn(steps, 4000, generator=gen, dtype=torch.float64) * torch.exp(5 * torch.randn(steps, 4000, generator=gen, dtype=torch.float64))
    moves = _adam_moves(grads)
    per_step = torch.tensor([adam_step_factor(t) for t in range(1, steps + 1)], dtype=torch.float64)
    assert bool((moves <= per_step[:, None] * (1 + 1e-9)).all())
    assert float(moves.sum(0).max()) <= adam_round_factor(steps)


def test_the_round_bound_follows_the_plan() -> None:
    assert max_parameter_move(optimizer="adam", learning_rate=0.01, local_steps=1) == pytest.approx(0.01)
    assert max_parameter_move(optimizer="adam", learning_rate=0.02, local_steps=10) == pytest.approx(0.02 * adam_round_factor(10))
    assert adam_step_factor(100_000) == pytest.approx(0.1 / (1 - 0.999) ** 0.5 / (1 - 0.81 / 0.999) ** 0.5, rel=1e-9)  # the limit, ≈ 7.27
    assert max_parameter_move(optimizer="sgd", learning_rate=0.01, local_steps=10) is None
    with pytest.raises(ValueError, match="Unknown optimizer"):
        max_parameter_move(optimizer="lion", learning_rate=0.01, local_steps=10)
    with pytest.raises(ValueError, match="no step bound"):
        adam_step_factor(1, beta1=0.99, beta2=0.9)


def test_a_sites_real_dp_round_stays_within_the_bound_the_coordinator_checks(tiny_cohort, alpha_state) -> None:  # noqa: ANN001
    """The bound assumes what Site.train does: a fresh Adam, exactly local_steps steps. A large
    learning rate makes every step move (the noisy clipped gradients are far from zero)."""
    from dataclasses import replace

    import numpy as np

    from client.site import Site, TrainResult
    from shared.config import load_site
    from shared.models import build_model
    from shared.params import get_arrays
    from tests.conftest import tiny_experiment

    exp = tiny_experiment()
    exp = replace(exp, training=replace(exp.training, learning_rate=0.5, local_steps=4))
    site = Site(replace(load_site(tiny_cohort / "alpha" / "site.yaml"), state_dir=alpha_state), exp)
    start = dict(get_arrays(build_model(exp)))
    result = site.train(start, run_id="bound", server_round=1, total_rounds=exp.federation.rounds)
    assert isinstance(result, TrainResult)
    moved = max(float(np.abs(result.arrays[k].astype(np.float64) - start[k]).max()) for k in start)
    bound = max_parameter_move(optimizer="adam", learning_rate=0.5, local_steps=4)
    assert bound is not None  # Adam's move is bounded
    assert 0.5 <= moved <= bound  # moved: at least one full first step (Adam's first step is exactly lr)
