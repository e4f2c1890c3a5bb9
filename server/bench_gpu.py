"""`fedrelapse bench gpu`: the prepared GPU benchmark (run it whenever a GPU is lent).

Measures, side by side in one process: DP vs non-DP step time (and patients per second) on
the GPU for each per-patient gradient strategy, the same under bf16 mixed precision, and,
with ``data``, a simulated federated round whose sites share the GPU (a quarter each).
On a machine without CUDA it measures nothing and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.config import ExperimentConfig

NO_GPU = ("No CUDA GPU is visible (torch.cuda.is_available() is False), so no GPU figure was measured. "
          "Run `fedrelapse bench gpu` on a machine with an NVIDIA GPU and a CUDA build of torch.")


def gpu_bench(exp: ExperimentConfig, *, data: Path | None, out: Path, quick: bool, gpus_per_site: float = 0.25) -> dict[str, Any]:
    from server.bench import machine

    if not torch.cuda.is_available():
        return {"machine": machine(), "gpu": None, "message": NO_GPU}
    from server.bench import dp_step_ratio

    repeats, steps = (2, 3) if quick else (5, 20)
    result: dict[str, Any] = {"machine": machine(), "gpu": torch.cuda.get_device_name(0)}
    for name, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
        r = dp_step_ratio(exp, device="cuda", repeats=repeats, steps=steps, autocast=dtype)
        r["patients_per_s"] = {mode: round(exp.training.batch_patients / row["step_s"], 1) for mode, row in r["modes"].items()}
        result[f"dp_step_{name}"] = r
    result["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if data is not None:
        from server.bench_fl import simulated_rounds

        result["simulated_round_sharing_gpu"] = simulated_rounds(exp, data, out / "gpu-sim", n_sites=4, rounds=2, gpus_per_site=gpus_per_site)
    return result
