"""One hospital's side of a federated round: load data once, train with DP, evaluate.

This is the Flower-independent core of the ClientApp, so it can be tested and benchmarked
directly. What it returns is exactly what may leave the site: a DP-trained update and
aggregate metrics over at least k patients.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.dataset import PatientTensors, build_tensors, split_patients
from client.dp_train import make_optimizer, predict, train_dp, train_plain
from client.prepare import SiteData, prepare_site
from shared import metrics as M  # noqa: N812
from shared.config import ExperimentConfig, FeatureConfig, SiteConfig
from shared.errors import DataError
from shared.models import build_model
from shared.params import get_arrays, set_arrays
from shared.privacy import ledger
from shared.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon

log = logging.getLogger("fedrelapse.site")


@dataclass(frozen=True)
class Refusal:
    """A structured refusal the coordinator shows per site instead of an update."""

    code: str  # machine-readable: "budget", "replay", "no-data", ...
    reason: str  # a full sentence for the researcher


@dataclass(frozen=True)
class TrainResult:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


@functools.lru_cache(maxsize=8)
def _load(manifest: Path, mtime_ns: int, cfg: FeatureConfig, cache_root: Path) -> SiteData:
    """Site data, memoised per process for an unchanged manifest (rounds reuse it)."""
    del mtime_ns  # part of the cache key only
    return prepare_site(manifest, cfg, cache_root)


def load_site_data(site: SiteConfig, cfg: FeatureConfig) -> SiteData:
    try:
        mtime = site.manifest.stat().st_mtime_ns
    except FileNotFoundError:
        raise DataError(f"Site {site.name}: manifest {site.manifest} does not exist; check site.yaml.") from None
    return _load(site.manifest, mtime, cfg, site.state_dir / "features")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("site.yaml asks for `device: cuda` but no CUDA GPU is visible; use auto or cpu.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def plan_hash(exp: ExperimentConfig) -> str:
    """Content hash of the training plan (model, training and privacy settings)."""
    return hashlib.sha256(exp.to_yaml().encode()).hexdigest()


class Site:
    """A site's data, split and model for one experiment."""

    def __init__(self, site: SiteConfig, exp: ExperimentConfig) -> None:
        self.cfg = site
        self.exp = exp
        self.data = load_site_data(site, exp.features)
        if not self.data.sessions:
            raise DataError(f"Site {site.name}: no usable session in {site.manifest}; run `fedrelapse site check`.")
        train_ids, eval_ids = split_patients(self.data.sessions, eval_fraction=exp.training.eval_fraction, seed=exp.seed)
        tensors = build_tensors(self.data.sessions, baseline_sessions=exp.features.baseline_sessions)
        pick = lambda ids: torch.tensor([i for i, p in enumerate(tensors.patient_ids) if p in ids], dtype=torch.long)  # noqa: E731
        self.train_set: PatientTensors = tensors.subset(pick(train_ids))
        self.eval_set: PatientTensors = tensors.subset(pick(eval_ids))
        self.device = resolve_device(site.device)
        self.ledger_path = site.state_dir / "ledger" / f"{self.data.fingerprint[:16]}.jsonl"

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.exp.training.batch_patients / max(self.train_set.n_patients, 1))

    def noise_multiplier(self, total_rounds: int) -> float:
        """σ that makes the whole run meet the experiment's (ε, δ) at this site."""
        p = self.exp.privacy
        steps = total_rounds * self.exp.training.local_steps
        return calibrate_noise(
            target_epsilon=p.target_epsilon, target_delta=p.target_delta, sample_rate=self.sample_rate, steps=steps, accountant=p.accountant
        )

    def train(self, arrays: dict[str, np.ndarray], *, run_id: str, server_round: int, total_rounds: int) -> TrainResult | Refusal:
        """One round of local training; with DP on, the ledger entry is fsync'd first."""
        exp, t = self.exp, self.exp.training
        if self.train_set.n_patients < exp.federation.min_patients_metric:
            return Refusal("no-data", f"Site {self.cfg.name} has {self.train_set.n_patients} training patients, fewer than k={exp.federation.min_patients_metric}.")
        model = build_model(exp).to(self.device)
        set_arrays(model, arrays)
        gen = torch.Generator().manual_seed(_round_seed(_site_secret(self.cfg.state_dir), run_id, server_round))
        opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
        q = self.sample_rate
        if not exp.privacy.enabled:
            stats = train_plain(model, self.train_set, steps=t.local_steps, sample_rate=q, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=self.device)
            metrics = {M.NUM_PATIENTS: float(self.train_set.n_patients), M.TRAIN_LOSS: stats.mean_loss, M.EPSILON_RUN: float("inf"), M.EPSILON_TOTAL: float("inf"), M.DELTA: 0.0, M.NOISE_MULTIPLIER: 0.0}
            return TrainResult(get_arrays(model), metrics)
        sigma = self.noise_multiplier(total_rounds)
        event = SubsampledGaussian(sigma, q, t.local_steps)
        with ledger.locked(self.ledger_path):
            entries = ledger.read_entries(self.ledger_path)
            if any(e.run_id == run_id and e.round == server_round for e in entries):
                return Refusal("replay", f"Site {self.cfg.name} already accounted round {server_round} of run {run_id}; it is not trained or charged twice.")
            p = exp.privacy
            eps_run = epsilon([*(e.mechanism for e in entries if e.run_id == run_id), event], delta=p.target_delta, accountant=p.accountant)
            if eps_run > p.target_epsilon * 1.001:
                return Refusal("budget", f"Site {self.cfg.name}: round {server_round} would bring this run to ε={eps_run:.2f} > {p.target_epsilon} at δ={p.target_delta}; refused.")
            eps_total = epsilon([*(e.mechanism for e in entries), event], delta=p.target_delta, accountant=p.accountant)
            stats = train_dp(
                model, self.train_set, steps=t.local_steps, sample_rate=q, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=self.device, secure_mode=p.secure_mode,
            )
            entry = ledger.LedgerEntry(
                version=ledger.FORMAT_VERSION, site=self.cfg.name, dataset=self.data.fingerprint, run_id=run_id, round=server_round,
                plan_hash=plan_hash(exp), accountant=p.accountant, delta=p.target_delta, noise_multiplier=sigma, sample_rate=q,
                steps=t.local_steps, max_grad_norm=p.max_grad_norm, epsilon_run=eps_run, epsilon_total=eps_total,
                time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), prev_hash=ledger.head_hash(entries),
            )
            ledger.append(self.ledger_path, entry)  # durable before the update leaves
        log.info("site=%s run=%s round=%d trained: sigma=%.3f q=%.3f eps_run=%.3f", self.cfg.name, run_id, server_round, sigma, q, eps_run)
        metrics = {
            M.NUM_PATIENTS: float(self.train_set.n_patients), M.TRAIN_LOSS: stats.mean_loss, M.EPSILON_RUN: eps_run,
            M.EPSILON_TOTAL: eps_total, M.DELTA: p.target_delta, M.NOISE_MULTIPLIER: sigma,
        }
        return TrainResult(get_arrays(model), metrics)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Aggregate metrics on held-out patients; suppressed below k patients."""
        k = self.exp.federation.min_patients_metric
        if self.eval_set.n_patients < k:
            return {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}
        model = build_model(self.exp).to(self.device)
        set_arrays(model, arrays)
        probs = predict(model, self.eval_set, self.device)  # (P, K)
        mask = self.eval_set.mask
        y, s = self.eval_set.labels[mask].numpy(), probs[mask].numpy()
        loss = float(torch.nn.functional.binary_cross_entropy(probs[mask].clamp(1e-6, 1 - 1e-6), self.eval_set.labels[mask]))
        auc = M.auroc(y, s)
        if not np.isfinite(auc):  # one class only: AUROC undefined, say so rather than invent one
            return {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}
        return {M.SUPPRESSED: 0.0, M.NUM_PATIENTS: float(self.eval_set.n_patients), M.EVAL_LOSS: loss, M.AUROC: auc, M.AUPRC: M.average_precision(y, s)}


def _site_secret(state_dir: Path) -> bytes:
    """32 random bytes kept at the site (0600), created on first use.

    Sampling and noise are seeded from this secret, never from public values: a coordinator
    that could reproduce the noise could subtract it and undo DP.
    """
    path = state_dir / "noise-seed.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this site won the race
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def _round_seed(secret: bytes, run_id: str, server_round: int) -> int:
    digest = hashlib.sha256(secret + f"|{run_id}|{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
