"""The model registry: one place that turns a :class:`ModelSpec` into a module.

Server and sites build the same architecture from the same config, so parameters travel
as a flat, ordered list of arrays with no code attached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shared.config import ExperimentConfig, ModelSpec, SpeechConfig
from shared.errors import ConfigError
from shared.markers import N_MODEL_MARKERS
from shared.models.prosody_mel import ProsodyMelNet

Builder = Callable[[ModelSpec, int, int, SpeechConfig], nn.Module]


def _prosody_mel(spec: ModelSpec, n_mels: int, n_markers: int, speech: SpeechConfig) -> nn.Module:
    dims = (speech.embedding_dim, speech.adapter_dim) if speech.enabled else (0, 0)
    return ProsodyMelNet(spec, n_mels=n_mels, n_markers=n_markers, speech_dim=dims[0], adapter_dim=dims[1])


MODELS: dict[str, Builder] = {
    "speech_language": _prosody_mel,
    "prosody_mel": _prosody_mel,  # earlier name
}

__all__ = ["MODELS", "N_MODEL_MARKERS", "build_model"]


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """Build the experiment's model with a seeded initialisation (same on every side)."""
    try:
        builder = MODELS[cfg.model.name]
    except KeyError:
        raise ConfigError(
            f"Unknown model {cfg.model.name!r} in `model.name`; choose one of {', '.join(sorted(MODELS))}."
        ) from None
    torch.manual_seed(cfg.seed)
    return builder(cfg.model, cfg.features.n_mels, N_MODEL_MARKERS, cfg.speech)
