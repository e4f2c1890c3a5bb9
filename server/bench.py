"""Benchmarks (`fedrelapse bench ...`): ratios measured side by side in one process.

Never timed tests: these write JSON and print a markdown table for BENCHMARKS.md, with the
machine named, because absolute seconds on shared CI machines mean little.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from client.dataset import PatientTensors
from client.dp_train import make_optimizer, train_dp, train_plain
from client.patient_grads import GRAD_STRATEGIES
from shared.config import ExperimentConfig
from shared.markers import N_MODEL_MARKERS
from shared.models import build_model
from shared.privacy.accounting import calibrate_noise


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": _memory_gib(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def set_threads(threads: int) -> None:
    """Pin torch's CPU threads for a benchmark (0 keeps torch's default)."""
    if threads < 0:
        raise ValueError(f"--threads must be 0 (torch's default) or a positive count, not {threads}.")
    if threads:
        torch.set_num_threads(threads)


def synthetic_batch(exp: ExperimentConfig, patients: int, sessions: int, seed: int = 0) -> PatientTensors:
    from client.features import n_frames

    g = torch.Generator().manual_seed(seed)
    f = exp.features
    return PatientTensors(
        mel=torch.randn(patients, sessions, f.n_mels, n_frames(f), generator=g).half(),  # (P, K, n_mels, F)
        markers=torch.randn(patients, sessions, N_MODEL_MARKERS, generator=g),  # (P, K, N_MODEL_MARKERS)
        labels=(torch.rand(patients, sessions, generator=g) > 0.8).float(),
        mask=torch.ones(patients, sessions, dtype=torch.bool),
        patient_ids=tuple(f"p{i}" for i in range(patients)),
    )


def dp_step_ratio(exp: ExperimentConfig, *, device: str = "cpu", repeats: int = 5, steps: int = 10, strategies: tuple[str, ...] = GRAD_STRATEGIES, ghost_reference: bool = True,
                  autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Seconds per local step, patient-level DP-SGD (each strategy) vs plain SGD, same model, data and sampling.

    The modes run interleaved, in a rotating order, inside every repeat, so machine load hits
    them alike; the first repeat only warms up. Wall time and process CPU time are both
    reported: on a shared machine the CPU-time ratio is the steadier one. ``autocast`` (e.g.
    ``torch.bfloat16``) runs every mode under mixed precision. ``ghost_reference`` adds Opacus' ghost
    clipping with the *session* as the unit (not patient-level, so not selectable) for scale.
    """
    dev = torch.device(device)
    t = exp.training
    data = synthetic_batch(exp, patients=max(4 * t.batch_patients, 32), sessions=t.max_sessions_per_patient)
    q = t.batch_patients / data.n_patients
    modes = ["plain", *(f"dp-{s}" for s in strategies), *(["ghost-per-session"] if ghost_reference else [])]
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(repeats + 1):  # first pass warms up allocators and kernels, not counted
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            model = build_model(exp).to(dev)
            opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
            gen = torch.Generator().manual_seed(r)
            _sync(dev)
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                _run_mode(mode, model, data, q=q, steps=steps, max_sessions=t.max_sessions_per_patient, opt=opt, gen=gen, dev=dev)
            _sync(dev)
            if r:
                timings[mode].append((time.perf_counter() - start) / steps)
                cpu_times[mode].append((time.process_time() - cpu_start) / steps)
    med = {mode: statistics.median(v) for mode, v in timings.items()}
    cpu = {mode: statistics.median(v) for mode, v in cpu_times.items()}
    plain = med["plain"]
    rows = {mode: {"step_s": round(v, 5), "ratio_to_plain": round(v / plain, 3), "cpu_step_s": round(cpu[mode], 5), "cpu_ratio_to_plain": round(cpu[mode] / cpu["plain"], 3)}
            for mode, v in med.items()}
    best = min(strategies, key=lambda s: med[f"dp-{s}"])
    return {"device": device, "autocast": str(autocast).removeprefix("torch.") if autocast else None, "plain_step_s": round(plain, 5), "modes": rows, "fastest_patient_level": best, "default": t.per_patient_grads,
            "dp_step_s": rows[f"dp-{t.per_patient_grads}"]["step_s"] if t.per_patient_grads in strategies else None,
            "ratio": rows[f"dp-{t.per_patient_grads}"]["ratio_to_plain"] if t.per_patient_grads in strategies else None,
            "batch_patients": t.batch_patients, "sessions": t.max_sessions_per_patient, "repeats": repeats, "steps": steps}


