"""Empirical privacy audit: a loss-threshold membership-inference attack on one site.

DP-SGD's ε is an *upper* bound proved from the mechanism. An attack gives a *lower* bound
measured on the trained model: if an adversary tells training patients ("members") from
held-out patients ("non-members") with false-positive rate FPR and false-negative rate FNR,
then any (ε, δ)-DP training must satisfy FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ
(Kairouz et al. 2015), so

    ε ≥ max(ln((1 − δ − FPR) / FNR), ln((1 − δ − FNR) / FPR)).

With finitely many patients FPR and FNR are estimates; we use their one-sided upper
Clopper-Pearson bounds, as in Jagielski et al. 2020 ("Auditing differentially private
machine learning: how private is private SGD?") and Nasr et al. 2021 ("Adversary
instantiation: lower bounds for differentially private machine learning").

The audit never charges the site's privacy ledger: it trains fresh models from scratch on a
*simulated* site (synthetic data, or a copy a DPO is allowed to attack) and reports
aggregate attack metrics only. Its outputs are not themselves DP-protected.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from client.dataset import PatientTensors
from client.dp_train import make_optimizer, predict, train_dp, train_plain
from client.site import Site
from shared import metrics as M  # noqa: N812
from shared.errors import ConfigError, DataError
from shared.models import build_model
from shared.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon

FPR_TARGET = 0.1  # report TPR at FPR <= this
CONFIDENCE = 0.95  # one-sided confidence of each Clopper-Pearson bound


def membership_audit(site: Site, *, epsilons: tuple[float, ...], steps: int, seed: int) -> dict[str, Any]:
    """Train non-private and DP models on the site's training patients and attack each one.

    Members are the site's training patients, non-members its held-out patients (the split
    is by patient, so no patient is on both sides). For each setting a fresh model is built
    (initialised from ``seed``) and trained on the members only for ``steps`` steps:

    * ``non-private``: :func:`train_plain` with sampling rate 1.0 (full batch), i.e. the most
      a model of this size and this many steps can memorise; it is the reference for leakage.
    * ``dp-eps<ε>``: :func:`train_dp` at the site's sampling rate q, with σ calibrated by
      :func:`calibrate_noise` so that ``steps`` steps spend ε at the site's δ.

    Each patient with labelled sessions is then scored by the mean BCE of the model over all
    their labelled sessions; lower loss means "member". Reported per setting: the accounted ε
    (RDP/PRV, the site's accountant), attack AUC, TPR at FPR ≤ 0.1 and the empirical ε lower
    bound ε_lb = max over thresholds t of
    max(ln((1 − δ − FPR_ub(t)) / FNR_ub(t)), ln((1 − δ − FNR_ub(t)) / FPR_ub(t))), clipped at 0,
    with FPR_ub and FNR_ub one-sided 95% Clopper-Pearson upper bounds.

    Reading the lower bound: it is only as strong as the patient counts allow. With n
    non-members and no false positive at all, FPR_ub is still 1 − 0.05^(1/n) (≈ 0.26 for 10
    patients, ≈ 0.14 for 20), so even a perfect attack proves at most ε_lb ≈ 1.05 with 10
    members and 10 non-members, ≈ 1.8 with 20 + 20, ≈ 0.06 with 7 + 3, whatever the model
    does. So on a site with tens of patients a small ε_lb does **not** show that the model is
    private; it shows only that this attack, at this sample size, could not prove leakage.
    A ε_lb above the accounted ε would show a bug in the DP implementation or the accounting
    (up to the confidence level). Two further caveats: the threshold is chosen on the same
    patients the bound is computed on (the max over t is optimistic for the attacker; with
    so few patients a held-out threshold split would leave nothing), and the attack is a
    weak, black-box one, so the gap to the accounted ε is expected to be large.

    Deterministic for a fixed ``seed`` (and device): initialisation, Poisson sampling,
    session bounding and DP noise all come from seeded generators. Nothing is written to the
    site's state (no ledger entry, no noise secret, no key: ``audit attack`` loads the Site
    read-only).
    """
    exp, t, p = site.exp, site.exp.training, site.exp.privacy
    if steps < 1:
        raise ConfigError(f"The audit needs at least 1 training step; got --steps {steps}.")
    if any(not (e > 0) for e in epsilons):
        raise ConfigError(f"Every target ε must be > 0; got {', '.join(f'{e:g}' for e in epsilons)}.")
    members, non_members = _scorable(site.train_set), _scorable(site.eval_set)
    delta, q = site.delta, site.sample_rate
    if members.n_patients == 0 or non_members.n_patients == 0:
        raise DataError(
            f"Site {site.cfg.name}: the audit needs labelled sessions from both training and held-out patients; "
            f"it has {members.n_patients} and {non_members.n_patients}. Label more sessions or change `training.eval_fraction`."
        )
    out: dict[str, Any] = {
        "site": site.cfg.name, "seed": seed, "steps": steps, "delta": delta, "accountant": p.accountant,
        "members": members.n_patients, "non_members": non_members.n_patients, "confidence": CONFIDENCE, "fpr_target": FPR_TARGET,
        # what a perfect attack (no errors at all) could prove with these patient counts
        "epsilon_lower_bound_max": epsilon_lower_bound(fp=0, n_neg=non_members.n_patients, fn=0, n_pos=members.n_patients, delta=delta),
        "settings": [],
    }
    plan: list[tuple[str, float | None]] = [("non-private", None), *((f"dp-eps{e:g}", float(e)) for e in epsilons)]
    for i, (name, target) in enumerate(plan):
        torch_seed = (seed * 1_000_003 + i) & 0x7FFF_FFFF_FFFF_FFFF
        model = build_model(replace(exp, seed=torch_seed)).to(site.device)
        opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
        gen = torch.Generator().manual_seed(torch_seed)
        if target is None:
            rate, sigma, eps_acc = 1.0, 0.0, None
            stats = train_plain(model, members, steps=steps, sample_rate=rate, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=site.device)
        else:
            rate = q
            sigma = _calibrate(target, delta, rate, steps, p.accountant)
            eps_acc = epsilon([SubsampledGaussian(sigma, rate, steps)], delta=delta, accountant=p.accountant)
            stats = train_dp(model, members, steps=steps, sample_rate=rate, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                             max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=site.device, secure_mode=False,
                             grads=t.per_patient_grads)
        loss_in, loss_out = patient_losses(model, members, site.device), patient_losses(model, non_members, site.device)
        out["settings"].append({
            "setting": name, "target_epsilon": target, "noise_multiplier": sigma, "sample_rate": rate,
            "epsilon_accounted": eps_acc, "train_loss": stats.mean_loss,
            "member_loss": float(loss_in.mean()), "non_member_loss": float(loss_out.mean()),
            **attack_metrics(loss_in, loss_out, delta=delta),
        })
    return out


@functools.lru_cache(maxsize=64)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ for the setting (pure and a few seconds each with RDP, so repeated audits reuse it)."""
    return calibrate_noise(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)


