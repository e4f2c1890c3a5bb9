"""The scale benchmark's process accounting: memory and CPU seconds by kind of process."""

from __future__ import annotations

import subprocess
import sys
import time

from server.bench_fl import peak_tree_rss

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
