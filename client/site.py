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
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from client import releases
from client.dataset import PatientTensors, build_tensors, split_patients
from client.manifest import read_manifest
from client.predict import predict
from client.prepare import SiteData, prepare_site
from client.sigma_cache import calibrated_sigma
from shared import metrics as M  # noqa: N812
from shared import signing
from shared.config import ExperimentConfig, FeatureConfig, LanguageConfig, SiteConfig, SpeechConfig, metric_k
from shared.errors import DataError, FedrelapseError, PolicyError
from shared.model_signing import model_digest
from shared.models import build_model
from shared.params import get_arrays, set_arrays
from shared.privacy import ledger
from shared.privacy import noised_metrics as NM  # noqa: N812
from shared.privacy.accounting import SubsampledGaussian, epsilon

if TYPE_CHECKING:
    from client.dp_train import StepStats

log = logging.getLogger("fedrelapse.site")


@dataclass(frozen=True)
class Refusal:
    """A structured refusal the coordinator shows per site instead of an update."""

    code: str  # machine-readable: "budget", "replay", "no-data", ...
    reason: str  # a full sentence for the researcher
    metrics: dict[str, float] = field(default_factory=dict)  # aggregate figures that still hold (a replay: the round's ε as accounted)
    ledger_head: str = ""


@dataclass(frozen=True)
class TrainResult:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    ledger_head: str = ""


SITE_CACHE_ENV = "FEDRELAPSE_SITE_CACHE"


def site_cache_size() -> int:
    """How many (site, plan) pairs one process keeps loaded: 4, or ``$FEDRELAPSE_SITE_CACHE``.

    A SuperNode serves one site, so 4 covers a few plans. A simulation actor serves many
    sites in turn; with fewer slots than sites the LRU evicts every site before its next
    round and each round reloads all data (3.4× round overhead at 10 sites), so
    :func:`server.simulate.simulate` sets it to the number of sites.
    """
    raw = os.environ.get(SITE_CACHE_ENV, "4")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"${SITE_CACHE_ENV} is {raw!r}; set it to a whole number of sites of at least 1 (or unset it for 4).")
    return size


FileStat = tuple[int, int, int, int] | None  # (size, mtime_ns, inode, ctime_ns), None if the file cannot be read


@dataclass(frozen=True)
class DataIdentity:
    """The site's data as it is on disk now: the stat of its manifest and of every recording and
    transcript file it lists. Another value means other data: a patient removed from the manifest
    (consent withdrawn), a recording replaced or a transcript redacted; the next message then loads
    the data again. The inode and change time see what size and mtime miss: two recordings of one
    size and mtime swapped (files unpacked from one archive), or a file rewritten with its mtime kept
    (``cp -p``, ``rsync -t``, ``touch -r``)."""

    manifest: str
    manifest_stat: FileStat
    files: tuple[FileStat, ...]  # the recordings, then the transcript files, in manifest order


def _stat(path: str) -> FileStat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


@functools.lru_cache(maxsize=site_cache_size())
def _listed_files(manifest: str, stat: FileStat) -> tuple[str, ...]:
    """The recordings, then the transcript files, one version of a manifest lists (read once per
    version; none if it does not parse: the Site that loads it then says what is wrong)."""
    del stat  # part of the cache key only
    try:
        rows = read_manifest(manifest).rows
    except (OSError, ValueError, FedrelapseError):
        return ()
    return (*(str(r.audio_path) for r in rows), *(str(r.transcript_path) for r in rows if r.transcript_path is not None))


def data_identity(site_cfg: SiteConfig) -> DataIdentity:
    """What prepared site data (:func:`load_site_data`) and a ClientApp's loaded Site are keyed on: one stat per listed
    file per message (4 ms per 1000 recordings on a loaded 2-core machine; a round's training
    takes seconds), so an edited manifest, a replaced recording or an edited transcript is never
    served from memory. The ledger's data fingerprint covers the same data (manifest bytes,
    recordings, transcripts)."""
    manifest = str(site_cfg.manifest.absolute())
    stat = _stat(manifest)
    return DataIdentity(manifest, stat, tuple(_stat(f) for f in _listed_files(manifest, stat)))


@functools.lru_cache(maxsize=8)
def _load(manifest: Path, data: DataIdentity, cfg: FeatureConfig, language: LanguageConfig | None, speech: SpeechConfig | None, cache_root: Path) -> SiteData:
    """Site data, memoised per process while the manifest and the files it lists are unchanged on disk (rounds reuse it)."""
    del data  # part of the cache key only
    return prepare_site(manifest, cfg, cache_root, language=language, speech=speech)


