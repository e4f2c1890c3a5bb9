"""The site's record of evaluation releases: each global model's metrics leave at most once.

A site's evaluation metrics (AUROC, AUPRC, loss over at least k held-out patients) are not
DP-protected. k-suppression stops a metric that is about a few patients, but not a coordinator
that crafts the global model it asks the site to evaluate: a model whose output is large only
for sessions with one marker above a threshold turns the loss into a count of those sessions,
and bisection over many evaluate messages then recovers one session's value (a red-team
script did it in 64 free evaluate messages). The coordinator holds the model-signing key, so
the signature cannot tell a crafted model from a trained one.

What this module enforces, for every plan with DP on, bounds how many such answers a
coordinator can get and ties them to spent budget:

* one model per (run, round): once the site has sent its evaluation of a model as run R's
  model after round r, another model under that label is refused. The same model again
  (its digest, :func:`shared.model_signing.model_digest`) under the same plan and on the same
  data (its fingerprint) is evaluated again: it gives the same answer (a noised release, the
  same noise), so a reply lost in transit can be asked for again without telling the
  coordinator anything new. Under another plan (another noise level) or after the data changed
  (a patient removed) the answer would differ, and the difference is a new question about the
  patients: refused;
* only in a run the site has paid into: its privacy ledger holds a charged round of that
  run. A fresh run id costs at least one DP round before any evaluation leaves, so the
  number of models evaluated is at most the number of charged rounds (plus one final
  evaluation per run) that the site's approved plans and ε caps allow.

A DPO who wants no un-noised output at all sets ``policy.release_metrics: false``; the site
then sends only its DP-trained update and its ε. The record is one JSON line per release in
``<state_dir>/ledger/evaluation-releases.jsonl``, written and fsync'd under the ledger's lock
before the metrics are computed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.privacy.ledger import append_durably

RELEASES_FILE = "evaluation-releases.jsonl"


def releases_path(ledger_file: Path) -> Path:
    """The release record beside the privacy ledger ``ledger_file``."""
    return ledger_file.parent / RELEASES_FILE


def claims(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    """(run id, model round) -> the first claim under that label: its ``model`` digest and the
    ``plan`` hash and ``dataset`` fingerprint it was answered under ("" in records written
    before they were kept)."""
    out: dict[tuple[str, int], dict[str, str]] = {}
    for rec in _records(path):
        if "answer" not in rec:
            extra = {k: rec[k] for k in ("plan", "dataset") if isinstance(rec.get(k), str)}
            out.setdefault((rec["run_id"], rec["round"]), {"model": rec["model"], "plan": "", "dataset": "", **extra})
    return out


def record(path: Path, *, run_id: str, model_round: int, model: str, plan: str = "", dataset: str = "") -> None:
    """Append one release (``model``: the evaluated model's digest, under the ``plan`` hash and the
    data's ``dataset`` fingerprint) and fsync file and folder. Call under the ledger's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _append(path, {"run_id": run_id, "round": model_round, "model": model, "plan": plan, "dataset": dataset, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})


def answers(path: Path) -> dict[tuple[str, int, str], dict[str, float]]:
    """(run id, model round, model digest) -> the metrics the site sent for it (``answer``
    lines, written once the evaluation was computed), so a repeat is answered with exactly what
    left before, never recomputed (a lost noise secret or another software version would
    otherwise give a second, different answer about the same patients)."""
    out: dict[tuple[str, int, str], dict[str, float]] = {}
    for rec in _records(path):
        values = rec.get("answer")
        if isinstance(values, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in values.items()):
            out.setdefault((rec["run_id"], rec["round"], rec["model"]), {k: float(v) for k, v in values.items()})
    return out


def record_answer(path: Path, *, run_id: str, model_round: int, model: str, answer: dict[str, float]) -> None:
    """Append the metrics sent for a claimed release and fsync. Call under the ledger's lock."""
    _append(path, {"run_id": run_id, "round": model_round, "model": model, "answer": answer})


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """Each line of the record that names a run, a model round and a model (claims and answers);
    lines that do not parse (a write cut short by a crash) are skipped: that write never completed."""
    if not path.exists():
        return
    for raw in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("run_id"), str) and isinstance(rec.get("round"), int) and isinstance(rec.get("model"), str):
            yield rec


def _append(path: Path, body: dict[str, Any]) -> None:
    """Append ``body`` as one canonical JSON line (mode 0600) and fsync file and folder; a line cut
    short by a crash before it is ended first, so the new line starts afresh."""
    line = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    cut_short = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
    append_durably(path, (b"\n" if cut_short else b"") + line.encode() + b"\n", mode=0o600)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
