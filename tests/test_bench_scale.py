"""The scale benchmark's process accounting: memory and CPU seconds by kind of process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.bench_fl import peak_tree_rss
from tests.conftest import tiny_experiment

# burn 0.4 s of CPU, then idle long enough for the 0.2-s sampler to see the final count
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4:\n    pass\ntime.sleep(0.6)\n"


def test_cpu_seconds_are_split_between_coordinator_site_actors_and_other_processes() -> None:
    with peak_tree_rss() as box:
        actor = subprocess.Popen(["ray::ClientAppActor.run", "-c", BURN], executable=sys.executable)  # how Ray titles a site actor
        other = subprocess.Popen(["raylet", "-c", BURN], executable=sys.executable)
        started = time.process_time()
        while time.process_time() - started < 0.3:
            pass
        actor.wait(timeout=60)
        other.wait(timeout=60)

    cpu = box["cpu_s"]
    assert 0.35 <= cpu["site_actors"] < 1.5
    assert 0.35 <= cpu["other"] < 1.5
    assert 0.25 <= cpu["coordinator"] < 1.5  # this process, without the sampler thread
    assert box["actor_peak_mib"] > 1 and box["peak_mib"] >= box["actor_peak_mib"]


@pytest.mark.slow
def test_bench_scale_reports_time_memory_and_cpu_by_kind_of_process(tiny_cohort: Path, tmp_path: Path) -> None:
    from server.bench_suite import scale

    data = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, data, ignore=shutil.ignore_patterns("state"))

    result = scale(tiny_experiment(), data, tmp_path / "scale", sites=(3,), rounds=2, say=lambda _: None)

    (row,) = result["rows"]
    assert row["sites"] == 3 and row["wall_per_round_after_round_1_s"] > 0
    assert row["cpu_s"]["site_actors"] > 0 and row["cpu_s"]["coordinator"] > 0
    assert row["cpu_s_per_site_round"]["site_actors"] == pytest.approx(row["cpu_s"]["site_actors"] / 6, abs=1e-3)
    assert 0 < row["peak_rss_one_actor_mib"] < row["peak_rss_all_processes_mib"]
    assert row["dispatch_sweep_cpu_ms"]["linear"] >= 0 and row["dispatch_sweep_cpu_ms"]["flower"] >= 0
    assert json.loads((tmp_path / "scale" / "scale.json").read_text())["rows"] == result["rows"]
