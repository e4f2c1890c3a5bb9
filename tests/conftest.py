"""Shared fixtures: a tiny synthetic cohort (real espeak-ng speech) and WAV helpers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shared.config import ExperimentConfig, FederationConfig, TrainingConfig, load_experiment
from shared.synth.config import CohortConfig, HospitalSpec, Trajectory, load_cohort

ROOT = Path(__file__).resolve().parents[1]


def tiny_cohort_config() -> CohortConfig:
    """3 hospitals, few short sessions: seconds to synthesise, same code path as the demo."""
    base = load_cohort(ROOT / "configs" / "cohort.yaml")
    hospitals = (
        HospitalSpec(name="alpha", language="nb", sample_rate=16000, noise_snr_db=30, n_patients=10, relapse_prevalence=0.5),
        HospitalSpec(name="beta", language="nb", sample_rate=8000, noise_snr_db=20, n_patients=8, relapse_prevalence=0.5),
        HospitalSpec(name="gamma", language="en", sample_rate=22050, noise_snr_db=25, n_patients=8, relapse_prevalence=0.5),
    )
    traj = Trajectory(sessions_per_patient=7, days_between_sessions=7, stable_sessions_min=3, prodromal_sessions=1, relapse_sessions=2, recovery_sessions=1)
    return replace(base, session_seconds=4.0, hospitals=hospitals, trajectory=traj)


def tiny_experiment() -> ExperimentConfig:
    exp = load_experiment(ROOT / "configs" / "experiment.yaml")
    return replace(
        exp,
        federation=replace(exp.federation, rounds=2, min_nodes=3, min_patients_metric=2, node_wait_timeout_s=60),
        training=replace(exp.training, local_steps=3, batch_patients=3),
        features=replace(exp.features, max_seconds=4.0, baseline_sessions=2),
    )


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("espeakng_loader")
    from shared.synth.cohort import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(tiny_cohort_config(), out, seed=3, workers=1)
    return out


def write_tone(path: Path, *, sr: int = 16000, seconds: float = 3.0, amp: float = 0.3, silent_gaps: bool = True) -> Path:
    """A voiced-like test signal: 150 Hz harmonic tone bursts separated by pauses."""
    t = np.arange(int(sr * seconds)) / sr
    x = amp * (np.sin(2 * np.pi * 150 * t) + 0.5 * np.sin(2 * np.pi * 300 * t)) / 1.5
    if silent_gaps:
        x = x * (np.sin(2 * np.pi * 0.7 * t) > -0.3)
    x = x + 0.001 * np.random.default_rng(0).standard_normal(x.shape)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
    return path


__all__ = ["ROOT", "tiny_cohort_config", "tiny_experiment", "write_tone", "FederationConfig", "TrainingConfig"]
