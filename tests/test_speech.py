"""The optional frozen speech encoder: embeddings at the site (cached), a declared dimension
the site checks, and a DP-trained adapter that is the only part of it that travels."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.dataset import build_tensors
from client.prepare import prepare_site
from shared.config import ExperimentConfig, FeatureConfig, LanguageConfig, ModelSpec, SpeechConfig, load_site
from shared.errors import ConfigError
from shared.markers import N_MODEL_MARKERS
from shared.models import build_model
from shared.params import get_arrays
from tests.conftest import small_site, tiny_experiment

HIDDEN = 16


def tiny_wav2vec2(folder: Path) -> Path:
    """A 1-layer wav2vec2 (hidden size 16, two conv layers), built from config: no download."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2Model(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_wav2vec2(tmp_path_factory.mktemp("w2v2"))


def speech_cfg(path: Path, **changes: Any) -> SpeechConfig:
    return replace(SpeechConfig(encoder="transformer", model_path=str(path), embedding_dim=HIDDEN, adapter_dim=4), **changes)


def test_embeddings_are_computed_once_then_cached(tiny_cohort: Path, tmp_path: Path, encoder_dir: Path) -> None:
    manifest, cfg = small_site(tiny_cohort, tmp_path), speech_cfg(encoder_dir)
    kwargs: dict[str, Any] = {"language": LanguageConfig(encoder="none"), "speech": cfg}
    first = prepare_site(manifest, FeatureConfig(max_seconds=4.0), tmp_path / "state", **kwargs)
    assert first.speech_cache_hits == 0 and first.report()["sessions_with_speech_embeddings"] == len(first.sessions) == 14
    again = prepare_site(manifest, FeatureConfig(max_seconds=4.0), tmp_path / "state", **kwargs)
    assert again.speech_cache_hits == 14
    for a, b in zip(first.sessions, again.sessions, strict=True):
        assert a.speech_embedding is not None and a.speech_embedding.shape == (HIDDEN,) and np.isfinite(a.speech_embedding).all()
        assert b.speech_embedding is not None and np.array_equal(a.speech_embedding, b.speech_embedding)
    assert len({s.speech_embedding.tobytes() for s in first.sessions}) == 14  # type: ignore[union-attr]  # one per recording, not a constant
    t = build_tensors(first.sessions, baseline_sessions=2)
    assert t.markers.shape[-1] == N_MODEL_MARKERS + HIDDEN and torch.isfinite(t.markers).all()
    off = prepare_site(manifest, FeatureConfig(max_seconds=4.0), tmp_path / "state", language=LanguageConfig(encoder="none"))
    assert off.sessions[0].speech_embedding is None
    assert build_tensors(off.sessions, baseline_sessions=2).markers.shape[-1] == N_MODEL_MARKERS  # encoder off: as before


def test_site_encoder_of_another_size_is_refused(tmp_path: Path, encoder_dir: Path) -> None:
    from client.speech import speech_embeddings

    with pytest.raises(ConfigError, match=r"speech.embedding_dim.*hidden size 16"):
        speech_embeddings(["0" * 64], lambda i: np.zeros(16000, np.float32), speech_cfg(encoder_dir, embedding_dim=768), cache_root=tmp_path)
    with pytest.raises(ConfigError, match="speech.model_path"):
        speech_embeddings(["0" * 64], lambda i: np.zeros(16000, np.float32), speech_cfg(tmp_path), cache_root=tmp_path)


def test_plan_with_encoder_but_no_path_is_a_config_error() -> None:
    from shared.config import experiment_from_yaml_text

    with pytest.raises(ConfigError, match="speech.model_path"):
        experiment_from_yaml_text("name: t\nspeech:\n  encoder: transformer\n", source="plan")


