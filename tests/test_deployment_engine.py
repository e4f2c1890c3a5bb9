"""The same ServerApp/ClientApp on Flower's Deployment Engine: a real flower-superlink and one
flower-supernode per hospital as processes on 127.0.0.1, over TLS with the consortium CA and
SuperNode authentication (only registered node keys may join), each site running its pinned
ClientApp launcher (client/pinned_app.py). The coordinator's ServerApp is killed once round 1 is
recorded and the run is resumed with `fedrelapse run --resume` (same run id): each site's ledger
then holds exactly one entry per round."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from client.pinned_app import PINNED_MARK
from server.cli import app
from server.deployment import LocalConsortium
from server.keys import make_ca, make_server, make_site
from shared.schema import to_plain
from tests.conftest import tiny_experiment


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc): the SuperLink's ServerApp runs there."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def kill_serverapp_after_round_1(consortium: LocalConsortium, submitted: subprocess.Popen[str], out: Path, timeout_s: float = 300.0) -> None:
    """Wait until round 1 is in metrics.json, then SIGKILL the ServerApp: a coordinator crash."""
    deadline = time.monotonic() + timeout_s
    metrics = out / "metrics.json"
    while not (metrics.is_file() and json.loads(metrics.read_text())):
        assert submitted.poll() is None and time.monotonic() < deadline, "the run ended or stalled before round 1 was recorded"
        time.sleep(0.1)
    serverapps = [p for p in descendants(consortium.procs[0].pid) if b"flwr-serverapp" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert serverapps, "no flwr-serverapp process under the SuperLink"
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    submitted.terminate()  # the researcher's `flwr run --stream` goes too
    submitted.wait(timeout=30)


def test_deployment_engine_runs_the_same_apps_end_to_end_over_tls_and_resumes_after_a_coordinator_crash(tiny_cohort: Path, tmp_path: Path) -> None:
    exp_path = tmp_path / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump(to_plain(tiny_experiment())))
    keys = tmp_path / "keys"
    make_ca(keys)
    make_server(keys)
    sites = []
    for name in ("alpha", "beta", "gamma"):  # each site keeps its own state dir, as hospitals do
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"name: {name}\nmanifest: {tiny_cohort / name / 'manifest.csv'}\nstate_dir: {tmp_path / name}\n"
                       f"coordinator_public_key: {keys / 'server' / 'model-signing.pub.pem'}\n")  # sites verify every global model
        sites.append(cfg)
    out = tmp_path / "run"
    logs = tmp_path / "flower" / "logs"

    intruder_key, _ = make_site(keys, "intruder")  # a valid key the coordinator never registered

    with LocalConsortium(tmp_path / "flower", sites, keys=keys, node_auth=True) as consortium:
        plain, plain_log = consortium.start_supernode(sites[0], "plaintext-intruder", insecure=True, wait=False)
        unknown, unknown_log = consortium.start_supernode(sites[0], "unregistered-intruder", wait=False, auth_key=intruder_key)
        argv, env = consortium.submit_command(exp_path, out, run_id="deploy-test")
        submitted = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        kill_serverapp_after_round_1(consortium, submitted, out)
        crashed_without_summary = not (out / "summary.json").exists()
        intruder_alive = plain.poll() is None
        unknown_alive = unknown.poll() is None
        resumed = CliRunner().invoke(app, ["run", "--resume", str(out), "--superlink", f"127.0.0.1:{consortium.superlink_port}", "--keys", str(keys), "--timeout-s", "400"])

    all_logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log")))
    assert crashed_without_summary
    summary = json.loads((out / "summary.json").read_text())
    # Whether the sites had trained round 2 before the kill is a race: if every site had, all refuse it as a
    # replay and the resumed run ends incomplete (exit 6); otherwise it completes (exit 0).
    incomplete = summary["status"] == "incomplete: a round had no usable update"
    assert summary["status"] == "completed" or incomplete, summary["status"]
    assert resumed.exit_code == (6 if incomplete else 0), resumed.output[-3000:] + all_logs
    assert summary["run_id"] == "deploy-test" and summary["resumed_at_round"] == 2 and summary["rounds_planned"] == 2
    rounds = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    # a site that had already trained round 2 for the killed ServerApp refuses it as a replay, uncharged
    assert all(e.get("refused", {}).get("code", "replay") == "replay" for e in rounds[1]["sites"].values()), rounds[1]["sites"]
    assert set(summary["sites"]) == {"alpha", "beta", "gamma"}
    assert all(s["epsilon"] > 0 and len(s["ledger_head"]) == 64 for s in summary["sites"].values())
    for name in ("alpha", "beta", "gamma"):  # each site accounted each round exactly once in its own signed ledger
        entries = [json.loads(line) for line in (tmp_path / name / "ledger" / "privacy-ledger.jsonl").read_text().splitlines()]
        assert sorted((e["run_id"], e["round"]) for e in entries) == [("deploy-test", 1), ("deploy-test", 2)], entries
    superlink_log = (logs / "superlink.log").read_text(errors="replace")
    assert "https://127.0.0.1" in superlink_log
    assert intruder_alive and "Connection attempt failed" in plain_log.read_text(errors="replace")  # no TLS: refused
    unknown_text = unknown_log.read_text(errors="replace")
    assert all("SuperNode ID:" in (logs / f"supernode-{i}.log").read_text(errors="replace") for i in range(3))  # registered sites admitted
    assert all(PINNED_MARK in (logs / f"supernode-{i}.log").read_text(errors="replace") for i in range(3))  # each ran the pinned ClientApp
    assert all("SuperNode idle poll every 0.25 s after a message" in (logs / f"supernode-{i}.log").read_text(errors="replace") for i in range(3))  # site.yaml's default, over TLS + node auth
    assert "fedrelapse: WARNING" not in "".join((logs / f"supernode-{i}.log").read_text(errors="replace") for i in range(3))  # every Flower wait found and shortened
    for i in range(3):  # each SuperNode's messages (plan, train, evaluate; both ServerApps) ran in one site worker, which loaded the site once
        served = re.findall(r"fedrelapse site worker pid (\d+): task (\d+) done, site plans loaded (\d+)", (logs / f"supernode-{i}.log").read_text(errors="replace"))
        assert len(served) >= 4 and len({pid for pid, _, _ in served}) == 1, served
        assert [int(task) for _, task, _ in served] == list(range(1, len(served) + 1)) and {loaded for *_, loaded in served} == {"1"}, served
    assert "SuperNode ID:" not in unknown_text, unknown_text[-2000:]  # unregistered key: never admitted
    assert unknown_alive or "Exit Code" in unknown_text, unknown_text[-2000:]
