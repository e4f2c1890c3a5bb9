"""Speech synthesis with libespeak-ng through ctypes, using the ``espeakng-loader`` wheel.

Determinism: libespeak-ng keeps function-static state between utterances (pitch flutter
phase, gain control, ...) that no API call resets, and seeds its noise generator from
``time()`` in ``espeak_Initialize``. Each :func:`synthesize` call therefore loads a fresh
instance of a private copy of the library, seeds it with a fixed value, synthesises and
unloads it again (about 4 ms). The private copy, opened with RTLD_DEEPBIND, also keeps this
module apart from any other user of the wheel's library in the same process. Side effect:
libc's ``rand()`` is reseeded (``srand``) before each synthesis, because the speechPlayer
backend of some variants draws its breath noise from it. All calls share one lock.
"""

from __future__ import annotations

import _ctypes
import ctypes
import difflib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["EspeakError", "VoiceSettings", "available_variants", "available_voices", "synthesize"]

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it a missing data folder calls exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_VOLUME_NORMAL = 100
_RAND_SEED = 1
_DLOPEN_MODE = os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0)  # own symbols first, see _session
_RANGES = {"rate_wpm": (80, 450), "pitch": (0, 99), "pitch_range": (0, 99), "word_gap_ms": (0, 2000)}

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    """``espeak_VOICE`` from speak_lib.h."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_INT, _UINT, _PTR = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
_ARGTYPES = {
    "espeak_Initialize": [_INT, _INT, ctypes.c_char_p, _INT],
    "espeak_ListVoices": [ctypes.POINTER(_Voice)],
    "espeak_SetVoiceByName": [ctypes.c_char_p],
    "espeak_SetParameter": [_INT, _INT, _INT],
    "espeak_ng_SetRandSeed": [ctypes.c_long],
    "espeak_Synth": [ctypes.c_char_p, ctypes.c_size_t, _UINT, _INT, _UINT, _UINT, _PTR, _PTR],
}


class EspeakError(RuntimeError):
    """libespeak-ng, its data or a requested voice could not be loaded or used."""


@dataclass(frozen=True)
class VoiceSettings:
    """How espeak-ng speaks; every field is checked on construction.

    ``voice`` is a name from :func:`available_voices` (case-insensitive, e.g. ``"en"``,
    ``"en-us"``, ``"nb"``), optionally with ``+`` and a variant from :func:`available_variants`
    (case-sensitive, e.g. ``"en+m3"``, ``"nb+f2"``, ``"en+Storm"``).
    ``word_gap_ms`` is rounded to espeak's 10 ms unit, which espeak scales with the rate.
    """

    voice: str
    rate_wpm: int
    pitch: int
    pitch_range: int
    word_gap_ms: int

    def __post_init__(self) -> None:
        """Raise ValueError naming the field, the bad value and the allowed range."""
        voice = self.voice
        if not isinstance(voice, str) or not voice.strip() or "\0" in voice or voice.count("+") > 1:
            raise ValueError(
                f"voice must be a non-empty espeak voice name with at most one '+variant' "
                f"(e.g. 'en', 'nb', 'en+f3'), got {voice!r}."
            )
        for field, (low, high) in _RANGES.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, Integral) or not low <= int(value) <= high:
                raise ValueError(f"{field} must be an integer in [{low}, {high}], got {value!r}.")


class _Engine:
    """A private copy of libespeak-ng plus the voice lists; one instance per process."""

    def __init__(self) -> None:
        try:
            import espeakng_loader

            source = Path(espeakng_loader.get_library_path())
            self._data = espeakng_loader.get_data_path().encode()
        except (ImportError, RuntimeError) as exc:
            raise EspeakError(f"The espeakng-loader package is unusable: {exc}.") from exc
        if not source.is_file():
            raise EspeakError(f"espeakng-loader names {source} as libespeak-ng, but it does not exist.")
        self._tmp = tempfile.TemporaryDirectory(prefix="espeak-ng-")
        self._lib_path = str(shutil.copy(source, Path(self._tmp.name) / source.name))
        try:
            _ctypes.dlclose(ctypes.CDLL(self._lib_path, mode=_DLOPEN_MODE)._handle)
        except OSError:  # e.g. a noexec temp folder: share the wheel's copy instead
            self._lib_path = str(source)
        self._libc = ctypes.CDLL(None)
        self._chunks: list[bytes] = []
        self._callback = _SynthCallback(self._collect)  # must outlive every espeak_Synth call
        with self._session() as (lib, _):
            self.voices = tuple(sorted({name.lower() for name in self._list(lib, None)}))
            self.variants = tuple(sorted(self._list(lib, _Voice(languages=b"variant")), key=str.lower))

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], n: int, _events: int | None) -> int:
        if wav and n > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    @contextmanager
    def _session(self) -> Iterator[tuple[ctypes.CDLL, int]]:
        """Yield a freshly loaded, initialised and seeded library and its sample rate."""
        try:
            lib = ctypes.CDLL(self._lib_path, mode=_DLOPEN_MODE)
        except OSError as exc:
            raise EspeakError(f"Could not load libespeak-ng from {self._lib_path}: {exc}.") from exc
        if lib.espeak_ng_GetSampleRate() != 0:  # another user holds this instance: its state is not fresh
            _ctypes.dlclose(lib._handle)
            raise EspeakError(
                f"{self._lib_path} is already initialised by other code in this process, so espeak-ng's "
                "state cannot be reset; allow executables in the temp folder so a private copy can be used."
            )
        for name, argtypes in _ARGTYPES.items():
            getattr(lib, name).argtypes = argtypes
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        try:
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data, _INITIALIZE_DONT_EXIT)
            if rate <= 0:
                raise EspeakError(f"libespeak-ng could not read its data folder {self._data.decode()}.")
            lib.espeak_SetSynthCallback(self._callback)
            lib.espeak_ng_SetRandSeed(_RAND_SEED)
            self._libc.srand(_RAND_SEED)  # the speechPlayer backend (variants caleb, Reed) uses rand()
            yield lib, rate
        finally:
            self._chunks.clear()
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)

    @staticmethod
    def _list(lib: ctypes.CDLL, spec: _Voice | None) -> set[str]:
        """Return identifiers without their folder (``gmw/en-US`` -> ``en-US``) from ListVoices."""
        found = lib.espeak_ListVoices(spec)  # NULL-terminated array owned by the library
        names: set[str] = set()
        for i in range(100_000):
            if not found[i]:
                return names
            names.add(found[i].contents.identifier.decode().rsplit("/", 1)[-1])
        return names

    def synthesize(self, text: str, settings: VoiceSettings) -> tuple[npt.NDArray[np.float32], int]:
        """See :func:`synthesize`; the caller holds the module lock."""
        base, _, variant = settings.voice.partition("+")
        if variant and variant not in self.variants:  # espeak would silently ignore it
            close = difflib.get_close_matches(variant, self.variants, 6, 0)
            raise EspeakError(
                f"espeak-ng has no voice variant {variant!r} (in {settings.voice!r}); variant names are "
                f"case-sensitive, close ones are {', '.join(close)} (see available_variants())."
            )
        with self._session() as (lib, sample_rate):
            if lib.espeak_SetVoiceByName(settings.voice.encode()) != _EE_OK:
                close = difflib.get_close_matches(base.lower(), self.voices, 6, 0)
                raise EspeakError(
                    f"espeak-ng could not load voice {settings.voice!r}; available voices include "
                    f"{', '.join(close)} (see available_voices())."
                )
            gap = (settings.word_gap_ms + 5) // 10
            params = ((_RATE, settings.rate_wpm), (_PITCH, settings.pitch), (_RANGE, settings.pitch_range))
            for param, value in (*params, (_WORDGAP, gap), (_VOLUME, _VOLUME_NORMAL)):
                if lib.espeak_SetParameter(param, int(value), 0) != _EE_OK:
                    raise EspeakError(f"espeak-ng refused parameter {param} = {value}.")
            data = text.encode("utf-8") + b"\0"
            status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != _EE_OK or lib.espeak_Synchronize() != _EE_OK:
                raise EspeakError(f"espeak-ng failed to synthesise {len(text)} characters (status {status}).")
            pcm = b"".join(self._chunks)
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)
        return samples, sample_rate


_lock = threading.Lock()
_engine: _Engine | None = None


def _get_engine() -> _Engine:
    """Return the process-wide engine, creating it on first use; the caller holds ``_lock``."""
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def available_voices() -> list[str]:
    """Return the voice names espeak_ListVoices reports, usable as ``VoiceSettings.voice``.

    Names are identifiers without their language-family folder, in lower case (``"en"``,
    ``"en-us"``, ``"nb"``, ...). Variants (``"+f3"``, ``"+m3"``, ...) are not listed.
    """
    with _lock:
        return list(_get_engine().voices)


def available_variants() -> list[str]:
    """Return the voice variants (``f3``, ``m3``, ``Storm``, ...) to append to a voice with ``+``."""
    with _lock:
        return list(_get_engine().variants)


def synthesize(text: str, settings: VoiceSettings) -> tuple[npt.NDArray[np.float32], int]:
    """Return (samples float32 in [-1, 1], shape (n,), sample_rate) for `text`.

    The result depends only on ``text`` and ``settings`` (byte-identical on repeat calls,
    whatever was synthesised in between). The sample rate is espeak's native 22050 Hz.
    Raises TypeError/ValueError for bad arguments and EspeakError when the library, its
    data, the voice or the variant cannot be loaded.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    if "\0" in text:
        raise ValueError("text must not contain NUL characters.")
    if not isinstance(settings, VoiceSettings):
        raise TypeError(f"settings must be a VoiceSettings, got {type(settings).__name__}.")
    with _lock:
        return _get_engine().synthesize(text, settings)
