"""The same ServerApp/ClientApp on Flower's Deployment Engine: a real flower-superlink and one
flower-supernode per hospital as processes on 127.0.0.1 (insecure; TLS is issue #4)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from server.deployment import LocalConsortium
from shared.schema import to_plain
from tests.conftest import tiny_experiment


def test_deployment_engine_runs_the_same_apps_end_to_end(tiny_cohort: Path, tmp_path: Path) -> None:
    exp_path = tmp_path / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump(to_plain(tiny_experiment())))
    sites = []
    for name in ("alpha", "beta", "gamma"):  # each site keeps its own state dir, as hospitals do
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"name: {name}\nmanifest: {tiny_cohort / name / 'manifest.csv'}\nstate_dir: {tmp_path / name}\n")
        sites.append(cfg)
    out = tmp_path / "run"

    with LocalConsortium(tmp_path / "flower", sites) as consortium:
        proc = consortium.submit(exp_path, out, run_id="deploy-test", timeout_s=400)

    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "flower" / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert set(summary["sites"]) == {"alpha", "beta", "gamma"}
    assert all(s["epsilon"] > 0 for s in summary["sites"].values())
    for name in ("alpha", "beta", "gamma"):  # each site accounted both rounds in its own ledger
        ledgers = list((tmp_path / name / "ledger").glob("*.jsonl"))
        assert len(ledgers) == 1 and len(ledgers[0].read_text().splitlines()) == 2
