"""Patient-level DP-SGD: one clipped gradient per patient, real noise, honest accounting."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant, create_accountant

from client.dataset import PatientTensors
from client.dp_train import CpuNoiseDPOptimizer, clip_and_sum, patient_loss_fn, train_dp
from client.patient_grads import DEFAULT_GRADS, GRAD_STRATEGIES, make_patient_grads
from shared.config import ModelSpec, TrainingConfig
from shared.markers import N_MODEL_MARKERS
from shared.models.prosody_mel import ProsodyMelNet
from shared.privacy.accounting import RDP_ALPHAS, SubsampledGaussian, _calibrate, calibrate_noise, epsilon

P, K, N_MELS, F, M = 6, 4, 8, 16, N_MODEL_MARKERS

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

    class DPParameter(torch.nn.Parameter):
        """A parameter as Opacus' DPOptimizer uses it: per-patient rows in ``grad_sample``, their clipped
        sum in ``summed_grad`` (attributes Opacus sets at run time; torch's types do not declare them)."""

        grad_sample: torch.Tensor | None
        summed_grad: torch.Tensor | None
else:
    DPParameter = torch.nn.Parameter  # at run time a plain Parameter: Opacus adds the attributes


def summed_grad(p: torch.Tensor) -> torch.Tensor:
    """``p.summed_grad``: the clipped per-patient sum that clip_and_accumulate left on ``p``."""
    s = cast(DPParameter, p).summed_grad
    assert s is not None, "no clipped sum on this parameter"
    return s


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, which the step under test has set."""
    assert p.grad is not None, "no gradient on this parameter"
    return p.grad


def make_data(seed: int = 0, patients: int = P) -> PatientTensors:
    g = torch.Generator().manual_seed(seed)
    return PatientTensors(
        mel=torch.randn(patients, K, N_MELS, F, generator=g).half(),
        markers=torch.randn(patients, K, M, generator=g),
        labels=(torch.rand(patients, K, generator=g) > 0.5).float(),
        mask=torch.ones(patients, K, dtype=torch.bool),
        patient_ids=tuple(f"p{i}" for i in range(patients)),
    )


def make_model() -> ProsodyMelNet:
    torch.manual_seed(0)
    return ProsodyMelNet(ModelSpec(hidden=8, conv_channels=4, groups=2), n_mels=N_MELS, n_markers=M)


def run(model: torch.nn.Module, data: PatientTensors, *, sigma: float, clip: float, seed: int = 1, grads: str = "functorch") -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_dp(model, data, steps=1, sample_rate=1.0, noise_multiplier=sigma, max_grad_norm=clip, max_sessions=K,
             optimizer=opt, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), grads=grads)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


by_strategy = pytest.mark.parametrize("grads", GRAD_STRATEGIES)


@by_strategy
def test_the_rows_clipped_are_one_per_patient_not_per_session(grads: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.dp_train as dp_train

    model, data = make_model(), make_data()
    seen: list[tuple[int, ...]] = []
    original = dp_train.clip_and_sum

    def spy(grad_samples: list[torch.Tensor], *, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(tuple(g.shape[0] for g in grad_samples))
        return original(grad_samples, max_grad_norm=max_grad_norm)

    monkeypatch.setattr(dp_train, "clip_and_sum", spy)
    run(model, data, sigma=0.0, clip=1.0, grads=grads)
    assert seen and all(len(rows) == len(list(model.parameters())) for rows in seen)
    assert {n for rows in seen for n in rows} == {P}  # every step: 6 patients for every parameter, not 6 x 4 = 24 sessions


@by_strategy
def test_each_patients_contribution_is_clipped_to_C(grads: str) -> None:
    """Adding one patient (with huge, adversarial labels) moves the summed update by <= C."""
    clip = 0.5
    base = make_data()
    extra = make_data(seed=9, patients=1)
    extra = PatientTensors(extra.mel * 50, extra.markers * 50, 1 - extra.labels, extra.mask, ("outlier",))
    mel, markers, labels, mask = (torch.cat([a, b]) for a, b in zip((base.mel, base.markers, base.labels, base.mask), (extra.mel, extra.markers, extra.labels, extra.mask), strict=True))
    both = PatientTensors(mel, markers, labels, mask, base.patient_ids + ("outlier",))
    start = {n: p.detach().clone() for n, p in make_model().named_parameters()}

    # With q = 1 and sigma = 0, SGD(lr=1) moves params by -(sum of clipped grads) / expected batch.
    without = run(make_model(), base, sigma=0.0, clip=clip, grads=grads)
    with_p = run(make_model(), both, sigma=0.0, clip=clip, grads=grads)
    sum_without = torch.cat([((start[n] - without[n]) * P).flatten() for n in start])
    sum_with = torch.cat([((start[n] - with_p[n]) * (P + 1)).flatten() for n in start])
    assert float((sum_with - sum_without).norm()) <= clip * (1 + 1e-4)
    # ...and without clipping the same outlier would have moved it far more.
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    raw = torch.func.grad(patient_loss_fn(model))(params, dict(model.named_buffers()), extra.mel[0].float(), extra.markers[0], extra.labels[0], extra.mask[0].float())
    assert float(torch.cat([g.flatten() for g in raw.values()]).norm()) > 5 * clip


@by_strategy
def test_clipping_is_per_patient_not_per_session(grads: str) -> None:
    """A patient with many sessions gets the same bound as a patient with one."""
    data = make_data()
    one_session = PatientTensors(data.mel, data.markers, data.labels, data.mask.clone(), data.patient_ids)
    one_session.mask[:, 1:] = False
    for d in (data, one_session):
        model = make_model()
        opt = CpuNoiseDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=P)
        per_patient = make_patient_grads(model, strategy=grads)
        per_grads, _ = per_patient(d.mel.float(), d.markers, d.labels, d.mask.float())
        assert all(g.shape[0] == P for g in per_grads.values())
        for n, p in model.named_parameters():
            cast(DPParameter, p).grad_sample = per_grads[n]
        opt.clip_and_accumulate()
        per_patient.close()
        total = torch.cat([summed_grad(p).flatten() for p in model.parameters()])
        assert float(total.norm()) <= P * 0.1 * (1 + 1e-4)


@by_strategy
def test_noise_is_really_added(grads: str) -> None:
    data = make_data()
    quiet = run(make_model(), data, sigma=0.0, clip=1.0, grads=grads)
    noisy = run(make_model(), data, sigma=1.0, clip=1.0, grads=grads)
    diff = torch.cat([(quiet[n] - noisy[n]).flatten() for n in quiet])
    # noise std per coordinate = sigma * C / B = 1/6; its norm over d params ~ sqrt(d)/6
    d = diff.numel()
    assert float(diff.norm()) == pytest.approx(d**0.5 / P, rel=0.2)


@by_strategy
def test_same_seed_same_update_different_seed_different_noise(grads: str) -> None:
    data = make_data()
    a = run(make_model(), data, sigma=1.0, clip=1.0, seed=5, grads=grads)
    b = run(make_model(), data, sigma=1.0, clip=1.0, seed=5, grads=grads)
    c = run(make_model(), data, sigma=1.0, clip=1.0, seed=6, grads=grads)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_a_separate_noise_generator_leaves_the_plain_batch_sequence() -> None:
    """`bench dp-step` compares DP and plain steps on the same Poisson batches: with its own noise
    generator, DP training draws exactly the batches plain training draws from the same seed."""
    from client.dp_train import train_plain

    data = make_data(patients=40)

    def sampled(mode: str, noise_generator: torch.Generator | None = None) -> tuple[float, torch.Tensor]:
        model, gen = make_model(), torch.Generator().manual_seed(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        common: dict[str, Any] = dict(steps=12, sample_rate=0.3, max_sessions=2, optimizer=opt, generator=gen, device=torch.device("cpu"))
        if mode == "plain":
            stats = train_plain(model, data, **common)
        else:
            stats = train_dp(model, data, noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=noise_generator, **common)
        return stats.mean_batch, gen.get_state()

    plain = sampled("plain")
    apart = sampled("dp", torch.Generator().manual_seed(9))
    shared = sampled("dp")
    assert apart[0] == plain[0] and torch.equal(apart[1], plain[1])
    assert not torch.equal(shared[1], plain[1])  # noise drawn from the sampling generator moves the batch sequence


def test_every_strategy_gives_the_same_per_patient_gradients_and_losses() -> None:
    """Grouped contractions == hooks (per-session rows summed per patient) == vmap over patients == one patient at a time."""
    data = make_data()
    data.mask[0, 2:] = False  # a patient with fewer labelled sessions weighs them more
    mel, markers, y, m = data.mel.float(), data.markers, data.labels, data.mask.float()
    results = {}
    for name in GRAD_STRATEGIES:
        model = make_model()
        per_patient = make_patient_grads(model, strategy=name)
        results[name] = per_patient(mel, markers, y, m)
        per_patient.close()
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    for i in range(P):  # reference: plain autograd, one patient alone
        ref = torch.func.grad(patient_loss_fn(model))(params, dict(model.named_buffers()), mel[i], markers[i], y[i], m[i])
        for name, (g, _) in results.items():
            for n in ref:
                torch.testing.assert_close(g[n][i], ref[n], rtol=1e-4, atol=1e-6, msg=f"{name}: {n} patient {i}")
    for name in GRAD_STRATEGIES:
        torch.testing.assert_close(results[name][1], results["functorch"][1])


@pytest.mark.parametrize("grads", ["hooks", "grouped"])
def test_hooks_are_removed_after_training(grads: str) -> None:
    model, data = make_model(), make_data()
    run(model, data, sigma=1.0, clip=1.0, grads=grads)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    # the plain model still trains with ordinary autograd afterwards
    model(data.mel[0].float(), data.markers[0]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent device: the GPU bench script runs it)")
@pytest.mark.filterwarnings("error::RuntimeWarning")  # `grouped` must not fall back to functorch on the GPU (its probes compare in full float32 there too)
@by_strategy
def test_a_dp_step_on_the_gpu_gives_the_cpu_update(grads: str) -> None:
    """Data resident on the GPU, seeded sampling and noise on the CPU: the same update either way."""
    from client import patient_grads

    data = make_data(patients=12)
    updates = {}
    for dev in ("cpu", "cuda"):
        patient_grads._INDEPENDENT_ROWS.clear()  # `grouped` probes the model on each device
        model = make_model().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        stats = train_dp(model, data, steps=3, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=0.5, max_sessions=3,
                         optimizer=opt, generator=torch.Generator().manual_seed(4), device=torch.device(dev), grads=grads)
        updates[dev] = ({n: p.detach().cpu() for n, p in model.named_parameters()}, stats)
    (cpu, cpu_stats), (gpu, gpu_stats) = updates["cpu"], updates["cuda"]
    assert cpu_stats.mean_batch == gpu_stats.mean_batch and cpu_stats.mean_loss == pytest.approx(gpu_stats.mean_loss, abs=1e-4)
    for n in cpu:
        torch.testing.assert_close(gpu[n], cpu[n], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent device: the GPU bench script runs it)")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_grouped_probes_pass_on_the_gpu_with_tf32_and_under_autocast(autocast: bool) -> None:
    """cuDNN may use TF32 and `bench gpu` runs under bf16 autocast: the probes compare in full float32 whatever the caller's settings."""
    from client import patient_grads
    from client.patient_grads import GroupedGrads

    patient_grads._INDEPENDENT_ROWS.clear()
    model = make_model().cuda()
    g = torch.Generator().manual_seed(0)
    b, k = 4, 3
    mel, markers = torch.randn(b, k, N_MELS, F, generator=g).cuda(), torch.randn(b, k, M, generator=g).cuda()
    y, m = (torch.rand(b, k, generator=g) > 0.5).float().cuda(), torch.ones(b, k).cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    grouped = GroupedGrads(model)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            rows, _ = grouped(mel, markers, y, m)
        assert grouped.rows_checked and all(torch.isfinite(r).all() for r in rows.values())
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # the caller's settings are back
    finally:
        grouped.close()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_config_offers_exactly_the_implemented_strategies() -> None:
    from dataclasses import fields

    meta = next(f for f in fields(TrainingConfig) if f.name == "per_patient_grads").metadata
    assert tuple(meta["choices"]) == GRAD_STRATEGIES
    assert TrainingConfig().per_patient_grads == DEFAULT_GRADS == "grouped"
    with pytest.raises(ValueError, match="choose one of grouped, functorch, hooks"):
        make_patient_grads(make_model(), strategy="ghost")


def test_epsilon_grows_with_rounds_and_matches_opacus_own_accountant() -> None:
    sigma, q, steps = 1.1, 0.2, 10
    acc = RDPAccountant()
    previous = 0.0
    for rnd in range(1, 6):
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        ours = epsilon([SubsampledGaussian(sigma, q, steps)] * rnd, delta=1e-5)
        assert ours > previous
        assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
        previous = ours


def test_merging_repeated_mechanisms_leaves_epsilon_unchanged() -> None:
    """A ledger of many rounds is composed as few events, with exactly Opacus' result."""
    rounds = [SubsampledGaussian(1.1, 0.2, 10)] * 6 + [SubsampledGaussian(0.9, 0.1, 5)] * 3 + [SubsampledGaussian(1.1, 0.2, 0)]
    for accountant in ("rdp", "prv"):
        acc = create_accountant(accountant)
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in rounds if e.steps]  # unmerged: 9 entries
        expected = acc.get_epsilon(delta=1e-5, **({"alphas": list(RDP_ALPHAS)} if accountant == "rdp" else {}))
        assert epsilon(rounds, delta=1e-5, accountant=accountant) == pytest.approx(expected, rel=1e-6)


