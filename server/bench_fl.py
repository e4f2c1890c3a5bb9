"""Federation-level benchmarks: update size, round overhead, scale, feature cache, memory.

Like :mod:`server.bench`, these return ratios measured side by side in one run and are never
timed tests. Simulated consortia larger than the cohort re-use its hospitals' manifests
round-robin; every simulated site keeps its own state (ledger, secret), and links the
source hospital's feature cache so features are extracted once.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shared.config import ExperimentConfig, FederationConfig, load_site
from shared.errors import ConfigError

FLOAT_BYTES = 4
# A pretrained speech encoder a site would otherwise fine-tune and send, for scale only:
# wav2vec 2.0 / HuBERT base have about 94-95 million parameters (Baevski et al. 2020, Table 1).
PRETRAINED_ENCODER_PARAMS = 94_000_000


def quick_cohort_config() -> Any:
    """3 small hospitals with short sessions: the `--quick` bench cohort (about a minute to make)."""
    from shared.synth.config import HospitalSpec, Trajectory, load_cohort

    base = load_cohort(Path(__file__).resolve().parents[1] / "configs" / "cohort.yaml")
    hospitals = (
        HospitalSpec(name="alpha", language="nb", sample_rate=16000, noise_snr_db=30, n_patients=10, relapse_prevalence=0.5),
        HospitalSpec(name="beta", language="nb", sample_rate=8000, noise_snr_db=20, n_patients=8, relapse_prevalence=0.5),
        HospitalSpec(name="gamma", language="en", sample_rate=22050, noise_snr_db=25, n_patients=8, relapse_prevalence=0.5),
    )
    traj = Trajectory(sessions_per_patient=7, days_between_sessions=7, stable_sessions_min=3, prodromal_sessions=1, relapse_sessions=2, recovery_sessions=1)
    return replace(base, session_seconds=4.0, hospitals=hospitals, trajectory=traj)


def quick_experiment(exp: ExperimentConfig) -> ExperimentConfig:
    """The experiment scaled to the quick cohort (2 rounds, 3 local steps, 4-second inputs)."""
    return replace(
        exp,
        federation=replace(exp.federation, rounds=2, min_patients_metric=2, node_wait_timeout_s=120),
        training=replace(exp.training, local_steps=3, batch_patients=3),
        features=replace(exp.features, max_seconds=4.0, baseline_sessions=2),
    )


# --- update size -------------------------------------------------------------------------


def with_evaluation(exp: ExperimentConfig, evaluation: str | None) -> ExperimentConfig:
    """The experiment with ``federation.evaluation`` set to ``evaluation`` (None: the plan's own),
    validated as the plan's YAML would be (choices, and fraction_evaluate for with-next-round)."""
    if evaluation is None:
        return exp
    from shared.schema import build, to_plain

    federation = build(FederationConfig, {**to_plain(exp.federation), "evaluation": evaluation}, source="--evaluation", path="federation")
    return replace(exp, federation=federation)


def quantise(update: np.ndarray, *, bits: int, clip: float, rng: np.random.Generator) -> np.ndarray:
    """Fixed-point encoding as secure aggregation needs: clip to ±clip, stochastic rounding to
    ``bits``-bit unsigned integers (unbiased), returned already decoded to float32."""
    levels = 2**bits - 1
    x = (np.clip(update, -clip, clip) + clip) / (2 * clip) * levels  # [0, levels]
    low = np.floor(x)
    q = low + (rng.random(x.shape) < (x - low))  # stochastic rounding: E[q] = x
    return (q / levels * 2 * clip - clip).astype(np.float32)


def update_size(exp: ExperimentConfig, data: Path, *, rounds: int, bits: tuple[int, ...] = (32, 16, 8)) -> dict[str, Any]:
    """Bytes per site per round, and the AUROC cost of quantised updates.

    Sites train without DP (synthetic sites allow it) so the only difference between the
    float and the quantised global model is the quantisation: each round every aggregate is
    formed from the *same* site updates and evaluated by the sites; the float one goes on.
    The clip range is public and data-independent: 2 × learning rate × local steps
    (Adam moves a coordinate by about the learning rate per step).
    """
    from client.site import Site
    from server.simulate import discover_sites, prepare_sites
    from shared.models import build_model
    from shared.params import get_arrays, layout, pack

    nodp = replace(exp, privacy=replace(exp.privacy, enabled=False))
    cfgs = [load_site(p) for p in discover_sites(data)]
    from rich.console import Console

    prepare_sites(cfgs, nodp, Console(quiet=True))
    sites = [Site(c, nodp) for c in cfgs]
    model = build_model(nodp)
    arrays: dict[str, np.ndarray] = get_arrays(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if n.startswith("head.")}
    adapter = {n for n in trainable if n.startswith("adapter.")}
    n_all = sum(v.size for v in arrays.values())
    n_head = sum(arrays[n].size for n in head)
    n_adapter = sum(arrays[n].size for n in adapter)
    wire = sum(len(a.data) for a in pack(arrays, layout(arrays)).values())  # Flower Array payload bytes (the packed model)
    clip = 2 * nodp.training.learning_rate * nodp.training.local_steps
    rng = np.random.default_rng(0)
    history: list[dict[str, Any]] = []
    clipped = 0
    for rnd in range(1, rounds + 1):
        results = [s.train(arrays, run_id="bench-update-size", server_round=rnd, total_rounds=rounds) for s in sites]
        updates = [(float(r.metrics["num-patients"]), r.arrays) for r in results if hasattr(r, "arrays")]
        if len(updates) != len(sites):
            raise RuntimeError("A site refused the update-size benchmark's non-private plan; use a synthetic cohort (its sites allow it).")
        total = sum(w for w, _ in updates)
        deltas = [(w, {k: a[k] - arrays[k] for k in arrays}) for w, a in updates]
        clipped += sum(int((np.abs(d[k]) > clip).sum()) for _, d in deltas for k in d)
        candidates = {"float32": {k: arrays[k] + sum(w * d[k] for w, d in deltas) / total for k in arrays}}
        for b in bits:
            candidates[f"int{b}"] = {k: arrays[k] + sum(w * quantise(d[k], bits=b, clip=clip, rng=rng) for w, d in deltas) / total for k in arrays}
        row: dict[str, Any] = {"round": rnd}
        for name, cand in candidates.items():
            row[name] = _pooled_auroc(nodp, sites, cand)
        history.append(row)
        arrays = candidates["float32"]
    last = history[-1]
    speech: dict[str, Any] = {}
    if exp.speech.enabled:  # the site's frozen encoder, counted from its folder: what fine-tuning it would send
        n_enc = encoder_parameters(Path(exp.speech.model_path))
        speech = {"speech_encoder": {
            "encoder_parameters": n_enc, "encoder_float32_bytes": n_enc * FLOAT_BYTES,
            "adapter_parameters": int(n_adapter), "head_and_adapter_float32_bytes": int((n_head + n_adapter) * FLOAT_BYTES),
            "encoder_over_full_model_float32": round(n_enc / n_all, 1),
            "encoder_over_head_and_adapter_float32": round(n_enc / (n_head + n_adapter), 1),
            "update_holds_encoder_weights": False,
        }}
    return {
        **speech,
        "parameters": {"all": int(n_all), "trainable": int(sum(arrays[n].size for n in trainable)), "head": int(n_head), "adapter": int(n_adapter)},
        "bytes_per_site_per_round": {
            "full_model_float32": int(n_all * FLOAT_BYTES),
            "full_model_flower_payload": int(wire),
            "head_only_float32": int(n_head * FLOAT_BYTES),
            **{f"full_model_int{b}": int(n_all * b // 8) for b in bits},
            **{f"head_only_int{b}": int(n_head * b // 8) for b in bits},
            "pretrained_encoder_float32_reference": PRETRAINED_ENCODER_PARAMS * FLOAT_BYTES,
        },
        "encoder_over_full_int16": round(PRETRAINED_ENCODER_PARAMS * FLOAT_BYTES / (n_all * 2), 1),
        "quantisation_clip": clip,
        "clipped_coordinates_share": round(clipped / (n_all * len(sites) * rounds), 6),
        "auroc_by_round": history,
        "auroc_loss_vs_float32_last_round": {k: round(last["float32"] - v, 4) for k, v in last.items() if k.startswith("int") and v is not None and last["float32"] is not None},
        "rounds": rounds,
        "privacy": "off (quantisation effect isolated from DP noise)",
        "auroc": "pooled over all sites' held-out sessions",
    }


def _pooled_auroc(exp: ExperimentConfig, sites: list[Any], arrays: dict[str, np.ndarray]) -> float | None:
    """AUROC over every site's held-out sessions pooled (a benchmark on synthetic data, in one
    process; real sites only ever report their own aggregate over at least k patients)."""
    from client.dp_train import predict
    from shared import metrics as M  # noqa: N812
    from shared.models import build_model
    from shared.params import set_arrays

    model = build_model(exp)
    set_arrays(model, arrays)
    ys, ss = [], []
    for site in sites:
        probs = predict(model, site.eval_set, site.device)  # (P, K)
        ys.append(site.eval_set.labels[site.eval_set.mask].numpy())
        ss.append(probs[site.eval_set.mask].numpy())
    auc = M.auroc(np.concatenate(ys), np.concatenate(ss))
    return round(float(auc), 4) if np.isfinite(auc) else None


# --- simulated consortia: round overhead, scale, memory -----------------------------------


def make_consortium(src: Path, out: Path, n_sites: int, *, device: str = "cpu") -> Path:
    """``n_sites`` simulated hospitals under ``out`` re-using ``src``'s hospitals round-robin.

    Each has its own state folder (ledger, round secret); its feature cache is a link to
    the source hospital's, filled once.
    """
    from server.simulate import discover_sites

    sources = [(p, load_site(p)) for p in discover_sites(src)]
    if out.exists():
        shutil.rmtree(out)
    for i in range(n_sites):
        path, cfg = sources[i % len(sources)]
        hdir = out / f"site{i:03d}"
        (hdir / "state").mkdir(parents=True)
        (cfg.state_dir / "features").mkdir(parents=True, exist_ok=True)
        (hdir / "state" / "features").symlink_to(cfg.state_dir / "features", target_is_directory=True)
        site = {"name": f"{cfg.name}-{i:03d}", "manifest": str(cfg.manifest), "state_dir": "state", "device": device, "policy": {"allow_non_private": True},
                "coordinator_public_key": "../consortium/model-signing.pub.pem"}
        (hdir / "site.yaml").write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return out


@contextmanager
def peak_tree_rss() -> Iterator[dict[str, Any]]:
    """Peak summed RSS (MiB) of this process and all its descendants (Ray's too), sampled every 0.2 s.

    Also the CPU seconds each kind of process used while the block ran: ``cpu_s`` holds
    ``coordinator`` (this process: ServerApp, Flower's runtime threads and Ray client; the
    sampler's own CPU left out), ``site_actors`` (processes Ray titled ``ClientAppActor``)
    and ``other`` (Ray's services and anything else below this process). CPU time, unlike
    wall time, does not grow when other jobs share the cores. ``actor_peak_mib``: the
    largest RSS one site actor reached.
    """
    box: dict[str, Any] = {"peak_mib": 0.0}
    stop = threading.Event()
    me = os.getpid()
    last: dict[int, float] = {}  # pid -> CPU seconds at its latest sample (kept after it exits)
    actors: set[int] = set()
    actor_peak = 0.0
    sampler_cpu = 0.0
    start_cpu = {pid: cpu for pid, (_, cpu) in _tree(me).items()}

    def sample() -> None:
        nonlocal actor_peak, sampler_cpu
        while not stop.is_set():
            tree = _tree(me)
            box["peak_mib"] = max(box["peak_mib"], sum(rss for rss, _ in tree.values()) / 2**20)
            for pid, (rss, cpu) in tree.items():
                last[pid] = cpu
                if pid not in actors and pid != me and _title(pid).startswith("ray::ClientAppActor"):
                    actors.add(pid)
                if pid in actors:
                    actor_peak = max(actor_peak, rss / 2**20)
            sampler_cpu = time.thread_time()
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        for pid, (_, cpu) in _tree(me).items():
            last[pid] = cpu
        used = {pid: cpu - start_cpu.get(pid, 0.0) for pid, cpu in last.items()}
        box["peak_mib"] = round(box["peak_mib"], 1)
        box["actor_peak_mib"] = round(actor_peak, 1)
        box["cpu_s"] = {
            "coordinator": round(used.get(me, 0.0) - sampler_cpu, 2),
            "site_actors": round(sum(v for pid, v in used.items() if pid in actors), 2),
            "other": round(sum(v for pid, v in used.items() if pid != me and pid not in actors), 2),
        }


def _proc_stat(pid: int | str) -> tuple[int, int, float]:
    """(parent pid, RSS bytes, CPU seconds used so far: user + system) of a process, from /proc/<pid>/stat."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE"), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> dict[int, tuple[int, float]]:
    """pid -> (RSS bytes, CPU seconds used so far) for ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent, rss, cpu = _proc_stat(entry.name)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
        stats[int(entry.name)] = (rss, cpu)
    out: dict[int, tuple[int, float]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid]
        todo.extend(children.get(pid, []))
    return out


def _title(pid: int) -> str:
    """A process's command line as shown by ps (Ray workers retitle theirs ``ray::<Actor>.<method>``)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def simulated_rounds(exp: ExperimentConfig, data: Path, out: Path, *, n_sites: int, rounds: int, cpus: int | None = None, gpus_per_site: float = 0.0) -> dict[str, Any]:
    """One simulated run with ``n_sites`` sites: per-round wall time vs the sites' own compute."""
    from rich.console import Console

    from server.simulate import simulate

    cons = make_consortium(data, out / f"sites-{n_sites}", n_sites, device="auto" if gpus_per_site else "cpu")
    run_exp = replace(exp, federation=replace(exp.federation, rounds=rounds, min_nodes=n_sites))
    run_dir = out / f"run-{n_sites}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    with peak_tree_rss() as mem:
        simulate(run_exp, cons, run_dir, run_id=f"bench-{n_sites}-{int(time.time())}", console=Console(quiet=True), cpus=cpus, gpus_per_site=gpus_per_site)
    total_s = time.perf_counter() - started
    per_site_round = {k: round(v / (n_sites * rounds), 4) for k, v in mem["cpu_s"].items()}
    return {"sites": n_sites, "rounds": rounds, "actors": cpus or max(1, min(n_sites, os.cpu_count() or 1)),
            **_round_figures(run_dir, evaluation=run_exp.federation.evaluation), "run_total_s": round(total_s, 1), "peak_rss_all_processes_mib": mem["peak_mib"],
            "peak_rss_one_actor_mib": mem["actor_peak_mib"], "cpu_s": mem["cpu_s"], "cpu_s_per_site_round": per_site_round}


def phase_compute(records: list[dict[str, Any]], index: int, evaluation: str) -> tuple[dict[str, float], dict[str, float]]:
    """The sites' compute seconds inside round ``records[index]``'s wall time, per exchange:
    (site -> compute in its train exchange, site -> compute in its evaluate exchange).

    ``separate``: the round's training, then the evaluation of its model. ``with-next-round``:
    the train exchange also evaluates the previous round's model (recorded with that round),
    and only the last round has an evaluate exchange, for its own model.
    """
    rec = records[index]
    train = {site: e.get("train_compute_s", 0.0) for site, e in rec["sites"].items()}
    own_eval = {site: e.get("eval_compute_s", 0.0) for site, e in rec["sites"].items()}
    if evaluation == "separate":
        return train, own_eval
    previous = records[index - 1]["sites"] if index > 0 else {}
    for site, e in previous.items():
        train[site] = train.get(site, 0.0) + e.get("eval_compute_s", 0.0)
    return train, own_eval if index == len(records) - 1 else {}


def _round_figures(run_dir: Path, *, evaluation: str = "separate") -> dict[str, Any]:
    """Per-round wall time vs the compute the sites reported inside it, from a run folder's metrics.json.

    What ran inside a round's wall time depends on ``evaluation`` (:func:`phase_compute`).
    ``wall_minus_critical_path_s``: the round's wall time less the slowest site's compute in
    the train exchange and the slowest site's in the evaluate exchange (one after the other):
    the seconds spent in neither, i.e. transfers, polling, hand-offs and the coordinator's work.
    """
    records = json.loads((run_dir / "metrics.json").read_text())
    per_round = []
    for i, rec in enumerate(records):
        sites = rec["sites"].values()
        train, evaluate = phase_compute(records, i, evaluation)
        each = [train.get(s, 0.0) + evaluate.get(s, 0.0) for s in set(train) | set(evaluate)]
        compute = sum(each)
        critical = max(train.values(), default=0.0) + max(evaluate.values(), default=0.0)
        per_round.append({"round": rec["round"], "wall_s": rec["wall_s"], "sites_compute_s": round(compute, 3),
                          "ratio": round(rec["wall_s"] / compute, 3) if compute else None,
                          "ratio_to_slowest_site": round(rec["wall_s"] / max(each), 3) if each and max(each) != 0 else None,
                          "wall_minus_critical_path_s": round(rec["wall_s"] - critical, 3),
                          "sites_replied": sum("train_compute_s" in s for s in sites)})
    later = per_round[1:] or per_round
    steady = [r["ratio"] for r in later if r["ratio"]]
    slowest = [r["ratio_to_slowest_site"] for r in later if r["ratio_to_slowest_site"]]
    rss = [s.get("peak-rss-mb") for rec in records for s in rec["sites"].values() if s.get("peak-rss-mb")]
    return {
        "evaluation": evaluation,
        "per_round": per_round,
        "round_overhead_ratio_after_round_1": round(statistics.median(steady), 3) if steady else None,
        "wall_over_slowest_site_after_round_1": round(statistics.median(slowest), 3) if slowest else None,
        "wall_per_round_after_round_1_s": round(statistics.median([r["wall_s"] for r in later]), 3),
        "wall_minus_critical_path_after_round_1_s": round(statistics.median([r["wall_minus_critical_path_s"] for r in later]), 3),
        "peak_rss_site_process_mib": max(rss) if rss else None,
    }


def message_objects(content: Any) -> int:
    """How many content-addressed objects Flower stores and moves for a message with this
    ``RecordDict`` (Flower's own object tree: the records, each Array and its chunk(s)), plus
    one for the Message itself. In deployment each is its own pull/push request."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return len(get_all_nested_objects(content)) + 1


def wire_objects(exp: ExperimentConfig) -> dict[str, int]:
    """Objects per train message and per train reply of this plan's model: as sent (one packed
    array) and as it was sent before (one Array per parameter), counted with Flower's code."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from shared import metrics as M  # noqa: N812
    from shared import protocol as P  # noqa: N812
    from shared.models import build_model
    from shared.params import get_arrays, layout, pack

    rng = np.random.default_rng(0)  # a trained model's values: no two parameters equal (Flower stores equal arrays once)
    model = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in get_arrays(build_model(exp)).items()}
    config = ConfigRecord({P.RUN_ID: "r", P.TOTAL_ROUNDS: 3, P.PLAN_YAML: exp.to_yaml(), P.MODEL_SIGNATURE: "s", P.SERVER_ROUND: 1})
    reply: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {P.METRICS: MetricRecord({M.NUM_PATIENTS: 10.0, M.TRAIN_LOSS: 0.5}), P.SITE: ConfigRecord({P.SITE_NAME: "a", P.LEDGER_HEAD: "h"})}
    forms = {"packed": pack(model, layout(model)), "one_array_per_parameter": ArrayRecord({k: Array(v) for k, v in model.items()})}
    out = {}
    for form, arrays in forms.items():
        out[f"train_message_{form}"] = message_objects(RecordDict({P.ARRAYS: arrays, P.CONFIG: config}))
        out[f"train_reply_{form}"] = message_objects(RecordDict({P.ARRAYS: arrays, **reply}))
    return out


def deployment_rounds(exp: ExperimentConfig, data: Path, out: Path, *, n_sites: int, rounds: int, site_worker: bool = True, site_threads: int | None = None) -> dict[str, Any]:
    """The same measurement on the Deployment Engine: a SuperLink and one SuperNode process per
    site on 127.0.0.1, TLS and node authentication on, sites verifying signed models.

    Sites run in parallel here (one process each), so besides wall ÷ Σ compute the figure
    wall ÷ the slowest site's compute is given (1.00 = no overhead beyond the slowest site).
    ``site_worker``: each SuperNode's tasks run in one long-lived site worker (client/site_worker.py);
    False: a fresh ClientApp process per message (Flower's default). ``site_threads``: each
    site's torch threads (``site.yaml`` ``threads``); None gives each site its share of this
    machine's cores, max(1, cores // sites), as the Simulation Engine gives each site one CPU;
    0 leaves torch's default (every site using every core).
    """
    from server.deployment import LocalConsortium
    from server.keys import make_ca, make_server
    from shared.schema import load_yaml, to_plain

    mode = "worker" if site_worker else "per-message"
    cons = make_consortium(data, out / f"deploy-sites-{n_sites}-{mode}", n_sites)
    keys = out / f"deploy-keys-{n_sites}-{mode}"
    shutil.rmtree(keys, ignore_errors=True)
    make_ca(keys)
    make_server(keys)
    site_yamls = sorted(cons.glob("*/site.yaml"))
    threads = max(1, (os.cpu_count() or 1) // n_sites) if site_threads is None else site_threads
    for path in site_yamls:
        cfg = load_yaml(path)  # duplicate keys refused, as everywhere else
        cfg["threads"] = threads
        cfg["coordinator_public_key"] = str((keys / "server" / "model-signing.pub.pem").resolve())
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_exp = replace(exp, federation=replace(exp.federation, rounds=rounds, min_nodes=n_sites))
    exp_path = out / f"deploy-{n_sites}-{mode}.yaml"
    exp_path.write_text(yaml.safe_dump(to_plain(run_exp)))
    run_dir = out / f"deploy-run-{n_sites}-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    with peak_tree_rss() as mem, LocalConsortium(out / f"deploy-flower-{n_sites}-{mode}", site_yamls, keys=keys, node_auth=True, site_worker=site_worker) as consortium:
        proc = consortium.submit(exp_path, run_dir, run_id=f"bench-deploy-{n_sites}-{mode}-{int(time.time())}", timeout_s=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"The Deployment Engine run failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return {"sites": n_sites, "rounds": rounds, "engine": "deployment (TLS, node auth, signed models)", "clientapp": mode, "site_threads": threads,
            **_round_figures(run_dir, evaluation=run_exp.federation.evaluation),
            "run_total_s": round(time.perf_counter() - started, 1), "peak_rss_all_processes_mib": mem["peak_mib"], "objects_per_message": wire_objects(run_exp)}


# --- feature cache ---------------------------------------------------------------------------


def idle_poll_load(out: Path, *, n_sites: int, seconds: float, idle_poll_s: float | None) -> dict[str, Any]:
    """CPU the SuperLink spends answering ``n_sites`` idle SuperNodes (TLS, node auth, no run)
    that look for work every ``idle_poll_s`` seconds (None: Flower's own 3 s), and each
    SuperNode's own CPU, over ``seconds``. The sites' ``idle_poll_growth`` is 1 here, so the
    wait stays at ``idle_poll_s`` and the rate of looks is known (``looks_per_s``); with the
    default growth an idle site is back at Flower's 3 s after ≈ 13 s.
    """
    from server.deployment import LocalConsortium
    from server.keys import make_ca, make_server

    label = "flower" if idle_poll_s is None else f"{idle_poll_s:g}"
    work = out / f"idle-{n_sites}-{label}"
    shutil.rmtree(work, ignore_errors=True)
    keys = work / "keys"
    make_ca(keys)
    make_server(keys)
    sites = []
    for i in range(n_sites):
        path = work / f"site-{i}.yaml"
        poll = "" if idle_poll_s is None else f"idle_poll_s: {idle_poll_s}\nidle_poll_growth: 1.0\n"
        path.write_text(f"name: idle-{i}\nmanifest: none.csv\nstate_dir: {work / f'state-{i}'}\n{poll}", encoding="utf-8")
        sites.append(path)

    def cpu_s(pid: int) -> float:
        return _proc_stat(pid)[2]

    with LocalConsortium(work / "flower", sites, keys=keys, node_auth=True, bounded_poll=idle_poll_s is not None) as consortium:
        time.sleep(5.0)  # every SuperNode has joined and is idle
        link, nodes = consortium.procs[0].pid, [p.pid for p in consortium.procs[1:]]
        link0, nodes0, started = cpu_s(link), sum(cpu_s(p) for p in nodes), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        link_cores = (cpu_s(link) - link0) / elapsed
        node_cores = (sum(cpu_s(p) for p in nodes) - nodes0) / elapsed / n_sites
    looks = n_sites / (3.0 if idle_poll_s is None else idle_poll_s)
    return {"sites": n_sites, "idle_poll_s": label, "seconds": round(elapsed, 1), "looks_per_s": round(looks, 1),
            "superlink_cores": round(link_cores, 4), "one_supernode_cores": round(node_cores, 4)}


def sample_manifest(manifest: Path, dest: Path, *, sessions: int) -> Path:
    """Copy ``sessions`` rows of a site's CSV manifest, evenly spaced over the file, with the
    files they name, into ``dest``; returns the new manifest (paths stay relative to it)."""
    import csv

    if manifest.suffix.lower() != ".csv":
        raise ConfigError(f"{manifest}: the feature-cache benchmark samples CSV manifests only; run it on a cohort from `fedrelapse synth` or without a sample (--quick times every recording).")
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or ()), list(reader)
    if not rows:
        raise ConfigError(f"{manifest} has no sessions to sample for the feature-cache benchmark.")
    step = max(1, len(rows) // sessions)
    picked = rows[::step][:sessions]
    shutil.rmtree(dest, ignore_errors=True)
    for row in picked:
        for col in ("audio_path", "transcript_path"):
            if row.get(col):
                (dest / row[col]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(manifest.parent / row[col], dest / row[col])
    out = dest / manifest.name
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(picked)
    return out


def feature_cache(exp: ExperimentConfig, data: Path, scratch: Path, *, sessions_per_site: int | None = None) -> dict[str, Any]:
    """Data time with a cold feature cache (extraction) vs a warm one (what rounds after the first see).

    ``sessions_per_site`` times extraction on that many recordings of each site (evenly spaced
    over its manifest, every sample rate of the cohort kept) instead of all of them: the
    figures are per hour of audio, so a sample gives them in a fraction of the time.
    """
    from client.prepare import prepare_site
    from server.simulate import discover_sites

    cfgs = [load_site(p) for p in discover_sites(data)]
    out: dict[str, Any] = {"sites": [], "sessions_per_site": sessions_per_site or "all"}
    cold_cpu = cold_wall = warm_wall = hours = 0.0
    speech_cpu = speech_cold = speech_warm = 0.0
    for cfg in cfgs:
        cache = scratch / cfg.name
        shutil.rmtree(cache, ignore_errors=True)
        manifest = cfg.manifest if sessions_per_site is None else sample_manifest(cfg.manifest, scratch / "sample" / cfg.name, sessions=sessions_per_site)
        t0, c0 = time.perf_counter(), time.process_time()
        site_data = prepare_site(manifest, exp.features, cache)
        t1, c1 = time.perf_counter(), time.process_time()
        prepare_site(manifest, exp.features, cache)
        t2 = time.perf_counter()
        h = float(site_data.report()["hours_of_audio"])  # type: ignore[arg-type]
        out["sites"].append({"site": cfg.name, "hours_of_audio": h, "cold_s": round(t1 - t0, 2), "warm_s": round(t2 - t1, 3)})
        cold_wall, cold_cpu, warm_wall, hours = cold_wall + t1 - t0, cold_cpu + c1 - c0, warm_wall + t2 - t1, hours + h
        if exp.speech.enabled:  # the encoder's embeddings on top of the (now warm) features, cold then warm
            t3, c3 = time.perf_counter(), time.process_time()
            prepare_site(manifest, exp.features, cache, speech=exp.speech)
            t4, c4 = time.perf_counter(), time.process_time()
            prepare_site(manifest, exp.features, cache, speech=exp.speech)
            t5 = time.perf_counter()
            speech_cpu, speech_cold, speech_warm = speech_cpu + c4 - c3, speech_cold + t4 - t3, speech_warm + t5 - t4
    shutil.rmtree(scratch, ignore_errors=True)
    if exp.speech.enabled:
        out["speech_encoder"] = {
            "encoder": Path(exp.speech.model_path).name, "encoder_parameters": encoder_parameters(Path(exp.speech.model_path)),
            "max_seconds": exp.speech.max_seconds, "threads": _threads(),
            "encoder_only_hours_per_cpu_minute": round(hours / (speech_cpu / 60), 3),
            "hours_per_cpu_minute_with_encoder": round(hours / ((cold_cpu + speech_cpu) / 60), 3),
            "hours_per_wall_minute_with_encoder": round(hours / ((cold_wall + speech_cold) / 60), 3),
            "warm_over_cold_with_encoder": round((warm_wall + speech_warm) / (cold_wall + speech_cold), 4),
        }
    out.update({
        "warm_over_cold": round(warm_wall / cold_wall, 4),
        "hours_of_audio": round(hours, 3),
        "hours_per_cpu_minute": round(hours / (cold_cpu / 60), 2),
        "hours_per_wall_minute": round(hours / (cold_wall / 60), 2),
        "note": "one process; without the speech encoder (features + transcripts off here), then with it when one is given",
    })
    return out


# --- the optional frozen speech encoder: construction, size, memory ---------------------------


def make_random_speech_encoder(out: Path, *, size: str) -> Path:
    """A randomly initialised wav2vec2 saved with save_pretrained, built offline from config:
    ``base`` is wav2vec2-base-sized (``Wav2Vec2Config()`` defaults, ~94 M parameters), ``tiny``
    the tests' 1-layer, hidden-16 encoder. Random weights time and size like trained ones."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    configs = {
        "base": Wav2Vec2Config(),
        "tiny": Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16),
                               conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
    }
    if size not in configs:
        raise ConfigError(f"Unknown encoder size {size!r}; choose one of {', '.join(configs)}.")
    torch.manual_seed(0)
    Wav2Vec2Model(configs[size]).save_pretrained(out)
    return out


def with_speech_encoder(exp: ExperimentConfig, path: Path) -> ExperimentConfig:
    """The experiment with the frozen speech encoder in ``path`` on (its hidden size declared)."""
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"--speech-encoder {path} is not a transformers model folder (no config.json); make one with `fedrelapse bench speech-encoder`.")
    hidden = json.loads(config.read_text()).get("hidden_size")
    if not isinstance(hidden, int):
        raise ConfigError(f"{config} has no whole-number hidden_size; is it a wav2vec2/HuBERT-style encoder?")
    return replace(exp, speech=replace(exp.speech, encoder="transformer", model_path=str(path.resolve()), embedding_dim=hidden))


def encoder_parameters(path: Path) -> int:
    from transformers import AutoModel

    return int(sum(p.numel() for p in AutoModel.from_pretrained(path, local_files_only=True).parameters()))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def site_round_memory(exp: ExperimentConfig, data: Path, scratch: Path) -> dict[str, Any]:
    """Peak RSS of a fresh site process that loads its data and trains one DP round, for the
    first hospital of ``data``: without and (when the plan has one) with the speech encoder.

    Each measurement is its own Python process (its own RSS high-water mark); the site's
    state folder is a scratch copy whose ``features`` links the hospital's feature and
    transcript caches but not its speech embeddings: the figure is a site's first round with
    the encoder (loaded and run on every recording, the worst case), not feature extraction's."""
    from server.simulate import discover_sites

    cfg = load_site(discover_sites(data)[0])
    plans = {"default_model": replace(exp, speech=replace(exp.speech, encoder="none"))}
    if exp.speech.enabled:
        plans["with_speech_encoder"] = exp
    out: dict[str, Any] = {"site": cfg.name, "rounds": 1, "privacy": f"on ({exp.training.per_patient_grads} per-patient gradients)"}
    for name, plan in plans.items():
        state = scratch / name
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        (state / "features").mkdir()
        for entry in sorted((cfg.state_dir / "features").glob("*")):  # warm features and transcripts; speech embeddings cold
            if not entry.name.startswith("speech-"):
                (state / "features" / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        (state / "plan.yaml").write_text(plan.to_yaml())
        code = "from server.bench_fl import _site_round_child; _site_round_child()"
        done = subprocess.run([sys.executable, "-c", code, str(state / "plan.yaml"), str(cfg.manifest.parent / "site.yaml"), str(state)],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"the site process for {name} failed: {done.stderr.strip()[-800:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _site_round_child() -> None:
    """Child of :func:`site_round_memory`: argv = plan YAML, site YAML, scratch state folder."""
    from client.site import Site
    from shared.config import load_experiment
    from shared.models import build_model
    from shared.params import get_arrays

    exp = load_experiment(sys.argv[1])
    cfg = replace(load_site(sys.argv[2]), state_dir=Path(sys.argv[3]))
    t0 = time.perf_counter()
    site = Site(cfg, exp)
    if exp.speech.enabled and site.data.speech_cache_hits:
        raise RuntimeError("the speech embeddings were cached; the memory figure must include running the encoder")
    loaded = _peak_rss_mib()
    t1 = time.perf_counter()
    result = site.train(get_arrays(build_model(exp)), run_id="bench-memory", server_round=1, total_rounds=1)
    peak = _peak_rss_mib()
    print(json.dumps({"peak_rss_mib": round(peak, 1), "peak_rss_after_load_mib": round(loaded, 1), "load_s": round(t1 - t0, 2),
                      "round_s": round(time.perf_counter() - t1, 2), "refusal": getattr(result, "code", None),
                      "update_bytes": int(sum(v.nbytes for v in getattr(result, "arrays", {}).values()))}))


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM). Not ``ru_maxrss``: Linux carries that over
    exec from the parent, so a child started by a large bench process would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; the memory benchmark needs Linux.")
