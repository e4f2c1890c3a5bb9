"""Approved plans: every approval is kept, and a damaged approvals file is named, not a traceback."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.approval import approvals_path, approve, is_approved
from server.cli import app
from shared.config import ExperimentConfig, SiteConfig, load_experiment, load_site
from shared.errors import ConfigError
from tests.conftest import ROOT

runner = CliRunner()


def _site(tmp_path: Path) -> SiteConfig:
    path = tmp_path / "site.yaml"
    path.write_text("name: oslo\nmanifest: m.csv\nstate_dir: state\n")
    return load_site(path)


def _plans(n: int) -> list[ExperimentConfig]:
    exp = load_experiment(ROOT / "configs" / "experiment.yaml")
    return [replace(exp, seed=100 + i) for i in range(n)]  # n plans, n hashes


def test_approvals_made_at_the_same_time_are_all_kept(tmp_path: Path) -> None:
    cfg, plans = _site(tmp_path), _plans(8)
    start = threading.Barrier(len(plans))

    def approve_one(exp: ExperimentConfig) -> None:
        start.wait()
        approve(cfg, exp, approved_by=f"IT {exp.seed}")

    for _ in range(3):
        approvals_path(cfg).unlink(missing_ok=True)
        threads = [threading.Thread(target=approve_one, args=(exp,)) for exp in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kept = json.loads(approvals_path(cfg).read_text())
        assert sorted(kept) == sorted(exp.plan_hash() for exp in plans)


@pytest.mark.parametrize("content", ["", "{\"abc\": {\"experiment\": ", "[]", "\xff"])
def test_a_damaged_approvals_file_is_a_config_error_that_names_it_and_is_kept(tmp_path: Path, content: str) -> None:
    cfg, (exp,) = _site(tmp_path), _plans(1)
    path = approvals_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))

    with pytest.raises(ConfigError, match=rf"Approved plans file {path} .*: move it aside, and approve .* `fedrelapse site approve`"):
        is_approved(cfg, exp)
    with pytest.raises(ConfigError, match=rf"Approved plans file {path} "):
        approve(cfg, exp, approved_by="IT: Ola N.")
    assert path.read_bytes() == content.encode("latin-1")  # nothing overwritten: it records who approved what

    result = runner.invoke(app, ["site", "approve", "--site", str(tmp_path / "site.yaml"), "--plan", str(ROOT / "configs" / "experiment.yaml"), "--approved-by", "IT", "--yes"])
    assert result.exit_code == 2 and "Approved plans file" in result.output and "Traceback" not in result.output, result.output