def test_noise_calibration_is_computed_once_per_question() -> None:
    _calibrate.cache_clear()
    first = calibrate_noise(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.125, steps=30)
    again = calibrate_noise(target_epsilon=4, target_delta=1e-5, sample_rate=0.125, steps=30)  # int ε: same question
    assert first == again and _calibrate.cache_info().hits == 1
    assert calibrate_noise(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.125, steps=31) > first


def test_calibrated_sigma_gives_the_target_epsilon_back() -> None:
    for eps in (1.0, 3.0, 8.0):
        sigma = calibrate_noise(target_epsilon=eps, target_delta=1e-5, sample_rate=0.15, steps=50)
        assert epsilon([SubsampledGaussian(sigma, 0.15, 50)], delta=1e-5) == pytest.approx(eps, rel=0.02)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_at_a_small_epsilon_the_sigma_spends_within_one_percent_of_it(eps: float, accountant: str) -> None:
    """Opacus' absolute 0.01 tolerance gave σ 7-40 % above the one needed below ε = 1 (ε = 0.1:
    σ 65 spending 0.092, where σ 60.6 spends 0.099): noise that costs utility and was not asked for."""
    sigma = calibrate_noise(target_epsilon=eps, target_delta=1e-5, sample_rate=0.25, steps=50, accountant=accountant)
    spent = epsilon([SubsampledGaussian(sigma, 0.25, 50)], delta=1e-5, accountant=accountant)

    assert eps * 0.99 <= spent <= eps