def load_site_data(site: SiteConfig, cfg: FeatureConfig, language: LanguageConfig | None = None, speech: SpeechConfig | None = None) -> SiteData:
    data = data_identity(site)
    if data.manifest_stat is None:
        raise DataError(f"Site {site.name}: manifest {site.manifest} does not exist; check site.yaml.")
    return _load(site.manifest, data, cfg, language, speech if speech is not None and speech.enabled else None, site.state_dir / "features")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("site.yaml asks for `device: cuda` but no CUDA GPU is visible; use auto or cpu.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def plan_hash(exp: ExperimentConfig) -> str:
    """Content hash of the training plan (model, training and privacy settings)."""
    return exp.plan_hash()


class Site:
    """A site's data, split and model for one experiment."""

    def __init__(self, site: SiteConfig, exp: ExperimentConfig, *, read_only: bool = False) -> None:
        """``read_only``: write nothing to the site's state folder (the DPO's ``audit attack``); a
        site without its noise secret yet then gets a held-out split of this object's own."""
        self.cfg = site
        self.exp = exp
        if site.threads:  # per process: one site per SuperNode's worker or ClientApp process
            torch.set_num_threads(site.threads)
        self.data = load_site_data(site, exp.features, exp.language, exp.speech)
        if not self.data.sessions:
            from client.audio import TOO_SHORT

            short = sum(p.field == "audio_path" and TOO_SHORT in p.message for p in self.data.problems)
            why = f" {short} recording(s) are shorter than `features.min_seconds` ({exp.features.min_seconds:g} s) of the plan." if short else ""
            raise DataError(f"Site {site.name}: no usable session in {site.manifest}.{why} Run `fedrelapse site check`.")
        train_ids, eval_ids = split_patients(self.data.sessions, eval_fraction=exp.training.eval_fraction, seed=exp.seed, salt=_split_salt(site.state_dir, create=not read_only))
        tensors = build_tensors(self.data.sessions, baseline_sessions=exp.features.baseline_sessions)
        pick = lambda ids: torch.tensor([i for i, p in enumerate(tensors.patient_ids) if p in ids], dtype=torch.long)  # noqa: E731
        self.train_set: PatientTensors = tensors.subset(pick(train_ids))
        self.eval_set: PatientTensors = tensors.subset(pick(eval_ids))
        self.device = resolve_device(site.device)
        # One ledger per site, not per manifest version: adding a patient or fixing a row
        # changes the fingerprint, and a fresh budget per version would under-count.
        self.ledger_path = ledger_path(site.state_dir)

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.exp.training.batch_patients / max(self.train_set.n_patients, 1))

    @property
    def delta(self) -> float:
        """δ this site accounts at: the stricter of its policy and the plan."""
        return min(self.cfg.policy.delta, self.exp.privacy.target_delta)

    @property
    def k(self) -> int:
        """Smallest group a metric may describe: the stricter of policy and plan."""
        return metric_k(self.cfg, self.exp)

    def noise_multiplier(self, total_rounds: int, cap_run: float | None = None) -> float:
        """σ that makes the whole run (its rounds and its noised metric releases) meet the plan's ε
        (within the per-run cap in force) at δ."""
        p = self.exp.privacy
        steps = total_rounds * self.exp.training.local_steps
        target = min(p.target_epsilon, self.cfg.policy.epsilon_cap_run if cap_run is None else cap_run)
        return calibrated_sigma(
            self.cfg.state_dir, target_epsilon=target, target_delta=self.delta, sample_rate=self.sample_rate, steps=steps, accountant=p.accountant,
            site=self.cfg.name, fixed=self.releases(total_rounds),
        )

    def releases(self, total_rounds: int) -> tuple[SubsampledGaussian, ...]:
        """The noised metric releases a run of ``total_rounds`` rounds plans here, as one mechanism
        (empty with exact metrics or no evaluation): one evaluation of each round's model."""
        p, f = self.exp.privacy, self.exp.federation
        if not p.noised_metrics or f.fraction_evaluate == 0:
            return ()
        one = NM.release_mechanism(p.metrics_noise_multiplier)
        return (SubsampledGaussian(one.noise_multiplier, one.sample_rate, total_rounds),)

    def signing_key(self) -> Ed25519PrivateKey:
        """The site's ledger key (created on first use; its public half is for the DPO)."""
        priv, pub = site_key_paths(self.cfg.state_dir)
        priv.parent.mkdir(parents=True, exist_ok=True)
        with ledger.locked(priv):  # one creator: two processes of a site starting their first round together both saw no key
            if not priv.exists():
                key = new_ledger_key(self.cfg.state_dir)
                log.info("site=%s created ledger signing key <state_dir>/%s (id %s)", self.cfg.name, priv.relative_to(self.cfg.state_dir), signing.fingerprint(key.public_key()))
                return key
            return signing.load_private(priv)

    def plan(self, *, run_id: str, total_rounds: int) -> dict[str, float | str]:
        """What this run would cost here, checked against the policy before anything runs."""
        p = self.exp.privacy
        if not p.enabled and not self.cfg.policy.allow_non_private:
            return {"code": "no-dp", "reason": f"Site {self.cfg.name} trains only with DP; the plan has privacy.enabled = false."}
        with ledger.locked(self.ledger_path):
            entries = ledger.read_entries(self.ledger_path, self._public_key())
        cap_total, cap_run = ledger.current_caps(entries, cap_total=self.cfg.policy.epsilon_cap_total, cap_run=self.cfg.policy.epsilon_cap_run)
        sigma = self.noise_multiplier(total_rounds, cap_run)
        events = [SubsampledGaussian(sigma, self.sample_rate, total_rounds * self.exp.training.local_steps), *self.releases(total_rounds)]
        spent = epsilon([e.mechanism for e in entries if e.charged], delta=self.delta, accountant=p.accountant)
        eps_run = epsilon(events, delta=self.delta, accountant=p.accountant)
        after = epsilon([*(e.mechanism for e in entries if e.charged and e.run_id != run_id), *events], delta=self.delta, accountant=p.accountant)
        out: dict[str, float | str] = {
            "noise_multiplier": sigma, "epsilon_run": eps_run, "epsilon_spent": spent, "epsilon_after": after,
            "epsilon_remaining": max(0.0, cap_total - spent), "delta": self.delta, "code": "ok", "reason": "",
        }
        refusal = self._weight_refusal() or self._check(sigma=sigma, eps_run=eps_run, eps_total=after, cap_total=cap_total, cap_run=cap_run, what="this run")
        if refusal:
            out.update(code=refusal.code, reason=refusal.reason)
        return out

    def _check(self, *, sigma: float, eps_run: float, eps_total: float, cap_total: float, cap_run: float, what: str) -> Refusal | None:
        pol, name = self.cfg.policy, self.cfg.name
        if sigma < pol.min_noise_multiplier:
            return Refusal(
                "min-sigma", f"Site {name}: {what} needs σ={sigma:.3f}, below the site minimum {pol.min_noise_multiplier}; "
                "the σ a plan needs grows with more rounds or local steps, a larger `training.batch_patients`, or a smaller ε: ask for one of these.",
            )
        return self._budget_refusal(eps_run=eps_run, eps_total=eps_total, cap_total=cap_total, cap_run=cap_run, what=what)

    def _budget_refusal(self, *, eps_run: float, eps_total: float, cap_total: float, cap_run: float, what: str) -> Refusal | None:
        """The ``budget`` refusal when ``what`` would take this run past the plan's ε or the per-run cap, or the dataset past the all-time cap."""
        name = self.cfg.name
        if eps_run > min(self.exp.privacy.target_epsilon, cap_run) * 1.001:
            return Refusal("budget", f"Site {name}: {what} would bring this run to ε={eps_run:.2f} > {min(self.exp.privacy.target_epsilon, cap_run):g} (per-run cap) at δ={self.delta:g}; refused.")
        if eps_total > cap_total * 1.001:
            return Refusal("budget", f"Site {name}: {what} would bring this dataset to ε={eps_total:.2f} over all runs, above the all-time cap {cap_total:g} at δ={self.delta:g}; refused.")
        return None

    def data_refusal(self) -> Refusal | None:
        """The ``no-data`` refusal every training round gets when this site has fewer than k
        training patients (``fedrelapse plan`` shows it too; the pre-flight does not ask it)."""
        if self.train_set.n_patients >= self.k:
            return None
        log.info("site=%s refuses to train: %d training patients, fewer than k=%d", self.cfg.name, self.train_set.n_patients, self.k)
        return Refusal("no-data", f"Site {self.cfg.name} has fewer than k={self.k} training patients (the count stays at the site: its log has it).")

    def _weight_refusal(self) -> Refusal | None:
        """A refusal when this site's update weight (its training patients) exceeds the plan's
        ``federation.secure_aggregation.max_weight``: the coordinator rejects such an update in
        plain rounds and SecAgg+ cannot sum it, so the round would be charged for nothing.
        The reason names the cap, not the count."""
        cap = self.exp.federation.secure_aggregation.max_weight
        if self.train_set.n_patients <= cap:
            return None
        log.info("site=%s has %d training patients, above max_weight %g", self.cfg.name, self.train_set.n_patients, cap)
        return Refusal(
            "max-weight", f"Site {self.cfg.name} has more training patients than the plan's `federation.secure_aggregation.max_weight` ({cap:g}), "
            "the largest update weight the coordinator accepts; ask the researcher to raise it. Nothing was trained or charged.",
        )

    def _public_key(self) -> Ed25519PublicKey | None:
        return ledger_public_key(self.cfg.state_dir)

    def train(self, arrays: dict[str, np.ndarray], *, run_id: str, server_round: int, total_rounds: int) -> TrainResult | Refusal:
        """One round of local training; with DP on, the round is charged before training starts.

        Once the round passes its checks (not a replay, within the caps, σ at least the site's
        minimum), its signed ledger entry is written and fsync'd before any patient's data is
        touched, so whatever training then does (diverges, raises, is killed) the round stays
        charged and a retry of the same (run, round) is a ``replay``. A diverged round is
        refused with the figures it was charged, as a replay is. Charging a round whose update
        never leaves over-counts ε, which is safe; charging only rounds that end well would make
        "diverged or not" a free, repeatable answer about the training data.
        """
        from client.dp_train import make_optimizer, train_dp, train_plain  # Opacus: only a training process imports it

        exp, t = self.exp, self.exp.training
        too_few = self.data_refusal()
        if too_few:
            return too_few
        too_many = self._weight_refusal()
        if too_many:  # before anything is charged: the coordinator (and SecAgg+) would reject the update
            return too_many
        model = build_model(exp).to(self.device)
        set_arrays(model, arrays)
        gen = torch.Generator().manual_seed(_round_seed(_site_secret(self.cfg.state_dir), run_id, server_round))
        opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
        q = self.sample_rate
        if not exp.privacy.enabled:
            if not self.cfg.policy.allow_non_private:
                return Refusal("no-dp", f"Site {self.cfg.name} trains only with DP (its policy has allow_non_private: false); the plan has privacy.enabled = false.")
            stats = train_plain(model, self.train_set, steps=t.local_steps, sample_rate=q, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=self.device, prox_mu=t.prox_mu)
            metrics = {M.NUM_PATIENTS: float(self.train_set.n_patients), **self._train_loss(stats), M.EPSILON_RUN: float("inf"), M.EPSILON_TOTAL: float("inf"), M.DELTA: 0.0, M.NOISE_MULTIPLIER: 0.0}
            return TrainResult(get_arrays(model), metrics)
        p = exp.privacy
        key = self.signing_key()
        with ledger.locked(self.ledger_path):
            entries = ledger.read_entries(self.ledger_path, key.public_key())
            done = next((e for e in entries if e.kind == "round" and e.run_id == run_id and e.round == server_round), None)  # before the costly σ search
            if done is not None:  # the figures it was charged go back, so a resumed run's summary shows what the ledger holds
                return Refusal(
                    "replay", f"Site {self.cfg.name} already accounted round {server_round} of run {run_id}; it is not trained or charged twice.",
                    metrics=_charged(done),
                    ledger_head=ledger.head_hash(entries),
                )
            cap_total, cap_run = ledger.current_caps(entries, cap_total=self.cfg.policy.epsilon_cap_total, cap_run=self.cfg.policy.epsilon_cap_run)
            sigma = self.noise_multiplier(total_rounds, cap_run)
            event = SubsampledGaussian(sigma, q, t.local_steps)
            paid = [e for e in entries if e.charged]
            eps_run = epsilon([*(e.mechanism for e in paid if e.run_id == run_id), event], delta=self.delta, accountant=p.accountant)
            eps_total = epsilon([*(e.mechanism for e in paid), event], delta=self.delta, accountant=p.accountant)
            refusal = self._check(sigma=sigma, eps_run=eps_run, eps_total=eps_total, cap_total=cap_total, cap_run=cap_run, what=f"round {server_round}")
            if refusal:
                return refusal
            entry = ledger.LedgerEntry(
                site=self.cfg.name, dataset=self.data.fingerprint, run_id=run_id, round=server_round,
                plan_hash=plan_hash(exp), accountant=p.accountant, delta=self.delta, noise_multiplier=sigma, sample_rate=q,
                steps=t.local_steps, max_grad_norm=p.max_grad_norm, epsilon_run=eps_run, epsilon_total=eps_total,
                time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), wall_time_s=0.0,  # written before training: its duration is not known yet
                key_id=signing.fingerprint(key.public_key()), prev_hash=ledger.head_hash(entries),
            )
            ledger.append(self.ledger_path, entry, key)  # charged, durably, before training touches any patient's data
        # Training runs outside the lock. The lock makes "not yet in the ledger, within the caps,
        # append" one atomic step, and that is all it must cover now that the entry is written
        # first: a second process of this site sent the same (run, round) waits for the append,
        # then finds the entry and refuses a replay, so the entry is appended once and the round
        # trained once. Another run's round, a pre-flight query or `site budget` does not wait for
        # this training; it accounts after this entry, as it would after a finished round.
        charged = _charged(entry)
        stats = train_dp(  # an exception here leaves the round charged: over-counting is safe, under-counting is not
            model, self.train_set, steps=t.local_steps, sample_rate=q, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
            max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=self.device, secure_mode=p.secure_mode, prox_mu=t.prox_mu,
            grads=t.per_patient_grads,
        )
        update = get_arrays(model)
        if not all(np.isfinite(v).all() for v in update.values()):  # checked before anything leaves
            log.info("site=%s run=%s round=%d diverged (charged): sigma=%.3f q=%.3f eps_run=%.3f", self.cfg.name, run_id, server_round, sigma, q, eps_run)
            return Refusal(
                "diverged", f"Site {self.cfg.name}: local training in round {server_round} produced NaN/Inf parameters; no update is sent (lower the learning rate). "
                "The round is charged (its ledger entry was written before training) and is not trained again.",
                metrics=charged, ledger_head=entry.hash,
            )
        log.info("site=%s run=%s round=%d trained: sigma=%.3f q=%.3f eps_run=%.3f", self.cfg.name, run_id, server_round, sigma, q, eps_run)
        metrics = {M.NUM_PATIENTS: float(self.train_set.n_patients), **self._train_loss(stats), **charged}
        return TrainResult(update, metrics, entry.hash)

    def _train_loss(self, stats: StepStats) -> dict[str, float]:
        """The round's train loss as a metric, only when it covers at least k distinct patients,
        the site's policy releases metrics (``policy.release_metrics``) and the metrics are exact
        (neither the plan nor the policy asks for noised metrics).

        It is the mean of the sampled patients' losses, not DP-protected; with few patients
        sampled in the round (a plan with a small batch and few local steps) it would be one or
        two patients' own loss on the global model, so below k it stays at the site. It leaves
        at most once per (run, round): only with a charged round's update.
        """
        if not self.cfg.policy.release_metrics or self.exp.privacy.noised_metrics or self.cfg.policy.require_noised_metrics:
            return {}  # with noised metrics only the charged evaluation leaves; an exact loss would bypass its noise
        if stats.patients < self.k:
            log.info("site=%s train loss over %d patients (< k=%d) not sent", self.cfg.name, stats.patients, self.k)
            return {}
        if not math.isfinite(stats.mean_loss):  # the coordinator would reject the whole reply; the update still goes
            log.warning("site=%s train loss is %s; not sent", self.cfg.name, stats.mean_loss)
            return {}
        return {M.TRAIN_LOSS: stats.mean_loss}

    def reserve_evaluation(self, arrays: dict[str, np.ndarray], *, run_id: str, model_round: int, total_rounds: int | None = None) -> Refusal | None:
        """Claim the release of ``arrays``' evaluation as run ``run_id``'s model after round
        ``model_round`` (:mod:`client.releases`), or the refusal that says why it may not leave.

        With DP on, an evaluation leaves only if the site's policy releases metrics, its ledger
        holds a charged round of this run, and no other model was evaluated under this run and
        round (the same model again, under the same plan and on the same data, is allowed: it gives
        the same answer), and ``model_round`` is a round of the run (0 to ``total_rounds``, the
        plan's rounds); the claim is fsync'd before the metrics are computed. With noised metrics (``privacy.metrics_noise_multiplier``)
        the release is also charged: a signed ``release`` entry, once per (run, round), within the
        plan's ε and the caps, written before the claim. A plan without DP (which the site's
        policy must allow: synthetic benchmark data only) is not limited.
        """
        name, p = self.cfg.name, self.exp.privacy
        if not self.cfg.policy.release_metrics:
            return Refusal("metrics-withheld", f"Site {name} sends no evaluation metrics (its policy has release_metrics: false); only its DP-trained update and its ε leave it.")
        if self.cfg.policy.require_noised_metrics and not p.noised_metrics:
            return Refusal(
                "metrics-withheld", f"Site {name} sends evaluations only noised and charged to its ledger (its policy has require_noised_metrics: true); "
                "the plan asks for exact metrics. Set `privacy.metrics_noise_multiplier` above 0 in the plan to get this site's evaluations.",
            )
        if not p.enabled:
            return None
        rounds = self.exp.federation.rounds if total_rounds is None else total_rounds
        first = 1 if p.noised_metrics else 0  # noised: the releases σ was calibrated for are the trained models' (a run never asks for model 0)
        if not first <= model_round <= rounds:
            return Refusal("evaluation-limit", f"Site {name} evaluates the models of rounds {first} to {rounds} of a run; round {model_round} is not one of them.")
        digest, plan, data = model_digest(arrays), plan_hash(self.exp), self.data.fingerprint
        with ledger.locked(self.ledger_path):
            entries = ledger.read_entries(self.ledger_path, self._public_key())
            if not any(e.kind == "round" and e.run_id == run_id for e in entries):
                return Refusal(
                    "evaluation-limit",
                    f"Site {name} evaluates models only in a run it has trained in (its ledger holds no round of run {run_id}); "
                    "an evaluation is an answer about its held-out patients, so each costs a charged round.",
                )
            path = releases.releases_path(self.ledger_path)
            before = releases.claims(path).get((run_id, model_round))
            if before is not None and before["model"] != digest:
                return Refusal(
                    "evaluation-limit",
                    f"Site {name} already sent its evaluation of another model as round {model_round}'s model of run {run_id}; "
                    "it evaluates one model per run and round.",
                )
            if before is not None:
                if (before["plan"], before["dataset"]) == (plan, data):
                    return None  # the same model, plan and data again: the same answer (noised: the same noise), nothing new leaves
                if not before["plan"]:
                    return Refusal(
                        "evaluation-limit",
                        f"Site {name} answered round {model_round}'s model of run {run_id} before it kept the plan and data of each answer, "
                        "so it cannot tell whether this ask is the same question; it is not answered again.",
                    )
                changed = "plan" if before["plan"] != plan else "data"
                return Refusal(
                    "evaluation-limit",
                    f"Site {name} already sent its evaluation of this model as round {model_round}'s model of run {run_id} under another {changed}; "
                    f"answered again {'under this plan' if changed == 'plan' else 'on its data as it is now'}, the difference of the two answers would be "
                    "a new question about its patients, so it is not answered.",
                )
            if p.noised_metrics:
                refusal = self._charge_release(entries, run_id=run_id, model_round=model_round, model=digest)
                if refusal is not None:
                    return refusal
            releases.record(path, run_id=run_id, model=digest, model_round=model_round, plan=plan, dataset=data)
        return None

    def _charge_release(self, entries: list[ledger.LedgerEntry], *, run_id: str, model_round: int, model: str) -> Refusal | None:
        """Append the signed ``release`` entry of run ``run_id``'s model after ``model_round`` (its
        digest ``model`` in the entry's note; call under the ledger's lock), or the ``budget``
        refusal when it would take the run past the plan's ε or a cap. A release already in the
        ledger (its record was not written: a crash between the two) is not charged twice, and
        is reused only for the same model, plan, data and noise."""
        p = self.exp.privacy
        event = NM.release_mechanism(p.metrics_noise_multiplier)
        done = next((e for e in entries if e.kind == "release" and e.run_id == run_id and e.round == model_round), None)
        if done is not None:  # charged, but its claim was never written (a crash between the two)
            if (done.noise_multiplier, done.plan_hash, done.dataset, done.note) == (event.noise_multiplier, plan_hash(self.exp), self.data.fingerprint, _release_note(model)):
                return None
            return Refusal(
                "evaluation-limit",
                f"Site {self.cfg.name} already charged a noised evaluation of round {model_round}'s model of run {run_id} under another plan or other data "
                f"(noise multiplier {done.noise_multiplier:g}) or of another model; it is not released again under this one.",
            )
        paid = [e for e in entries if e.charged]
        eps_run = epsilon([*(e.mechanism for e in paid if e.run_id == run_id), event], delta=self.delta, accountant=p.accountant)
        eps_total = epsilon([*(e.mechanism for e in paid), event], delta=self.delta, accountant=p.accountant)
        cap_total, cap_run = ledger.current_caps(entries, cap_total=self.cfg.policy.epsilon_cap_total, cap_run=self.cfg.policy.epsilon_cap_run)
        refusal = self._budget_refusal(eps_run=eps_run, eps_total=eps_total, cap_total=cap_total, cap_run=cap_run, what=f"the noised evaluation of round {model_round}'s model")
        if refusal is not None:
            return refusal
        key = self.signing_key()
        entry = ledger.LedgerEntry(
            kind="release", site=self.cfg.name, dataset=self.data.fingerprint, run_id=run_id, round=model_round, plan_hash=plan_hash(self.exp),
            accountant=p.accountant, delta=self.delta, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps,
            epsilon_run=eps_run, epsilon_total=eps_total, time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), note=_release_note(model),
            key_id=signing.fingerprint(key.public_key()), prev_hash=ledger.head_hash(entries),
        )
        ledger.append(self.ledger_path, entry, key)
        log.info("site=%s run=%s noised evaluation of round %d's model charged: z=%.3f eps_run=%.3f", self.cfg.name, run_id, model_round, event.noise_multiplier, eps_run)
        return None

    def _release_entry(self, run_id: str, model_round: int) -> ledger.LedgerEntry | None:
        """The ledger's ``release`` entry of run ``run_id``'s model after ``model_round``, if charged."""
        with ledger.locked(self.ledger_path):
            entries = ledger.read_entries(self.ledger_path, self._public_key())
        return next((e for e in entries if e.kind == "release" and e.run_id == run_id and e.round == model_round), None)

    def newest_head(self) -> str:
        """The hash of the ledger's newest entry (sent as the reply's ledger head after a noised
        release, so the coordinator records a head that covers it)."""
        with ledger.locked(self.ledger_path):
            return ledger.head_hash(ledger.read_entries(self.ledger_path, self._public_key()))

    def evaluate(self, arrays: dict[str, np.ndarray], *, run_id: str = "", model_round: int = 0) -> dict[str, float]:
        """Aggregate metrics on held-out patients; suppressed below k patients, or when either class (sessions with and without
        relapse) comes from fewer than k patients (a one-patient class makes AUROC a statement about that patient's scores).

        With noised metrics (``privacy.metrics_noise_multiplier`` > 0, DP on) the answer is the
        held-out patients' statistics with Gaussian noise instead (:mod:`shared.privacy.noised_metrics`),
        never suppressed (the noise covers every patient, and a count-dependent suppression would
        itself say something about the count), its noise drawn from the site's secret, ``run_id``,
        ``model_round`` and the model (a ChaCha20 keystream with ``privacy.secure_mode``), so the
        same model asked again gets the same answer; with
        the run's ε as the release entry recorded it (``epsilon-run``, ``epsilon-total``).
        Call :meth:`reserve_evaluation` first: it charges the release.

        With DP on and a ``run_id``, the answer is recorded beside the claim
        (:func:`client.releases.record_answer`), and a repeat gets the recorded answer verbatim.
        """
        if self.exp.privacy.enabled and run_id:
            path, digest = releases.releases_path(self.ledger_path), model_digest(arrays)
            with ledger.locked(self.ledger_path):
                sent = releases.answers(path).get((run_id, model_round, digest))
            if sent is not None:
                return sent
            answer = self._evaluate(arrays, run_id=run_id, model_round=model_round)
            with ledger.locked(self.ledger_path):
                sent = releases.answers(path).get((run_id, model_round, digest))  # another process answered meanwhile: its answer stands
                if sent is not None:
                    return sent
                releases.record_answer(path, run_id=run_id, model_round=model_round, model=digest, answer=answer)
            return answer
        return self._evaluate(arrays, run_id=run_id, model_round=model_round)

    def _evaluate(self, arrays: dict[str, np.ndarray], *, run_id: str, model_round: int) -> dict[str, float]:
        """:meth:`evaluate`'s computation, without the record of answers."""
        model = build_model(self.exp).to(self.device)
        set_arrays(model, arrays)
        labels, mask = self.eval_set.labels.cpu(), self.eval_set.mask  # (P, K)
        if self.exp.privacy.noised_metrics:
            probs = predict(model, self.eval_set, self.device) if self.eval_set.n_patients else torch.zeros_like(labels)  # (P, K)
            stats = NM.patient_statistics(labels.numpy(), probs.numpy(), mask.numpy())
            context = f"|metrics|{run_id}|{model_round}|{model_digest(arrays)}|{plan_hash(self.exp)}|{self.data.fingerprint}"
            seed = hashlib.sha256(_site_secret(self.cfg.state_dir) + context.encode()).digest()
            z = self.exp.privacy.metrics_noise_multiplier
            noisy = (NM.noised(stats, noise_multiplier=z, secure_key=seed) if self.exp.privacy.secure_mode  # a ChaCha20 keystream, as secure as DP-SGD's
                     else NM.noised(stats, noise_multiplier=z, generator=np.random.default_rng(int.from_bytes(seed, "little"))))
            charged = self._release_entry(run_id, model_round)
            spent = {M.EPSILON_RUN: charged.epsilon_run, M.EPSILON_TOTAL: charged.epsilon_total} if charged is not None else {}  # ε as the release left it
            return {M.SUPPRESSED: 0.0, **NM.to_metrics(noisy), **spent}
        per_class = (int(((labels > 0.5) & mask).any(1).sum()), int(((labels <= 0.5) & mask).any(1).sum()))  # patients with a session of each class
        if self.eval_set.n_patients < self.k or min(per_class) < self.k:
            log.info("site=%s evaluation suppressed: %d held-out patients, %d/%d with relapse/other sessions (k=%d)", self.cfg.name, self.eval_set.n_patients, *per_class, self.k)
            return {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}
        probs = predict(model, self.eval_set, self.device)  # (P, K)
        y, s = self.eval_set.labels[mask].numpy(), probs[mask].numpy()
        loss = float(torch.nn.functional.binary_cross_entropy(probs[mask].clamp(1e-6, 1 - 1e-6), self.eval_set.labels[mask]))
        auc = M.auroc(y, s)
        if not np.isfinite(auc):  # one class only: AUROC undefined, say so rather than invent one
            return {M.SUPPRESSED: 1.0, M.NUM_PATIENTS: 0.0}
        return {M.SUPPRESSED: 0.0, M.NUM_PATIENTS: float(self.eval_set.n_patients), M.EVAL_LOSS: loss, M.AUROC: auc, M.AUPRC: M.average_precision(y, s)}


