"""The evaluation protocol (``fedrelapse evaluate``): every training mode on the same
patient splits, at several privacy levels, with ablations, judged as a clinical study would.

Modes: local-only (each site alone), federated (FedAvg, FedProx, FedAdam) and centralised
(the sites' training patients pooled: possible only on synthetic data, which is the point).
Each runs at every ε in the grid (∞ = non-private). Training calls the same ``Site.train``
the ClientApp runs, round by round in one process, so results match a Flower run with the
same seeds while a whole grid fits in minutes.

Measures, on held-out patients: pooled and per-site AUROC and AUPRC with 95% patient-
bootstrap intervals; balanced accuracy and macro-F1 at a threshold chosen on training
patients (and whether the model collapsed to one class); calibration (ECE, Brier); and
early warning (CUSUM threshold chosen on training patients' timelines, then lead time
before relapse onset and false alarms per patient-month on held-out patients).

This harness sees per-patient predictions of every site; it is a benchmark on synthetic
cohorts. In a real consortium each site computes its own measures and only aggregates over
at least k patients leave it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dp_train import make_optimizer, predict, train_dp, train_plain
from client.early_warning import Timeline, choose_threshold, summarise
from client.site import Refusal, Site
from client.timeline import site_timelines
from server.aggregation import make_server_optimizer, server_step, weighted_average
from server.baselines import concat
from server.simulate import discover_sites
from shared import metrics as M  # noqa: N812
from shared.atomic import AS_OPEN, write_atomically
from shared.config import ExperimentConfig, load_site
from shared.models import build_model
from shared.params import get_arrays, set_arrays
from shared.privacy.accounting import calibrate_noise

MODES = ("local", "fedavg", "fedprox", "fedadam", "centralised")
INF = math.inf


@dataclass(frozen=True)
class Setting:
    mode: str
    epsilon: float  # inf: non-private
    branches: str = "fused"
    personal_baseline: bool = True

    @property
    def name(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        extra = "" if (self.branches, self.personal_baseline) == ("fused", True) else f"/{self.branches}{'' if self.personal_baseline else '-nobaseline'}"
        return f"{self.mode}/eps={eps}{extra}"


def grid(*, quick: bool) -> list[Setting]:
    """The comparison grid, most informative settings first (a long run that is stopped
    early has already answered the main questions: FL+DP vs centralised, vs local, and the
    ablations); quick: the smallest grid that still answers them."""
    eps = (8.0, INF) if quick else (8.0, INF, 3.0, 1.0)
    modes = ("fedavg", "centralised", "local") if quick else ("fedavg", "centralised", "local", "fedprox", "fedadam")
    first = [Setting("fedavg", 8.0), Setting("centralised", INF), Setting("local", 8.0), Setting("local", INF), Setting("fedavg", INF)]
    ablations = [Setting("fedavg", e, b, pb) for e in ((8.0,) if quick else (8.0, INF)) for b, pb in (("acoustic", True), ("language", True), ("fused", False))]
    out = first + ablations[:3]
    out += [Setting(m, e) for e in eps for m in modes if Setting(m, e) not in out]
    return out + [a for a in ablations if a not in out]


def variant(exp: ExperimentConfig, s: Setting, *, prox_mu: float) -> ExperimentConfig:
    """The experiment as this setting trains it."""
    exp = exp.with_privacy(enabled=not math.isinf(s.epsilon), target_epsilon=s.epsilon if not math.isinf(s.epsilon) else exp.privacy.target_epsilon)
    exp = replace(exp, model=replace(exp.model, branches=s.branches, personal_baseline=s.personal_baseline))
    exp = replace(exp, training=replace(exp.training, prox_mu=prox_mu if s.mode == "fedprox" else 0.0))
    return replace(exp, federation=replace(exp.federation, server_optimizer="adam" if s.mode == "fedadam" else "none"))


class Harness:
    """Sites loaded once (features and splits are shared by every setting)."""

    def __init__(self, exp: ExperimentConfig, data: Path, workdir: Path, *, prox_mu: float = 0.01, bootstrap: int = 1000) -> None:
        self.exp, self.workdir, self.prox_mu, self.bootstrap = exp, workdir, prox_mu, bootstrap
        self.sites: list[Site] = []
        for path in discover_sites(data):
            cfg = load_site(path)
            # The benchmark's own ledger and caps: it must not spend the cohort's real budget.
            policy = replace(cfg.policy, epsilon_cap_total=1e9, epsilon_cap_run=1e9, min_noise_multiplier=0.0, allow_non_private=True)
            self.sites.append(Site(replace(cfg, policy=policy, coordinator_public_key=None), exp))

    def _use(self, exp: ExperimentConfig, tag: str) -> None:
        for site in self.sites:
            site.exp = exp
            site.ledger_path = self.workdir / "ledgers" / tag / f"{site.cfg.name}.jsonl"

    def train(self, s: Setting) -> dict[str, torch.nn.Module]:
        """The model each site is evaluated with (the same global model for all but local)."""
        exp = variant(self.exp, s, prox_mu=self.prox_mu)
        tag = s.name.replace("/", "_").replace("=", "")
        self._use(exp, tag)
        rounds = exp.federation.rounds
        if s.mode == "centralised":
            model = self._centralised(exp)
            return {site.cfg.name: model for site in self.sites}
        if s.mode == "local":
            out = {}
            for site in self.sites:
                arrays: dict[str, np.ndarray] = get_arrays(build_model(exp))
                for r in range(1, rounds + 1):
                    arrays = _ok(site.train(arrays, run_id=f"eval-{tag}-{site.cfg.name}", server_round=r, total_rounds=rounds)).arrays
                out[site.cfg.name] = _model(exp, arrays)
            return out
        arrays = get_arrays(build_model(exp))
        opt = make_server_optimizer(exp.federation.server_optimizer, lr=exp.federation.server_learning_rate)
        for r in range(1, rounds + 1):
            results = [_ok(site.train(arrays, run_id=f"eval-{tag}", server_round=r, total_rounds=rounds)) for site in self.sites]
            avg = weighted_average([res.arrays for res in results], [res.metrics[M.NUM_PATIENTS] for res in results])
            arrays = server_step(opt, arrays, avg)
        model = _model(exp, arrays)
        return {site.cfg.name: model for site in self.sites}

    def _centralised(self, exp: ExperimentConfig) -> torch.nn.Module:
        """Pooled training patients, as many patient-steps as the federation takes."""
        pooled = concat([s.train_set for s in self.sites])
        model = build_model(exp)
        t, p = exp.training, exp.privacy
        steps = exp.federation.rounds * t.local_steps * len(self.sites)
        q = min(1.0, t.batch_patients / pooled.n_patients)
        gen = torch.Generator().manual_seed(exp.seed)
        opt = make_optimizer(model, name=t.optimizer, lr=t.learning_rate)
        cpu = torch.device("cpu")
        if p.enabled:
            sigma = calibrate_noise(target_epsilon=p.target_epsilon, target_delta=p.target_delta, sample_rate=q, steps=steps, accountant=p.accountant)
            train_dp(model, pooled, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                     steps=steps, sample_rate=q, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=cpu)
        else:
            train_plain(model, pooled, steps=steps, sample_rate=q, max_sessions=t.max_sessions_per_patient, optimizer=opt, generator=gen, device=cpu)
        return model

    def measure(self, models: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """Every measure of the protocol, on held-out patients."""
        cpu = torch.device("cpu")
        ys, ps, groups, train_y, train_p = [], [], [], [], []
        per_site: dict[str, float] = {}
        val_tl: list[Timeline] = []
        eval_tl: list[Timeline] = []
        offset = 0
        for site in self.sites:
            model = models[site.cfg.name]
            ev, tr = site.eval_set, site.train_set
            pe, pt = predict(model, ev, cpu), predict(model, tr, cpu)  # (P, K)
            y, p = ev.labels[ev.mask].numpy(), pe[ev.mask].numpy()
            ys.append(y)
            ps.append(p)
            groups.append((torch.arange(ev.n_patients).unsqueeze(1).expand_as(ev.mask)[ev.mask] + offset).numpy())
            offset += ev.n_patients
            train_y.append(tr.labels[tr.mask].numpy())
            train_p.append(pt[tr.mask].numpy())
            per_site[site.cfg.name] = round(M.auroc(y, p), 4)
            val_tl += site_timelines(site, model, which="train", probs=pt)
            eval_tl += site_timelines(site, model, which="eval", probs=pe)
        y, p, g = np.concatenate(ys), np.concatenate(ps), np.concatenate(groups)
        cut = youden_threshold(np.concatenate(train_y), np.concatenate(train_p))
        pred = p >= cut
        out: dict[str, Any] = {
            "auroc": round(M.auroc(y, p), 4),
            "auroc_ci": bootstrap_ci(M.auroc, y, p, g, reps=self.bootstrap),
            "auprc": round(M.average_precision(y, p), 4),
            "auprc_ci": bootstrap_ci(M.average_precision, y, p, g, reps=self.bootstrap),
            "prevalence": round(float(y.mean()), 4),
            "auroc_per_site": per_site,
            "decision_threshold": round(cut, 4),
            "balanced_accuracy": round(M.balanced_accuracy(y, pred), 4),
            "macro_f1": round(M.macro_f1(y, pred), 4),
            "collapsed": bool(pred.all() or not pred.any() or float(np.std(p)) < 1e-3),
            "ece": round(M.expected_calibration_error(y, p), 4),
            "brier": round(M.brier(y, p), 4),
        }
        a, n0 = self.exp.alerts, self.exp.features.baseline_sessions
        chosen = choose_threshold(val_tl, baseline_n=n0, slack=a.slack, lookback_days=a.lookback_days, grace_days=a.grace_days, max_false_alarms_per_month=a.max_false_alarms_per_month)
        out["early_warning_validation"] = chosen.as_dict()
        out["early_warning"] = summarise(eval_tl, threshold=chosen.threshold, baseline_n=n0, slack=a.slack, lookback_days=a.lookback_days, grace_days=a.grace_days).as_dict()
        return out


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut maximising sensitivity + specificity on (training) sessions."""
    if y.all() or not y.any():
        return 0.5
    cuts = np.unique(p)
    best, best_j = 0.5, -1.0
    for c in cuts[:: max(1, len(cuts) // 500)]:
        pred = p >= c
        j = (pred & (y == 1)).sum() / (y == 1).sum() + (~pred & (y == 0)).sum() / (y == 0).sum()
        if j > best_j:
            best, best_j = float(c), j
    return best


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, reps: int, seed: int = 0) -> list[float] | None:
    """95% percentile interval resampling patients (all of a patient's sessions together)."""
    if reps <= 0:
        return None
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == i) for i in ids]
    values = []
    for _ in range(reps):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        v = metric(y[pick], p[pick])
        if np.isfinite(v):
            values.append(v)
    if not values:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _ok(result: Any) -> Any:
    if isinstance(result, Refusal):
        raise RuntimeError(f"A site refused an evaluation round: {result.reason}")
    return result


