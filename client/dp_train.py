"""Local training with patient-level DP-SGD: per-patient gradients, Opacus clipping and noise.

Each patient's loss is averaged over at most ``max_sessions`` of their labelled sessions and
differentiated per patient by one of the strategies in :mod:`client.patient_grads` (Opacus
per-session hooks summed per patient, or ``torch.func.vmap``); the result is placed in
``p.grad_sample`` and Opacus' :class:`DPOptimizer` clips each patient's gradient to C, adds
Gaussian noise σC and steps. Patients are Poisson-sampled at rate q
(Abadi et al. 2016, Alg. 1), which is what the accountant assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from client.dataset import PatientTensors
from client.patient_grads import DEFAULT_GRADS, make_patient_grads, patient_loss_fn
from client.predict import predict

__all__ = ["CpuNoiseDPOptimizer", "StepStats", "make_optimizer", "patient_loss_fn", "predict", "train_dp", "train_plain"]


@dataclass(frozen=True)
class StepStats:
    steps: int
    mean_loss: float  # mean over steps of the sampled patients' mean loss
    mean_batch: float  # mean sampled patients per step


class CpuNoiseDPOptimizer(DPOptimizer):
    """DPOptimizer whose noise is drawn on the CPU from a seeded generator.

    The same seed then gives the same noise on CPU and GPU, so a site's result does not
    depend on its hardware beyond floating-point rounding.
    """

    def add_noise(self) -> None:
        if self.secure_mode:  # Opacus' hardened sampler; not reproducible by design
            super().add_noise()
            return
        std = self.noise_multiplier * self.max_grad_norm
        sizes = [p.summed_grad.numel() for p in self.params]
        # One draw and one host-to-device copy for all parameters, not one per parameter (on a GPU
        # each small copy is a synchronous transfer); the i-th parameter takes the i-th slice.
        noise = torch.normal(0.0, std, size=(sum(sizes),), generator=self.generator, device="cpu")
        if self.params:
            noise = noise.to(self.params[0].summed_grad.device)
        for p, chunk in zip(self.params, noise.split(sizes), strict=True):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + chunk.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    prox_mu: float = 0.0
    prox_ref: list[torch.Tensor] | None = None

    def scale_grad(self) -> None:
        """Opacus' averaging, then FedProx's μ(w - w_global): added after the noise because it
        depends on no patient's data, so it changes nothing in the privacy accounting."""
        super().scale_grad()
        add_prox(self.params, self.prox_ref, self.prox_mu)


def add_prox(params: list[torch.Tensor], ref: list[torch.Tensor] | None, mu: float) -> None:
    """In place: grad += μ (w - w_ref) for every parameter (FedProx, Li et al. 2020)."""
    if ref is None or mu == 0.0:
        return
    with torch.no_grad():
        for p, r in zip(params, ref, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - r, alpha=mu)


def bound_sessions(mask: torch.Tensor, max_sessions: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``max_sessions`` labelled sessions per patient, chosen at random."""
    if mask.shape[1] <= max_sessions:
        return mask
    scores = torch.rand(mask.shape, generator=generator) + mask.float() * 2  # labelled first
    keep = torch.zeros_like(mask)
    keep.scatter_(1, scores.topk(max_sessions, dim=1).indices, True)
    return keep & mask


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of patients included in this step, each independently with prob q."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def make_optimizer(model: nn.Module, *, name: str, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; choose adam or sgd.")


def train_dp(
    model: nn.Module,
    data: PatientTensors,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    max_sessions: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    secure_mode: bool = False,
    prox_mu: float = 0.0,
    grads: str = DEFAULT_GRADS,
) -> StepStats:
    """Run ``steps`` patient-level DP-SGD steps in place on ``model`` (FedProx with ``prox_mu`` > 0).

    ``grads`` picks the per-patient gradient strategy (:data:`client.patient_grads.GRAD_STRATEGIES`);
    all give the same gradients up to float rounding.
    """
    expected = max(1, int(data.n_patients * sample_rate))
    dp_opt = CpuNoiseDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        generator=None if secure_mode else generator,
        secure_mode=secure_mode,
    )
    if prox_mu > 0:
        dp_opt.prox_mu, dp_opt.prox_ref = prox_mu, [p.detach().clone() for p in dp_opt.params]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_patient = make_patient_grads(model, strategy=grads)
    data = data.on(device)
    losses: list[torch.Tensor] = []
    batches = []
    model.train()
    try:
        for _ in range(steps):
            idx = poisson_sample(data.n_patients, sample_rate, generator)
            batches.append(len(idx))
            if len(idx) == 0:  # an empty Poisson batch still takes a (pure-noise) step
                for _, p in named:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            else:
                mel, markers, y, m = _batch(data, idx, max_sessions, generator, device)
                per_grads, patient_loss = per_patient(mel, markers, y, m)  # name -> (B, *shape); (B,)
                for n, p in named:
                    p.grad_sample = per_grads[n]
                losses.append(patient_loss.detach().mean())
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    finally:
        per_patient.close()
    return _stats(steps, losses, batches)


def _stats(steps: int, losses: list[torch.Tensor], batches: list[int]) -> StepStats:
    """Step statistics, read back from the device once per call rather than once per step
    (a per-step read would make the CPU wait for the GPU before queueing the next step)."""
    mean_loss = float(torch.stack(losses).float().mean()) if losses else 0.0
    return StepStats(steps, mean_loss, sum(batches) / max(len(batches), 1))


def train_plain(
    model: nn.Module,
    data: PatientTensors,
    *,
    steps: int,
    sample_rate: float,
    max_sessions: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    prox_mu: float = 0.0,
) -> StepStats:
    """The same sampling and loss without clipping or noise (non-private baselines)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ref = [p.detach().clone() for p in params] if prox_mu > 0 else None
    data = data.on(device)
    losses: list[torch.Tensor] = []
    batches = []
    model.train()
    for _ in range(steps):
        idx = poisson_sample(data.n_patients, sample_rate, generator)
        batches.append(len(idx))
        if len(idx) == 0:
            continue
        mel, markers, y, m = _batch(data, idx, max_sessions, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_loss(model, mel, markers, y, m)
        loss.backward()
        add_prox(params, ref, prox_mu)
        optimizer.step()
        losses.append(loss.detach())
    return _stats(steps, losses, batches)


def _batch(data: PatientTensors, idx: torch.Tensor, max_sessions: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    m = bound_sessions(data.mask[idx], max_sessions, generator)
    on = idx.to(data.mel.device)  # gather where the tensors live (the device, after PatientTensors.on)
    return (
        data.mel[on].to(device=device, dtype=torch.float32),  # (B, K, n_mels, F)
        data.markers[on].to(device),  # (B, K, M)
        data.labels[on].to(device),  # (B, K)
        m.to(device=device, dtype=torch.float32),  # (B, K)
    )


def _batch_loss(model: nn.Module, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over patients of each patient's mean session loss (the DP objective)."""
    b, k = y.shape
    logits = model(mel.flatten(0, 1), markers.flatten(0, 1)).view(b, k)
    per = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return ((per * m).sum(1) / m.sum(1).clamp(min=1.0)).mean()
