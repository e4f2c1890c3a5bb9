"""Names of the per-recording markers both sides agree on (order = model input order)."""

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