def test_from_epsilon_one_up_the_sigma_search_keeps_opacus_tolerance() -> None:
    """Plans at ε >= 1 get the σ they got before (Opacus' own 0.01 tolerance)."""
    from opacus.accountants.utils import get_noise_multiplier

    for eps in (1.0, 8.0):
        opacus_sigma = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=0.25, steps=50, accountant="rdp", alphas=list(RDP_ALPHAS))
        assert calibrate_noise(target_epsilon=eps, target_delta=1e-5, sample_rate=0.25, steps=50) == opacus_sigma


def test_unknown_accountant_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of rdp, prv"):
        epsilon([SubsampledGaussian(1.0, 0.1, 1)], delta=1e-5, accountant="gdp")


def _grad_samples(rows: int, dtype: torch.dtype = torch.float32) -> tuple[list[DPParameter], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 8, 5), (4,), (3, 12), ()]  # () : a scalar parameter
    params = [DPParameter(torch.randn(s, generator=g)) for s in shapes]
    scales = torch.tensor([0.01, 0.3, 1.0, 5.0, 0.5, 2.0, 0.0, 0.1])[:rows]  # rows under and over C, one all-zero
    samples = [(torch.randn(rows, *s, generator=g) * scales.view(-1, *[1] * len(s))).to(dtype) for s in shapes]
    return params, samples


