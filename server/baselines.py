"""Reference points every federated run is compared with, on the same patient splits.

* centralised: the sites' training patients pooled in one place, trained without DP for as
  many patient-steps as the federation used. Only possible on synthetic data, which is the
  point: it is the ceiling federated training is measured against.
* one-feature: a single raw marker, pooled, with no model (speech rate, the literature's
  first marker; and the best single marker in hindsight, to show the task is not trivial).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dataset import PatientTensors
from client.dp_train import make_optimizer, predict, train_plain
from client.site import Site
from server.simulate import discover_sites
from shared import metrics as M  # noqa: N812
from shared.config import ExperimentConfig, load_site
from shared.markers import ACOUSTIC_MARKERS
from shared.models import build_model


def concat(parts: list[PatientTensors]) -> PatientTensors:
    """Stack patients of several sites, padding the session axis to the longest."""
    k = max(int(p.mel.shape[1]) for p in parts)

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = k - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra, *t.shape[2:])
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=1)

    return PatientTensors(
        torch.cat([pad(p.mel) for p in parts]),
        torch.cat([pad(p.markers) for p in parts]),
        torch.cat([pad(p.labels) for p in parts]),
        torch.cat([pad(p.mask) for p in parts]),
        tuple(i for p in parts for i in p.patient_ids),
    )


def site_weighted_auroc(model: torch.nn.Module, sites: list[Site]) -> float:
    """Patient-weighted mean of per-site AUROCs: the federated metric, computed centrally."""
    pairs = []
    for s in sites:
        probs = predict(model, s.eval_set, torch.device("cpu"))
        auc = M.auroc(s.eval_set.labels[s.eval_set.mask].numpy(), probs[s.eval_set.mask].numpy())
        if np.isfinite(auc):
            pairs.append((s.eval_set.n_patients, auc))
    return float(sum(w * a for w, a in pairs) / sum(w for w, _ in pairs))


def run_baselines(exp: ExperimentConfig, data: Path) -> dict[str, Any]:
    """Centralised non-private AUROC and one-feature AUROCs on the experiment's splits."""
    sites = [Site(load_site(p), exp) for p in discover_sites(data)]
    train = concat([s.train_set for s in sites])
    held = concat([s.eval_set for s in sites])
    model = build_model(exp)
    t = exp.training
    gen = torch.Generator().manual_seed(exp.seed)
    steps = exp.federation.rounds * t.local_steps * len(sites)
    opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
    train_plain(model, train, steps=steps, sample_rate=min(1.0, t.batch_patients / train.n_patients), max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=torch.device("cpu"))
    probs = predict(model, held, torch.device("cpu"))
    y = held.labels[held.mask].numpy()
    out: dict[str, Any] = {
        "centralised_nonprivate_auroc_pooled": round(M.auroc(y, probs[held.mask].numpy()), 4),
        "centralised_nonprivate_auroc_site_weighted": round(site_weighted_auroc(model, sites), 4),
    }
    out.update(one_feature(sites))
    return out


def one_feature(sites: list[Site]) -> dict[str, Any]:
    """Pooled AUROC of single raw markers on held-out sessions (no model, no baseline)."""
    raw, ys = [], []
    for s in sites:
        for sess in s.data.sessions:
            if sess.row.patient_id in s.eval_set.patient_ids and sess.row.label is not None:
                raw.append(sess.features.markers)
                ys.append(sess.row.label)
    x, y = np.stack(raw), np.asarray(ys)
    rate = ACOUSTIC_MARKERS.index("syllable_rate")
    per_marker = {name: M.auroc(y, x[:, i]) for i, name in enumerate(ACOUSTIC_MARKERS)}
    best_name, best = max(((n, max(a, 1 - a)) for n, a in per_marker.items()), key=lambda kv: kv[1])
    return {
        "one_feature_speech_rate_auroc": round(M.auroc(y, -x[:, rate]), 4),  # slower speech = risk
        "one_feature_best_marker": best_name,
        "one_feature_best_marker_auroc": round(best, 4),
    }