@pytest.mark.parametrize(("branches", "has_adapter"), [("fused", True), ("acoustic", True), ("language", False)])
def test_adapter_belongs_to_the_acoustic_side(branches: str, has_adapter: bool) -> None:
    exp = ExperimentConfig(name="t", model=ModelSpec(branches=branches), speech=speech_cfg(Path("unused")))
    model = build_model(exp).eval()
    assert ("adapter.weight" in model.state_dict()) == has_adapter
    mel, markers = torch.randn(2, exp.features.n_mels, 50), torch.randn(2, N_MODEL_MARKERS + HIDDEN)
    bumped = markers.clone()
    bumped[:, N_MODEL_MARKERS:] += 3
    assert (not torch.allclose(model(mel, markers), model(mel, bumped))) == has_adapter
    if has_adapter:
        with pytest.raises(ValueError, match="speech-embedding columns"):
            model(mel, markers[:, :N_MODEL_MARKERS])


def test_dp_round_with_encoder_sends_adapter_and_head_only(tiny_cohort: Path, tmp_path: Path, encoder_dir: Path) -> None:
    from client.site import Site

    exp = replace(tiny_experiment(), language=LanguageConfig(encoder="lsa"), speech=speech_cfg(encoder_dir))
    site = Site(replace(load_site(tiny_cohort / "alpha" / "site.yaml"), state_dir=tmp_path / "state"), exp)
    assert site.train_set.markers.shape[-1] == N_MODEL_MARKERS + HIDDEN
    start = get_arrays(build_model(exp))
    result = site.train(start, run_id="speech-test", server_round=1, total_rounds=2)
    assert not hasattr(result, "code"), result
    update = result.arrays
    assert list(update) == list(build_model(exp).state_dict())  # never more than the model's own state_dict
    assert update["adapter.weight"].shape == (4, HIDDEN) and all(np.isfinite(v).all() for v in update.values())
    assert not np.array_equal(update["adapter.weight"], start["adapter.weight"])  # the adapter is trained
    from transformers import AutoModel

    encoder_names = set(AutoModel.from_pretrained(encoder_dir, local_files_only=True).state_dict())
    assert not encoder_names & set(update)
    assert not any(k.startswith(("feature_extractor", "encoder.", "feature_projection")) for k in update)
    plain = get_arrays(build_model(tiny_experiment()))
    extra = sum(v.size for v in update.values()) - sum(v.size for v in plain.values())
    assert extra == HIDDEN * 4 + 4 + 4 * exp.model.hidden  # adapter weight + bias, and the head's 4 extra inputs


def test_bench_encoder_helpers_build_offline_and_check_folders(tmp_path: Path) -> None:
    from server.bench_fl import encoder_parameters, make_random_speech_encoder, with_speech_encoder

    path = make_random_speech_encoder(tmp_path / "tiny", size="tiny")
    exp = with_speech_encoder(tiny_experiment(), path)
    assert exp.speech.enabled and exp.speech.embedding_dim == HIDDEN and encoder_parameters(path) > 0
    with pytest.raises(ConfigError, match="choose one of base, tiny"):
        make_random_speech_encoder(tmp_path / "x", size="large")
    with pytest.raises(ConfigError, match="no config.json"):
        with_speech_encoder(tiny_experiment(), tmp_path)


@pytest.mark.slow
def test_site_memory_bench_runs_the_encoder_in_a_fresh_process(tiny_cohort: Path, tmp_path: Path, encoder_dir: Path) -> None:
    from server.bench_fl import site_round_memory

    exp = replace(tiny_experiment(), language=LanguageConfig(encoder="lsa"), speech=speech_cfg(encoder_dir))
    data = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, data)
    out = site_round_memory(exp, data, tmp_path / "scratch")
    for name in ("default_model", "with_speech_encoder"):
        assert out[name]["refusal"] is None and out[name]["peak_rss_mib"] > 50
    assert out["with_speech_encoder"]["update_bytes"] > out["default_model"]["update_bytes"]  # the adapter, not the encoder