def _scorable(data: PatientTensors) -> PatientTensors:
    """Only patients with at least one labelled session can be scored by their loss."""
    return data.subset(torch.nonzero(data.mask.any(dim=1)).flatten())


def patient_losses(model: torch.nn.Module, data: PatientTensors, device: torch.device) -> np.ndarray:
    """Each patient's mean BCE over their labelled sessions, shape (P,)."""
    probs = predict(model, data, device).double().clamp(1e-7, 1 - 1e-7)
    y, m = data.labels.double(), data.mask.double()
    bce = -(y * probs.log() + (1 - y) * (1 - probs).log())
    return ((bce * m).sum(1) / m.sum(1).clamp(min=1.0)).numpy()


def attack_metrics(loss_members: np.ndarray, loss_non_members: np.ndarray, *, delta: float, confidence: float = CONFIDENCE) -> dict[str, float]:
    """AUC, TPR at FPR ≤ 0.1 and the empirical ε lower bound of "loss ≤ t ⇒ member"."""
    loss_members, loss_non_members = np.asarray(loss_members, float), np.asarray(loss_non_members, float)
    n_in, n_out = len(loss_members), len(loss_non_members)
    y = np.r_[np.ones(n_in), np.zeros(n_out)]
    auc = M.auroc(y, -np.r_[loss_members, loss_non_members])  # lower loss = more likely a member
    tpr_at, eps_lb = 0.0, 0.0
    for thr in np.r_[-np.inf, np.unique(np.r_[loss_members, loss_non_members])]:
        tp = int((loss_members <= thr).sum())
        fp = int((loss_non_members <= thr).sum())
        if fp / n_out <= FPR_TARGET:
            tpr_at = max(tpr_at, tp / n_in)
        eps_lb = max(eps_lb, epsilon_lower_bound(fp=fp, n_neg=n_out, fn=n_in - tp, n_pos=n_in, delta=delta, confidence=confidence))
    # aggregate numbers only: no patient's loss (nor a threshold equal to one) is reported
    return {"attack_auc": auc, "tpr_at_fpr": tpr_at, "epsilon_lower_bound": eps_lb}


def clopper_pearson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper Clopper-Pearson bound on a binomial rate from k successes in n trials."""
    from scipy.stats import beta

    if n <= 0 or k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def epsilon_lower_bound(*, fp: int, n_neg: int, fn: int, n_pos: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """ε implied by one threshold's error counts (0 when the counts prove nothing)."""
    fpr, fnr = clopper_pearson_upper(fp, n_neg, confidence), clopper_pearson_upper(fn, n_pos, confidence)
    cands = [0.0]
    for num, den in ((1 - delta - fpr, fnr), (1 - delta - fnr, fpr)):
        if num > 0 and den > 0:
            cands.append(math.log(num / den))
    return max(cands)