def _clipped_sum(opt: DPOptimizer, params: list[DPParameter], samples: list[torch.Tensor]) -> list[torch.Tensor]:
    for p, s in zip(params, samples, strict=True):
        p.grad_sample = s.clone()
    opt.clip_and_accumulate()
    out = [summed_grad(p).clone() for p in params]
    opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("rows", [8, 0])
def test_fused_clipping_equals_opacus_per_parameter_clipping(rows: int) -> None:
    """All parameters clipped and summed at once == Opacus' own loop over parameters (and an empty batch sums to zero)."""
    from opacus.optimizers import DPOptimizer

    params, samples = _grad_samples(rows)
    ours = CpuNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    opacus = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    for mine, reference in zip(_clipped_sum(ours, params, samples), _clipped_sum(opacus, params, samples), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)
    if rows == 0:
        assert all(float(s.abs().max()) == 0.0 for s in _clipped_sum(ours, params, samples))


@pytest.mark.parametrize(("optimizer", "reduction", "prox_mu"), [("sgd", "mean", 0.0), ("adam", "mean", 0.0), ("sgd", "sum", 0.0), ("adam", "mean", 0.3)])
def test_step_rows_equals_the_grad_sample_step_over_several_steps(optimizer: str, reduction: str, prox_mu: float) -> None:
    """step_rows (rows straight in, the flat noisy gradient reused in place from the second step) == grad_sample + step + zero_grad, noise included, step after step."""
    params_a, samples = _grad_samples(8)
    params_b = [DPParameter(p.detach().clone()) for p in params_a]
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), "adam": lambda ps: torch.optim.Adam(ps, lr=0.05)}[optimizer]
    by_rows = CpuNoiseDPOptimizer(make(params_a), noise_multiplier=1.5, max_grad_norm=0.5, expected_batch_size=4, generator=torch.Generator().manual_seed(7), loss_reduction=reduction)
    by_samples = CpuNoiseDPOptimizer(make(params_b), noise_multiplier=1.5, max_grad_norm=0.5, expected_batch_size=4, generator=torch.Generator().manual_seed(7), loss_reduction=reduction)
    for opt, params in ((by_rows, params_a), (by_samples, params_b)):
        opt.prox_mu, opt.prox_ref = prox_mu, [p.detach().clone() * 0.5 for p in params]
    flats = set()
    for step in range(4):
        rows = [s * (step + 1) for s in samples]
        by_rows.step_rows(rows)
        flats.add(grad_of(params_a[0]).untyped_storage().data_ptr())
        for p, r in zip(params_b, rows, strict=True):
            p.grad_sample = r.clone()
        by_samples.step()
        noisy_b = [grad_of(p).clone() for p in params_b]
        by_samples.zero_grad(set_to_none=True)
        for a, b, g in zip(params_a, params_b, noisy_b, strict=True):
            torch.testing.assert_close(a.grad, g, rtol=1e-6, atol=1e-7)  # the same noisy, averaged gradient
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert len(flats) == 1  # one flat vector, overwritten in place from step 2 on
    by_rows.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params_a)


