"""Synthetic cohort: determinism, data contract, and markers that move with worsening."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.manifest import read_manifest
from client.prepare import prepare_site
from shared.config import FeatureConfig
from shared.markers import ACOUSTIC_MARKERS
from shared.synth.config import CohortConfig
from tests.conftest import tiny_cohort_config

pytest.importorskip("espeakng_loader")
from shared.synth.cohort import severity_course, synthesize_cohort  # noqa: E402


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def small() -> CohortConfig:
    cfg = tiny_cohort_config()
    return replace(cfg, hospitals=tuple(replace(h, n_patients=2) for h in cfg.hospitals), trajectory=replace(cfg.trajectory, sessions_per_patient=7))


def test_same_seed_gives_the_same_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    synthesize_cohort(small(), tmp_path / "a", seed=11, workers=1)
    synthesize_cohort(small(), tmp_path / "b", seed=11, workers=2)
    synthesize_cohort(small(), tmp_path / "c", seed=12, workers=1)
    a, b, c = (digest_tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_output_follows_the_data_contract_and_validates_cleanly(tiny_cohort: Path) -> None:
    for hospital in ("alpha", "beta", "gamma"):
        manifest = read_manifest(tiny_cohort / hospital / "manifest.csv")
        assert manifest.total_rows == len(manifest.rows) > 0
        assert not [p for p in manifest.problems if p.severity == "error"]
        assert {r.language for r in manifest.rows} == {"en" if hospital == "gamma" else "nb"}
        assert (tiny_cohort / hospital / "site.yaml").is_file()
    with (tiny_cohort / "beta" / "manifest.csv").open() as fh:
        first = next(csv.DictReader(fh))
    import soundfile as sf

    assert sf.info(str(tiny_cohort / "beta" / first["audio_path"])).samplerate == 8000


def test_course_is_stable_then_prodromal_relapse_recovery() -> None:
    sev, lab = severity_course(12, 4, 2, 2, 2)
    assert lab == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert sev[:4] == [0.0] * 4 and 0 < sev[4] < sev[5] < sev[6] == 1.0 == sev[7] > sev[8] > sev[9] > 0 == sev[10]
    assert severity_course(6, None, 2, 2, 2) == ([0.0] * 6, [0] * 6)


def test_worsening_sessions_show_more_pausing_and_flatter_pitch_within_patients(tiny_cohort: Path) -> None:
    """Within each relapsing patient: worsening-window sessions vs that patient's stable ones."""
    deltas = []
    for hospital in ("alpha", "beta", "gamma"):
        data = prepare_site(tiny_cohort / hospital / "manifest.csv", FeatureConfig(max_seconds=4.0), tiny_cohort / hospital / "state" / "features")
        by_patient: dict[str, list] = {}
        for s in data.sessions:
            by_patient.setdefault(s.row.patient_id, []).append(s)
        for sessions in by_patient.values():
            pos = [s.features.markers for s in sessions if s.row.label == 1]
            neg = [s.features.markers for s in sessions if s.row.label == 0]
            if pos and neg:
                deltas.append(np.mean(pos, axis=0) - np.mean(neg, axis=0))
    d = np.mean(deltas, axis=0)
    assert len(deltas) >= 6
    assert d[ACOUSTIC_MARKERS.index("pause_time_ratio")] > 0  # more of the time is pause
    assert d[ACOUSTIC_MARKERS.index("speech_ratio")] < 0  # less of the time is speech
    assert d[ACOUSTIC_MARKERS.index("f0_sd_st")] < 0  # reduced pitch variability


def test_transcripts_drift_off_topic_when_worse() -> None:
    """The share of off-topic sentences follows 0.05 + coherence_drop x severity."""
    from shared.synth.cohort import _speak_for
    from shared.synth.texts import topics

    bank = topics("en")
    on_topic = set(bank["food"])

    def fake_tts(text: str, settings: object) -> tuple[np.ndarray, int]:
        return np.zeros(22050, np.float32), 22050  # 1 s per chunk

    rng = np.random.default_rng(0)
    share = {}
    for severity in (0.0, 1.0):
        drift = 0.05 + tiny_cohort_config().effects.coherence_drop * severity
        said = [s for _ in range(200) for s in _speak_for(rng, 6.0, bank, "food", drift, None, 300.0, 0.0, fake_tts)[1]]
        share[severity] = np.mean([s not in on_topic for s in said])
    assert share[0.0] < 0.1
    assert share[1.0] == pytest.approx(0.65, abs=0.07)
