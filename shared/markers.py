"""Names of the per-session markers both sides agree on (order = model input order).

The model's marker input is ``MODEL_MARKERS``: every session marker standardised over the
site, then every marker as a deviation from the patient's own baseline sessions. Which of
these a model reads is chosen by :func:`marker_columns` (branches and baseline ablations).
"""

from __future__ import annotations

ACOUSTIC_MARKERS: tuple[str, ...] = (
    "duration_s",  # length of the speech region (first to last voiced frame)
    "speech_ratio",  # voiced time / speech-region time
    "pause_rate_per_min",  # pauses (>= min_pause_ms) per minute of speech region
    "mean_pause_s",  # mean pause length
    "pause_time_ratio",  # total pause time / speech-region time
    "syllable_rate",  # energy peaks (syllable nuclei) per voiced second
    "f0_median_st",  # median F0, semitones re 100 Hz
    "f0_sd_st",  # robust SD of F0 in semitones (pitch variability)
    "f0_range_st",  # 90th - 10th percentile of F0, semitones
    "energy_sd_db",  # SD of frame energy over voiced frames, dB
)
N_ACOUSTIC = len(ACOUSTIC_MARKERS)

LANGUAGE_MARKERS: tuple[str, ...] = (
    "coherence_mean",  # mean cosine of consecutive sentence embeddings (first-order coherence)
    "coherence_min",  # weakest consecutive link (derailment)
    "coherence_var",  # variance of consecutive cosines
    "tangentiality",  # 1 - mean cosine of later sentences to the first (drift from the opening topic)
    "repetition",  # share of sentences nearly identical to an earlier one (perseveration)
    "type_token_ratio",  # moving-average type-token ratio (window 25 words)
    "mean_sentence_words",  # words per sentence
    "pronoun_rate",  # personal pronouns per word (language-specific lists; NaN otherwise)
    "determiner_rate",  # determiners/articles per word (language-specific lists; NaN otherwise)
    "words_per_voiced_s",  # transcript words per voiced second of audio (speech rate with the transcript)
)
N_LANGUAGE = len(LANGUAGE_MARKERS)

SESSION_MARKERS: tuple[str, ...] = ACOUSTIC_MARKERS + LANGUAGE_MARKERS
N_SESSION = len(SESSION_MARKERS)
MODEL_MARKERS: tuple[str, ...] = SESSION_MARKERS + tuple(f"{n}_delta" for n in SESSION_MARKERS)
N_MODEL_MARKERS = len(MODEL_MARKERS)  # site-standardised markers + within-patient baseline deltas

BRANCHES = ("fused", "acoustic", "language")


def marker_columns(*, branches: str, personal_baseline: bool) -> tuple[int, ...]:
    """Indices into ``MODEL_MARKERS`` a model with these branches reads."""
    if branches not in BRANCHES:
        raise ValueError(f"Unknown branches {branches!r}; choose one of {', '.join(BRANCHES)}.")
    names = {"fused": SESSION_MARKERS, "acoustic": ACOUSTIC_MARKERS, "language": LANGUAGE_MARKERS}[branches]
    cols = [SESSION_MARKERS.index(n) for n in names]
    if personal_baseline:
        cols += [N_SESSION + c for c in cols]
    return tuple(cols)