def test_step_rows_takes_opacus_path_in_secure_mode_and_refuses_a_wrong_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    params, samples = _grad_samples(8)
    start = [p.detach().clone() for p in params]
    opt = CpuNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=4.0, max_grad_norm=0.5, expected_batch_size=4, secure_mode=True)

    def seeded_noise(self: CpuNoiseDPOptimizer, like: torch.Tensor) -> torch.Tensor:
        raise AssertionError("secure mode drew the seeded, reproducible noise instead of Opacus' hardened noise")

    monkeypatch.setattr(CpuNoiseDPOptimizer, "_noise", seeded_noise)
    for _ in range(2):  # the second step must not trip Opacus' "not cleared since the last step" check
        opt.step_rows([s.clone() for s in samples])
    assert all(getattr(p, "grad_sample", None) is None and p.summed_grad is None for p in params)
    update = torch.cat([(s - p.detach()).flatten() for p, s in zip(params, start, strict=True)])
    assert float(update.std()) == pytest.approx(2 ** 0.5 * 4.0 * 0.5 / 4, rel=0.2)  # two steps of σC / expected batch noise
    with pytest.raises(ValueError, match="step_rows got 3 per-patient gradient tensors for 4 trainable parameters"):
        opt.step_rows(samples[:3])


def test_step_rows_with_a_step_hook_or_float64_parameters_is_opacus_own_step() -> None:
    """A step hook (e.g. an Opacus accountant's, which reads grad_sample) and non-float32 parameters take Opacus' path: the same update as grad_sample + step."""
    seen = []
    for dtype, hook in ((torch.float32, lambda opt: seen.append(opt.accumulated_iterations)), (torch.float64, None)):
        params_a, samples = _grad_samples(8, dtype)
        params_a = [DPParameter(p.detach().to(dtype)) for p in params_a]
        params_b = [DPParameter(p.detach().clone()) for p in params_a]
        by_rows = CpuNoiseDPOptimizer(torch.optim.SGD(params_a, lr=0.5), noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=4, generator=torch.Generator().manual_seed(3))
        by_samples = CpuNoiseDPOptimizer(torch.optim.SGD(params_b, lr=0.5), noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=4, generator=torch.Generator().manual_seed(3))
        by_rows.step_hook = by_samples.step_hook = hook
        for _ in range(2):
            by_rows.step_rows([s.clone() for s in samples])
            for p, s in zip(params_b, samples, strict=True):
                p.grad_sample = s.clone()
            by_samples.step()
            by_samples.zero_grad(set_to_none=True)
        for a, b in zip(params_a, params_b, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
    assert seen == [1, 1, 1, 1]  # the hook ran for both optimizers, both steps, and could read grad_sample


def test_step_rows_keeps_a_skipped_steps_sum_and_adds_the_next_batch_to_it_as_opacus_does() -> None:
    from opacus.optimizers import DPOptimizer

    params_a, samples = _grad_samples(8)
    params_b = [DPParameter(p.detach().clone()) for p in params_a]
    ours = CpuNoiseDPOptimizer(torch.optim.SGD(params_a, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4)
    opacus = DPOptimizer(torch.optim.SGD(params_b, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4)
    for opt in (ours, opacus):
        opt.signal_skip_step(do_skip=True)  # the first physical batch only accumulates
    ours.step_rows([s[:4].clone() for s in samples])
    for p, s in zip(params_b, samples, strict=True):
        p.grad_sample = s[:4].clone()
    opacus.step()
    opacus.zero_grad(set_to_none=True)
    assert all(p.summed_grad is not None for p in params_a)  # kept for the next batch
    ours.step_rows([s[4:].clone() for s in samples])
    for p, s in zip(params_b, samples, strict=True):
        p.grad_sample = s[4:].clone()
    opacus.step()
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_train_dp_refuses_an_optimizer_holding_parameters_that_are_not_the_models() -> None:
    model = make_model()
    other = torch.nn.Parameter(torch.zeros(3, 2))
    opt = torch.optim.SGD([*model.parameters(), other], lr=1.0)
    with pytest.raises(ValueError, match=r"optimizer holds 1 trainable parameter\(s\) that are not the model's \(shapes \[\(3, 2\)\]\)"):
        train_dp(model, make_data(), steps=1, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0, max_sessions=K,
                 optimizer=opt, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))


def test_fused_clipping_bounds_each_row_in_float32_even_for_bf16_rows() -> None:
    _, samples = _grad_samples(8, torch.bfloat16)
    summed, norms = clip_and_sum(samples, max_grad_norm=0.5)
    assert summed.dtype == norms.dtype == torch.float32
    reference = torch.cat([s.float().reshape(8, -1) for s in samples], dim=1).norm(dim=1)
    torch.testing.assert_close(norms, reference)
    for row in range(8):  # each row alone contributes at most C
        alone, _ = clip_and_sum([s[row : row + 1] for s in samples], max_grad_norm=0.5)
        assert float(alone.norm()) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_row_holding_nan_or_inf_adds_nothing_and_the_clipped_sum_stays_finite(bad: float) -> None:
    """One patient's non-finite gradient counts as a zero row: the sum is the other rows' clipped sum, so it cannot decide the step alone."""
    # Arrange: row 3 (scale 5, over C) gets one non-finite entry in its third parameter
    _, samples = _grad_samples(8)
    poisoned = [s.clone() for s in samples]
    poisoned[2][3, 0, 0] = bad
    others = [torch.cat([s[:3], s[4:]]) for s in samples]
    # Act
    summed, norms = clip_and_sum(poisoned, max_grad_norm=0.5)
    expected, _ = clip_and_sum(others, max_grad_norm=0.5)
    # Assert
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-7)
    assert not torch.isfinite(norms[3]) and torch.isfinite(norms[[0, 1, 2, 4, 5, 6, 7]]).all()  # the norms say which rows were dropped


@pytest.mark.parametrize("path", ["step_rows", "grad_sample and step", "step_rows in secure mode"])
def test_a_patient_row_holding_nan_or_inf_leaves_every_dp_step_path_finite(path: str) -> None:
    """The fused step, Opacus' step through our clip_and_accumulate, and secure mode's fallback all drop a non-finite row (σ = 0: exact comparison)."""
    # Arrange: row 1 NaN in the first parameter, row 5 +Inf in the scalar parameter
    params, samples = _grad_samples(8)
    poisoned = [s.clone() for s in samples]
    poisoned[0][1, 0, 0, 0] = float("nan")
    poisoned[3][5] = float("inf")
    finite_rows = [torch.cat([s[:1], s[2:5], s[6:]]) for s in samples]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def optimizer(ps: Sequence[torch.nn.Parameter]) -> CpuNoiseDPOptimizer:
        return CpuNoiseDPOptimizer(torch.optim.SGD(ps, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4, secure_mode=path.endswith("secure mode"))

    # Act
    if path == "grad_sample and step":
        opt = optimizer(params)
        for p, s in zip(params, poisoned, strict=True):
            p.grad_sample = s
        opt.step()
    else:
        optimizer(params).step_rows(poisoned)
    optimizer(reference).step_rows(finite_rows)
    # Assert
    for mine, expected in zip(params, reference, strict=True):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine.detach(), expected.detach(), rtol=1e-6, atol=1e-7)


def test_fused_step_equals_opacus_step_and_noise_has_std_sigma_c() -> None:
    """The whole step (clip, noise, averaging by the expected batch): σ = 0 gives Opacus' update; σ > 0 adds N(0, (σC/B)²) per coordinate."""
    from opacus.optimizers import DPOptimizer

    params, samples = _grad_samples(8)
    start = [p.detach().clone() for p in params]
    updates = []
    for opt_class, sigma in ((DPOptimizer, 0.0), (CpuNoiseDPOptimizer, 0.0), (CpuNoiseDPOptimizer, 4.0)):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        opt = opt_class(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4, generator=torch.Generator().manual_seed(0))
        for p, s in zip(params, samples, strict=True):
            p.grad_sample = s.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates.append(torch.cat([(s - p.detach()).flatten() for p, s in zip(params, start, strict=True)]))
    opacus, quiet, noisy = updates
    torch.testing.assert_close(quiet, opacus, rtol=1e-5, atol=1e-7)
    assert float((noisy - quiet).std()) == pytest.approx(4.0 * 0.5 / 4, rel=0.15)  # 389 coordinates


def test_an_empty_poisson_batch_still_takes_a_pure_noise_step() -> None:
    model = make_model()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stats = train_dp(model, make_data(), steps=1, sample_rate=1e-9, noise_multiplier=1.0, max_grad_norm=1.0, max_sessions=K,
                     optimizer=torch.optim.SGD(model.parameters(), lr=1.0), generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    assert stats.mean_batch == 0.0
    assert float(moved.std()) == pytest.approx(1.0 / max(1, int(P * 1e-9)), rel=0.2)  # σC / expected batch (1)


def test_flat_clipped_sum_accumulates_like_opacus_and_respects_gradients_set_by_hand() -> None:
    """summed_grad / grad are views of one flat vector; two accumulated batches equal Opacus'; a summed_grad replaced by hand is what gets noised and averaged."""
    from opacus.optimizers import DPOptimizer

    params, samples = _grad_samples(8)
    ours = CpuNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4)
    opacus = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4)
    sums = []
    for opt in (ours, opacus):
        for half in (slice(0, 4), slice(4, 8)):  # two physical batches into one logical step
            for p, s in zip(params, samples, strict=True):
                p.grad_sample = s[half].clone()
            opt.clip_and_accumulate()
        sums.append([summed_grad(p).clone() for p in params])
        if opt is ours:
            assert len({summed_grad(p).untyped_storage().data_ptr() for p in params}) == 1  # one flat vector
            params[2].summed_grad = torch.full_like(params[2], 3.0)  # set by hand: must be used as it is
            opt.add_noise()
            opt.scale_grad()
            assert len({grad_of(p).untyped_storage().data_ptr() for p in params if p is not params[2]}) == 1
            torch.testing.assert_close(params[2].grad, torch.full_like(params[2], 3.0 / 4))
            torch.testing.assert_close(params[0].grad, sums[0][0] / 4)
        opt.zero_grad(set_to_none=True)
    for mine, reference in zip(*sums, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_secure_mode_uses_opacus_noise_and_still_averages_by_the_expected_batch() -> None:
    """secure_mode: Opacus' own per-parameter noise sets p.grad; the averaging then divides those (not a stale flat vector)."""
    params, samples = _grad_samples(8)
    start = [p.detach().clone() for p in params]
    opt = CpuNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=4.0, max_grad_norm=0.5, expected_batch_size=4, secure_mode=True)
    for p, s in zip(params, samples, strict=True):
        p.grad_sample = s.clone()
    opt.step()
    update = torch.cat([(s - p.detach()).flatten() for p, s in zip(params, start, strict=True)])
    assert torch.isfinite(update).all()
    assert float(update.std()) == pytest.approx(4.0 * 0.5 / 4, rel=0.15)  # σC / expected batch, as in the seeded path


