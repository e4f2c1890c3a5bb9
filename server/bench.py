"""Benchmarks (`fedrelapse bench ...`): ratios measured side by side in one process.

Never timed tests: these write JSON and print a markdown table for BENCHMARKS.md, with the
machine named, because absolute seconds on shared CI machines mean little.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from client.dataset import PatientTensors
from client.dp_train import make_optimizer, train_dp, train_plain
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
    out = {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


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


def dp_step_ratio(exp: ExperimentConfig, *, device: str = "cpu", repeats: int = 5, steps: int = 10) -> dict[str, Any]:
    """Seconds per local step, patient-level DP-SGD vs plain SGD, same model, data and sampling."""
    dev = torch.device(device)
    t = exp.training
    data = synthetic_batch(exp, patients=max(4 * t.batch_patients, 32), sessions=t.max_sessions_per_patient)
    q = t.batch_patients / data.n_patients
    timings: dict[str, list[float]] = {"dp": [], "plain": []}
    for r in range(repeats + 1):  # first pass warms up allocators and kernels, not counted
        for mode in ("plain", "dp"):
            model = build_model(exp).to(dev)
            opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
            gen = torch.Generator().manual_seed(r)
            start = time.perf_counter()
            if mode == "dp":
                train_dp(model, data, steps=steps, sample_rate=q, noise_multiplier=1.0, max_grad_norm=1.0, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=dev)
            else:
                train_plain(model, data, steps=steps, sample_rate=q, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                timings[mode].append((time.perf_counter() - start) / steps)
    dp, plain = statistics.median(timings["dp"]), statistics.median(timings["plain"])
    return {"device": device, "dp_step_s": round(dp, 5), "plain_step_s": round(plain, 5), "ratio": round(dp / plain, 3), "batch_patients": t.batch_patients, "sessions": t.max_sessions_per_patient}


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
