"""Patients' risk timelines at a site: model risk per session in time order, early-warning
alerts, and the clinician's one-patient view (``fedrelapse site timeline``).

Everything here is per patient and therefore never leaves the site: the rendered page is
written to the site's own disk for its clinicians.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from client.dp_train import predict
from client.early_warning import Timeline, alerts, cusum
from client.prepare import PreparedSession
from client.site import Site
from shared.atomic import write_atomically
from shared.config import AlertConfig
from shared.markers import SESSION_MARKERS


def sessions_by_patient(sessions: list[PreparedSession]) -> dict[str, list[PreparedSession]]:
    """Each patient's sessions in time order (the order :func:`build_tensors` uses)."""
    out: dict[str, list[PreparedSession]] = defaultdict(list)
    for s in sessions:
        out[s.row.patient_id].append(s)
    for lst in out.values():
        lst.sort(key=lambda s: s.row.recorded_at)
    return dict(out)


def site_timelines(site: Site, model: torch.nn.Module, *, which: str = "eval", probs: torch.Tensor | None = None) -> list[Timeline]:
    """Timelines of the site's held-out (``eval``) or training (``train``) patients; pass
    ``probs`` (P, K) when the caller has already predicted that split."""
    data = {"eval": site.eval_set, "train": site.train_set}[which]
    if probs is None:
        probs = predict(model, data, site.device)  # (P, K)
    by_patient = sessions_by_patient(site.data.sessions)
    out = []
    for i, pid in enumerate(data.patient_ids):
        lst = by_patient[pid]
        t0 = lst[0].row.recorded_at
        days = np.array([(s.row.recorded_at - t0).total_seconds() / 86400 for s in lst])
        labels = np.array([-1 if s.row.label is None else s.row.label for s in lst])
        onset = next((float(d) for d, s in zip(days, lst, strict=True) if s.row.relapse_onset), None)
        out.append(Timeline(pid, days, probs[i, : len(lst)].numpy().astype(np.float64), labels, onset))
    return out


def patient_timeline(site: Site, model: torch.nn.Module, patient_id: str) -> tuple[Timeline, list[PreparedSession]]:
    """One patient's timeline, whichever split they are in."""
    for which in ("eval", "train"):
        data = site.eval_set if which == "eval" else site.train_set
        if patient_id in data.patient_ids:
            tl = next(t for t in site_timelines(site, model, which=which) if t.patient_id == patient_id)
            return tl, sessions_by_patient(site.data.sessions)[patient_id]
    raise KeyError(f"Patient {patient_id!r} has no usable session at site {site.cfg.name}; check the id against the manifest (`fedrelapse site check`).")


MAX_NAME_BYTES = 200  # file systems allow 255; room for ".html" and a temporary file's affixes


