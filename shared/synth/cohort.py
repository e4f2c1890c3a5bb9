"""Synthesise a multi-hospital longitudinal speech cohort with espeak-ng.

Each patient has personal traits (rate, pitch, pitch range, pause habit, voice) and a course
stable → prodromal → relapse → recovery. Worsening applies the effect sizes of
:class:`~shared.synth.config.Effects`; sessions in the prodromal and relapse phases are
labelled 1 (the worsening window). Output per hospital follows the data contract in
``docs/data-manifest.md``: ``manifest.csv``, ``audio/``, ``transcripts/``, ``site.yaml`` and
``truth.json`` (onsets, for early-warning evaluation only; never read by a site).

espeak-ng (GPL-3.0) is imported lazily, only here, so site and coordinator code never load it.
Determinism: every patient draws from its own ``SeedSequence([seed, hospital, patient])``,
so the same seed gives the same bytes whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from shared.resample import resample
from shared.synth.config import CohortConfig, HospitalSpec
from shared.synth.texts import topics

MANIFEST_COLUMNS = ("patient_id", "session_id", "recorded_at", "audio_path", "transcript_path", "language", "label", "relapse_onset")
TTS_RATE = 22050  # espeak-ng always synthesises at this rate
_VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")
_START = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class PatientJob:
    """Everything a worker process needs to synthesise one patient's sessions."""

    cohort: CohortConfig
    hospital: HospitalSpec
    hospital_index: int
    patient_index: int
    relapses: bool
    seed: int
    out_dir: Path


def severity_course(n_sessions: int, onset: int | None, prodromal: int, relapse: int, recovery: int) -> tuple[list[float], list[int]]:
    """Per-session severity in [0, 1] and label (1 inside the worsening window).

    ``onset`` is the first prodromal session, or None for a patient who stays stable.
    """
    sev = [0.0] * n_sessions
    lab = [0] * n_sessions
    if onset is None:
        return sev, lab
    for i in range(prodromal):
        if onset + i < n_sessions:
            sev[onset + i] = (i + 1) / (prodromal + 1)
            lab[onset + i] = 1
    start = onset + prodromal
    for i in range(relapse):
        if start + i < n_sessions:
            sev[start + i] = 1.0
            lab[start + i] = 1
    start += relapse
    for i in range(recovery):
        if start + i < n_sessions:
            sev[start + i] = 1.0 - (i + 1) / (recovery + 1)
    return sev, lab


def _patient_sessions(job: PatientJob) -> list[dict[str, str]]:
    """Synthesise and write all sessions of one patient; return their manifest rows."""
    from shared.synth.espeak import VoiceSettings, synthesize  # GPL code: loaded only here

    c, h = job.cohort, job.hospital
    sp, ef, tr = c.spread, c.effects, c.trajectory
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.hospital_index, job.patient_index]))
    pid = f"{h.name}-p{job.patient_index:04d}"
    # Personal traits (the patient's own baseline).
    rate = float(np.clip(rng.normal(sp.rate_wpm_mean, sp.rate_wpm_sd), 100, 300))
    pitch = float(np.clip(rng.normal(sp.pitch_mean, sp.pitch_sd), 5, 95))
    prange = float(np.clip(rng.normal(sp.pitch_range_mean, sp.pitch_range_sd), 15, 95))
    pause = float(np.clip(rng.normal(sp.pause_ms_mean, sp.pause_ms_sd), 120, 2000))
    word_gap = int(rng.integers(0, 3)) * 10
    voice = f"{h.language}+{_VOICE_VARIANTS[int(rng.integers(len(_VOICE_VARIANTS)))]}"
    onset = None
    if job.relapses:
        last = tr.sessions_per_patient - tr.prodromal_sessions - tr.relapse_sessions
        onset = int(rng.integers(tr.stable_sessions_min, last + 1))
    sev, lab = severity_course(tr.sessions_per_patient, onset, tr.prodromal_sessions, tr.relapse_sessions, tr.recovery_sessions)
    bank = topics(h.language)
    names = sorted(bank)
    first_day = _START + dt.timedelta(days=int(rng.integers(0, 60)))
    rows: list[dict[str, str]] = []
    for s in range(tr.sessions_per_patient):
        jitter = lambda: 1.0 + sp.session_jitter * float(rng.standard_normal())  # noqa: E731
        settings = VoiceSettings(
            voice=voice,
            rate_wpm=int(np.clip(rate * (1 - ef.rate_drop * sev[s]) * jitter(), 80, 450)),
            pitch=int(np.clip(pitch * jitter(), 0, 99)),
            pitch_range=int(np.clip(prange * (1 - ef.pitch_range_drop * sev[s]) * jitter(), 0, 99)),
            word_gap_ms=word_gap,
        )
        topic = names[int(rng.integers(len(names)))]
        drift = 0.05 + ef.coherence_drop * sev[s]
        pause_now = pause * (1 + ef.pause_increase * sev[s])  # ms, before per-gap jitter
        speech, sentences = _speak_for(rng, c.session_seconds, bank, topic, drift, settings, pause_now, ef.extra_pauses * sev[s], synthesize)
        audio = _to_hospital(rng, speech, TTS_RATE, h)
        sid = f"{pid}-s{s:02d}"
        when = first_day + dt.timedelta(days=s * tr.days_between_sessions, minutes=int(rng.integers(0, 480)))
        wav = job.out_dir / "audio" / f"{sid}.wav"
        txt = job.out_dir / "transcripts" / f"{sid}.txt"
        sf.write(wav, audio, h.sample_rate, subtype="PCM_16", format="WAV")
        txt.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        rows.append(
            {
                "patient_id": pid,
                "session_id": sid,
                "recorded_at": when.isoformat(timespec="minutes"),
                "audio_path": f"audio/{sid}.wav",
                "transcript_path": f"transcripts/{sid}.txt",
                "language": h.language,
                "label": str(lab[s]),
                # the clinically recorded start of the acute relapse (after the prodrome)
                "relapse_onset": "1" if onset is not None and s == onset + tr.prodromal_sessions else "",
                "_severity": f"{sev[s]:.3f}",
                "_onset": "" if onset is None else str(onset),
            }
        )
    return rows