class ReversesItsRowsWhenTraining(torch.nn.Module):
    """Its Linear sees the rows in reverse order while training: `grouped`'s copies would meet other patients' rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(N_MELS, 1)

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        h = mel.mean(-1)  # (N, n_mels)
        return (self.a(h.flip(0)).flip(0) if self.training else self.a(h)).squeeze(-1) + markers[:, 0]


def test_a_model_grouped_probes_refuse_trains_with_functorch_after_a_warning() -> None:
    """The first step's probe refuses the model; the site warns, and every step's rows are functorch's (the same update as asking for functorch)."""
    from client import patient_grads

    patient_grads._INDEPENDENT_ROWS.clear()
    updates = {}
    for grads in ("grouped", "functorch"):
        model = ReversesItsRowsWhenTraining()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with pytest.warns(RuntimeWarning, match="does not give each patient's rows their own parameter copies.*Falling back to the functorch") if grads == "grouped" else contextlib.nullcontext():
            train_dp(model, make_data(), steps=3, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, max_sessions=K, optimizer=opt,
                     generator=torch.Generator().manual_seed(4), device=torch.device("cpu"), grads=grads)
        updates[grads] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert not any("forward" in vars(m) for m in model.modules())
    for name, value in updates["functorch"].items():
        torch.testing.assert_close(updates["grouped"][name], value, rtol=0, atol=0, msg=name)