def ledger_path(state_dir: Path) -> Path:
    return state_dir / "ledger" / ledger.LEDGER_FILE


def site_key_paths(state_dir: Path) -> tuple[Path, Path]:
    """(private, public) PEM paths of the site's ledger signing key."""
    return state_dir / "keys" / "ledger-ed25519.pem", state_dir / "keys" / "ledger-ed25519.pub.pem"


def ledger_public_key(state_dir: Path) -> Ed25519PublicKey | None:
    """The key that the site's ledger signatures are checked with: the public key file, else the private key's public half.

    None only while the site has neither key and no ledger entry (nothing signed yet). Entries
    with both keys gone cannot be checked, so that raises :class:`PolicyError`: a missing key file
    must never switch the signature check off.
    """
    priv, pub = site_key_paths(state_dir)
    if pub.exists():
        return signing.load_public(pub)
    if priv.exists():
        return signing.load_private(priv).public_key()
    path = ledger_path(state_dir)
    if path.exists() and path.stat().st_size:
        raise PolicyError(
            f"The ledger {path} holds signed entries but the site's signing key is missing ({priv} and {pub} do not exist), so its signatures cannot be "
            "checked; restore the key from the site's backup. The site refuses to train until a DPO has checked the ledger (`fedrelapse audit verify`)."
        )
    return None


