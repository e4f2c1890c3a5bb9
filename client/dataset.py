"""A site's sessions as per-patient tensors, split by patient, with personal baselines.

Each patient is their own baseline: besides site-standardised markers, the model sees each
marker's deviation from the mean of the patient's first ``baseline_sessions`` sessions.
Everything here stays at the site.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from client.prepare import PreparedSession


@dataclass(frozen=True)
class PatientTensors:
    """Sessions grouped by patient and padded to K sessions."""

    mel: torch.Tensor  # (P, K, n_mels, F) float16
    markers: torch.Tensor  # (P, K, N_MODEL_MARKERS [+ D]) float32: site z-scores, within-patient deltas, then (speech encoder on) D site-standardised embedding dims
    labels: torch.Tensor  # (P, K) float32, 0 where unlabelled or padding
    mask: torch.Tensor  # (P, K) bool, True for labelled sessions
    patient_ids: tuple[str, ...]

    @property
    def n_patients(self) -> int:
        return int(self.mel.shape[0])

    @property
    def n_sessions(self) -> int:
        return int(self.mask.sum())

    def on(self, device: torch.device) -> PatientTensors:
        """These tensors with what the steps gather from (mel, markers, labels) moved to ``device``
        once, instead of a batch's worth on every step; the mask stays on the CPU, where the seeded
        session sampling runs. On the CPU, itself."""
        if device.type == "cpu":
            return self
        return PatientTensors(self.mel.to(device), self.markers.to(device), self.labels.to(device), self.mask, self.patient_ids)

    def subset(self, idx: torch.Tensor) -> PatientTensors:
        return PatientTensors(
            self.mel[idx], self.markers[idx], self.labels[idx], self.mask[idx], tuple(self.patient_ids[i] for i in idx.tolist())
        )


def split_patients(sessions: list[PreparedSession], *, eval_fraction: float, seed: int, salt: bytes) -> tuple[set[str], set[str]]:
    """(train, eval) patient ids: deterministic, by patient never by session, stratified on
    whether the patient has any worsening session.

    Each stratum is ordered by a hash of ``salt`` (the site's secret), the plan's ``seed`` and
    ``eval_fraction``, and the patient id. With the fraction in the key, two plans that differ
    only in ``eval_fraction`` hold out unrelated sets, not nested ones: nested sets that differ
    by one patient made the difference of two released evaluation losses that patient's own
    loss (a red-team differencing attack). With the site's secret in it, the coordinator cannot
    choose a seed that picks the held-out patients it wants. The same plan at the same site
    always gets the same split."""
    ever: dict[str, bool] = defaultdict(bool)
    for s in sessions:
        ever[s.row.patient_id] |= s.row.label == 1
    train, held = set(), set()
    for group in (True, False):
        ids = sorted((p for p, e in ever.items() if e is group), key=lambda p: hashlib.sha256(salt + f"|{seed}|{eval_fraction!r}|{p}".encode()).hexdigest())
        n_eval = int(round(eval_fraction * len(ids)))
        held |= set(ids[:n_eval])
        train |= set(ids[n_eval:])
    return train, held


def build_tensors(sessions: list[PreparedSession], *, baseline_sessions: int) -> PatientTensors:
    """Group sessions by patient (chronologically) and add within-patient baseline deltas.

    Sessions with a speech embedding (all or none) get its D dimensions, standardised over
    the site, appended after the marker columns."""
    by_patient: dict[str, list[PreparedSession]] = defaultdict(list)
    for s in sessions:
        by_patient[s.row.patient_id].append(s)
    if not by_patient:
        raise ValueError("No usable sessions to build tensors from.")
    for lst in by_patient.values():
        lst.sort(key=lambda s: s.row.recorded_at)
    raw = np.stack([s.markers for s in sessions])  # (S, M), NaN where a marker is unavailable
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (no transcripts) stay NaN -> 0 below
        mean, std = np.nanmean(raw, axis=0), np.nanstd(raw, axis=0) + 1e-6
    with_emb = [s.speech_embedding is not None for s in sessions]
    if any(with_emb) and not all(with_emb):
        raise ValueError("Either every session or none has a speech embedding; prepare the site again with one speech config.")
    emb_dim = 0
    if all(with_emb):
        emb = np.stack([s.speech_embedding for s in sessions])  # type: ignore[misc]  # (S, D)
        emb_mean, emb_std, emb_dim = emb.mean(axis=0), emb.std(axis=0) + 1e-6, emb.shape[1]
    pids = sorted(by_patient)
    k = max(len(v) for v in by_patient.values())
    first = sessions[0].features.mel
    mel = torch.zeros(len(pids), k, *first.shape, dtype=torch.float16)
    markers = torch.zeros(len(pids), k, 2 * raw.shape[1] + emb_dim)
    labels = torch.zeros(len(pids), k)
    mask = torch.zeros(len(pids), k, dtype=torch.bool)
    for i, pid in enumerate(pids):
        lst = by_patient[pid]
        m = np.stack([s.markers for s in lst])  # (n, M)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a marker missing in every baseline session
            base = np.nanmean(m[:baseline_sessions], axis=0)  # (M,)
        feats = np.concatenate([(m - mean) / std, (m - base) / std], axis=1)  # (n, 2M)
        if emb_dim:
            e = (np.stack([s.speech_embedding for s in lst]) - emb_mean) / emb_std  # type: ignore[misc]  # (n, D)
            feats = np.concatenate([feats, e], axis=1)  # (n, 2M + D)
        # A missing marker (no transcript) is imputed as "typical": 0 after standardising.
        markers[i, : len(lst)] = torch.from_numpy(np.clip(np.nan_to_num(feats, nan=0.0), -8, 8).astype(np.float32))
        mel[i, : len(lst)] = torch.from_numpy(np.stack([s.features.mel for s in lst]))
        for j, s in enumerate(lst):
            if s.row.label is not None:
                labels[i, j] = float(s.row.label)
                mask[i, j] = True
    return PatientTensors(mel, markers, labels, mask, tuple(pids))
