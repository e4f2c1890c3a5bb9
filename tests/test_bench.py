"""The benchmark suite's code paths (never its timings): quick suite, GPU absence, Ray cluster config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from typer.testing import CliRunner

from client.patient_grads import conv1d_grad_sample
from server.bench_fl import quantise
from server.simulate import ray_backend_config
from shared.config import ExperimentConfig
from shared.errors import ConfigError
from tests.conftest import tiny_experiment


@pytest.mark.parametrize(("stride", "padding", "dilation", "kernel"), [(2, 2, 1, 5), (1, 0, 1, 3), (3, 1, 2, 4), (1, 2, 1, 1)])
def test_fast_conv1d_grad_sample_equals_opacus(stride: int, padding: int, dilation: int, kernel: int) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Conv1d(6, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(7, 6, 40)  # (N, C, L)
    g = torch.randn_like(layer(x))  # (N, O, L_out)
    ours, ref = conv1d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
    assert layer.bias is not None  # Conv1d's default bias=True
    for p in (layer.weight, layer.bias):
        torch.testing.assert_close(ours[p], ref[p], rtol=1e-4, atol=1e-5)


def test_quantisation_is_bounded_and_unbiased() -> None:
    rng = np.random.default_rng(1)
    x = np.linspace(-0.3, 0.3, 1001).astype(np.float32)
    for bits in (8, 16):
        step = 2 * 0.2 / (2**bits - 1)
        q = quantise(x, bits=bits, clip=0.2, rng=rng)
        assert np.all(np.abs(q - np.clip(x, -0.2, 0.2)) <= step + 1e-6)  # within one level of the clipped value
    mean = np.mean([quantise(np.full(1, 0.0123, np.float32), bits=4, clip=0.2, rng=rng) for _ in range(20000)])
    assert mean == pytest.approx(0.0123, abs=2e-3)  # coarse 4-bit levels, yet unbiased on average


def test_ray_backend_joins_an_existing_cluster_when_given_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = ray_backend_config(n_sites=10, cpus=None)
    assert "address" not in local["init_args"] and local["init_args"]["num_cpus"] >= 1
    cluster = ray_backend_config(n_sites=100, ray_address="ray://head:10001")
    assert cluster["init_args"]["address"] == "ray://head:10001"
    assert "num_cpus" not in cluster["init_args"]  # the cluster's own resources decide
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert ray_backend_config(n_sites=3)["init_args"]["address"] == "auto"
    shared_gpu = ray_backend_config(n_sites=4, ray_address=None, gpus_per_site=0.25)
    assert shared_gpu["client_resources"]["num_gpus"] == 0.25
    with pytest.raises(ConfigError, match="between 0 and 1"):
        ray_backend_config(n_sites=3, gpus_per_site=2.0)


def test_gpu_bench_says_plainly_that_no_gpu_is_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "gpu", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written["gpu"] is None and "No CUDA GPU is visible" in written["message"]
    assert "No CUDA GPU is visible" in result.output


def test_quick_bench_suite_runs_end_to_end(tiny_cohort: Path, tmp_path: Path) -> None:
    from server.bench_suite import run_all

    data = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, data, ignore=shutil.ignore_patterns("state"))
    out = tmp_path / "bench"
    results = run_all(tiny_experiment(), out, data=data, quick=True, sim_sites=(3,), say=lambda _: None)
    assert results["quick"] is True and json.loads((out / "results.json").read_text())["quick_note"].startswith("smoke test (--quick)")
    parts = results["parts"]
    assert not [k for k, v in parts.items() if "error" in v], {k: v["error"] for k, v in parts.items() if "error" in v}
    assert json.loads((out / "results.json").read_text())["parts"].keys() == parts.keys()
    dp = parts["dp_step"]["modes"]
    assert {"plain", "dp-grouped", "dp-functorch", "dp-hooks"} <= dp.keys() and all(m["step_s"] > 0 for m in dp.values())
    assert "ghost-per-session" not in dp  # the slow reference lives in `bench dp-step` only
    assert parts["dp_step_host_bound"]["threads"] == 1 and parts["dp_step_host_bound"]["ratio"] > 0
    size = parts["update_size"]["bytes_per_site_per_round"]
    assert size["head_only_float32"] < size["full_model_float32"] and size["full_model_int16"] * 2 == size["full_model_float32"]
    assert parts["update_size"]["auroc_by_round"][-1]["float32"] is not None
    cache = parts["feature_cache"]
    assert 0 < cache["warm_over_cold"] < 1 and cache["hours_per_cpu_minute"] > 0
    memory = parts["site_memory"]["default_model"]
    assert memory["refusal"] is None and memory["peak_rss_mib"] >= memory["peak_rss_after_load_mib"] > 0
    sim = parts["rounds_3_sites"]
    assert len(sim["per_round"]) == 2 and all(r["sites_replied"] == 3 and r["sites_compute_s"] > 0 for r in sim["per_round"])
    assert sim["peak_rss_site_process_mib"] > 0 and sim["peak_rss_all_processes_mib"] > 0


def test_site_cache_size_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.app import SITE_CACHE_ENV, site_cache_size

    monkeypatch.delenv(SITE_CACHE_ENV, raising=False)
    assert site_cache_size() == 4
    monkeypatch.setenv(SITE_CACHE_ENV, "100")
    assert site_cache_size() == 100
    for bad in ("0", "many"):
        monkeypatch.setenv(SITE_CACHE_ENV, bad)
        with pytest.raises(ValueError, match="FEDRELAPSE_SITE_CACHE"):
            site_cache_size()


def test_feature_sample_is_a_valid_manifest_spread_over_the_site(tiny_cohort: Path, tmp_path: Path) -> None:
    from client.manifest import read_manifest
    from server.bench_fl import sample_manifest

    source = read_manifest(tiny_cohort / "alpha" / "manifest.csv")
    sample = read_manifest(sample_manifest(source.path, tmp_path / "alpha", sessions=5))
    assert len(sample.rows) == 5 and not [p for p in sample.problems if p.severity == "error"]
    assert {r.session_id for r in sample.rows} <= {r.session_id for r in source.rows}
    assert len({r.patient_id for r in sample.rows}) > 1  # spread over the file, not the first patient's sessions
    assert all(r.audio_path.is_relative_to(tmp_path / "alpha") and r.audio_path.read_bytes() for r in sample.rows)
    with pytest.raises(ConfigError, match="no sessions"):
        empty = tmp_path / "empty" / "manifest.csv"
        empty.parent.mkdir()
        empty.write_text(source.path.read_text().splitlines()[0] + "\n")
        sample_manifest(empty, tmp_path / "e", sessions=3)
    with pytest.raises(ConfigError, match="CSV manifests only"):
        sample_manifest(tmp_path / "alpha" / "manifest.jsonl", tmp_path / "j", sessions=3)


def test_dp_step_bench_times_opacus_ghost_clipping_as_a_reference() -> None:
    from server.bench import dp_step_ratio

    r = dp_step_ratio(tiny_experiment(), repeats=1, steps=1, strategies=("functorch",), ghost_reference=True)
    assert set(r["modes"]) == {"plain", "dp-functorch", "ghost-per-session"} and all(m["step_s"] > 0 for m in r["modes"].values())


def test_the_host_bound_dp_step_runs_a_tiny_step_on_one_thread_and_restores_the_threads() -> None:
    from server.bench import HOST_BOUND_STEP, dp_step_host_bound

    before = torch.get_num_threads()
    seen: list[tuple[ExperimentConfig, int]] = []
    import server.bench as bench

    real = bench.dp_step_ratio

    def spy(exp: ExperimentConfig, **kwargs: Any) -> dict:
        seen.append((exp, torch.get_num_threads()))
        return real(exp, **kwargs)

    bench.dp_step_ratio = spy
    try:
        r = dp_step_host_bound(tiny_experiment(), repeats=1, steps=1)
    finally:
        bench.dp_step_ratio = real
    (exp, threads), = seen
    assert threads == 1 and torch.get_num_threads() == before
    assert exp.training.batch_patients == HOST_BOUND_STEP["batch_patients"] and exp.features.max_seconds == HOST_BOUND_STEP["max_seconds"]
    assert exp.training.max_sessions_per_patient == HOST_BOUND_STEP["max_sessions_per_patient"]
    assert {"plain", "dp-grouped", "dp-functorch", "dp-hooks"} == r["modes"].keys() and r["threads"] == 1 and r["ratio"] > 0


def test_dp_step_profile_times_every_strategy_and_the_grouped_parts() -> None:
    from server.bench import dp_step_profile

    ms = dp_step_profile(tiny_experiment(), repeats=1)["ms"]
    assert {"per-patient grads: grouped", "per-patient grads: functorch", "per-patient grads: hooks", "grouped: forward with per-patient copies", "grouped: backward to per-patient rows"} <= ms.keys()
    assert ms["grouped: forward with per-patient copies"] > 0
    assert all(v >= 0 for v in ms.values())


def test_gpu_bench_parts_are_measured_one_by_one_and_a_failed_part_is_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The device script runs once per lent GPU: one failing part must not cost the others."""
    import server.bench as bench
    from server.bench_gpu import gpu_bench
    from shared.config import load_experiment

    real = bench.dp_step_ratio

    def fails_under_bf16(*args: Any, autocast: torch.dtype | None = None, **kwargs: Any) -> dict:
        if autocast is torch.bfloat16:
            raise RuntimeError("bf16 kernel missing")
        return real(*args, autocast=autocast, **kwargs)

    monkeypatch.setattr(bench, "dp_step_ratio", fails_under_bf16)
    result = gpu_bench(load_experiment("configs/experiment.yaml"), data=None, out=tmp_path, quick=True, batches=(4,), device="cpu")
    fp32, bf16 = result["dp_step_fp32_b4"], result["dp_step_bf16_autocast_b4"]
    assert fp32["modes"]["plain"]["step_s"] > 0 and set(fp32["patients_per_s"]) == set(fp32["modes"]) and "ghost-per-session" not in fp32["modes"]
    assert bf16["error"] == "RuntimeError: bf16 kernel missing" and "part_s" in bf16
    assert json.loads((tmp_path / "gpu.json").read_text())["dp_step_fp32_b4"]["ratio"] == fp32["ratio"]  # written as it went
    assert result["quick"] is True and "figures are noisy" in json.loads((tmp_path / "gpu.json").read_text())["quick_note"]


