"""Typed configuration of the synthetic cohort (``configs/cohort.yaml``).

Every worsening effect is an explicit, tunable effect size applied at full relapse severity
(the prodromal phase ramps up to it). Between-patient spreads are what make the task
non-trivial: each patient is their own baseline, so pooled single markers separate poorly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.schema import build, load_yaml, spec


@dataclass(frozen=True, kw_only=True)
class HospitalSpec:
    """One synthetic hospital; hospitals differ on purpose (non-IID)."""

    name: str = spec(doc="Folder and site name.")
    language: str = spec(doc="BCP-47 language of speech and transcripts.", choices=("en", "nb"))
    sample_rate: int = spec(doc="Recording sample rate, Hz.", choices=(8000, 16000, 22050))
    noise_snr_db: float = spec(30.0, doc="Background noise, dB below speech.", ge=0, le=80)
    n_patients: int = spec(doc="Patients at this hospital.", ge=2, le=10000)
    relapse_prevalence: float = spec(doc="Share of patients who relapse during follow-up.", ge=0, le=1)


@dataclass(frozen=True, kw_only=True)
class Effects:
    """Marker shifts at full relapse severity (relative unless stated)."""

    rate_drop: float = spec(0.10, doc="Relative drop in speech rate (slower speech).", ge=0, lt=1)
    pause_increase: float = spec(0.4, doc="Relative lengthening of pauses between sentences.", ge=0)
    extra_pauses: float = spec(0.6, doc="Expected extra hesitation pauses per sentence.", ge=0)
    pitch_range_drop: float = spec(0.3, doc="Relative drop in pitch variability (flatter prosody).", ge=0, lt=1)
    coherence_drop: float = spec(0.6, doc="Chance a sentence drifts to another topic.", ge=0, le=1)


@dataclass(frozen=True, kw_only=True)
class Spread:
    """Between-patient (trait) and within-patient (session) variability."""

    rate_wpm_mean: float = spec(165.0, doc="Mean speaking rate, words per minute.", ge=80, le=400)
    rate_wpm_sd: float = spec(22.0, doc="Between-patient SD of speaking rate.", ge=0)
    pitch_mean: float = spec(45.0, doc="Mean espeak base pitch (0-99).", ge=0, le=99)
    pitch_sd: float = spec(12.0, doc="Between-patient SD of base pitch.", ge=0)
    pitch_range_mean: float = spec(55.0, doc="Mean espeak pitch range (0-99).", ge=0, le=99)
    pitch_range_sd: float = spec(12.0, doc="Between-patient SD of pitch range.", ge=0)
    pause_ms_mean: float = spec(450.0, doc="Mean pause between sentences, ms.", ge=0)
    pause_ms_sd: float = spec(150.0, doc="Between-patient SD of that pause.", ge=0)
    session_jitter: float = spec(0.06, doc="Relative session-to-session noise on every marker.", ge=0, le=1)


@dataclass(frozen=True, kw_only=True)
class Trajectory:
    """Longitudinal course: stable → prodromal → relapse → recovery."""

    sessions_per_patient: int = spec(12, doc="Recording sessions per patient.", ge=4, le=500)
    days_between_sessions: int = spec(7, doc="Days between sessions.", ge=1)
    stable_sessions_min: int = spec(4, doc="Relapse onset never before this session.", ge=1)
    prodromal_sessions: int = spec(2, doc="Sessions of ramping worsening before relapse.", ge=0)
    relapse_sessions: int = spec(2, doc="Sessions at full severity.", ge=1)
    recovery_sessions: int = spec(2, doc="Sessions of fading severity (labelled 0).", ge=0)


@dataclass(frozen=True, kw_only=True)
class CohortConfig:
    """The whole synthetic consortium."""

    seed: int = spec(7, doc="Default seed; `fedrelapse synth --seed` overrides it.")
    session_seconds: float = spec(12.0, doc="Length of the timed speech task per recording, seconds.", ge=3, le=300)
    effects: Effects = spec(Effects(), doc="Worsening effect sizes.")
    spread: Spread = spec(Spread(), doc="Variability.")
    trajectory: Trajectory = spec(Trajectory(), doc="Course of illness.")
    hospitals: tuple[HospitalSpec, ...] = spec(doc="Hospitals of the consortium.")

    def validate(self, source: str) -> None:
        if not self.hospitals:
            raise ConfigError(f"{source}: `hospitals` must list at least one hospital.")
        names = [h.name for h in self.hospitals]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: hospital names must be unique, got {names}.")
        t = self.trajectory
        episode = t.prodromal_sessions + t.relapse_sessions
        if t.stable_sessions_min + episode > t.sessions_per_patient:
            raise ConfigError(
                f"{source}: `trajectory` does not fit: {t.stable_sessions_min} stable + {episode} "
                f"worsening sessions exceed sessions_per_patient={t.sessions_per_patient}."
            )


def load_cohort(path: str | Path) -> CohortConfig:
    """Read and validate a cohort YAML file."""
    return build(CohortConfig, load_yaml(path), source=str(path))
