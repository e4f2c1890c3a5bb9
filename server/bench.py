"""Benchmarks (`fedrelapse bench ...`): ratios measured side by side in one process.

Never timed tests: these write JSON and print a markdown table for BENCHMARKS.md, with the
machine named, because absolute seconds on shared CI machines mean little.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch

from client.dataset import PatientTensors
from client.dp_train import make_optimizer, train_dp, train_plain
from client.patient_grads import GRAD_STRATEGIES
from shared.config import ExperimentConfig
from shared.markers import N_MODEL_MARKERS
from shared.models import build_model
from shared.privacy.accounting import calibrate_noise

if TYPE_CHECKING:
    from flwr.serverapp import Grid


QUICK_NOTE = (
    "smoke test (--quick): few repeats, rounds or sites on small inputs, so these figures are noisy and can contradict the full "
    "command's (which per-patient strategy is fastest, even which mode is faster); run the command without --quick for numbers"
)
SECAGG_QUICK_READ = (
    "of these only ratio_same_training is meaningful (both modes given the same training time); ratio and the round times "
    "carry each mode's own training-time noise"
)


def quick_marked(result: dict[str, Any], quick: bool, *, read: str = "") -> dict[str, Any]:
    """``result`` with ``quick`` first and, for a quick run, ``quick_note`` saying its figures are
    a smoke test only (``read``: what is still worth reading). Every bench command that has
    ``--quick`` passes its JSON through here."""
    if not quick:
        return {"quick": False, **result}
    return {"quick": True, "quick_note": QUICK_NOTE + (f"; {read}" if read else ""), **result}


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
    them alike, and every mode of a repeat trains on the same sequence of Poisson batches (DP
    noise comes from its own generator; the batch size moves a step's time by ±30 %); the first repeat only warms up. Wall time and process CPU time are both
    reported: on a shared machine the CPU-time ratio is the steadier one. ``autocast`` (e.g.
    ``torch.bfloat16``) runs every mode under mixed precision. ``ghost_reference`` adds Opacus' ghost
    clipping with the *session* as the unit (not patient-level, so not selectable) for scale.
    """
    dev = torch.device(device)
    t = exp.training
    # On a GPU the data is made resident once, as a site does each round (PatientTensors.on), outside the timing.
    data = synthetic_batch(exp, patients=max(4 * t.batch_patients, 32), sessions=t.max_sessions_per_patient).on(dev)
    q = t.batch_patients / data.n_patients
    modes = ["plain", *(f"dp-{s}" for s in strategies), *(["ghost-per-session"] if ghost_reference else [])]
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(repeats + 1):  # first pass warms up allocators and kernels, not counted
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            model = build_model(exp).to(dev)
            opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
            gen = torch.Generator().manual_seed(r)  # batches: the same sequence in every mode of this repeat
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


# A step so small that its arithmetic is negligible: what is left is host work (Python, operator
# dispatch, allocation), which is what a GPU step at the experiment's batch sizes waits on.
class _HostBoundStep(TypedDict):
    batch_patients: int
    max_sessions_per_patient: int
    max_seconds: float


HOST_BOUND_STEP: _HostBoundStep = {"batch_patients": 2, "max_sessions_per_patient": 2, "max_seconds": 1.2}


def dp_step_host_bound(exp: ExperimentConfig, *, repeats: int = 60, steps: int = 10) -> dict[str, Any]:
    """:func:`dp_step_ratio` on the same model with :data:`HOST_BOUND_STEP` (2 patients of 2 sessions of
    1.2 s a step), on one CPU thread: DP ÷ plain host work per step.

    A GPU at small batches is launch-bound: the device finishes each kernel before the host has
    queued the next (H200, 8 patients a step: 3.3 ms per plain step at 8 and at 128 patients
    alike, BENCHMARKS.md "GPU"), so its DP ÷ plain ratio is the ratio of host work, which this
    measures on any machine. Calibration, same commit (a08360b) on both sides: this proxy gave
    `grouped` 1.68–1.74, `hooks` 2.39–2.56, `functorch` 2.71–2.94 on the 2-core EPYC (three runs);
    the H200 measured 1.55, 2.37, 2.64 at 8 patients a step (fp32).
    """
    training = replace(exp.training, batch_patients=HOST_BOUND_STEP["batch_patients"], max_sessions_per_patient=HOST_BOUND_STEP["max_sessions_per_patient"])
    tiny = replace(exp, training=training, features=replace(exp.features, max_seconds=HOST_BOUND_STEP["max_seconds"]))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = dp_step_ratio(tiny, repeats=repeats, steps=steps, ghost_reference=False)
    finally:
        torch.set_num_threads(before)
    return {**result, "threads": 1, "max_seconds": HOST_BOUND_STEP["max_seconds"]}


