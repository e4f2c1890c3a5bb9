"""Log-mel + prosodic-marker relapse model: a small conv branch and a fusion head.

Reads top to bottom: the conv branch, the head, the model. GroupNorm, never BatchNorm:
batch statistics would mix patients and break per-patient DP.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelSpec


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
    """Session risk logit from a log-mel image and a marker vector."""

    def __init__(self, spec: ModelSpec, *, n_mels: int, n_markers: int) -> None:
        super().__init__()
        self.mel = MelBranch(n_mels, spec.conv_channels, spec.groups)
        self.head = nn.Sequential(
            nn.Linear(self.mel.out_dim + n_markers, spec.hidden),
            nn.ReLU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, 1),
        )

    def forward(self, mel: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        # mel: (N, n_mels, F), markers: (N, n_markers) -> logits (N,)
        return self.head(torch.cat([self.mel(mel), markers], dim=-1)).squeeze(-1)
