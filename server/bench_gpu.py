"""`fedrelapse bench gpu`: the prepared GPU benchmark (run it whenever a GPU is lent).

Measures, side by side in one process:

* DP vs non-DP step time and patients per second for each per-patient gradient strategy, in
  fp32 and under bf16 autocast, at the experiment's batch and at larger batches (a GPU is
  latency-bound at 8 patients a step; the sweep shows where it stops being so);
* the same default-batch step on this machine's CPU, for the GPU's speed-up;
* with ``data``, a simulated federated round whose sites share the GPU (a quarter each), and
  the same round with the sites on the CPU.

Each part is measured on its own: a part that fails is recorded with its error and the rest
still run, and the results so far are written after every part (a run cut short keeps them).
On a machine without CUDA it measures nothing and says so.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from server.interrupt import RunInterrupted
from shared.config import ExperimentConfig

NO_GPU = ("No CUDA GPU is visible (torch.cuda.is_available() is False), so no GPU figure was measured. "
          "Run `fedrelapse bench gpu` on a machine with an NVIDIA GPU and a CUDA build of torch.")
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16_autocast": torch.bfloat16}


def gpu_bench(exp: ExperimentConfig, *, data: Path | None, out: Path, quick: bool, gpus_per_site: float = 0.25, round_exp: ExperimentConfig | None = None,
              batches: tuple[int, ...] | None = None, device: str = "cuda", say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run every part, writing ``out/gpu.json`` after each (without a GPU, once, saying so); return the whole result.

    ``round_exp`` is the experiment for the simulated rounds (default ``exp``): it must suit
    the cohort in ``data``. ``batches`` are the patients per step swept (default: the
    experiment's, 64 and 256; ``quick``: the experiment's only). ``device`` is ``cuda`` except
    in tests, which run the same parts on the CPU.
    """
    from server.bench import machine

    out.mkdir(parents=True, exist_ok=True)
    if device == "cuda" and not torch.cuda.is_available():
        result: dict[str, Any] = {"machine": machine(), "gpu": None, "message": NO_GPU}
        (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    from server.bench import dp_step_host_bound, dp_step_ratio, quick_marked

    repeats, steps = (2, 3) if quick else (5, 20)
    default_batch = exp.training.batch_patients
    sweep = batches or ((default_batch,) if quick else tuple(dict.fromkeys((default_batch, 64, 256))))
    result = quick_marked({"machine": machine(), "gpu": _gpu_facts() if device == "cuda" else None, "device": device, "batches": list(sweep)}, quick)

    def part(name: str, fn: Callable[[], Any]) -> None:
        say(f"{name} ...")
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            value = fn()
        except RunInterrupted:  # Ctrl-C or SIGTERM during a part's simulation: stop the bench, not just the part
            raise
        except Exception as exc:  # a failed part is a result too; the others still run
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
        if isinstance(value, dict):
            value["part_s"] = round(time.perf_counter() - started, 1)
            if device == "cuda":
                value["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result[name] = value
        (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        say(f"{name}: {_headline(value)}")

    def dp_step(batch: int, dtype: torch.dtype | None) -> dict[str, Any]:
        bexp = replace(exp, training=replace(exp.training, batch_patients=batch))
        # Opacus' per-session ghost clipping is a reference for scale: at the experiment's batch only.
        return _with_throughput(dp_step_ratio(bexp, device=device, repeats=repeats, steps=steps, autocast=dtype, ghost_reference=batch == default_batch), batch)

    for batch in sweep:
        for label, dtype in DTYPES.items():
            part(f"dp_step_{label}_b{batch}", functools.partial(dp_step, batch, dtype))
    if device == "cuda":
        part(f"dp_step_cpu_b{default_batch}", lambda: _with_throughput(dp_step_ratio(exp, device="cpu", repeats=min(repeats, 3), steps=min(steps, 5), ghost_reference=False), default_batch))
        # The host-work proxy on this machine's CPU, beside the GPU's own ratio at the experiment's batch (the proxy's calibration).
        part("dp_step_host_bound_cpu", lambda: dp_step_host_bound(exp, repeats=repeats * 2, steps=steps // 2 or 1))
    if data is not None:
        from server.bench_fl import simulated_rounds

        rexp = round_exp or exp
        rounds = 2 if quick else 3
        part("simulated_round_sharing_gpu", lambda: simulated_rounds(rexp, data, out / "gpu-sim", n_sites=4, rounds=rounds, gpus_per_site=gpus_per_site if device == "cuda" else 0.0))
        if device == "cuda" and not quick:
            part("simulated_round_cpu_sites", lambda: simulated_rounds(rexp, data, out / "cpu-sim", n_sites=4, rounds=rounds, cpus=4))
    return result


def _gpu_facts() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda, "torch": torch.__version__}


def _with_throughput(r: dict[str, Any], batch: int) -> dict[str, Any]:
    """Add patients per second (expected patients per step ÷ seconds per step) for each mode."""
    r["patients_per_s"] = {mode: round(batch / row["step_s"], 1) for mode, row in r["modes"].items()}
    return r


def _headline(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    if "error" in value:
        return f"failed: {value['error']}"
    if "ratio" in value:
        return f"DP/plain {value['ratio']}x, plain {value['plain_step_s'] * 1e3:.2f} ms/step"
    if "wall_per_round_after_round_1_s" in value:
        return f"{value['wall_per_round_after_round_1_s']} s/round, overhead {value.get('round_overhead_ratio_after_round_1')}x"
    return "done"