def _run_mode(mode: str, model: torch.nn.Module, data: PatientTensors, *, q: float, steps: int, max_sessions: int, opt: torch.optim.Optimizer, gen: torch.Generator, dev: torch.device) -> None:
    if mode == "plain":
        train_plain(model, data, steps=steps, sample_rate=q, max_sessions=max_sessions, optimizer=opt, generator=gen, device=dev)
    elif mode == "ghost-per-session":
        _ghost_per_session(model, data, steps=steps, sample_rate=q, max_sessions=max_sessions, optimizer=opt, generator=gen, device=dev)
    else:
        train_dp(model, data, steps=steps, sample_rate=q, noise_multiplier=1.0, max_grad_norm=1.0, max_sessions=max_sessions,
                 optimizer=opt, generator=gen, device=dev, grads=mode.removeprefix("dp-"),
                 noise_generator=torch.Generator().manual_seed(2**31 - 1))  # noise apart, so DP and plain steps see the same batches


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
    out.update(_grouped_parts(model, (mel, markers, y, m), repeats, dev))
    dp_opt = CpuNoiseDPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=t.batch_patients, generator=gen)

    def clip() -> None:
        for n, p in named:  # grad_sample, summed_grad: Opacus' per-parameter attributes, not in torch's stubs
            p.grad_sample = grads[n].clone()  # type: ignore[attr-defined]
        dp_opt.clip_and_accumulate()
        for _, p in named:
            p.grad_sample = None  # type: ignore[attr-defined]
            p.summed_grad = None  # type: ignore[attr-defined]

    def noise() -> None:
        for _, p in named:
            p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
        dp_opt.add_noise()
        for _, p in named:
            p.summed_grad = None  # type: ignore[attr-defined]

    out["clip and sum per patient"] = _median_ms(clip, repeats, dev)
    out["Gaussian noise (seeded CPU generator)"] = _median_ms(noise, repeats, dev)
    return {"device": device, "batch_patients": t.batch_patients, "sessions": t.max_sessions_per_patient, "ms": {k: round(v, 3) for k, v in out.items()},
            "parameters": sum(p.numel() for _, p in named)}


def _grouped_parts(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], repeats: int, dev: torch.device) -> dict[str, float]:
    """The `grouped` strategy's time by part: its forward pass with per-patient parameter copies
    (:mod:`client.patient_layers`), and the backward pass that gives every patient's rows."""
    from client.patient_grads import GroupedGrads

    grouped = GroupedGrads(model)
    try:
        grouped(*batch)  # the first call runs the probes
        forward = _median_ms(lambda: grouped.forward(*batch), repeats, dev)
        whole = _median_ms(lambda: grouped(*batch), repeats, dev)
    finally:
        grouped.close()
    return {"grouped: forward with per-patient copies": forward, "grouped: backward to per-patient rows": max(whole - forward, 0.0)}


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
    from client.patient_grads import session_rows

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=None, loss_reduction="sum")
    try:
        for _ in range(steps):
            idx = poisson_sample(data.n_patients, sample_rate, generator)
            if len(idx) == 0:
                continue
            mel, markers, y, m = _batch(data, idx, max_sessions, generator, device)
            logits = gsm(session_rows(mel), session_rows(markers))  # (K·B,) session-major rows
            per = torch.nn.functional.binary_cross_entropy_with_logits(logits, session_rows(y), reduction="none")
            weight = session_rows(m / m.sum(1, keepdim=True).clamp(min=1.0))  # (K·B,)
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

    for scratch in ("fl-dp", "fl-nodp"):  # this benchmark's own runs: a repeat replaces them
        shutil.rmtree(out / scratch, ignore_errors=True)
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


