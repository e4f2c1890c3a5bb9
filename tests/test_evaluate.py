"""The evaluation protocol on the tiny cohort, collapse detection, and the clinician timeline."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from server.cli import app
from server.evaluate import Harness, Setting, bootstrap_ci, progress_line, run_evaluation
from shared import metrics as M  # noqa: N812
from shared.models import build_model
from shared.models.prosody_mel import ProsodyMelNet
from shared.params import get_arrays, save_checkpoint
from tests.conftest import tiny_experiment

runner = CliRunner()


def test_protocol_reports_every_measure_on_the_same_splits(tiny_cohort: Path, tmp_path: Path) -> None:
    settings = [Setting("fedavg", 8.0), Setting("local", float("inf"), "acoustic", False)]
    lines: list[str] = []
    report = run_evaluation(tiny_experiment(), tiny_cohort, tmp_path, settings=settings, progress=lines.append)
    assert [r["setting"] for r in report["results"]] == ["fedavg/eps=8", "local/eps=inf/acoustic-nobaseline"]
    assert len(lines) == 2 and all(re.search(r", lead (\d+\.\d d|-) \(median; \d+/\d+ relapses warned\)", line) for line in lines), lines  # was "lead 13.908680555555556 d"
    for r in report["results"]:
        lo, hi = r["auroc_ci"]
        assert 0 <= lo <= hi <= 1 and set(r["auroc_per_site"]) == {"alpha", "beta", "gamma"}
        assert {"median_lead_days", "false_alarms_per_patient_month", "warned", "relapses"} <= set(r["early_warning"])
        assert r["early_warning"]["relapses"] > 0  # every site holds out relapsing patients (stratified split)
        assert 0 <= r["ece"] <= 1 and 0 <= r["brier"] <= 1
    assert json.loads((tmp_path / "evaluation.json").read_text())["sites"]["alpha"] == {"train_patients": 6, "eval_patients": 4}  # 30% of 5 + 5, rounded per stratum
    assert "fedavg/eps=8" in (tmp_path / "evaluation.md").read_text() and (tmp_path / "auroc_by_epsilon.png").stat().st_size > 0


@pytest.mark.parametrize(("lead", "shown"), [(13.908680555555556, "lead 13.9 d (median; 11/20 relapses warned)"), (6.726388888888884, "lead 6.7 d"), (None, "lead - (median; 0/20")])
def test_progress_lines_round_the_lead_days_to_one_decimal_as_the_table_does(lead: float | None, shown: str) -> None:
    measured = {"auroc": 0.87312, "auroc_ci": [0.82231, 0.92019], "early_warning": {"median_lead_days": lead, "warned": 11 if lead else 0, "relapses": 20, "false_alarms_per_patient_month": 0.41666}}
    line = progress_line("centralised/eps=inf", measured)
    assert line.startswith("centralised/eps=inf: AUROC 0.873 [0.822, 0.920], lead ") and shown in line, line  # was "lead 13.908680555555556 d"
    assert line.endswith("false alarms 0.42/patient-month"), line


def test_a_model_that_predicts_one_class_is_reported_as_collapsed(tiny_cohort: Path, tmp_path: Path) -> None:
    exp = tiny_experiment()
    harness = Harness(exp, tiny_cohort, tmp_path, bootstrap=20)
    model = build_model(exp)
    assert isinstance(model, ProsodyMelNet)
    with torch.no_grad():
        for p in model.head[-1].parameters():
            p.zero_()  # every session gets risk 0.5: what heavy DP noise can do
    measured = harness.measure({s.cfg.name: model for s in harness.sites})
    assert measured["collapsed"] and measured["auroc"] == 0.5 and measured["macro_f1"] <= 0.5


def test_bootstrap_resamples_patients_not_sessions() -> None:
    import numpy as np

    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])
    groups = np.array([0, 0, 1, 1, 2, 2])
    ci = bootstrap_ci(M.auroc, y, p, groups, reps=200)
    assert ci is not None
    lo, hi = ci
    assert lo <= M.auroc(y, p) <= hi
    assert bootstrap_ci(M.auroc, y, p, groups, reps=0) is None


def test_site_timeline_renders_one_patient_at_the_site(tiny_cohort: Path, tmp_path: Path) -> None:
    exp = tiny_experiment()
    (tmp_path / "exp.yaml").write_text(exp.to_yaml())
    save_checkpoint(tmp_path / "model.safetensors", get_arrays(build_model(exp)), {})
    args = ["site", "timeline", "--site", str(tiny_cohort / "gamma" / "site.yaml"), "--model", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "exp.yaml")]
    res = runner.invoke(app, [*args, "--patient", "gamma-p0001", "--out", str(tmp_path / "tl")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "tl.html").read_text()
    assert "gamma-p0001" in page and "Decision support only" in page and (tmp_path / "tl.png").stat().st_size > 1000
    res = runner.invoke(app, [*args, "--patient", "nobody", "--out", str(tmp_path / "x")])
    assert res.exit_code == 3 and "nobody" in res.output


def test_site_timeline_takes_the_run_folders_config_and_refuses_another_plans(tiny_cohort: Path, tmp_path: Path) -> None:
    exp = tiny_experiment()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(exp.to_yaml())
    model = run / "checkpoints" / "round-002.safetensors"
    save_checkpoint(model, get_arrays(build_model(exp)), {"plan_hash": exp.plan_hash()})
    args = ["site", "timeline", "--site", str(tiny_cohort / "gamma" / "site.yaml"), "--model", str(model), "--patient", "gamma-p0001"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "tl")])  # no --config: the run folder's
    assert res.exit_code == 0, res.output
    other = tmp_path / "other.yaml"
    other.write_text(exp.with_privacy(target_epsilon=3.0).to_yaml())
    res = runner.invoke(app, [*args, "--config", str(other), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "was trained with plan" in res.output and not (tmp_path / "x.html").exists()


def test_site_timelines_are_written_0600_in_a_0700_folder_whatever_the_umask(tiny_cohort: Path, tmp_path: Path) -> None:
    exp = tiny_experiment()
    (tmp_path / "exp.yaml").write_text(exp.to_yaml())
    save_checkpoint(tmp_path / "model.safetensors", get_arrays(build_model(exp)), {})
    state = tmp_path / "state"
    shutil.copytree(tiny_cohort / "gamma" / "state" / "features", state / "features")  # cached features: no re-extraction
    (state / "timelines").mkdir(mode=0o755)  # as an older version left it
    site = tmp_path / "site.yaml"
    site.write_text(f"name: gamma\nmanifest: {tiny_cohort / 'gamma' / 'manifest.csv'}\nstate_dir: {state}\n")
    old = os.umask(0o022)
    try:
        res = runner.invoke(app, ["site", "timeline", "--site", str(site), "--model", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "exp.yaml"), "--patient", "gamma-p0001"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    folder = state / "timelines"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["gamma-p0001.html", "gamma-p0001.png"]  # no temporary file left
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())


def _tiny_timeline(patient_id: str) -> tuple:
    import datetime as dt
    from types import SimpleNamespace

    import numpy as np

    from client.early_warning import Timeline
    from shared.markers import N_SESSION

    n = 4
    sessions = [SimpleNamespace(row=SimpleNamespace(recorded_at=dt.datetime(2026, 3, 1) + dt.timedelta(days=7 * i)), markers=np.zeros(N_SESSION, np.float32)) for i in range(n)]
    return Timeline(patient_id, np.arange(n) * 7.0, np.linspace(0.1, 0.6, n), np.zeros(n), None), sessions


@pytest.mark.parametrize("pid", ["alpha.p0000", "2024.017", "../../etc/x", "a/b", "..", ".", ".hidden", "åse 1%2F", "p\x00q", "x" * 300])
def test_a_timeline_file_name_stays_in_its_folder_whatever_the_patient_id(pid: str) -> None:
    from client.timeline import timeline_name

    name = timeline_name(pid)
    assert "/" not in name and "\x00" not in name and not name.startswith(".") and 0 < len(name.encode()) <= 200
    assert Path("timelines", name).parent == Path("timelines")


def test_timeline_file_names_of_different_patients_differ() -> None:
    from client.timeline import timeline_name

    ids = ["alpha.p0000", "alpha.p0001", "alpha", "alpha.html", "a/b", "a%2Fb", "a_b", "..", ".", "%2E%2E", "x" * 300, "x" * 299 + "y"]
    assert len({timeline_name(i) for i in ids}) == len(ids)
    assert timeline_name("gamma-p0001") == "gamma-p0001"  # a plain id is the file name


def test_timeline_file_names_of_ids_that_differ_only_in_case_differ_in_more_than_case() -> None:
    """Before: P01 and p01 got P01.html and p01.html, one file on macOS or a Windows share."""
    from client.timeline import timeline_name

    ids = ["P01", "p01", "Åse-01", "åse-01", "ÅSE-01", "straße", "STRASSE", "strasse", "ıd", "id", "ID", "σς", "σσ", "ΣΣ",
           "a/b", "A/B", "alpha.P0000", "alpha.p0000", "x" * 300, "X" * 300, "x" * 299 + "X"]

    names = [timeline_name(i) for i in ids]

    assert len({n.casefold() for n in names}) == len(ids), names  # as macOS compares names
    assert len({n.upper() for n in names}) == len(ids), names  # as Windows (NTFS) compares them


def test_a_lower_case_id_keeps_its_timeline_file_name_and_an_upper_case_one_gets_a_hash() -> None:
    """Timelines already written for lower-case ids stay where `site timeline` and `--prune` look."""
    import hashlib

    from client.cache_retention import _is_timeline_name
    from client.timeline import timeline_name

    kept = {"gamma-p0001": "gamma-p0001", "alpha.p0000": "alpha.p0000", "åse-01": "åse-01", "2024.017": "2024.017", "a/b": "a%2Fb", ".hidden": "%2Ehidden"}
    assert {i: timeline_name(i) for i in kept} == kept
    assert timeline_name("P0001") == "P0001~" + hashlib.sha256(b"P0001").hexdigest()[:16]
    assert all(_is_timeline_name(timeline_name(i)) for i in ("P0001", "Åse-01", "X" * 300))


def test_patients_whose_ids_differ_after_a_dot_get_a_timeline_each(tmp_path: Path) -> None:
    from client.timeline import render_timeline
    from shared.config import AlertConfig

    for pid in ("alpha.p0000", "alpha.p0001"):
        tl, sessions = _tiny_timeline(pid)
        png, page = render_timeline(tl, sessions, threshold=0.5, alert_cfg=AlertConfig(), baseline_n=2, out=tmp_path / pid, site_name="alpha")
        assert (png.name, page.name) == (f"{pid}.png", f"{pid}.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.p0000.html", "alpha.p0000.png", "alpha.p0001.html", "alpha.p0001.png"]
    assert "<title>Patient alpha.p0000</title>" in (tmp_path / "alpha.p0000.html").read_text()