def _run_mode(mode: str, model: torch.nn.Module, data: PatientTensors, *, q: float, steps: int, max_sessions: int, opt: torch.optim.Optimizer, gen: torch.Generator, dev: torch.device) -> None:
    if mode == "plain":
        train_plain(model, data, steps=steps, sample_rate=q, max_sessions=max_sessions, optimizer=opt, generator=gen, device=dev)
    elif mode == "ghost-per-session":
        _ghost_per_session(model, data, steps=steps, sample_rate=q, max_sessions=max_sessions, optimizer=opt, generator=gen, device=dev)
    else:
        train_dp(model, data, steps=steps, sample_rate=q, noise_multiplier=1.0, max_grad_norm=1.0, max_sessions=max_sessions,
                 optimizer=opt, generator=gen, device=dev, grads=mode.removeprefix("dp-"))


def dp_step_profile(exp: ExperimentConfig, *, device: str = "cpu", repeats: int = 20) -> dict[str, Any]:
    """Where a DP step's time goes, on one fixed batch of ``batch_patients`` patients (ms, median)."""
    from client.dp_train import CpuNoiseDPOptimizer, _batch, _batch_loss
    from client.patient_grads import make_patient_grads

    dev = torch.device(device)
    t = exp.training
    data = synthetic_batch(exp, patients=t.batch_patients, sessions=t.max_sessions_per_patient)
    gen = torch.Generator().manual_seed(0)
    mel, markers, y, m = _batch(data, torch.arange(data.n_patients), t.max_sessions_per_patient, gen, dev)
    model = build_model(exp).to(dev)
    opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def fwd_bwd() -> None:
        opt.zero_grad(set_to_none=True)
        _batch_loss(model, mel, markers, y, m).backward()

    def optimizer_update() -> None:
        opt.step()

    parts: dict[str, Any] = {"plain forward+backward": fwd_bwd, "optimizer update (same in both)": optimizer_update}
    out: dict[str, float] = {}
    for name, fn in parts.items():
        out[name] = _median_ms(fn, repeats, dev)
    for strategy in GRAD_STRATEGIES:
        per_patient = make_patient_grads(model, strategy=strategy)
        out[f"per-patient grads: {strategy}"] = _median_ms(lambda pp=per_patient: pp(mel, markers, y, m), repeats, dev)
        grads, _ = per_patient(mel, markers, y, m)
        per_patient.close()
    dp_opt = CpuNoiseDPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=t.batch_patients, generator=gen)

    def clip() -> None:
        for n, p in named:
            p.grad_sample = grads[n].clone()
        dp_opt.clip_and_accumulate()
        for _, p in named:
            p.grad_sample = None
            p.summed_grad = None

    def noise() -> None:
        for _, p in named:
            p.summed_grad = torch.zeros_like(p)
        dp_opt.add_noise()
        for _, p in named:
            p.summed_grad = None

    out["clip and sum per patient"] = _median_ms(clip, repeats, dev)
    out["Gaussian noise (seeded CPU generator)"] = _median_ms(noise, repeats, dev)
    return {"device": device, "batch_patients": t.batch_patients, "sessions": t.max_sessions_per_patient, "ms": {k: round(v, 3) for k, v in out.items()},
            "parameters": sum(p.numel() for _, p in named)}