def ledger_throughput(workdir: Path, entries: int, accountant: str = "rdp") -> dict[str, Any]:
    """Signed append and full verification (chain + signatures + independent ε) rates.

    With ``accountant="rdp"`` every entry records ε = 0 (σ 1.2, q 0.2), so verification flags
    each as an under-count from an earlier entry's PLD floor. With ``"prv"`` the entries are an
    honest PRV ledger: σ for ε = 8 per 50-round run at q 0.2, each entry's ε from Opacus' PRV
    accountant over its rounds as a ``prv`` site records it (about 0.4 s an entry to compute,
    before the timed appends), which verification checks against PLD at most entries.
    """
    import datetime as dt

    from shared import signing
    from shared.privacy import ledger
    from shared.privacy.audit import verify_ledger

    path = workdir / "ledger.jsonl"
    path.unlink(missing_ok=True)
    key = signing.generate(workdir / "k.pem", workdir / "k.pub.pem") if not (workdir / "k.pem").exists() else signing.load_private(workdir / "k.pem")
    sigma, figures = _ledger_figures(entries, accountant)
    head = ledger.GENESIS
    start = time.perf_counter()
    with ledger.locked(path):
        for i, (eps_run, eps_total) in enumerate(figures):
            e = ledger.LedgerEntry(site="bench", dataset="d", run_id=f"run-{i // 50}", round=i % 50 + 1, accountant=accountant, delta=1e-5, noise_multiplier=sigma, sample_rate=0.2,
                                   steps=10, max_grad_norm=1.0, epsilon_run=eps_run, epsilon_total=eps_total, time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat(), prev_hash=head)
            ledger.append(path, e, key)
            head = e.hash
    append_s = time.perf_counter() - start
    start = time.perf_counter()
    report = verify_ledger(path, key.public_key())
    verify_s = time.perf_counter() - start
    integrity = [i for i in report.issues if "ε" not in i.message]  # rdp bench entries carry ε = 0 on purpose
    return {"entries": entries, "accountant": accountant, "append_per_s": round(entries / append_s, 1), "verify_per_s": round(entries / verify_s, 1),
            "verify_s": round(verify_s, 2), "issues": len(report.issues), "integrity_issues": len(integrity), "append_includes_fsync": True}


def _ledger_figures(entries: int, accountant: str) -> tuple[float, list[tuple[float, float]]]:
    """σ and each bench entry's (ε of its run, ε of all rounds): zeros for ``rdp``, what a ``prv`` site records for ``prv``."""
    from shared.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon

    if accountant == "rdp":
        return 1.2, [(0.0, 0.0)] * entries
    sigma = calibrate_noise(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.2, steps=50 * 10, accountant="prv")
    step = SubsampledGaussian(sigma, 0.2, 10)
    return sigma, [(epsilon([step] * (i % 50 + 1), delta=1e-5, accountant="prv"), epsilon([step] * (i + 1), delta=1e-5, accountant="prv")) for i in range(entries)]


class LoopbackGrid:
    """An in-process Grid: each site is a ClientApp called directly with its own Context.

    Sites run one after the other here, but each call is timed, so a round's time with
    sites in parallel (one machine per hospital) is modelled as: coordinator time + the
    slowest site of every exchange. Message sizes are their protobuf wire sizes.
    """

    def __init__(self, client_app: Any, n_sites: int, train_clock: dict[str, float] | None = None) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process gets from the SuperLink
        self.app = client_app
        self.train_clock = train_clock if train_clock is not None else {"last": 0.0}  # the sites' handler writes its training time here
        self.nodes = list(range(1001, 1001 + n_sites))
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(), run_config={}) for i, n in enumerate(self.nodes)}
        self.reset()

    def reset(self) -> None:
        self.site_s = 0.0  # summed site time
        self.parallel_s = 0.0  # Σ over exchanges of the slowest site
        self.parallel_train_s = 0.0  # Σ over exchanges of the slowest site's local training
        self.parallel_other_s = 0.0  # Σ over exchanges of the slowest site's time outside training
        self.bytes_up = 0  # site -> coordinator
        self.bytes_down = 0  # coordinator -> site

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.common.serde import message_from_proto, message_to_proto

        replies, slowest, slowest_train, slowest_other = [], 0.0, 0.0, 0.0
        for msg in messages:
            wire = message_to_proto(msg)  # each site gets its own decoded copy, as over the network
            self.bytes_down += wire.ByteSize()
            self.train_clock["last"] = 0.0
            start = time.perf_counter()
            reply = self.app(message_from_proto(wire), self.contexts[msg.metadata.dst_node_id])
            took = time.perf_counter() - start
            self.site_s += took
            slowest = max(slowest, took)
            slowest_train = max(slowest_train, self.train_clock["last"])
            slowest_other = max(slowest_other, took - self.train_clock["last"])
            wire = message_to_proto(reply)
            self.bytes_up += wire.ByteSize()
            replies.append(message_from_proto(wire))
        self.parallel_s += slowest
        self.parallel_train_s += slowest_train
        self.parallel_other_s += slowest_other
        return replies


