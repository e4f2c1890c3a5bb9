"""shared.synth.espeak: languages, determinism, parameter effects, variants, errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from shared.synth.espeak import (
    EspeakError,
    VoiceSettings,
    available_variants,
    available_voices,
    synthesize,
)

EN = "The weather today is lovely, and I think we should walk down to the harbour after lunch."
NB = "Jeg har sovet dårlig i hele natt, og nå er jeg veldig trøtt og lei meg."


def settings(
    voice: str = "en", rate: int = 175, pitch: int = 50, rng: int = 50, gap: int = 0
) -> VoiceSettings:
    """Shorthand for VoiceSettings with espeak's defaults."""
    return VoiceSettings(voice=voice, rate_wpm=rate, pitch=pitch, pitch_range=rng, word_gap_ms=gap)


def seconds(text: str, s: VoiceSettings) -> float:
    """Duration of the synthesised text in seconds."""
    audio, sample_rate = synthesize(text, s)
    return len(audio) / sample_rate


def f0_semitones(audio: np.ndarray, sr: int) -> np.ndarray:
    """Crude autocorrelation F0 track (semitones) over strongly periodic 40 ms frames."""
    frame, hop, lo, hi = int(0.04 * sr), int(0.01 * sr), sr // 400, sr // 60
    track = []
    for start in range(0, len(audio) - frame, hop):
        x = audio[start : start + frame] - audio[start : start + frame].mean()
        ac = np.correlate(x, x, "full")[frame - 1 :]
        if ac[0] <= 1e-4 * frame or ac[lo:hi].max() <= 0.6 * ac[0]:
            continue
        lag = lo + int(np.nonzero(ac[lo:hi] > 0.85 * ac[lo:hi].max())[0][0])  # avoid sub-octaves
        if ac[lag] > 0.6 * ac[0]:
            track.append(12 * np.log2(sr / lag))
    return np.array(track)


@pytest.mark.parametrize(("voice", "text"), [("en", EN), ("en-us", EN), ("nb", NB)])
def test_languages_give_plausible_speech(voice: str, text: str) -> None:
    audio, sr = synthesize(text, settings(voice))
    assert sr == 22050
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert np.abs(audio).max() <= 1.0
    assert np.sqrt(np.mean(audio**2)) > 0.02  # not silent
    expected = len(text.split()) / 175 * 60  # about 16 words at 175 wpm: about 5.5 s
    assert 0.5 * expected < len(audio) / sr < 2.0 * expected
    assert {"en", "en-us", "nb"} <= set(available_voices())
    assert {"f3", "m3", "f2"} <= set(available_variants())


@pytest.mark.parametrize("voice", ["en", "nb+f2", "en+f3"])  # f3 adds seeded breath noise
def test_same_input_gives_identical_bytes(voice: str) -> None:
    first, _ = synthesize(EN, settings(voice))
    synthesize(NB, settings("nb", rate=300, rng=99, gap=50))
    synthesize("Something else entirely.", settings("en+klatt"))
    again, _ = synthesize(EN, settings(voice))
    assert first.tobytes() == again.tobytes()


def test_rate_and_word_gap_change_duration() -> None:
    assert seconds(EN, settings(rate=300)) < 0.75 * seconds(EN, settings(rate=175))
    assert seconds(EN, settings(gap=200)) > 1.3 * seconds(EN, settings(gap=0))


def test_pitch_range_controls_f0_variability() -> None:
    flat, sr = synthesize(EN, settings(rng=0))
    lively, _ = synthesize(EN, settings(rng=99))
    assert np.std(f0_semitones(flat, sr)) < 0.8
    assert np.std(f0_semitones(lively, sr)) > 4 * np.std(f0_semitones(flat, sr))


def test_variant_changes_the_voice() -> None:
    male, sr = synthesize(EN, settings("en"))
    female, _ = synthesize(EN, settings("en+f3"))
    assert np.median(f0_semitones(female, sr)) > np.median(f0_semitones(male, sr)) + 6  # > half an octave


def test_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match=r"rate_wpm must be an integer in \[80, 450\], got 500"):
        settings(rate=500)
    with pytest.raises(ValueError, match="pitch_range"):
        settings(rng=-1)
    with pytest.raises(EspeakError, match="could not load voice 'xx-nowhere'; available voices include"):
        synthesize("Hello.", settings("xx-nowhere"))
    with pytest.raises(EspeakError, match="no voice variant 'F3'"):
        synthesize("Hello.", settings("en+F3"))