def timeline_name(patient_id: str) -> str:
    """The file name (without suffix) of a patient's timeline: one name per id, inside its folder,
    also on a file system that ignores upper/lower case (macOS, a Windows share).

    Letters, digits, ``-``, ``_`` and ``.`` stay as they are (``gamma-p0001``, ``alpha.p0000``);
    every other character, and a leading ``.``, becomes ``%XX`` per UTF-8 byte. No two ids get the
    same name (``%`` itself is encoded), and none can be ``.``, ``..``, a hidden file or hold a
    ``/``. An id with an upper-case letter (or a letter that upper/lower-case folding maps onto
    another, such as ``ß``, ``ς`` or ``ı``) gets a name ending in ``~`` and 16 hex digits of a hash
    of the id (``P0001`` gives ``P0001~`` and the hash); so does a name longer than
    :data:`MAX_NAME_BYTES`, which keeps only its start. So ids that differ only in case get names
    that differ in more than case (``p0001`` and ``P0001~…``), and a lower-case id keeps the name
    it always had.
    """
    name = "".join(
        c if (c.isalnum() or c in "-_.") and c.isprintable() and not (i == 0 and c == ".") else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for i, c in enumerate(patient_id)
    )
    # Letters kept as they are must be each one's own case fold, both ways (the %XX escapes' hex
    # digits are always upper case, and "%" is never kept, so they cannot be confused)
    caseless = all(c.casefold() == c == c.upper().casefold() for c in patient_id if c.isalnum())
    if len(name.encode("utf-8")) > MAX_NAME_BYTES or not caseless:
        digest = hashlib.sha256(patient_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = name.encode("utf-8")[: MAX_NAME_BYTES - 20].decode("utf-8", "ignore") + "~" + digest
    return name or "%"  # an empty id (the manifest refuses one) still names a file


PLOTTED = ("speech_ratio", "pause_time_ratio", "syllable_rate", "f0_sd_st", "coherence_mean", "words_per_voiced_s")


def render_timeline(tl: Timeline, sessions: list[PreparedSession], *, threshold: float, alert_cfg: AlertConfig, baseline_n: int, out: Path, site_name: str) -> tuple[Path, Path]:
    """Write ``<out>.png`` and a self-contained ``<out>.html`` for one patient (the suffixes are added
    to ``out``'s whole name: ``alpha.p0000`` gives ``alpha.p0000.html``, not ``alpha.html``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fired = alerts(tl.risk, baseline_n=baseline_n, slack=alert_cfg.slack, threshold=threshold)
    stat = cusum(tl.risk, baseline_n=baseline_n, slack=alert_cfg.slack)
    dates = [s.row.recorded_at for s in sessions]
    markers = np.stack([s.markers for s in sessions])  # (n, N_SESSION)
    fig, axes = plt.subplots(1 + len(PLOTTED) // 2, 2, figsize=(11, 2.2 * (1 + len(PLOTTED) // 2)), sharex=True)
    ax = plt.subplot2grid((1 + len(PLOTTED) // 2, 2), (0, 0), colspan=2, fig=fig)
    axes[0, 0].remove()
    axes[0, 1].remove()
    ax.plot(dates, tl.risk, "o-", color="#1f4e79", label="session risk")  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
    ax.plot(dates, stat, "--", color="#999999", label="CUSUM")  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
    ax.axhline(threshold, color="#c00000", lw=0.8, label=f"alert threshold {threshold:.2f}")
    for d, f in zip(dates, fired, strict=True):
        if f:
            ax.axvline(d, color="#c00000", alpha=0.35, lw=6)  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
    for d, y in zip(dates, tl.labels, strict=True):
        if y == 1:
            ax.axvspan(d - dt.timedelta(days=3), d + dt.timedelta(days=3), color="#f4b183", alpha=0.4, lw=0)  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
    if tl.onset_day is not None:
        ax.axvline(dates[0] + dt.timedelta(days=tl.onset_day), color="black", ls=":", label="recorded relapse onset")  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
    ax.axvspan(dates[0] - dt.timedelta(days=3), dates[min(baseline_n, len(dates)) - 1] + dt.timedelta(days=3), color="#e2efda", alpha=0.6, lw=0, label="personal baseline")  # type: ignore[arg-type]  # matplotlib plots datetimes (units); its stubs take numbers only
    ax.set_ylabel("risk")
    ax.set_title(f"{site_name} · patient {tl.patient_id}")
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    for k, name in enumerate(PLOTTED):
        a = axes[1 + k // 2, k % 2]
        a.plot(dates, markers[:, SESSION_MARKERS.index(name)], "o-", ms=3, color="#404040")
        a.set_ylabel(name, fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new folder is the owner's only
    png = out.with_name(out.name + ".png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_private(png, buf.getvalue())
    rows = "".join(
        f"<tr><td>{d:%Y-%m-%d}</td><td>{r:.2f}</td><td>{'ALERT' if f else ''}</td><td>{'' if y < 0 else int(y)}</td></tr>"
        for d, r, f, y in zip(dates, tl.risk, fired, tl.labels, strict=True)
    )
    page = f"""<!doctype html><meta charset="utf-8"><title>Patient {html.escape(tl.patient_id)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px}}.note{{color:#555}}</style>
<h1>Relapse risk timeline: patient {html.escape(tl.patient_id)}</h1>
<p class="note">Site {html.escape(site_name)}. Decision support only, not a diagnosis. This page holds personal data:
it stays at the site. Alerts: CUSUM of risk above the patient's own first {baseline_n} sessions (slack {alert_cfg.slack}),
threshold {threshold:.3f}.</p>
<img alt="risk and markers over time" style="width:100%" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">
<table><tr><th>date</th><th>risk</th><th>alert</th><th>label</th></tr>{rows}</table>
"""
    page_path = out.with_name(out.name + ".html")
    write_private(page_path, page.encode("utf-8"))
    return png, page_path


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` readable by its owner only (0600, whatever the umask), atomically: a
    timeline names a patient and shows their risk, so it is personal data like the feature cache."""
    write_atomically(path, lambda fh: fh.write(data), mode=0o600, prefix=f".{path.name}.")  # a hidden temporary file, 0600 from the start