def bench_client_app(exp: ExperimentConfig, *, weights: list[int], seed: int = 0, train_clock: dict[str, float] | None = None, inner_mods: tuple[Any, ...] = ()) -> Any:
    """Sites that DP-train the real model on synthetic patients and answer like our sites.

    The same code path as client/app.py from the update on: plain rounds reply with the
    Message-API records, SecAgg+ rounds with fitres records through secaggplus_mod.
    """
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from client.app import _fitres, _reply, check_secure_update, secure_aggregation_mod
    from shared import metrics as M  # noqa: N812
    from shared import protocol as P  # noqa: N812
    from shared import secure_records
    from shared.params import flatten, get_arrays, layout, pack, set_arrays, unflatten, unpack

    t = exp.training
    data = synthetic_batch(exp, patients=max(2 * t.batch_patients, 16), sessions=min(t.max_sessions_per_patient, 6), seed=seed)
    shapes = layout(get_arrays(build_model(exp)))
    app = ClientApp(mods=[secure_aggregation_mod, *inner_mods])

    clock = train_clock if train_clock is not None else {}

    def local_train(arrays: dict[str, Any], site: int) -> dict[str, Any]:
        start = time.perf_counter()
        model = build_model(exp)
        set_arrays(model, arrays)
        opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
        train_dp(model, data, steps=t.local_steps, sample_rate=t.batch_patients / data.n_patients, noise_multiplier=1.0, max_grad_norm=1.0,
                 max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=torch.Generator().manual_seed(site), device=torch.device("cpu"))
        clock["last"] = time.perf_counter() - start
        return get_arrays(model)

    @app.train()
    def train(msg: Message, context: Any) -> Message:
        site = int(context.node_config["partition-id"])
        metrics = {M.NUM_PATIENTS: float(weights[site]), M.TRAIN_LOSS: 0.5}
        if P.LEGACY_FITINS_ARRAYS in msg.content.array_records:
            incoming = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content.array_records[P.LEGACY_FITINS_ARRAYS], keep_input=True))
            update = local_train(unflatten(incoming[0], shapes, what="the global model"), site)
            values = [flatten(update, shapes)]  # the packed update, as client/app.py sends it
            problem = check_secure_update(values, incoming, float(weights[site]), exp.federation.secure_aggregation)
            if problem:
                raise ValueError(problem)
            return _fitres(msg, values, weights[site], secure_records.encode(site_name=f"site{site}", metrics=metrics))
        return _reply(msg, f"site{site}", arrays=pack(local_train(unpack(msg.content.array_records[P.ARRAYS], shapes, what="the global model"), site), shapes), metrics=metrics)

    return app


