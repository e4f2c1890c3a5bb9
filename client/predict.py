"""Session risk probabilities for a site's held-out patients (evaluation needs no Opacus).

Kept apart from :mod:`client.dp_train` so a ClientApp process that only evaluates (a fresh
process per message on the Deployment Engine) does not import Opacus.
"""

from __future__ import annotations

import torch
from torch import nn

from client.dataset import PatientTensors


@torch.no_grad()
def predict(model: nn.Module, data: PatientTensors, device: torch.device, chunk: int = 32) -> torch.Tensor:
    """Session risk probabilities (P, K); padding entries are meaningless (use ``mask``)."""
    model.eval()
    out = []
    for i in range(0, data.n_patients, chunk):
        mel = data.mel[i : i + chunk].to(device=device, dtype=torch.float32)
        mk = data.markers[i : i + chunk].to(device)
        b, k = mk.shape[:2]
        out.append(torch.sigmoid(model(mel.flatten(0, 1), mk.flatten(0, 1)).view(b, k)).cpu())
    return torch.cat(out)
