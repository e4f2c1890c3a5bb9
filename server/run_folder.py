"""A run folder: the config used, per-round metrics (JSON + plot), checkpoints, summary.

Layout::

    RUN/config.yaml            the experiment exactly as run
    RUN/run.json               run id and plan hash (what `fedrelapse run --resume` checks)
    RUN/metrics.json           one object per round (aggregate and per-site figures); with
                               ``federation.evaluation: with-next-round`` a round is written
                               when its training ends (``evaluation_pending``) and rewritten
                               with its evaluation when the next round's replies bring it
    RUN/metrics.png            loss, federated AUROC and per-site ε over rounds (not written
                               when no round completed: refused before start, or every round
                               refused or failed)
    RUN/checkpoints/round-NNN.safetensors   the global model after each round, with its
                               digest, the digest of metrics.json's rounds so far
                               (records_digest) and the coordinator's signature over both in
                               the file's metadata
    RUN/summary.json           final AUROC, rounds, per-site ε and δ, wall time
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.strategy import RoundLog
from shared import metrics as M  # noqa: N812
from shared.atomic import write_atomically
from shared.config import ExperimentConfig
from shared.model_signing import model_digest, sign_checkpoint
from shared.params import save_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RUN_INFO = "run.json"


@dataclass
class RoundRecord:
    round: int
    train_loss: float | None
    auroc: float | None
    auprc: float | None
    eval_loss: float | None
    patients_trained: float
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    updated: bool = True
    wall_s: float | None = None  # coordinator's wall time for the round: its message exchange(s), i.e. train + evaluate; with-next-round: train (with the evaluation of the previous round's model), and the last round also the final evaluation
    note: str = ""  # why the model was not updated (e.g. a halted secure-aggregation round)
    evaluation_pending: bool = False  # with-next-round: this round's model is evaluated in the next round's train replies, not yet arrived


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (UTF-8, mode 0600), atomically: a value that cannot be serialised
    (NaN, an unknown type) raises before anything is written, and any failure leaves the old
    file as it was and no temporary file."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=_nan_to_none) + "\n"
    write_atomically(path, lambda fh: fh.write(text.encode("utf-8")))


def _nan_to_none(obj: Any) -> Any:
    raise TypeError(f"Not JSON serialisable: {obj!r}")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


SUPPRESSED = "suppressed (fewer than k patients or one class)"  # a site's `eval` in metrics.json
NOISED = "noised (charged to the site's ledger)"  # ... when it sent a noised release; its eval_auroc is read from that


def why_no_auroc(sites: Mapping[str, Mapping[str, Any]]) -> str:
    """Why a round (its ``sites`` entries, as in metrics.json) has no federated AUROC."""
    evaluated = [e for e in sites.values() if {"eval", "eval_auroc", "eval_error"} & set(e)]
    if not evaluated:
        return "no site evaluated the model"
    if all(e.get("eval") == SUPPRESSED for e in evaluated):
        return "suppressed at every site (fewer than k evaluation patients, or only one class)"
    if any(e.get("eval") == NOISED for e in evaluated):
        return "the sites' noised statistics, summed, held no weight in one class (too few held-out patients for privacy.metrics_noise_multiplier)"
    return "no site sent a usable evaluation"


RECORDS_DIGEST = "records_digest"  # checkpoint metadata: records_digest() of metrics.json's rounds when the checkpoint was written (signed with it)
LAST_PENDING = "records_last_pending"  # ... and whether its own round's evaluation was still to come ("true"/"false")
EVALUATION_FIELDS = ("auroc", "auprc", "eval_loss", "evaluation_pending")  # what record_evaluation changes in a round record ...
EVALUATION_ENTRIES = ("eval", "eval_auroc", "eval_error", "eval_compute_s", "eval_epsilon-run", "eval_epsilon-total", "eval_ledger_head")  # ... and in its site entries (_add_evaluation)


def training_part(record: Mapping[str, Any]) -> dict[str, Any]:
    """A round record (as in metrics.json) without what its evaluation adds after its checkpoint
    is written (with-next-round): the evaluation fields, and the evaluation keys of each site
    entry (a site entry left empty is dropped)."""
    sites = {}
    for site, entry in record["sites"].items():
        kept = {k: v for k, v in entry.items() if k not in EVALUATION_ENTRIES}
        if kept:
            sites[site] = kept
    return {k: v for k, v in record.items() if k not in EVALUATION_FIELDS} | {"sites": sites}


def records_digest(rows: Sequence[Mapping[str, Any]], *, last_pending: bool) -> str:
    """SHA-256 of metrics.json's rounds (``rows``, as written) up to the round a checkpoint is
    written for, which the checkpoint carries and its signature covers: every earlier round
    whole (its evaluation has arrived by then) and its own round whole, or only its
    :func:`training_part` while its evaluation is still to come (``last_pending``)."""
    body = [*rows[:-1], training_part(rows[-1]) if last_pending else rows[-1]] if rows else []
    text = json.dumps({"rounds": body, "last_pending": last_pending}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_path(root: Path, server_round: int) -> Path:
    return root / "checkpoints" / f"round-{server_round:03d}.safetensors"


class RunFolder:
    """The run folder being written; ``previous`` holds the rounds of a resumed run."""

    def __init__(self, root: Path, exp: ExperimentConfig, run_id: str, *, signing_key: Ed25519PrivateKey | None = None, previous: Sequence[RoundRecord] = ()) -> None:
        self.root = root
        self.exp = exp
        self.run_id = run_id
        self.signing_key = signing_key
        self.plan_hash = exp.plan_hash()
        self.rounds: list[RoundRecord] = list(previous)
        self.started = time.time()
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not previous:  # a resumed run keeps the files it was started with (checked unchanged)
            (root / "config.yaml").write_text(exp.to_yaml(), encoding="utf-8")
            write_json(root / RUN_INFO, {"run_id": run_id, "experiment": exp.name, "plan_hash": self.plan_hash, "signed_checkpoints": signing_key is not None})

    def record_round(
        self, server_round: int, log: RoundLog, train_metrics: dict[str, float] | None, eval_metrics: dict[str, float] | None, arrays: dict[str, np.ndarray], updated: bool,
        note: str = "", *, wall_s: float | None = None, evaluation_pending: bool = False,
    ) -> RoundRecord:
        """Record a round, write its checkpoint and metrics.json. ``evaluation_pending``: the
        round's model is evaluated later (:meth:`record_evaluation`), its AUROC is not known yet."""
        sites: dict[str, dict[str, Any]] = {}
        for r in log.train:
            entry = sites.setdefault(r.site, {})
            if r.refusal_code:
                entry["refused"] = {"code": r.refusal_code, "reason": r.refusal_reason}
            if r.error:
                entry["error"] = r.error
            if r.ledger_head:
                entry["ledger_head"] = r.ledger_head
            for key in (M.EPSILON_RUN, M.EPSILON_TOTAL, M.DELTA, M.NOISE_MULTIPLIER, M.TRAIN_LOSS, M.NUM_PATIENTS, M.PEAK_RSS_MB):
                if key in r.metrics:
                    entry[key] = r.metrics[key]
            if M.COMPUTE_SECONDS in r.metrics:
                entry["train_compute_s"] = r.metrics[M.COMPUTE_SECONDS]
        _add_evaluation(sites, log)
        tm, em = train_metrics or {}, eval_metrics or {}
        rec = RoundRecord(
            round=server_round,
            train_loss=tm.get(M.TRAIN_LOSS),
            auroc=em.get(M.AUROC),
            auprc=em.get(M.AUPRC),
            eval_loss=em.get(M.EVAL_LOSS),
            patients_trained=tm.get(M.NUM_PATIENTS, 0.0),
            sites=sites,
            updated=updated,
            wall_s=wall_s,
            note=note,
            evaluation_pending=evaluation_pending,
        )
        self.rounds.append(rec)
        rows = _clean([asdict(r) for r in self.rounds])
        bound = records_digest(rows, last_pending=evaluation_pending)
        meta = {
            "run_id": self.run_id, "round": str(server_round), "experiment": self.exp.name, "plan_hash": self.plan_hash, "digest": model_digest(arrays),
            RECORDS_DIGEST: bound, LAST_PENDING: "true" if evaluation_pending else "false",
        }
        if self.signing_key is not None:
            meta["signature"] = sign_checkpoint(self.signing_key, arrays, run_id=self.run_id, server_round=server_round, plan_hash=self.plan_hash, records_digest=bound)
        save_checkpoint(checkpoint_path(self.root, server_round), arrays, meta)
        write_json(self.root / "metrics.json", rows)
        return rec

    def record_evaluation(self, server_round: int, log: RoundLog, eval_metrics: dict[str, float] | None) -> RoundRecord:
        """Add the evaluation of a round recorded with ``evaluation_pending`` (with-next-round:
        it arrived with the next round's train replies) and rewrite metrics.json atomically.
        The round's checkpoint and wall time stay as they were."""
        rec = next((r for r in self.rounds if r.round == server_round), None)
        if rec is None or not rec.evaluation_pending:
            state = "is not recorded" if rec is None else "already has its evaluation"
            raise ValueError(f"Round {server_round} {state} in {self.root / 'metrics.json'}; only a round awaiting its evaluation can be given one.")
        _add_evaluation(rec.sites, log)
        em = eval_metrics or {}
        rec.auroc, rec.auprc, rec.eval_loss = em.get(M.AUROC), em.get(M.AUPRC), em.get(M.EVAL_LOSS)
        rec.evaluation_pending = False
        write_json(self.root / "metrics.json", _clean([asdict(r) for r in self.rounds]))
        return rec

    def epsilon_by_site(self) -> dict[str, dict[str, float | str | None]]:
        """Each site's latest reported (ε, δ) for this run, as the site's ledger stated it (δ or
        σ None where a round's entry lacks it: folders written before replies had to carry all four).

        ε is the largest the site reported, in a train reply or after a noised metric release
        (``eval_epsilon-run``: a run's last release comes after its last round); σ is the training
        σ; the ledger head is the last one received (a round's, then its evaluate reply's)."""
        out: dict[str, dict[str, float | str | None]] = {}
        for rec in self.rounds:
            for site, entry in rec.sites.items():
                if M.EPSILON_RUN in entry:
                    before = out.get(site, {}).get("epsilon")
                    out[site] = {"epsilon": max(entry[M.EPSILON_RUN], before) if isinstance(before, float) else entry[M.EPSILON_RUN],
                                 "delta": entry.get(M.DELTA), "noise_multiplier": entry.get(M.NOISE_MULTIPLIER)}
                    if "ledger_head" in entry:
                        out[site]["ledger_head"] = entry["ledger_head"]
                if site in out and isinstance(entry.get(f"eval_{M.EPSILON_RUN}"), float):
                    out[site]["epsilon"] = max(float(out[site]["epsilon"] or 0.0), entry[f"eval_{M.EPSILON_RUN}"])
                    if "eval_ledger_head" in entry:
                        out[site]["ledger_head"] = entry["eval_ledger_head"]
        return out

    def finish(self, *, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        last = next((r for r in reversed(self.rounds) if r.auroc is not None), None)
        summary = {
            "run_id": self.run_id,
            "experiment": self.exp.name,
            "status": status,
            "rounds_completed": sum(r.updated for r in self.rounds),
            "rounds_planned": self.exp.federation.rounds,
            "final_federated_auroc": last.auroc if last else None,
            "final_federated_auprc": last.auprc if last else None,
            "privacy": privacy_block(self.exp),
            "sites": self.epsilon_by_site(),
            "refusals": [
                {"round": r.round, "site": s, **e["refused"]} for r in self.rounds for s, e in r.sites.items() if "refused" in e
            ],
            "rounds_not_updated": [{"round": r.round, "reason": r.note or "no site sent a usable update"} for r in self.rounds if not r.updated],
            "wall_time_s": round(time.time() - self.started, 2),
            **(extra or {}),
        }
        summary = _clean(summary)
        write_json(self.root / "summary.json", summary)
        if any(r.updated for r in self.rounds):  # no round completed (refused before start, or every round refused): no plot of empty panels
            plot_metrics(self.root / "metrics.png", self.rounds, private=self.exp.privacy.enabled)
        return summary


def privacy_block(exp: ExperimentConfig) -> dict[str, Any]:
    """summary.json's ``privacy``: whether the run was private and, only then, the (ε, δ) it
    targeted (null with DP off: no target applied)."""
    p = exp.privacy
    out: dict[str, Any] = {"enabled": p.enabled, "target_epsilon": p.target_epsilon if p.enabled else None, "target_delta": p.target_delta if p.enabled else None}
    if p.noised_metrics:  # the AUROC figures are read from noised, charged releases
        out["metrics_noise_multiplier"] = p.metrics_noise_multiplier
    return out


def _add_evaluation(sites: dict[str, dict[str, Any]], log: RoundLog) -> None:
    """Each site's evaluation figures (AUROC or that it was suppressed, compute seconds) into
    its entry of a round's ``sites``."""
    for r in log.evaluate:
        entry = sites.setdefault(r.site, {})
        if r.metrics.get(M.SUPPRESSED) == 1.0:
            entry["eval"] = SUPPRESSED
        elif r.metrics.get(M.NOISED) == 1.0:  # its AUROC, if any, read from the noised statistics it sent
            entry["eval"] = NOISED
            if M.AUROC in r.metrics:
                entry["eval_auroc"] = r.metrics[M.AUROC]
            for key in (M.EPSILON_RUN, M.EPSILON_TOTAL):  # the run's ε after the release (charged at the site)
                if key in r.metrics:
                    entry[f"eval_{key}"] = r.metrics[key]
            if r.ledger_head:  # an evaluate message's reply: the site's newest head, after the release
                entry["eval_ledger_head"] = r.ledger_head
        elif M.AUROC in r.metrics:
            entry["eval_auroc"] = r.metrics[M.AUROC]
        elif r.refusal_code and not r.metrics:  # the site refused to release its evaluation (its policy, the release limits)
            entry["eval_error"] = f"refused ({r.refusal_code}): {r.refusal_reason or ''}"
        elif r.error and "error" not in entry:  # why this site's evaluation is missing (a training failure is already its `error`)
            entry["eval_error"] = r.error
        if M.COMPUTE_SECONDS in r.metrics:
            entry["eval_compute_s"] = r.metrics[M.COMPUTE_SECONDS]


CHANCE_AUROC = 0.5


def metrics_figure(rounds: Sequence[RoundRecord], *, private: bool = True) -> Figure:
    """The figure of metrics.png: train loss, federated AUROC (its axis reaches every plotted
    value, with the chance level dashed) and ε per site ("DP off" with ``private`` False)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    xs = [r.round for r in rounds]
    axes[0].plot(xs, [np.nan if r.train_loss is None else r.train_loss for r in rounds], marker="o")
    axes[0].set_title("train loss (patient-weighted)")
    aurocs = [r.auroc for r in rounds if r.auroc is not None and np.isfinite(r.auroc)]
    axes[1].plot(xs, [np.nan if r.auroc is None else r.auroc for r in rounds], marker="o", color="tab:green", label="federated AUROC")
    axes[1].axhline(CHANCE_AUROC, color="grey", linestyle="--", linewidth=1, label="chance (0.5)")
    axes[1].set_title("federated AUROC (held-out patients)")
    axes[1].set_ylim(min([0.4, *(a - 0.02 for a in aurocs)]), 1.0)  # low-ε runs can sit below 0.4: never hide a point
    axes[1].legend(fontsize=8, loc="lower right")
    sites = sorted({s for r in rounds for s in r.sites})
    if private:
        for s in sites:
            axes[2].plot(xs, [r.sites.get(s, {}).get(M.EPSILON_RUN, np.nan) for r in rounds], marker="o", label=s)
        if sites:
            axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "DP off: no ε spent", ha="center", va="center", transform=axes[2].transAxes, fontsize=12, color="grey")
        axes[2].set_yticks([])
    axes[2].set_title("ε spent per site (this run)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_metrics(path: Path, rounds: Sequence[RoundRecord], *, private: bool = True) -> None:
    """Write :func:`metrics_figure` to ``path`` (PNG)."""
    metrics_figure(rounds, private=private).savefig(path, dpi=110)