def secagg_overhead(exp: ExperimentConfig, *, sites: tuple[int, ...] = (3, 10, 30), rounds: int = 3) -> dict[str, Any]:
    """Training-round time and bytes per site, SecAgg+ vs plain, same sites and model, side by side."""
    from flwr.app import ConfigRecord

    from server.secure_round import secure_train_round
    from server.strategy import PatientFedAvg
    from shared import protocol as P  # noqa: N812
    from shared.config import SecureAggregationConfig
    from shared.params import layout, pack

    rows = []
    for n in sites:
        shares = n if n <= 5 else (5 if n <= 10 else 7)  # odd; grows slowly with n as SecAgg+ intends
        sa = SecureAggregationConfig(enabled=True, num_shares=shares, reconstruction_threshold=shares // 2 + 1, max_weight=100.0)
        e = replace(exp, federation=replace(exp.federation, min_nodes=n, secure_aggregation=sa))
        weights = [10 + (7 * i) % 40 for i in range(n)]
        clock: dict[str, float] = {"last": 0.0}
        grid = LoopbackGrid(bench_client_app(e, weights=weights, train_clock=clock), n, clock)
        as_grid = cast("Grid", grid)  # duck-typed: the strategy and the SecAgg+ workflow call only get_node_ids and send_and_receive
        model = get_arrays_of(e)
        arrays = pack(model, layout(model))
        cfg = ConfigRecord({P.RUN_ID: "bench", P.TOTAL_ROUNDS: rounds})
        times: dict[str, list[float]] = {"plain": [], "secagg": []}
        walls: dict[str, list[float]] = {"plain": [], "secagg": []}
        other: dict[str, list[float]] = {"plain": [], "secagg": []}  # round time outside local training
        train: list[float] = []  # slowest site's local training per round, both modes
        up: dict[str, int] = {"plain": 0, "secagg": 0}
        down: dict[str, int] = {"plain": 0, "secagg": 0}
        for rnd in range(rounds + 1):  # round 0 warms up, not counted
            for mode in ("plain", "secagg"):
                strategy = PatientFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=n, node_wait_timeout_s=5)
                strategy.expected = layout(model)
                grid.reset()
                start = time.perf_counter()
                if mode == "plain":
                    new, _ = strategy.aggregate_train(rnd + 1, grid.send_and_receive(strategy.configure_train(rnd + 1, arrays, cfg, as_grid)))
                else:
                    new = secure_train_round(as_grid, strategy=strategy, sa=sa, server_round=rnd + 1, arrays=arrays, config=cfg).arrays
                wall = time.perf_counter() - start
                if new is None:
                    raise RuntimeError(f"bench: the {mode} round with {n} sites produced no aggregate")
                if rnd:
                    times[mode].append(wall - grid.site_s + grid.parallel_s)
                    walls[mode].append(wall)
                    other[mode].append(wall - grid.site_s + grid.parallel_other_s)
                    train.append(grid.parallel_train_s)
                    up[mode] += grid.bytes_up
                    down[mode] += grid.bytes_down
        plain, secure = statistics.median(times["plain"]), statistics.median(times["secagg"])
        t_train, o_plain, o_secure = statistics.median(train), statistics.median(other["plain"]), statistics.median(other["secagg"])
        rows.append({
            "sites": n, "num_shares": shares, "threshold": sa.reconstruction_threshold,
            "plain_round_s": round(plain, 4), "secagg_round_s": round(secure, 4), "ratio": round(secure / plain, 3),
            "local_training_s": round(t_train, 4), "plain_outside_training_s": round(o_plain, 4), "secagg_outside_training_s": round(o_secure, 4),
            "ratio_same_training": round((t_train + o_secure) / (t_train + o_plain), 3),
            "plain_sequential_s": round(statistics.median(walls["plain"]), 3), "secagg_sequential_s": round(statistics.median(walls["secagg"]), 3),
            "bytes_sent_per_site_plain": up["plain"] // (rounds * n), "bytes_sent_per_site_secagg": up["secagg"] // (rounds * n),
            "bytes_received_per_site_plain": down["plain"] // (rounds * n), "bytes_received_per_site_secagg": down["secagg"] // (rounds * n),
        })
    params = sum(int(v.size) for v in get_arrays_of(exp).values())
    return {"model_parameters": params, "local_steps": exp.training.local_steps, "rounds_timed": rounds, "results": rows,
            "note": ("round time = coordinator time + slowest site per exchange (sites in parallel, no network latency); *_sequential_s: all sites "
                     "on this machine one after another; ratio_same_training: both modes given the median slowest-site training time, so load "
                     "noise in local training cancels and only the aggregation protocol differs")}


def get_arrays_of(exp: ExperimentConfig) -> dict[str, Any]:
    from shared.params import get_arrays

    return get_arrays(build_model(exp))