def test_an_epsilon_no_noise_can_reach_is_a_policy_error_that_says_what_to_raise() -> None:
    from shared.errors import PolicyError, UnreachableEpsilonError

    with pytest.raises(UnreachableEpsilonError) as caught:
        calibrate_noise(target_epsilon=0.001, target_delta=1e-5, sample_rate=0.43, steps=6)
    assert isinstance(caught.value, PolicyError) and caught.value.refusal_code == "budget"
    message = str(caught.value)
    assert "`privacy.target_epsilon` ε=0.001 cannot be met" in message and "6 DP-SGD steps" in message
    assert "Raise `privacy.target_epsilon` above 0.0084" in message


def test_an_epsilon_below_the_rdp_floor_is_refused_without_a_sigma_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opacus learns it by doubling σ to 1e6, and RDP at σ ≈ 1e5–1e6 costs seconds an evaluation: 25 s per refusal."""
    from opacus.accountants import utils
    from opacus.accountants.analysis import rdp

    from shared.errors import UnreachableEpsilonError
    from shared.privacy.accounting import rdp_epsilon_floor

    _calibrate.cache_clear()

    def searched(**_: object) -> float:
        raise AssertionError("the σ search ran")

    monkeypatch.setattr(utils, "get_noise_multiplier", searched)
    monkeypatch.setattr(rdp, "compute_rdp", searched)
    floor = rdp_epsilon_floor(delta=1e-5)
    with pytest.raises(UnreachableEpsilonError, match=r"however much noise is added it spends at least ε ≈ 0\.00837"):
        calibrate_noise(target_epsilon=floor, target_delta=1e-5, sample_rate=0.5, steps=6)
    monkeypatch.undo()
    # The floor is Opacus' own conversion at zero RDP, and no σ spends less.
    assert floor == pytest.approx(rdp.get_privacy_spent(orders=list(RDP_ALPHAS), rdp=np.zeros(len(RDP_ALPHAS)), delta=1e-5)[0], rel=1e-12)
    for sigma in (0.8, 5.0, 1e3):
        assert epsilon([SubsampledGaussian(sigma, 0.5, 6)], delta=1e-5) >= floor
    assert rdp_epsilon_floor(delta=1e-3) < floor  # a looser δ costs less
    with pytest.raises(ValueError, match="delta must be in"):
        rdp_epsilon_floor(delta=0.0)
