"""A fresh site process (one per message on the Deployment Engine) imports only what it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import nn

    from shared.config import ExperimentConfig, SiteConfig

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

    def counting_parse(text: str, *, source: str) -> ExperimentConfig:
        parsed.append(text)
        return real(text, source=source)

    monkeypatch.setattr(app, "experiment_from_yaml_text", counting_parse)
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

    def counting_build(*a: Any, **k: Any) -> Any:
        builds.append(a[0])
        return real_build(*a, **k)

    monkeypatch.setattr(config, "build", counting_build)
    config._plan_hash.cache_clear()

    hashes = [exp.plan_hash() for _ in range(4)]
    reparsed = config.experiment_from_yaml_text(exp.to_yaml(), source="test")  # a separate, equal object
    builds.clear()

    assert hashes == [expected] * 4
    assert reparsed.plan_hash() == expected and builds == []  # equal plan: no re-validation
    assert exp.with_privacy(target_epsilon=exp.privacy.target_epsilon + 1).plan_hash() != expected


# --- per-message set-up in a long-lived site process (simulation actor, site worker) ---------


def test_site_yaml_is_validated_once_while_unchanged_and_an_edit_applies_at_the_next_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.app as app

    path = tmp_path / "site.yaml"
    path.write_text("name: oslo\nmanifest: manifest.csv\n", encoding="utf-8")
    parsed: list[str] = []
    real = app.site_from_yaml_text

    def counting_parse(text: str, p: str | Path) -> SiteConfig:
        parsed.append(text)
        return real(text, p)

    monkeypatch.setattr(app, "site_from_yaml_text", counting_parse)
    app._site_config.cache_clear()

    first = [app.site_config(path) for _ in range(4)]  # four messages, file unchanged
    path.write_text("name: bergn\nmanifest: manifest.csv\n", encoding="utf-8")  # same size, same second
    edited = app.site_config(path)

    assert len(parsed) == 2 and all(c is first[0] for c in first)
    assert first[0].name == "oslo" and edited.name == "bergn"
    assert edited.manifest == (tmp_path / "manifest.csv").resolve()  # relative to the file, as load_site does
    app._site_config.cache_clear()


def _patients(site: object) -> set[str]:
    return {s.row.patient_id for s in site.data.sessions}  # type: ignore[attr-defined]


def test_a_manifest_or_recording_changed_while_the_site_runs_is_loaded_again_at_the_next_message(tiny_cohort: Path, tmp_path: Path) -> None:
    import client.app as app
    from tests.conftest import small_site, tiny_experiment

    (tmp_path / "site").mkdir()
    manifest = small_site(tiny_cohort, tmp_path / "site", n_rows=56)  # 8 patients
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {manifest}\nstate_dir: {tmp_path / 'state'}\n", encoding="utf-8")
    cfg, exp = app.site_config(site_yaml), tiny_experiment()
    app.restart_process_state()

    first = app.site_for(cfg, exp)
    again = app.site_for(cfg, exp)  # next message, nothing changed: the loaded site is reused
    header, *rows = manifest.read_text(encoding="utf-8").splitlines()
    withdrawn = sorted(_patients(first))[:4]  # consent withdrawn: their rows are removed, the SuperNode keeps running
    manifest.write_text("\n".join([header, *(r for r in rows if r.split(",")[0] not in withdrawn)]) + "\n", encoding="utf-8")
    after_withdrawal = app.site_for(cfg, exp)
    kept = after_withdrawal.data.sessions[0].row.audio_path
    other = next(s.row.audio_path for s in after_withdrawal.data.sessions if s.row.audio_path != kept)
    kept.write_bytes(other.read_bytes())  # a recording replaced, manifest untouched
    after_recording = app.site_for(cfg, exp)

    assert again is first and len(_patients(first)) == 8
    assert after_withdrawal is not first and _patients(after_withdrawal) == _patients(first) - set(withdrawn)
    assert after_recording is not after_withdrawal
    assert after_recording.data.fingerprint != after_withdrawal.data.fingerprint  # the new recording, not the memoised one
    app.restart_process_state()


def test_a_missing_or_invalid_site_yaml_is_an_error_at_every_message(tmp_path: Path) -> None:
    import client.app as app
    from shared.errors import ConfigError

    path = tmp_path / "site.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        app.site_config(path)
    path.write_text("name: oslo\nmanifest: m.csv\nunknown_key: 1\n", encoding="utf-8")
    for _ in range(2):  # refused again, not served from a cache
        with pytest.raises(ConfigError, match="unknown_key"):
            app.site_config(path)


def test_the_global_model_check_builds_the_plan_model_once_and_refuses_what_loading_it_would(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import client.app as app
    from shared.models import build_model
    from shared.params import get_arrays
    from tests.conftest import tiny_experiment

    exp = tiny_experiment()
    good = dict(get_arrays(build_model(exp)))
    name = next(iter(good))
    builds: list[object] = []

    def counting_build(e: ExperimentConfig) -> nn.Module:
        builds.append(e)
        return build_model(e)

    monkeypatch.setattr(app, "build_model", counting_build)
    app.model_shapes.cache_clear()

    ok = [app.model_problem("oslo", exp, good) for _ in range(3)]
    shape = app.model_problem("oslo", exp, {**good, name: np.zeros((*good[name].shape, 2), np.float32)})
    nan = app.model_problem("oslo", exp, {**good, name: np.full_like(good[name], np.nan)})
    extra = app.model_problem("oslo", exp, {**good, "backdoor.weight": np.zeros(3, np.float32)})
    missing = app.model_problem("oslo", exp, {k: v for k, v in good.items() if k != name})

    assert ok == [None] * 3 and len(builds) == 1
    assert shape is not None and shape.code == "invalid-model" and "the model expects" in shape.reason
    assert nan is not None and "NaN or infinite" in nan.reason
    assert extra is not None and "unexpected ['backdoor.weight']" in extra.reason
    assert missing is not None and f"missing [{name!r}]" in missing.reason
    assert list(app.model_shapes(exp)) == list(good)  # the plan model's order (SecAgg+ maps arrays by it)
    app.model_shapes.cache_clear()


def test_the_simulation_client_app_travels_as_its_build_arguments_and_is_built_once_per_process() -> None:
    from flwr.clientapp import ClientApp
    from ray import cloudpickle  # what Ray pickles a task's arguments with

    import client.app as app
    from shared.faults import FaultPlan

    sites = ("/data/a/site.yaml", "/data/b/site.yaml", "/data/c/site.yaml")
    app._simulation_app.cache_clear()

    blob = cloudpickle.dumps(app.build_client_app(sites))
    received = [cloudpickle.loads(blob) for _ in range(3)]  # three messages to one actor
    with_faults = cloudpickle.dumps(app.build_client_app(sites, FaultPlan()))
    fresh = [cloudpickle.loads(with_faults) for _ in range(2)]

    assert len(blob) < 1000  # the build arguments, not the handlers' code
    assert isinstance(received[0], ClientApp) and all(r is received[0] for r in received)
    assert set(received[0]._registered_funcs) >= {"train.default", "evaluate.default", "query.default"}
    assert fresh[0] is not fresh[1]  # a test's fault plan: each message carries its own copy, as before
    app._simulation_app.cache_clear()


@pytest.mark.parametrize("threads", [0, 1])
def test_site_yaml_threads_sets_the_site_processs_torch_threads_and_0_leaves_torchs_default(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    from dataclasses import replace

    import torch

    from client.site import Site
    from shared.config import load_site
    from tests.conftest import tiny_experiment

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cfg = load_site(tiny_cohort / "alpha" / "site.yaml")
    Site(replace(cfg, state_dir=tmp_path / "state", threads=threads), tiny_experiment())
    assert calls == ([threads] if threads else [])


def test_site_yaml_threads_must_be_a_count(tmp_path: Path) -> None:
    from shared.config import load_site
    from shared.errors import ConfigError

    path = tmp_path / "site.yaml"
    path.write_text("name: oslo\nmanifest: m.csv\nthreads: -2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="threads"):
        load_site(path)


def _two_recording_site(folder: Path) -> Path:
    """site.yaml of a site with two same-length recordings (equal sizes) and transcript files."""
    import csv

    from tests.conftest import write_tone

    (folder / "audio").mkdir(parents=True)
    for i, amp in enumerate((0.3, 0.1)):
        write_tone(folder / "audio" / f"r{i}.wav", amp=amp)
        (folder / f"r{i}.txt").write_text(f"Transcript number {i}.\n", encoding="utf-8")
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["patient_id", "session_id", "recorded_at", "audio_path", "transcript_path", "language", "label"])
        for i in range(2):
            w.writerow([f"p{i}", f"s{i}", "2026-03-01T09:30", f"audio/r{i}.wav", f"r{i}.txt", "nb", "0"])
    (folder / "site.yaml").write_text("name: alpha\nmanifest: manifest.csv\nstate_dir: state\n", encoding="utf-8")
    return folder / "site.yaml"


def test_two_recordings_of_one_size_and_mtime_swapped_are_loaded_again_with_a_new_ledger_fingerprint(tmp_path: Path) -> None:
    """Red team d13(b): the memo was keyed on (size, mtime_ns) only, so a swap of two recordings
    unpacked from one archive (same size, same mtime) kept serving the old features and fingerprint."""
    import os

    import client.app as app
    from client.features import FeatureCache
    from client.site import load_site_data
    from shared.config import FeatureConfig, load_site

    site = load_site(_two_recording_site(tmp_path))
    a, b = tmp_path / "audio" / "r0.wav", tmp_path / "audio" / "r1.wav"
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    app.restart_process_state()
    first = load_site_data(site, FeatureConfig())

    a.rename(tmp_path / "swap"), b.rename(a), (tmp_path / "swap").rename(b)
    again = load_site_data(site, FeatureConfig())

    assert again is not first
    assert again.sessions[0].audio_sha256 == FeatureCache.audio_hash(a) != first.sessions[0].audio_sha256
    assert again.fingerprint != first.fingerprint
    app.restart_process_state()


def test_a_transcript_rewritten_in_place_with_its_size_and_mtime_kept_is_read_again(tmp_path: Path) -> None:
    """Red team d13(a): transcript files were no part of the memo's key, so a redacted transcript kept feeding the old text."""
    import os
    import time

    import client.app as app
    from client.site import load_site_data
    from shared.config import FeatureConfig, load_site

    site = load_site(_two_recording_site(tmp_path))
    transcript = tmp_path / "r0.txt"
    app.restart_process_state()
    first = load_site_data(site, FeatureConfig())
    before = transcript.stat()

    time.sleep(0.05)  # past the file system's coarse clock tick, as any real edit is
    transcript.write_text("[REDACTED] number 0.\n", encoding="utf-8")  # the same size
    os.utime(transcript, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = load_site_data(site, FeatureConfig())

    assert transcript.stat().st_size == before.st_size and transcript.stat().st_mtime_ns == before.st_mtime_ns
    assert [s.row.transcript for s in again.sessions] == ["[REDACTED] number 0.\n", "Transcript number 1.\n"]
    assert again.fingerprint != first.fingerprint  # the ledger names the text trained on
    app.restart_process_state()