def _speak_for(
    rng: np.random.Generator,
    seconds: float,
    bank: dict[str, tuple[str, ...]],
    topic: str,
    drift: float,
    settings: object,
    pause_ms: float,
    hesitations: float,
    synthesize: Callable[..., tuple[np.ndarray, int]],
) -> tuple[np.ndarray, list[str]]:
    """Speak sentences on ``topic`` for a fixed ``seconds`` (a timed speech task), as in
    clinical protocols: worsening shows as fewer words and more silence in the same time,
    not as longer recordings. Each sentence drifts off topic with probability ``drift``.
    Returns (audio (n,) at the TTS rate cropped to ``seconds``, sentences started)."""
    others = [t for t in sorted(bank) if t != topic]
    on_topic = list(rng.permutation(len(bank[topic])))
    pieces: list[np.ndarray] = []
    sentences: list[str] = []
    sr, total = TTS_RATE, 0
    lead = int(0.3 * sr)
    pieces.append(np.zeros(lead, np.float32))
    total = lead
    while total < seconds * sr:
        if rng.random() < min(drift, 1.0) or not on_topic:
            other = bank[others[int(rng.integers(len(others)))]]
            sentence = other[int(rng.integers(len(other)))]
        else:
            sentence = bank[topic][on_topic.pop()]
        sentences.append(sentence)
        for chunk in _hesitate(rng, sentence, hesitations):
            audio, sr = synthesize(chunk, settings)
            gap = np.zeros(int(sr * pause_ms * float(rng.lognormal(0.0, 0.25)) / 1000), np.float32)
            pieces += [audio, gap]
            total += audio.shape[0] + gap.shape[0]
    return np.concatenate(pieces)[: int(seconds * sr)], sentences


def _hesitate(rng: np.random.Generator, sentence: str, rate: float) -> Iterator[str]:
    """Split a sentence at word boundaries where the speaker hesitates (Poisson(rate) times)."""
    words = sentence.split()
    k = min(int(rng.poisson(rate)), max(len(words) - 1, 0))
    cuts = sorted(rng.choice(np.arange(1, len(words)), size=k, replace=False)) if k else []
    start = 0
    for cut in [*cuts, len(words)]:
        yield " ".join(words[start:cut])
        start = cut


def _to_hospital(rng: np.random.Generator, speech: np.ndarray, sr_tts: int, h: HospitalSpec) -> np.ndarray:
    """Resample to the hospital's rate, add its background noise, set a recording gain."""
    x = resample(speech, sr_tts, h.sample_rate)
    voiced = x[np.abs(x) > 1e-4]
    rms = float(np.sqrt(np.mean(voiced**2))) if voiced.size else 1e-3
    noise = rng.standard_normal(len(x)).astype(np.float32) * rms / (10 ** (h.noise_snr_db / 20))
    y = x + noise
    peak = float(np.max(np.abs(y))) or 1.0
    return (y / peak * rng.uniform(0.4, 0.8)).astype(np.float32)


def synthesize_cohort(
    cohort: CohortConfig,
    out: Path,
    *,
    seed: int | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Write the cohort under ``out``; return each hospital's manifest path.

    ``progress(done, total)`` is called after each patient.
    """
    seed = cohort.seed if seed is None else seed
    jobs: list[PatientJob] = []
    for hi, h in enumerate(cohort.hospitals):
        hdir = out / h.name
        (hdir / "audio").mkdir(parents=True, exist_ok=True)
        (hdir / "transcripts").mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng(np.random.SeedSequence([seed, hi])).permutation(h.n_patients)
        n_relapse = round(h.relapse_prevalence * h.n_patients)
        relapsers = set(order[:n_relapse].tolist())
        jobs += [PatientJob(cohort, h, hi, p, p in relapsers, seed, hdir) for p in range(h.n_patients)]
    results: list[list[dict[str, str]]] = []
    if workers > 1:
        # spawn, not fork: a forked child of a process that already ran torch's OpenMP
        # thread pool deadlocks on its first parallel op (libgomp is not fork-safe).
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for i, rows in enumerate(pool.map(_patient_sessions, jobs, chunksize=2)):
                results.append(rows)
                if progress:
                    progress(i + 1, len(jobs))
    else:
        for i, job in enumerate(jobs):
            results.append(_patient_sessions(job))
            if progress:
                progress(i + 1, len(jobs))
    manifests: dict[str, Path] = {}
    for h in cohort.hospitals:
        hdir = out / h.name
        rows = [r for job, rs in zip(jobs, results, strict=True) if job.hospital is h for r in rs]
        manifest = hdir / "manifest.csv"
        with manifest.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        truth = {
            r["session_id"]: {"patient_id": r["patient_id"], "severity": float(r["_severity"]), "onset_session": r["_onset"] or None}
            for r in rows
        }
        (hdir / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        # Synthetic data: the site accepts non-private plans so benchmarks can compare FL with
        # and without DP. A hospital's site.yaml keeps allow_non_private: false (the default).
        site = {
            "name": h.name, "manifest": "manifest.csv", "state_dir": "state", "device": "auto", "policy": {"allow_non_private": True},
            "coordinator_public_key": "../consortium/model-signing.pub.pem",  # made by the (simulated) coordinator
        }
        (hdir / "site.yaml").write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
        manifests[h.name] = manifest
    return manifests
