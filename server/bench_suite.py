"""`fedrelapse bench all`: every benchmark in one run, written to ``results.json``.

``quick`` (CI smoke) uses a tiny synthetic cohort made on the spot, 2 rounds and 3/6
simulated sites; the full suite uses the default cohort, 3 rounds and 3/10 sites, and times
feature extraction on a sample of each site's recordings. Both aim at under 10 minutes on
2 cores (BENCHMARKS.md records the measured time). Scale runs (30, 100 sites), the
Deployment Engine and Opacus' ghost-clipping reference are separate commands.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.interrupt import RunInterrupted
from shared.config import ExperimentConfig
from shared.errors import ConfigError

FEATURE_SAMPLE = 80  # recordings per site timed cold and warm by the full suite's feature_cache part


def run_all(exp: ExperimentConfig, out: Path, *, data: Path | None, quick: bool, sim_sites: tuple[int, ...] | None = None, only: tuple[str, ...] = (), say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite (or the parts named in ``only``); each part's result (or its error) lands
    in ``out/results.json`` as it finishes. With ``exp.speech`` on, feature cache, update size
    and site memory also measure the frozen speech encoder."""
    from server.bench import dp_step_host_bound, dp_step_profile, dp_step_ratio, machine, quick_marked
    from server.bench_fl import feature_cache, quick_cohort_config, quick_experiment, simulated_rounds, site_round_memory, update_size

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = quick_marked({"machine": machine(), "evaluation": exp.federation.evaluation, "parts": {}}, quick)
    started = time.perf_counter()
    if data is None:
        if not quick:
            raise ConfigError("The full suite needs --data (a cohort from `fedrelapse synth --config configs/cohort.yaml`); --quick makes its own tiny cohort.")
        from shared.synth.cohort import synthesize_cohort

        data = out / "cohort"
        if not (data / "alpha" / "site.yaml").exists():
            say("making the quick cohort (tiny synthetic hospitals)")
            synthesize_cohort(quick_cohort_config(), data, seed=3, workers=1)
    run_exp = quick_experiment(exp) if quick else exp
    sites = sim_sites or ((3, 6) if quick else (3, 10))
    rounds = 2 if quick else 3
    parts: list[tuple[str, Callable[[], Any]]] = [
        # --quick times the step on the quick experiment's small inputs: a smoke of the path, not the figure.
        # Opacus' per-session ghost clipping (a reference, not selectable, and the slowest mode by
        # far) is left to `fedrelapse bench dp-step`, which keeps the suite within its time budget.
        ("dp_step", lambda: dp_step_ratio(run_exp, repeats=2 if quick else 4, steps=3 if quick else 10, ghost_reference=False)),
        ("dp_step_profile", lambda: dp_step_profile(run_exp, repeats=3 if quick else 20)),
        ("dp_step_host_bound", lambda: dp_step_host_bound(run_exp, repeats=2 if quick else 60, steps=3 if quick else 10)),
        # extraction is timed per hour of audio, so the full suite samples 80 recordings per site
        ("feature_cache", lambda: feature_cache(run_exp, data, out / "feature-cache-scratch", sessions_per_site=None if quick else FEATURE_SAMPLE)),
        ("update_size", lambda: update_size(run_exp, data, rounds=rounds)),
        ("site_memory", lambda: site_round_memory(run_exp, data, out / "site-memory-scratch")),
        # one Ray actor: sites run one after another, so wall / Σ site compute is the pure overhead
        *((f"rounds_{n}_sites", lambda n=n: simulated_rounds(run_exp, data, out / "sim", n_sites=n, rounds=rounds, cpus=1)) for n in sites),
    ]
    unknown = set(only) - {name for name, _ in parts}
    if unknown:
        raise ConfigError(f"Unknown benchmark part(s) {', '.join(sorted(unknown))}; choose from {', '.join(name for name, _ in parts)}.")
    for name, fn in parts:
        if only and name not in only:
            continue
        say(f"bench {name} …")
        t0 = time.perf_counter()
        try:
            results["parts"][name] = {**fn(), "bench_seconds": round(time.perf_counter() - t0, 1)}
        except RunInterrupted:  # Ctrl-C or SIGTERM during a part's simulation: stop the suite, not just the part
            raise
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others' figures
            results["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def scale(exp: ExperimentConfig, data: Path, out: Path, *, sites: tuple[int, ...], rounds: int, quick: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Time per round and peak memory for growing simulated consortia, with the per-site cost
    (``quick``: ``exp`` is the quick experiment, and the JSON says its figures are a smoke test).

    Besides wall time (which other jobs on the machine inflate), the CPU seconds per site and
    round of the coordinator process and of the site actors (whole run), and the CPU cost of
    one sweep of the Simulation Engine's message dispatch, Flower's and ours, at that size.
    """
    from server.bench import machine, quick_marked
    from server.bench_fl import simulated_rounds
    from server.sim_dispatch import sweep_cost_ms

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sites:
        say(f"scale: {n} sites …")
        r = simulated_rounds(exp, data, out / "sim", n_sites=n, rounds=rounds)
        keep = ("sites", "actors", "evaluation", "wall_per_round_after_round_1_s", "round_overhead_ratio_after_round_1", "peak_rss_all_processes_mib",
                "peak_rss_one_actor_mib", "peak_rss_site_process_mib", "run_total_s", "cpu_s", "cpu_s_per_site_round")
        rows.append({k: r[k] for k in keep} | {"wall_per_round_per_site_s": round(r["wall_per_round_after_round_1_s"] / n, 4), "dispatch_sweep_cpu_ms": sweep_cost_ms(n)})
        (out / "scale.json").write_text(json.dumps(quick_marked({"machine": machine(), "rows": rows}, quick), indent=2) + "\n")
    return quick_marked({"machine": machine(), "rows": rows}, quick)
