"""Local training with patient-level DP-SGD: per-patient gradients, Opacus clipping and noise.

Each patient's loss is averaged over at most ``max_sessions`` of their labelled sessions and
differentiated per patient by one of the strategies in :mod:`client.patient_grads` (Opacus
per-session hooks summed per patient, ``torch.func.vmap``, or the default one-pass ``grouped`` rule over session-major rows); the rows go to
:meth:`CpuNoiseDPOptimizer.step_rows` (Opacus' :class:`DPOptimizer`, acting on all parameters at
once), which clips each patient's gradient to C, adds Gaussian noise σC and steps. Patients are Poisson-sampled at rate q
(Abadi et al. 2016, Alg. 1), which is what the accountant assumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeGuard

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from client.dataset import PatientTensors
from client.patient_grads import (
    DEFAULT_GRADS,
    GroupedGrads,
    PatientGrads,
    functorch_fallback,
    make_patient_grads,
    patient_logits,
    patient_loss_fn,
    patient_losses,
)
from client.patient_layers import UnsupportedLayerError
from client.predict import predict

__all__ = ["CpuNoiseDPOptimizer", "StepStats", "clip_and_sum", "make_optimizer", "patient_loss_fn", "predict", "train_dp", "train_plain"]


@dataclass(frozen=True)
class StepStats:
    steps: int
    mean_loss: float  # mean over steps of the sampled patients' mean loss
    mean_batch: float  # mean sampled patients per step
    patients: int = 0  # distinct patients whose loss mean_loss covers (a site sends it on only from k of them)


def clip_and_sum(grad_samples: list[torch.Tensor], *, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row L2 clipping to C and the sum over rows, for all parameters at once.

    grad_samples: one (B, *shape_i) tensor per parameter -> (the clipped sum, (D,) float32 with
    D = Σ numel_i, in parameter order; the (B,) float32 per-row norms before clipping). Row b is
    scaled by min(1, C / (‖g_b‖ + 1e-6)) where ‖g_b‖ is its norm over every parameter, exactly
    as Opacus' ``DPOptimizer.clip_and_accumulate`` (Abadi et al. 2016, Alg. 1, "clip gradient"),
    but with one norm and one matrix-vector product over a (B, D) float32 copy instead of three
    operations per parameter. Norms and sums are float32 whatever the rows' dtype (bf16 under
    autocast), so rounding cannot push a row past C.

    A row whose norm is not finite (an entry is NaN or ±Inf, or its squares overflow float32)
    counts as a zero gradient: that patient contributes nothing to this step. Scaled as it is,
    it would make the whole sum NaN (C / ∞ = 0, and 0 · ∞ = NaN), so one patient's data would
    decide the step's output alone, beyond the sensitivity C the noise is calibrated to; zeroed,
    every row adds at most C whatever its values. Its factor is 0 (C / ∞ = 0 already; a NaN
    norm's NaN factor is set to 0) and the non-finite entries of the (B, D) copy are set to 0, so
    0 · entry is 0: two in-place elementwise ops, no read back to the host and no data-dependent
    branch (finite rows are left as they are). The returned norms are left as computed: NaN or
    Inf for such rows.
    """
    flat = torch.cat([g.reshape(g.shape[0], math.prod(g.shape[1:])) for g in grad_samples], dim=1).float()  # (B, D); cat promotes mixed dtypes
    norms = torch.linalg.vector_norm(flat, dim=1)  # (B,): NaN or Inf for a row with a NaN/Inf entry
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0).nan_to_num_(nan=0.0)  # (B,): 0 for a non-finite norm
    flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # (B, D), in place (flat is cat's own copy): 0 · NaN or 0 · ∞ would be NaN
    return factors @ flat, norms  # (D,), (B,)


class _Flat(NamedTuple):
    """A (D,) vector and the per-parameter views of it that were handed out as ``p.summed_grad`` or ``p.grad``."""

    flat: torch.Tensor  # (D,)
    views: list[torch.Tensor]  # views[i]: (*shape_i), slice i of flat