def _stub_bench_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench commands' measuring functions replaced by instant ones (this checks what the JSON says, not timings)."""
    from server import bench, bench_fl, sim_dispatch

    monkeypatch.setattr(bench, "dp_step_ratio", lambda *a, **k: {"modes": {}, "fastest_patient_level": "hooks"})
    monkeypatch.setattr(bench, "dp_step_profile", lambda *a, **k: {})
    monkeypatch.setattr(bench, "dp_step_host_bound", lambda *a, **k: {})
    monkeypatch.setattr(bench, "secagg_overhead", lambda *a, **k: {"results": [{"ratio": 0.681, "ratio_same_training": 1.474}], "note": "how the round time is modelled"})
    keys = ("sites", "actors", "evaluation", "wall_per_round_after_round_1_s", "round_overhead_ratio_after_round_1", "peak_rss_all_processes_mib",
            "peak_rss_one_actor_mib", "peak_rss_site_process_mib", "run_total_s", "cpu_s", "cpu_s_per_site_round")
    monkeypatch.setattr(bench_fl, "simulated_rounds", lambda *a, **k: dict.fromkeys(keys, 1.0))
    monkeypatch.setattr(sim_dispatch, "sweep_cost_ms", lambda n: 0.1)


@pytest.mark.parametrize("command", [["dp-step"], ["secagg"], ["scale", "--data", "{d}", "--out", "{d}/o", "--sites", "3"]])
def test_quick_bench_output_says_its_figures_are_a_smoke_test_only(command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runbook's figures can be contradicted by a --quick run (dp-step once named hooks fastest, secagg a ratio below 1):
    its JSON says so, and the full command's does not."""
    from server.cli import app

    _stub_bench_parts(monkeypatch)
    args = ["bench", *(a.replace("{d}", str(tmp_path)) for a in command)]
    quick = CliRunner().invoke(app, [*args, "--quick"])
    assert quick.exit_code == 0, quick.output
    shown = json.loads(quick.stdout)
    assert shown["quick"] is True and shown["quick_note"].startswith("smoke test (--quick)") and "without --quick for numbers" in shown["quick_note"]
    assert ("only ratio_same_training is meaningful" in shown["quick_note"]) == (command[0] == "secagg")
    if command[0] == "secagg":
        assert shown["note"] == "how the round time is modelled"  # the bench's own note stays
    full = json.loads(CliRunner().invoke(app, args).stdout)
    assert full["quick"] is False and "quick_note" not in full
    if command[0] == "scale":  # the file it writes says the same
        assert json.loads((tmp_path / "o" / "scale.json").read_text())["quick"] is False


def test_round_figures_take_the_slowest_site_of_each_phase_as_the_critical_path(tmp_path: Path) -> None:
    from server.bench_fl import _round_figures

    sites = {"a": {"train_compute_s": 3.0, "eval_compute_s": 0.1}, "b": {"train_compute_s": 1.0, "eval_compute_s": 0.5}}
    (tmp_path / "metrics.json").write_text(json.dumps([{"round": 1, "wall_s": 9.0, "sites": sites}, {"round": 2, "wall_s": 4.0, "sites": sites}]))

    figures = _round_figures(tmp_path)

    assert figures["per_round"][1]["wall_minus_critical_path_s"] == 0.5  # 4.0 - (3.0 + 0.5): phases run one after the other
    assert figures["wall_minus_critical_path_after_round_1_s"] == 0.5 and figures["round_overhead_ratio_after_round_1"] == round(4.0 / 4.6, 3)
