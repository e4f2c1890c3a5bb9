"""Embeddings of each recording from an optional frozen pretrained speech encoder, at the site.

Reads top to bottom: the encoder (a local wav2vec2/HuBERT-style transformers folder, loaded on
first use, mean-pooled last hidden state on normalised 16 kHz audio), its content-addressed
on-disk cache, and the batch entry point :func:`speech_embeddings`. The audio, the encoder
and these embeddings never leave the site; only the model's adapter (trained with DP on them)
does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from client.vector_cache import VectorCache
from shared.config import SpeechConfig
from shared.errors import ConfigError

EMBEDDING_FORMAT = 1  # bump when the code changes what a recording produces
SAMPLE_RATE = 16000  # wav2vec2/HuBERT encoders are trained on 16 kHz audio


class SpeechEncoder:
    """A frozen transformers speech encoder from a local folder, mean-pooled over frames."""

    def __init__(self, path: Path, *, embedding_dim: int, max_seconds: float) -> None:
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(
                f"`speech.model_path` {path} is not a transformers model folder (no config.json); "
                "give a local folder saved with save_pretrained, or set `speech.encoder: none`."
            )
        hidden = json.loads(config.read_text()).get("hidden_size")
        if hidden != embedding_dim:
            raise ConfigError(
                f"`speech.embedding_dim` is {embedding_dim} but the encoder in {path} has hidden size {hidden}; "
                "the plan and this site's encoder must agree (ask the coordinator which encoder the plan expects)."
            )
        self.path, self.max_seconds = path, max_seconds
        h = hashlib.sha256(config.read_bytes())
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        self.identity = f"speech:{h.hexdigest()[:16]}:{max_seconds:g}"
        self._model: object | None = None  # loaded on first use: a fully cached site never pays for it

    def _load(self) -> object:
        if self._model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """(n,) float32 mono 16 kHz samples -> (H,) float32 mean of the last hidden state."""
        import torch

        x = samples[: int(self.max_seconds * SAMPLE_RATE)].astype(np.float32)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # as Wav2Vec2FeatureExtractor(do_normalize=True)
        with torch.inference_mode():
            hidden = self._load()(torch.from_numpy(x)[None]).last_hidden_state  # type: ignore[operator]  # (1, T, H)
        return hidden[0].mean(dim=0).numpy().astype(np.float32)  # (H,)


_ENCODERS: dict[tuple[str, int, float], SpeechEncoder] = {}


def make_encoder(cfg: SpeechConfig) -> SpeechEncoder | None:
    """One encoder per process and setting (loading takes seconds; rounds reuse it)."""
    if not cfg.enabled:
        return None
    if not cfg.model_path:
        raise ConfigError("`speech.encoder` is transformer but `speech.model_path` is empty; give the encoder's local folder.")
    key = (str(Path(cfg.model_path).expanduser().resolve()), cfg.embedding_dim, cfg.max_seconds)
    if key not in _ENCODERS:
        _ENCODERS[key] = SpeechEncoder(Path(key[0]), embedding_dim=cfg.embedding_dim, max_seconds=cfg.max_seconds)
    return _ENCODERS[key]


class EmbeddingCache(VectorCache):
    """``<root>/speech-<encoder identity hash>/<sha[:2]>/<audio sha256>.npy``, written atomically."""

    def __init__(self, root: Path, identity: str, dim: int) -> None:
        tag = hashlib.sha256(json.dumps([EMBEDDING_FORMAT, identity]).encode()).hexdigest()[:16]
        super().__init__(root / f"speech-{tag}", (dim,), finite=True)


def speech_embeddings(
    audio_sha256: Sequence[str],
    load_audio: Callable[[int], np.ndarray],
    cfg: SpeechConfig,
    *,
    cache_root: Path,
) -> tuple[np.ndarray, int]:
    """Embeddings (S, embedding_dim) float32 for S recordings, and the number of cache hits.

    ``load_audio(i)`` decodes recording i to 16 kHz mono; it is called only on a cache miss."""
    encoder = make_encoder(cfg)
    if encoder is None:
        raise ConfigError("speech_embeddings needs `speech.encoder: transformer`.")
    cache = EmbeddingCache(cache_root, encoder.identity, cfg.embedding_dim)
    out = np.zeros((len(audio_sha256), cfg.embedding_dim), dtype=np.float32)
    hits = 0
    for i, digest in enumerate(audio_sha256):
        cached = cache.get(digest)
        if cached is not None:
            out[i], hits = cached, hits + 1
            continue
        out[i] = encoder.encode(load_audio(i))
        cache.put(digest, out[i])
    return out, hits
