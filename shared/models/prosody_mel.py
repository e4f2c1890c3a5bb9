"""Speech-language relapse model: a log-mel conv branch, a marker input and a fusion head.

Reads top to bottom: the conv branch, the model. The marker input holds acoustic and
language markers (site z-scores and within-patient deltas, see :mod:`shared.markers`);
``spec.branches`` and ``spec.personal_baseline`` pick which of them (and whether the log-mel
branch) the model uses, for ablations. With the optional speech encoder on, the marker input
carries the site's frozen-encoder embedding after the markers, and a low-rank adapter (part of
the acoustic side) maps it into the fusion head; the encoder itself is never part of the model. GroupNorm, never BatchNorm: batch statistics would
mix patients and break per-patient DP.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelSpec
from shared.markers import marker_columns


class MelBranch(nn.Module):
    """Two strided 1-D convolutions over time, pooled to a fixed vector."""

    def __init__(self, n_mels: int, channels: int, groups: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(n_mels, channels, kernel_size=5, stride=2, padding=2),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
        )
        self.out_dim = 2 * channels

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.net(mel)  # (N, C, F/4)
        return torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=-1)  # (N, 2C)


class ProsodyMelNet(nn.Module):
    """Session risk logit from a log-mel image and the marker vector."""

    cols: torch.Tensor  # the marker columns the model reads: a buffer (register_buffer), so it follows .to(device)

    def __init__(self, spec: ModelSpec, *, n_mels: int, n_markers: int, speech_dim: int = 0, adapter_dim: int = 0) -> None:
        super().__init__()
        cols = marker_columns(branches=spec.branches, personal_baseline=spec.personal_baseline)
        if max(cols) >= n_markers:
            raise ValueError(f"Marker column {max(cols)} is outside the {n_markers}-marker input.")
        self.register_buffer("cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.mel = MelBranch(n_mels, spec.conv_channels, spec.groups) if spec.branches != "language" else None
        # The adapter reads markers[..., n_markers : n_markers + speech_dim] (acoustic side only).
        self.n_markers, self.speech_dim = n_markers, speech_dim
        self.adapter = nn.Linear(speech_dim, adapter_dim) if speech_dim and spec.branches != "language" else None
        width = (self.mel.out_dim if self.mel is not None else 0) + len(cols) + (adapter_dim if self.adapter is not None else 0)
        self.head = nn.Sequential(
            nn.Linear(width, spec.hidden),
            nn.ReLU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, 1),
        )

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        # mel: (N, n_mels, F), markers: (N, N_MODEL_MARKERS [+ speech_dim]) -> logits (N,)
        x = markers.index_select(-1, self.cols)  # (N, len(cols))
        if self.mel is not None:
            x = torch.cat([self.mel(mel), x], dim=-1)  # (N, 2C + len(cols))
        if self.adapter is not None:
            if markers.shape[-1] != self.n_markers + self.speech_dim:
                raise ValueError(f"The model expects {self.speech_dim} speech-embedding columns after the {self.n_markers} markers; got {markers.shape[-1] - self.n_markers}.")
            x = torch.cat([x, self.adapter(markers.narrow(-1, self.n_markers, self.speech_dim))], dim=-1)  # (N, ... + adapter_dim)
        return self.head(x).squeeze(-1)