def _model(exp: ExperimentConfig, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(exp)
    set_arrays(model, arrays)
    return model


def run_evaluation(exp: ExperimentConfig, data: Path, out: Path, *, quick: bool = False, settings: list[Setting] | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and measure every setting; write ``evaluation.json``, ``evaluation.md`` and a plot.
    ``out`` is created once the sites' data has loaded (a wrong --data leaves no empty folder)."""
    if quick:
        exp = replace(exp, federation=replace(exp.federation, rounds=min(exp.federation.rounds, 3)))
    with tempfile.TemporaryDirectory(prefix="fedrelapse-eval-") as tmp:
        harness = Harness(exp, data, Path(tmp), bootstrap=200 if quick else 1000)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for s in settings or grid(quick=quick):
            started = time.perf_counter()
            models = harness.train(s)
            measured = harness.measure(models)
            results.append({"setting": s.name, **asdict(s), "epsilon": "inf" if math.isinf(s.epsilon) else s.epsilon, **measured, "seconds": round(time.perf_counter() - started, 1)})
            write_report(out, exp, harness, results, quick=quick, final=False)
            if progress:
                progress(progress_line(s.name, measured))
        report = write_report(out, exp, harness, results, quick=quick, final=True)
    return report


def _ci(v: Any) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else "-"


def _lead(days: float | None) -> str:
    return "-" if days is None else f"{days:.1f} d"


def progress_line(name: str, measured: dict[str, Any]) -> str:
    """One setting's headline figures as `evaluate` prints them when it is measured (rounded as
    in evaluation.md: AUROC and its interval to 3 decimals, lead days to 1, false alarms to 2)."""
    ew = measured["early_warning"]
    return (
        f"{name}: AUROC {measured['auroc']:.3f} {_ci(measured['auroc_ci'])}, lead {_lead(ew['median_lead_days'])} "
        f"(median; {ew['warned']}/{ew['relapses']} relapses warned), false alarms {ew['false_alarms_per_patient_month']:.2f}/patient-month"
    )


def write_report(out: Path, exp: ExperimentConfig, harness: Harness, results: list[dict[str, Any]], *, quick: bool, final: bool) -> dict[str, Any]:
    """Write what is measured so far (after every setting: a stopped run keeps its results)."""
    sizes = {s.cfg.name: {"train_patients": s.train_set.n_patients, "eval_patients": s.eval_set.n_patients} for s in harness.sites}
    report = {"experiment": exp.name, "rounds": exp.federation.rounds, "sites": sizes, "quick": quick, "complete": final, "results": results}
    text = (json.dumps(report, indent=1) + "\n").encode("utf-8")
    write_atomically(out / "evaluation.json", lambda fh: fh.write(text), mode=AS_OPEN)
    (out / "evaluation.md").write_text(markdown_table(report), encoding="utf-8")
    if final:
        plot(report, out / "auroc_by_epsilon.png")
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| setting | AUROC [95% CI] | AUPRC [95% CI] | per-site AUROC | bal. acc | macro-F1 | ECE | lead (median d) | warned | false alarms / pt-month | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ew = r["early_warning"]
        sites = ", ".join(f"{k} {v:.3f}" for k, v in r["auroc_per_site"].items())
        lines.append(
            f"| {r['setting']} | {r['auroc']:.3f} {_ci(r['auroc_ci'])} | {r['auprc']:.3f} {_ci(r['auprc_ci'])} | {sites} | {r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} | {r['ece']:.3f} "
            f"| {format(ew['median_lead_days'], '.1f') if ew['median_lead_days'] is not None else '-'} | {ew['warned']}/{ew['relapses']} | {ew['false_alarms_per_patient_month']:.2f} | {'yes' if r['collapsed'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    main = [r for r in report["results"] if r["branches"] == "fused" and r["personal_baseline"]]
    order = sorted({r["epsilon"] for r in main}, key=lambda e: INF if e == "inf" else float(e))
    xs = {e: i for i, e in enumerate(order)}
    for mode in MODES:
        rows = sorted((r for r in main if r["mode"] == mode), key=lambda r: xs[r["epsilon"]])
        if rows:
            ax.errorbar([xs[r["epsilon"]] for r in rows], [r["auroc"] for r in rows],
                        yerr=[[r["auroc"] - (r["auroc_ci"] or [r["auroc"]] * 2)[0] for r in rows], [(r["auroc_ci"] or [r["auroc"]] * 2)[1] - r["auroc"] for r in rows]],
                        marker="o", capsize=3, label=mode)
    ax.set_xticks(range(len(order)), [f"ε={e}" if e != "inf" else "non-private" for e in order])
    ax.set_ylabel("held-out AUROC (pooled)")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Relapse detection by training mode and privacy level")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
