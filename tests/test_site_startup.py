"""A fresh site process (one per message on the Deployment Engine) imports only what it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_clientapp_process_that_does_not_train_never_imports_opacus_or_scipy_stats() -> None:
    code = "import sys, client.app; print(sorted(m for m in ('opacus', 'scipy.stats') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_train_handler_loads_the_training_code_before_its_compute_clock() -> None:
    code = "import sys, client.app; client.app._import_training(); print('opacus' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_a_site_process_parses_each_plan_text_once_across_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    import client.app as app
    from tests.conftest import tiny_experiment

    parsed: list[str] = []
    real = app.experiment_from_yaml_text
    monkeypatch.setattr(app, "experiment_from_yaml_text", lambda text, *, source: (parsed.append(text), real(text, source=source))[1])
    app.parse_plan.cache_clear()
    plan = tiny_experiment().to_yaml()

    first = [app.parse_plan(plan) for _ in range(5)]  # train, evaluate, ... messages of one run
    other = app.parse_plan(plan.replace("rounds: 2", "rounds: 3"))

    assert parsed == [plan, plan.replace("rounds: 2", "rounds: 3")]
    assert all(e is first[0] for e in first) and other.federation.rounds == 3
    app.parse_plan.cache_clear()


def test_a_plan_that_fails_validation_is_refused_every_time_not_cached() -> None:
    import client.app as app
    from shared.errors import ConfigError

    app.parse_plan.cache_clear()
    for _ in range(2):
        with pytest.raises(ConfigError, match="training plan from the coordinator"):
            app.parse_plan("federation: [not, a, mapping")
    assert app.parse_plan.cache_info().currsize == 0


def test_the_plan_hash_is_computed_once_per_plan_and_still_canonical(monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.config as config
    from tests.conftest import tiny_experiment

    exp = tiny_experiment()
    expected = exp.plan_hash()
    builds: list[object] = []
    real_build = config.build
    monkeypatch.setattr(config, "build", lambda *a, **k: (builds.append(a[0]), real_build(*a, **k))[1])
    config._plan_hash.cache_clear()

    hashes = [exp.plan_hash() for _ in range(4)]
    reparsed = config.experiment_from_yaml_text(exp.to_yaml(), source="test")  # a separate, equal object
    builds.clear()

    assert hashes == [expected] * 4
    assert reparsed.plan_hash() == expected and builds == []  # equal plan: no re-validation
    assert exp.with_privacy(target_epsilon=exp.privacy.target_epsilon + 1).plan_hash() != expected