class CpuNoiseDPOptimizer(DPOptimizer):
    """DPOptimizer whose noise is drawn on the CPU from a seeded generator, all parameters at once.

    The same seed then gives the same noise on CPU and GPU, so a site's result does not
    depend on its hardware beyond floating-point rounding. Clipping, noise and averaging are
    Opacus' (same clip factor, same σC noise, same division by the expected batch size) but
    act on all parameters together: the clipped sum (:func:`clip_and_sum`) and the noisy
    gradient are each one flat (D,) vector whose slices are the parameters' ``summed_grad`` and
    ``grad`` (views, no copies), so the noise is one draw and one addition and the averaging one
    division. Opacus' per-parameter loops cost ≈ 0.6 ms per step, as much as the rest of the DP
    overhead on the default model (``fedrelapse bench dp-step``). Anything else that set these
    attributes (Opacus' secure-mode noise, a caller) is read per parameter, as before.
    """

    _summed: _Flat | None = None  # the flat clipped sum behind every p.summed_grad
    _noisy: _Flat | None = None  # the flat noisy gradient behind every p.grad

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        """Every parameter's (B, *shape) per-sample gradient (Opacus' property, without its per-parameter checks for a single tensor)."""
        samples = [getattr(p, "grad_sample", None) for p in self.params]
        return [s if isinstance(s, torch.Tensor) else self._get_flat_grad_sample(p) for p, s in zip(self.params, samples, strict=True)]

    def pre_step(self, closure: object = None) -> bool:
        """Opacus' ``pre_step`` (clip and accumulate; unless this step is skipped, noise, averaging, the step
        hook) without its two extra evaluations of ``grad_samples`` to learn whether there are parameters."""
        if not self.params:  # no trainable parameters: a plain optimizer step
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def step_rows(self, rows: list[torch.Tensor]) -> None:
        """One whole DP-SGD step from this step's per-patient gradient rows, one (B, *shape) tensor per parameter in ``self.params`` order.

        The same operations as assigning each ``p.grad_sample`` and calling :meth:`step`, in the
        same order (clip and sum, one seeded CPU noise draw of σC, division by the expected batch,
        FedProx, the wrapped optimizer's step; bit-identical for float32 parameters), without
        routing the rows through ``grad_sample`` and ``summed_grad`` and Opacus' per-parameter
        flags: those exist for physical batches accumulated into one logical step and for callers
        who may forget ``zero_grad``, and :func:`train_dp` does neither. Between two calls
        ``p.grad`` stays the last step's noisy gradient, a view of one flat vector that the next
        call overwrites in place while every ``p.grad`` still is its view;
        ``zero_grad(set_to_none=True)`` ends that. The bookkeeping left out was ≈ 0.1 ms of host
        time a step, a large part of a small step's DP overhead where a GPU waits on the host
        (``host_bound`` in ``fedrelapse bench dp-step``). Opacus' own path (:meth:`step`) takes over in
        secure mode, with an accumulation in progress or a queued skip, with a step hook (an
        Opacus accountant's reads ``grad_sample``), and for parameters other than float32.
        """
        params = self.params
        if len(rows) != len(params):
            raise ValueError(f"step_rows got {len(rows)} per-patient gradient tensors for {len(params)} trainable parameters; pass one per parameter, in the optimizer's order.")
        if self.secure_mode or self._step_skip_queue or self.step_hook or any(p.summed_grad is not None or p.dtype != torch.float32 for p in params):
            for p, r in zip(params, rows, strict=True):
                p.grad_sample = r
            self.step()
            for p in params:  # what zero_grad clears besides p.grad (a skipped step's sum is kept, as Opacus keeps it), so the next call starts afresh
                p.grad_sample = None
                if not self._is_last_step_skipped:
                    p.summed_grad = None
            return
        summed, _ = clip_and_sum(rows, max_grad_norm=self.max_grad_norm)  # (D,) float32, as every parameter here
        noise = self._noise(summed)  # (D,) float32
        # The previous step's flat noisy gradient, whose views still are every p.grad, takes this one's
        # in place: no new views to hand out (zero_grad(set_to_none=True) ends that).
        reuse = self._noisy if _still_views(self._noisy, params, "grad") and self._noisy.flat.device == summed.device else None
        noisy = torch.add(summed, noise, out=reuse.flat) if reuse is not None else summed + noise  # (D,)
        if self.loss_reduction == "mean":
            noisy.div_(self.expected_batch_size)  # one physical batch per step: Opacus' accumulated_iterations is 1
        self._summed = None
        if reuse is None:
            self._noisy = _share(noisy, params, "grad")
        add_prox(params, self.prox_ref, self.prox_mu)
        self._is_last_step_skipped = False
        self.original_optimizer.step()

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = self.grad_samples  # (B, *shape) each
        for p in params:
            _check_processed_flag(p.grad_sample)
        summed, _ = clip_and_sum(samples, max_grad_norm=self.max_grad_norm)  # (D,) float32
        if any(p.summed_grad is not None for p in params):  # accumulating physical batches into one step
            summed = summed + self._flat(params, "summed_grad", self._summed)
        self._summed = _share(summed, params, "summed_grad")
        for p in params:
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        if self.secure_mode:  # Opacus' hardened sampler; not reproducible by design
            super().add_noise()
            return
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        summed = self._flat(params, "summed_grad", self._summed)  # (D,)
        # One draw and one host-to-device copy for all parameters, not one per parameter; the i-th
        # parameter takes the i-th slice.
        self._noisy = _share(summed + self._noise(summed).to(dtype=summed.dtype), params, "grad")
        for p in params:
            _mark_as_processed(p.summed_grad)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, (σC)²) noise shaped like ``like`` (D,), drawn on the CPU from the seeded generator, float32, on ``like``'s device.

        To a GPU it travels from page-locked memory without blocking: PyTorch's copy from ordinary
        (pageable) memory waits until the GPU has finished all the work queued so far, which
        would stall the host once every step. The pinned block is not reused before its copy has
        run (PyTorch's caching host allocator records the copy's stream).
        """
        pinned = like.device.type == "cuda"
        host = torch.empty(like.shape, dtype=torch.float32, pin_memory=pinned)
        torch.normal(0.0, self.noise_multiplier * self.max_grad_norm, size=like.shape, generator=self.generator, out=host)
        return host.to(like.device, non_blocking=pinned)

    prox_mu: float = 0.0
    prox_ref: list[torch.Tensor] | None = None

    def scale_grad(self) -> None:
        """Opacus' averaging (one division of the flat noisy gradient), then FedProx's μ(w - w_global):
        added after the noise because it depends on no patient's data, so it changes nothing in
        the privacy accounting."""
        params = self.params
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations
            if _still_views(self._noisy, params, "grad"):
                self._noisy.flat.div_(divisor)
            else:
                torch._foreach_div_([p.grad for p in params], divisor)
        add_prox(params, self.prox_ref, self.prox_mu)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        if not self._is_last_step_skipped:  # Opacus kept summed_grad otherwise
            self._summed = None
        if set_to_none:
            self._noisy = None

    @staticmethod
    def _flat(params: list[nn.Parameter], attr: str, stored: _Flat | None) -> torch.Tensor:
        """(D,): every parameter's ``attr`` in order (None as zeros), the stored flat vector itself while they still are its views."""
        if _still_views(stored, params, attr):
            return stored.flat
        return torch.cat([torch.zeros_like(p).reshape(-1) if getattr(p, attr) is None else getattr(p, attr).reshape(-1) for p in params])


