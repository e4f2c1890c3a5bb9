"""The same ServerApp/ClientApp on Flower's Deployment Engine: a real flower-superlink and one
flower-supernode per hospital as processes on 127.0.0.1, over TLS with the consortium CA and
SuperNode authentication (only registered node keys may join), each site running its pinned
ClientApp launcher (client/pinned_app.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from client.pinned_app import PINNED_MARK
from server.deployment import LocalConsortium
from server.keys import make_ca, make_server, make_site
from shared.schema import to_plain
from tests.conftest import tiny_experiment


def test_deployment_engine_runs_the_same_apps_end_to_end_over_tls(tiny_cohort: Path, tmp_path: Path) -> None:
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
        proc = consortium.submit(exp_path, out, run_id="deploy-test", timeout_s=400)
        time.sleep(1)
        intruder_alive = plain.poll() is None
        unknown_alive = unknown.poll() is None

    all_logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + all_logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert set(summary["sites"]) == {"alpha", "beta", "gamma"}
    assert all(s["epsilon"] > 0 and len(s["ledger_head"]) == 64 for s in summary["sites"].values())
    for name in ("alpha", "beta", "gamma"):  # each site accounted both rounds in its own signed ledger
        assert len((tmp_path / name / "ledger" / "privacy-ledger.jsonl").read_text().splitlines()) == 2
    superlink_log = (logs / "superlink.log").read_text(errors="replace")
    assert "https://127.0.0.1" in superlink_log
    assert intruder_alive and "Connection attempt failed" in plain_log.read_text(errors="replace")  # no TLS: refused
    unknown_text = unknown_log.read_text(errors="replace")
    assert all("SuperNode ID:" in (logs / f"supernode-{i}.log").read_text(errors="replace") for i in range(3))  # registered sites admitted
    assert all(PINNED_MARK in (logs / f"supernode-{i}.log").read_text(errors="replace") for i in range(3))  # each ran the pinned ClientApp
    assert "SuperNode ID:" not in unknown_text, unknown_text[-2000:]  # unregistered key: never admitted
    assert unknown_alive or "Exit Code" in unknown_text, unknown_text[-2000:]