def new_ledger_key(state_dir: Path) -> Ed25519PrivateKey:
    """Create the site's ledger key pair, the only way fedrelapse does (`site init`, a first round,
    a first cap change). Refused with :class:`PolicyError` when the ledger already holds entries:
    they were signed by the lost key, and under a new one every one of them fails its signature check."""
    priv, pub = site_key_paths(state_dir)
    path = ledger_path(state_dir)
    if path.is_file() and path.stat().st_size:
        raise PolicyError(
            f"The site's ledger signing key {priv} is missing but the ledger {path} already holds entries it signed; a new key would make "
            f"every one of them fail its signature check, so none was created. Restore {priv.name} (mode 0600) and {pub.name} from the "
            "site's backup into that folder; without a backup, call your DPO before anything else (docs/runbook-dpo.md, \"The site's signing key\")."
        )
    return signing.generate(priv, pub)


NOISE_SEED_FILE = "noise-seed.key"  # the site secret, in its state folder


def _release_note(model: str) -> str:
    """A ``release`` ledger entry's note: the digest of the model whose evaluation it charged."""
    return f"model {model}"


def _charged(entry: ledger.LedgerEntry) -> dict[str, float]:
    """The privacy figures a round was charged, as its ledger entry holds them (sent with its
    update, and with a ``replay`` or ``diverged`` refusal)."""
    return {M.EPSILON_RUN: entry.epsilon_run, M.EPSILON_TOTAL: entry.epsilon_total, M.DELTA: entry.delta, M.NOISE_MULTIPLIER: entry.noise_multiplier}


def _split_salt(state_dir: Path, *, create: bool) -> bytes:
    """The held-out split's salt: the site's noise secret (created if ``create``), else, for a
    site that has none yet and must not be written to, a random salt of this process's own."""
    if create or (state_dir / NOISE_SEED_FILE).exists():
        return _site_secret(state_dir)
    return secrets.token_bytes(32)


def _site_secret(state_dir: Path) -> bytes:
    """32 random bytes kept at the site (0600), created on first use.

    Sampling and noise are seeded from this secret, never from public values: a coordinator
    that could reproduce the noise could subtract it and undo DP. It also salts the held-out
    split (:func:`client.dataset.split_patients`), so a Site creates it when it loads.
    """
    path = state_dir / NOISE_SEED_FILE
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