def _share(flat: torch.Tensor, params: list[nn.Parameter], attr: str) -> _Flat | None:
    """Set each parameter's ``attr`` to its slice of ``flat`` (D,) in the parameters' dtype: views of one
    converted vector when they share a dtype (returned), else per-parameter copies (None)."""
    dtypes = {p.dtype for p in params}
    shared = len(dtypes) == 1
    if shared:
        flat = flat.to(dtypes.pop())
    views = [v.view_as(p) if shared else v.view_as(p).to(p.dtype) for v, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]
    for p, v in zip(params, views, strict=True):
        setattr(p, attr, v)
    return _Flat(flat, views) if shared else None


def _still_views(stored: _Flat | None, params: list[nn.Parameter], attr: str) -> TypeGuard[_Flat]:
    """Whether every parameter's ``attr`` is still the view of ``stored`` that :func:`_share` set (never for None)."""
    return stored is not None and len(stored.views) == len(params) and all(getattr(p, attr) is v for p, v in zip(params, stored.views, strict=True))


def add_prox(params: Sequence[torch.Tensor], ref: list[torch.Tensor] | None, mu: float) -> None:
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
    noise_generator: torch.Generator | None = None,
) -> StepStats:
    """Run ``steps`` patient-level DP-SGD steps in place on ``model`` (FedProx with ``prox_mu`` > 0).

    ``grads`` picks the per-patient gradient strategy (:data:`client.patient_grads.GRAD_STRATEGIES`);
    all give the same gradients up to float rounding. The noise is drawn from ``noise_generator``
    when given, else from ``generator``, which also draws the Poisson batches and session bounds
    (a separate noise generator leaves the batch sequence exactly that of :func:`train_plain`
    with the same ``generator``, as ``fedrelapse bench dp-step`` needs to compare like with like).
    """
    expected = max(1, int(data.n_patients * sample_rate))
    dp_opt = CpuNoiseDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        generator=None if secure_mode else (noise_generator if noise_generator is not None else generator),
        secure_mode=secure_mode,
    )
    if prox_mu > 0:
        dp_opt.prox_mu, dp_opt.prox_ref = prox_mu, [p.detach().clone() for p in dp_opt.params]
    name_of = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    stray = [tuple(p.shape) for p in dp_opt.params if id(p) not in name_of]
    if stray:
        raise ValueError(f"The optimizer holds {len(stray)} trainable parameter(s) that are not the model's (shapes {stray}); build it from this model's parameters (make_optimizer).")
    names = [name_of[id(p)] for p in dp_opt.params]  # the optimizer's order, which step_rows takes
    per_patient = make_patient_grads(model, strategy=grads)
    data = data.on(device)
    losses: list[torch.Tensor] = []
    batches: list[int] = []
    seen: set[int] = set()
    model.train()
    try:
        for _ in range(steps):
            idx = poisson_sample(data.n_patients, sample_rate, generator)
            batches.append(len(idx))
            seen.update(idx.tolist())
            if len(idx) == 0:  # an empty Poisson batch still takes a (pure-noise) step
                rows = [torch.zeros((0, *p.shape), device=p.device) for p in dp_opt.params]
            else:
                mel, markers, y, m = _batch(data, idx, max_sessions, generator, device)
                per_patient, (per_grads, patient_loss) = _rows_or_fallback(per_patient, model, mel, markers, y, m)  # name -> (B, *shape); (B,)
                rows = [per_grads[n] for n in names]
                losses.append(patient_loss.detach().mean())
            dp_opt.step_rows(rows)  # p.grad stays the step's noisy gradient until the next step overwrites it
    finally:
        dp_opt.zero_grad(set_to_none=True)
        per_patient.close()
    return _stats(steps, losses, batches, len(seen))