def _median_ms(fn: Any, repeats: int, dev: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _ghost_per_session(model: torch.nn.Module, data: PatientTensors, *, steps: int, sample_rate: float, max_sessions: int, optimizer: torch.optim.Optimizer,
                       generator: torch.Generator, device: torch.device) -> None:
    """Opacus ghost clipping with the SESSION as the unit: a timing reference only, never for training."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from client.dp_train import _batch, poisson_sample

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=None, loss_reduction="sum")
    try:
        for _ in range(steps):
            idx = poisson_sample(data.n_patients, sample_rate, generator)
            if len(idx) == 0:
                continue
            mel, markers, y, m = _batch(data, idx, max_sessions, generator, device)
            logits = gsm(mel.flatten(0, 1), markers.flatten(0, 1))  # (B*K,)
            per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.flatten(), reduction="none")
            weight = (m / m.sum(1, keepdim=True).clamp(min=1.0)).flatten()  # (B*K,)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                DPTensorFastGradientClipping(gsm, opt, per * weight, "sum").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        gsm.cleanup()


def utility(exp: ExperimentConfig, data: Path, out: Path) -> dict[str, Any]:
    """FL+DP AUROC vs centralised non-private vs one-feature, on the same patient splits."""
    from rich.console import Console

    from server.app import new_run_id
    from server.baselines import run_baselines
    from server.simulate import simulate

    start = time.perf_counter()
    summary = simulate(exp, data, out / "fl-dp", run_id=new_run_id(f"{exp.name}-bench"), console=Console(quiet=True))
    fl_seconds = time.perf_counter() - start
    nodp = replace(exp, privacy=replace(exp.privacy, enabled=False))
    summary_nodp = simulate(nodp, data, out / "fl-nodp", run_id=new_run_id(f"{exp.name}-bench-nodp"), console=Console(quiet=True))
    base = run_baselines(exp, data)
    fl = summary["final_federated_auroc"]
    return {
        "fl_dp_auroc": fl,
        "fl_nodp_auroc": summary_nodp["final_federated_auroc"],
        "epsilon_per_site": {k: round(v["epsilon"], 3) for k, v in summary["sites"].items()},
        "delta": exp.privacy.target_delta,
        **base,
        "gap_centralised_minus_fl_dp": round(base["centralised_nonprivate_auroc_site_weighted"] - fl, 4) if fl is not None else None,
        "fl_dp_run_seconds": round(fl_seconds, 1),
        "noise_multiplier_per_site": {k: round(v["noise_multiplier"], 3) for k, v in summary["sites"].items()},
    }


def sigma_table(exp: ExperimentConfig, sample_rates: tuple[float, ...] = (0.1, 0.2, 0.3)) -> list[dict[str, float]]:
    steps = exp.federation.rounds * exp.training.local_steps
    return [
        {"sample_rate": q, "steps": steps, "sigma": round(calibrate_noise(target_epsilon=exp.privacy.target_epsilon, target_delta=exp.privacy.target_delta, sample_rate=q, steps=steps), 3)}
        for q in sample_rates
    ]


def ledger_throughput(workdir: Path, entries: int) -> dict[str, Any]:
    """Signed append and full verification (chain + signatures + independent ε) rates."""
    import datetime as dt

    from shared import signing
    from shared.privacy import ledger
    from shared.privacy.audit import verify_ledger

    path = workdir / "ledger.jsonl"
    path.unlink(missing_ok=True)
    key = signing.generate(workdir / "k.pem", workdir / "k.pub.pem") if not (workdir / "k.pem").exists() else signing.load_private(workdir / "k.pem")
    head = ledger.GENESIS
    start = time.perf_counter()
    with ledger.locked(path):
        for i in range(entries):
            e = ledger.LedgerEntry(site="bench", dataset="d", run_id=f"run-{i // 50}", round=i % 50 + 1, delta=1e-5, noise_multiplier=1.2, sample_rate=0.2,
                                   steps=10, max_grad_norm=1.0, epsilon_run=0.0, epsilon_total=0.0, time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat(), prev_hash=head)
            ledger.append(path, e, key)
            head = e.hash
    append_s = time.perf_counter() - start
    start = time.perf_counter()
    report = verify_ledger(path, key.public_key())
    verify_s = time.perf_counter() - start
    integrity = [i for i in report.issues if "ε" not in i.message]  # bench entries carry ε = 0 on purpose
    return {"entries": entries, "append_per_s": round(entries / append_s, 1), "verify_per_s": round(entries / verify_s, 1), "integrity_issues": len(integrity), "append_includes_fsync": True}
