"""Empirical privacy audit: membership inference leaks without DP, less with DP, and the
empirical ε lower bound never exceeds the accounted ε; the ledger is never touched."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from client.attack import attack_metrics, epsilon_lower_bound, membership_audit
from client.site import Site
from server.cli import app
from shared.config import load_site
from tests.conftest import tiny_experiment

# Full-batch training for 80 steps lets the non-private model memorise its 6 training
# patients (mean member loss ~0 vs ~1.3 for held-out patients) on the tiny cohort.
STEPS, SEED = 80, 0


def snapshot(state_dir: Path) -> dict[str, bytes]:
    """Every file of the site's state except the feature cache (ledger, keys, noise seed)."""
    files = (p for p in sorted(state_dir.rglob("*")) if p.is_file())
    return {str(p.relative_to(state_dir)): p.read_bytes() for p in files if p.relative_to(state_dir).parts[0] != "features"}


@pytest.fixture(scope="module")
def audited(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Site, dict[str, Any], dict[str, bytes], dict[str, bytes]]:
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    site = Site(replace(cfg, state_dir=tmp_path_factory.mktemp("attack-state")), tiny_experiment(), read_only=True)
    # the audit must leave an existing ledger (and everything else but the feature cache) as it is
    site.ledger_path.parent.mkdir(parents=True)
    site.ledger_path.write_bytes(b'{"kind":"round","note":"stands in for a signed entry"}\n')
    before = snapshot(site.cfg.state_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = membership_audit(site, epsilons=(1.0,), steps=STEPS, seed=SEED)
    return site, result, before, snapshot(site.cfg.state_dir)


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["setting"]: r for r in result["settings"]}


def test_non_private_model_leaks_membership(audited: tuple) -> None:
    _, result, _, _ = audited
    plain = by_name(result)["non-private"]
    assert result["members"] >= 3 and result["non_members"] >= 3
    assert plain["epsilon_accounted"] is None and plain["noise_multiplier"] == 0.0
    assert plain["member_loss"] < plain["non_member_loss"]
    assert plain["attack_auc"] > 0.6


def check_dp_rows(result: dict[str, Any]) -> None:
    for r in result["settings"][1:]:
        assert r["noise_multiplier"] > 0 and r["sample_rate"] < 1.0
        assert r["epsilon_accounted"] == pytest.approx(r["target_epsilon"], rel=0.02)
        assert 0.0 <= r["epsilon_lower_bound"] <= r["epsilon_accounted"]
        assert r["epsilon_lower_bound"] <= result["epsilon_lower_bound_max"] + 1e-12


def test_dp_lowers_the_attack_and_the_lower_bound_respects_the_accounted_epsilon(audited: tuple) -> None:
    _, result, _, _ = audited
    rows = by_name(result)
    assert rows["dp-eps1"]["attack_auc"] < rows["non-private"]["attack_auc"]
    check_dp_rows(result)


def test_audit_does_not_touch_the_ledger_keys_or_noise_seed(audited: tuple) -> None:
    site, _, before, after = audited
    assert after == before
    assert list(before) == [str(site.ledger_path.relative_to(site.cfg.state_dir))]  # no key, no noise seed created


def test_audit_is_deterministic_for_a_fixed_seed(audited: tuple) -> None:
    site = audited[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [membership_audit(site, epsilons=(1.0,), steps=6, seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0]["settings"] != runs[2]["settings"]
    check_dp_rows(runs[0])


def test_lower_bound_follows_clopper_pearson() -> None:
    # no errors with 10 + 10 patients: FPR_ub = FNR_ub = 1 - 0.05 ** (1 / 10)
    ub = 1 - 0.05 ** (1 / 10)
    assert epsilon_lower_bound(fp=0, n_neg=10, fn=0, n_pos=10, delta=0.0) == pytest.approx(np.log((1 - ub) / ub))
    assert epsilon_lower_bound(fp=5, n_neg=10, fn=5, n_pos=10, delta=1e-5) == 0.0  # a coin flip proves nothing
    # perfect separation of 200 + 200: a large bound; identical scores: AUC 0.5 and no bound
    m = attack_metrics(np.zeros(200), np.ones(200), delta=1e-5)
    assert m["attack_auc"] == 1.0 and m["tpr_at_fpr"] == 1.0 and m["epsilon_lower_bound"] > 3.5
    m = attack_metrics(np.ones(20), np.ones(20), delta=1e-5)
    assert m["attack_auc"] == 0.5 and m["epsilon_lower_bound"] == 0.0


def test_cli_prints_the_table_and_writes_json(tiny_cohort: Path, tmp_path: Path) -> None:
    site_yaml = tiny_cohort / "beta" / "site.yaml"
    exp = tmp_path / "experiment.yaml"
    exp.write_text(tiny_experiment().to_yaml())
    state = load_site(site_yaml).state_dir
    before = snapshot(state) if state.exists() else {}
    out = tmp_path / "attack.json"
    res = CliRunner().invoke(app, ["audit", "attack", "--site", str(site_yaml), "--config", str(exp), "--epsilons", "2", "--steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "membership audit" in res.output
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["settings"]] == ["non-private", "dp-eps2"]
    assert data["settings"][0]["epsilon_accounted"] is None and data["settings"][1]["epsilon_accounted"] <= 2.0 + 0.02
    assert snapshot(state) == before