def _rows_or_fallback(per_patient: PatientGrads, model: nn.Module, *batch: torch.Tensor) -> tuple[PatientGrads, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The step's per-patient rows, and the strategy to use from now on.

    When `grouped`'s first-step probes refuse the model (it mixes sessions, or a layer's copies would
    meet other patients' rows), the site warns and uses `functorch` for this step and the rest, as
    :func:`client.patient_grads.make_patient_grads` does for a layer it has no rule for: the same
    patient-level gradients, slower. Nothing of the refused attempt is used. A refusal after the
    probes passed (a parameter used outside its layer, an input changed in place) is raised.
    """
    try:
        return per_patient, per_patient(*batch)
    except UnsupportedLayerError as e:
        if not isinstance(per_patient, GroupedGrads) or per_patient.rows_checked:
            raise
        per_patient.close()
        fallback = functorch_fallback(model, e, stacklevel=4)
        return fallback, fallback(*batch)


def _stats(steps: int, losses: list[torch.Tensor], batches: list[int], patients: int) -> StepStats:
    """Step statistics, read back from the device once per call rather than once per step
    (a per-step read would make the CPU wait for the GPU before queueing the next step)."""
    mean_loss = float(torch.stack(losses).float().mean()) if losses else 0.0
    return StepStats(steps, mean_loss, sum(batches) / max(len(batches), 1), patients)


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
    batches: list[int] = []
    seen: set[int] = set()
    model.train()
    for _ in range(steps):
        idx = poisson_sample(data.n_patients, sample_rate, generator)
        batches.append(len(idx))
        seen.update(idx.tolist())
        if len(idx) == 0:
            continue
        mel, markers, y, m = _batch(data, idx, max_sessions, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_loss(model, mel, markers, y, m)
        loss.backward()
        add_prox(params, ref, prox_mu)
        optimizer.step()
        losses.append(loss.detach())
    return _stats(steps, losses, batches, len(seen))


def _batch(data: PatientTensors, idx: torch.Tensor, max_sessions: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The patients ``idx``: mel (B, K, n_mels, F) float32 and markers (B, K, M) stored session-major.

    Their storage is (K, B, ...), so :func:`client.patient_grads.session_rows` gives the model's
    session-major rows without another copy. ``index_select`` then one converting copy: advanced
    indexing (``mel[idx]``) of the float16 log-mels took ~0.5 ms of a ~9 ms step on CPU.
    """
    m = bound_sessions(data.mask[idx], max_sessions, generator)
    on = idx.to(data.mel.device)  # gather where the tensors live (the device, after PatientTensors.on)
    return (
        _session_major(data.mel.index_select(0, on), device=device, dtype=torch.float32),  # (B, K, n_mels, F)
        _session_major(data.markers.index_select(0, on), device=device, dtype=data.markers.dtype),  # (B, K, M)
        data.labels.index_select(0, on).to(device),  # (B, K)
        m.to(device=device, dtype=torch.float32),  # (B, K)
    )


def _session_major(t: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, K, *rest) -> the same values as ``dtype`` on ``device``, a (B, K, *rest) view of a (K, B, *rest) tensor (one copy)."""
    out = torch.empty((t.shape[1], t.shape[0], *t.shape[2:]), device=device, dtype=dtype)  # (K, B, *rest)
    return out.copy_(t.transpose(0, 1)).transpose(0, 1)


def _batch_loss(model: nn.Module, mel: torch.Tensor, markers: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over patients of each patient's mean session loss (the DP objective)."""
    return patient_losses(patient_logits(model, mel, markers), y, m).mean()
