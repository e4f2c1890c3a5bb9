"""SecAgg+ rounds: the coordinator holds only the weighted sum; dropouts and halts are handled.

Two real simulations (Flower Simulation Engine, tiny cohort): 3 sites × 2 rounds with every
reply the ServerApp side receives recorded, and 5 sites × 3 rounds with sites crashing in
the masked-vector stage (one in round 1: survivors' aggregate; three in round 2: below the
threshold, the round halts and fails loudly; round 3 runs normally).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import soundfile as sf
import yaml
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid
from rich.console import Console
from safetensors.numpy import load_file

from client.app import site_config_path
from server.simulate import simulate
from shared import protocol as P  # noqa: N812
from shared.config import ExperimentConfig, SecureAggregationConfig
from shared.errors import ConfigError
from shared.models import build_model
from shared.schema import build
from tests.conftest import error_of, tiny_experiment

SA = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=20.0, clipping_range=8.0)


def secure_experiment(sa: SecureAggregationConfig, *, rounds: int, min_nodes: int) -> ExperimentConfig:
    exp = tiny_experiment()
    return replace(exp, federation=replace(exp.federation, rounds=rounds, min_nodes=min_nodes, secure_aggregation=sa))


def quantisation_tolerance(sa: SecureAggregationConfig, n_sites: int, total_weight: float) -> float:
    """Worst-case error of the unmasked average: n stochastic roundings of one level each,
    divided by the summed weight ratio, plus float32 rounding of the result."""
    level = 2 * sa.clipping_range / sa.quantization_range
    return n_sites * level * sa.max_weight / total_weight + 1e-6


class RecordingGrid:
    """Wraps the ServerApp's Grid and keeps every reply message handed to server-side code."""

    def __init__(self, grid: Any, store: list[Message]) -> None:
        self._grid, self.store = grid, store

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.store.extend(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _site_and_round(msg: Message, ctxt: Context, sim_sites: tuple[str, ...]) -> tuple[str, int]:
    site = yaml.safe_load(site_config_path(ctxt, sim_sites).read_text())["name"]
    return site, int(msg.content.config_records[P.LEGACY_FITINS_CONFIG][P.SERVER_ROUND])  # type: ignore[arg-type]


class RecordUpdate:
    """Inner mod (site side, before masking): saves the update and weight the site hands to SecAgg+."""

    def __init__(self, folder: Path, sim_sites: tuple[str, ...]) -> None:
        self.folder, self.sim_sites = folder, sim_sites

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        out = call_next(msg, ctxt)
        if P.LEGACY_FITINS_ARRAYS in msg.content.array_records:
            site, rnd = _site_and_round(msg, ctxt, self.sim_sites)
            fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
            arrays = parameters_to_ndarrays(fitres.parameters)
            np.savez(self.folder / f"{site}-r{rnd}.npz", *arrays, weight=np.array(fitres.num_examples))
        return out


class CrashAt:
    """Inner mod: the named sites crash in the masked-vector stage of the given rounds."""

    def __init__(self, crashes: dict[int, set[str]], sim_sites: tuple[str, ...]) -> None:
        self.crashes, self.sim_sites = crashes, sim_sites

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if P.LEGACY_FITINS_ARRAYS in msg.content.array_records:
            site, rnd = _site_and_round(msg, ctxt, self.sim_sites)
            if site in self.crashes.get(rnd, set()):
                raise RuntimeError(f"injected crash of site {site} in round {rnd}")
        return call_next(msg, ctxt)


def checkpoint(run: Path, rnd: int) -> list[np.ndarray]:
    """The global model after round ``rnd`` as it travels: one vector, the parameters flattened
    in the model's order (checkpoints keep the names)."""
    stored = load_file(str(run / "checkpoints" / f"round-{rnd:03d}.safetensors"))
    return [np.concatenate([stored[name].reshape(-1) for name in build_model(tiny_experiment()).state_dict()])]


def load_updates(folder: Path, rnd: int) -> dict[str, tuple[float, list[np.ndarray]]]:
    out = {}
    for f in sorted(folder.glob(f"*-r{rnd}.npz")):
        z = np.load(f)
        out[f.name.rsplit("-r", 1)[0]] = (float(z["weight"]), [z[f"arr_{i}"] for i in range(len(z.files) - 1)])
    return out


def weighted_average(updates: dict[str, tuple[float, list[np.ndarray]]]) -> list[np.ndarray]:
    total = sum(w for w, _ in updates.values())
    return [cast(np.ndarray, sum(w * arrs[i].astype(np.float64) for w, arrs in updates.values())) / total for i in range(len(next(iter(updates.values()))[1]))]


def received_arrays(replies: list[Message]) -> list[np.ndarray]:
    """Every numeric array in the replies: array records and ndarray bytes inside config records."""
    found: list[np.ndarray] = []
    for msg in replies:
        if msg.has_error():
            continue
        for record in msg.content.array_records.values():
            found += [a.numpy() for a in record.values()]
        for config in msg.content.config_records.values():
            for value in config.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        try:
                            found.append(bytes_to_ndarray(item))
                        except Exception:  # keys, ciphertexts: not arrays  # noqa: BLE001
                            continue
    return found


def leaks(received: list[np.ndarray], updates: dict[str, tuple[float, list[np.ndarray]]], sa: SecureAggregationConfig, tol: float) -> list[str]:
    """Which site arrays appear in ``received``: as sent, or as the mod's quantised form decoded."""
    hits = []
    level = 2 * sa.clipping_range / sa.quantization_range
    for site, (weight, arrays) in updates.items():
        scale = round(weight / sa.max_weight * sa.quantization_range) / sa.quantization_range
        for i, u in enumerate(arrays):
            if u.size < 2:
                continue
            for a in received:
                if a.size != u.size:
                    continue
                flat, target = a.reshape(-1).astype(np.float64), u.reshape(-1).astype(np.float64)
                decoded = (flat * level - sa.clipping_range) / scale if scale else flat
                if np.allclose(flat, target, atol=tol, rtol=0) or np.allclose(decoded, target, atol=tol * 10, rtol=0):
                    hits.append(f"{site} array {i}")
    return hits


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize("shares", [4, 6, 10])
def test_even_num_shares_is_rejected_with_the_field_and_a_fix(shares: int) -> None:
    with pytest.raises(ConfigError) as err:
        build(ExperimentConfig, {"name": "x", "federation": {"secure_aggregation": {"enabled": True, "num_shares": shares}}}, source="exp.yaml")
    msg = str(err.value)
    assert "exp.yaml" in msg and "federation.secure_aggregation.num_shares" in msg and "odd" in msg
    assert f"Use {shares - 1} or {shares + 1}" in msg


def test_threshold_must_be_below_num_shares_and_within_min_nodes() -> None:
    with pytest.raises(ConfigError, match="reconstruction_threshold"):
        build(ExperimentConfig, {"name": "x", "federation": {"secure_aggregation": {"num_shares": 3, "reconstruction_threshold": 3}}}, source="exp.yaml")
    with pytest.raises(ConfigError, match="min_nodes"):
        build(ExperimentConfig, {"name": "x", "federation": {"min_nodes": 2, "secure_aggregation": {"enabled": True, "num_shares": 5, "reconstruction_threshold": 3}}}, source="exp.yaml")
    ok = build(ExperimentConfig, {"name": "x", "federation": {"min_nodes": 5, "secure_aggregation": {"enabled": True, "num_shares": 5, "reconstruction_threshold": 3}}}, source="exp.yaml")
    assert ok.federation.secure_aggregation.num_shares == 5


def test_leak_check_finds_an_update_sent_in_the_clear() -> None:
    """The privacy check below can fail: a plain update, or its quantised form, is found."""
    rng = np.random.default_rng(0)
    update = [rng.normal(size=(4, 5)).astype(np.float32)]
    updates = {"alpha": (7.0, update)}
    assert leaks([update[0].copy()], updates, SA, 1e-5) == ["alpha array 0"]
    scale = round(7 / SA.max_weight * SA.quantization_range) / SA.quantization_range
    quantised = np.round((update[0] * scale + SA.clipping_range) * SA.quantization_range / (2 * SA.clipping_range))
    assert leaks([quantised], updates, SA, 1e-5) == ["alpha array 0"]
    assert leaks([rng.integers(0, 2**32, size=(4, 5))], updates, SA, 1e-5) == []


# --- 3 sites, 2 rounds: the coordinator never sees a single site's update ----------------


@pytest.fixture(scope="module")
def secure_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("secure-run")
    updates = tmp_path_factory.mktemp("site-updates")
    sim_sites = tuple(str(p.resolve()) for p in sorted(tiny_cohort.glob("*/site.yaml")))
    replies: list[Message] = []
    summary = simulate(
        secure_experiment(SA, rounds=2, min_nodes=3), tiny_cohort, out, run_id="secagg-test", console=Console(quiet=True), cpus=2,
        wrap_grid=lambda g: cast(Grid, RecordingGrid(g, replies)), client_mods=(RecordUpdate(updates, sim_sites),),  # RecordingGrid: duck-typed, the wrapped Grid's own methods
    )
    return {"out": out, "summary": summary, "replies": replies, "updates": updates}


def test_secure_sum_equals_the_patient_weighted_average_within_quantisation_error(secure_run: dict[str, Any]) -> None:
    summary, out = secure_run["summary"], secure_run["out"]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    for rnd in (1, 2):
        updates = load_updates(secure_run["updates"], rnd)
        assert set(updates) == {"alpha", "beta", "gamma"}
        expected = weighted_average(updates)
        ckpt = checkpoint(out, rnd)
        tol = quantisation_tolerance(SA, 3, sum(w for w, _ in updates.values()))
        assert len(ckpt) == len(expected)
        worst = max(float(np.abs(c - e).max()) for c, e in zip(ckpt, expected, strict=True))
        assert worst <= tol, f"round {rnd}: secure average differs from the plain weighted average by {worst:.2e} > {tol:.2e}"


def test_no_array_the_coordinator_receives_is_a_single_sites_update(secure_run: dict[str, Any]) -> None:
    replies: list[Message] = secure_run["replies"]
    assert replies
    for msg in replies:  # the mod cleared the update before the reply left the site
        for record in msg.content.array_records.values() if not msg.has_error() else []:
            assert len(record) == 0
    received = received_arrays(replies)
    assert any(a.dtype.kind in "iu" and a.size > 100 for a in received)  # the masked vectors were inspected
    for rnd in (1, 2):
        updates = load_updates(secure_run["updates"], rnd)
        tol = quantisation_tolerance(SA, 3, sum(w for w, _ in updates.values()))
        assert leaks(received, updates, SA, tol) == []


def test_signing_dp_ledger_and_evaluation_still_work_under_secure_aggregation(secure_run: dict[str, Any]) -> None:
    summary, out = secure_run["summary"], secure_run["out"]
    assert summary["refusals"] == []  # every site verified the signed model
    assert set(summary["sites"]) == {"alpha", "beta", "gamma"}
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= tiny_experiment().privacy.target_epsilon * 1.001
        assert site["ledger_head"]
    rounds = json.loads((out / "metrics.json").read_text())
    assert all(r["updated"] for r in rounds)
    assert any(r["auroc"] is not None or any("eval" in s or "eval_auroc" in s for s in r["sites"].values()) for r in rounds)


# --- 5 sites, 3 rounds: dropout, halt, recovery ------------------------------------------


@pytest.fixture(scope="module")
def five_sites(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five hospitals: the tiny cohort's three plus copies of alpha and beta under new names."""
    root = tmp_path_factory.mktemp("five")
    fresh = shutil.ignore_patterns("ledger", "keys", "noise-seed.key", "approved-plans.json")  # feature caches are reused, privacy state is not
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(tiny_cohort / name, root / name, ignore=fresh)
    for src, name in (("alpha", "delta"), ("beta", "epsilon")):
        shutil.copytree(tiny_cohort / src, root / name, ignore=fresh)
        cfg = yaml.safe_load((root / name / "site.yaml").read_text())
        (root / name / "site.yaml").write_text(yaml.safe_dump({**cfg, "name": name}))
    # delta lists every alpha patient twice (under new ids, with recordings of their own: the site
    # refuses one recording under two patients): about twice alpha's weight.
    manifest = root / "delta" / "manifest.csv"
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or ()), list(reader)
    dups = []
    for r in rows:
        audio = Path(r["audio_path"])
        samples, rate = sf.read(manifest.parent / audio, dtype="float32")
        sf.write(manifest.parent / audio.with_name("dup-" + audio.name), 0.98 * samples, rate)
        dups.append({**r, "patient_id": "dup-" + r["patient_id"], "session_id": "dup-" + r["session_id"], "audio_path": str(audio.with_name("dup-" + audio.name))})
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows([*rows, *dups])
    return root


def test_dropout_survivors_aggregate_then_halt_below_threshold_then_recovery(five_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sa = replace(SA, num_shares=5, reconstruction_threshold=3)
    sim_sites = tuple(str(p.resolve()) for p in sorted(five_sites.glob("*/site.yaml")))
    crashes = {1: {"gamma"}, 2: {"alpha", "beta", "delta"}}
    updates = tmp_path / "updates"
    updates.mkdir()
    summary = simulate(
        secure_experiment(sa, rounds=3, min_nodes=5), five_sites, tmp_path / "run", run_id="secagg-dropout", console=Console(quiet=True), cpus=2,
        client_mods=(RecordUpdate(updates, sim_sites), CrashAt(crashes, sim_sites)),
    )
    # Round 1: gamma crashed after training; the aggregate is the four survivors' weighted average.
    r1 = load_updates(updates, 1)
    assert set(r1) == {"alpha", "beta", "delta", "epsilon"}
    ckpt1 = checkpoint(tmp_path / "run", 1)
    tol = quantisation_tolerance(sa, 4, sum(w for w, _ in r1.values()))
    assert max(float(np.abs(c - e).max()) for c, e in zip(ckpt1, weighted_average(r1), strict=True)) <= tol
    # Round 2: two survivors < threshold 3: halted, failed loudly, model not updated.
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["updated"] for r in rounds] == [True, False, True]
    assert "secure aggregation halted" in rounds[1]["note"]
    assert all("dropped out" in rounds[1]["sites"][s]["error"] for s in ("alpha", "beta", "delta"))  # named from round 1
    ckpt2 = checkpoint(tmp_path / "run", 2)
    assert all(np.array_equal(a, b) for a, b in zip(ckpt1, ckpt2, strict=True))
    assert summary["rounds_completed"] == 2 and summary["status"].startswith("incomplete")
    assert [r["round"] for r in summary["rounds_not_updated"]] == [2]
    printed = " ".join(capsys.readouterr().out.split())
    assert "round 2 FAILED: secure aggregation halted" in printed and "NOT updated" in printed
    # Round 3: everyone back; all five contribute.
    r3 = load_updates(updates, 3)
    assert len(r3) == 5
    assert r3["delta"][0] > 1.5 * r3["alpha"][0]  # unequal weights, so weighting is really tested
    ckpt3 = checkpoint(tmp_path / "run", 3)
    tol3 = quantisation_tolerance(sa, 5, sum(w for w, _ in r3.values()))
    assert max(float(np.abs(c - e).max()) for c, e in zip(ckpt3, weighted_average(r3), strict=True)) <= tol3
    unweighted = [np.mean([arrs[i] for _, arrs in r3.values()], axis=0) for i in range(len(ckpt3))]
    assert max(float(np.abs(c - u).max()) for c, u in zip(ckpt3, unweighted, strict=True)) > 10 * tol3


# --- in-process (no Ray): weighting, and the site's own policy ------------------------------


def test_in_process_secure_round_equals_plain_round_with_unequal_weights() -> None:
    """The benchmark's loopback sites train deterministically per site, so the same round
    aggregated plainly and with SecAgg+ must agree within quantisation error."""
    from flwr.app import ConfigRecord

    from server.bench import LoopbackGrid, bench_client_app, get_arrays_of
    from server.secure_round import secure_train_round
    from server.strategy import PatientFedAvg
    from shared.params import layout, pack, unpack

    sa = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=50.0)
    exp = tiny_experiment()
    exp = replace(exp, federation=replace(exp.federation, min_nodes=4, secure_aggregation=sa), training=replace(exp.training, local_steps=1))
    weights = [5, 12, 30, 49]
    grid = LoopbackGrid(bench_client_app(exp, weights=weights), len(weights))
    as_grid = cast(Grid, grid)  # duck-typed: the strategy and the SecAgg+ workflow call only get_node_ids and send_and_receive
    shapes = layout(get_arrays_of(exp))
    arrays = pack(get_arrays_of(exp), shapes)
    cfg = ConfigRecord({P.RUN_ID: "loopback", P.TOTAL_ROUNDS: 1})

    def new() -> PatientFedAvg:
        s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=4, node_wait_timeout_s=5)
        s.expected = shapes
        return s

    plain, _ = new().aggregate_train(1, grid.send_and_receive(new().configure_train(1, arrays, cfg, as_grid)))
    result = secure_train_round(as_grid, strategy=new(), sa=sa, server_round=1, arrays=arrays, config=cfg)
    assert plain is not None and result.arrays is not None and result.halted is None
    assert list(result.arrays.keys()) == list(plain.keys()) == ["model"]  # one packed vector either way
    tol = quantisation_tolerance(sa, 4, sum(weights))
    for (name, p), (name2, s) in zip(unpack(plain, shapes, what="plain").items(), unpack(result.arrays, shapes, what="secure").items(), strict=True):
        assert name == name2
        assert float(np.abs(p - s).max()) <= tol, name
    assert result.metrics is not None and result.metrics["num-patients"] == sum(weights)


def test_site_requiring_secure_aggregation_refuses_a_plain_plan(tiny_cohort: Path, tmp_path: Path) -> None:
    from collections import OrderedDict

    from flwr.app import ConfigRecord, MessageType

    from client.app import _check, request_from
    from client.site import Refusal
    from shared.config import load_site

    site_dir = tmp_path / "alpha"
    shutil.copytree(tiny_cohort / "alpha", site_dir, ignore=shutil.ignore_patterns("ledger", "keys", "noise-seed.key"))
    cfg = yaml.safe_load((site_dir / "site.yaml").read_text())
    cfg["policy"]["require_secure_aggregation"] = True
    cfg.pop("coordinator_public_key", None)
    (site_dir / "site.yaml").write_text(yaml.safe_dump(cfg))
    site_cfg = load_site(site_dir / "site.yaml")

    honest_setup = ConfigRecord({"share_num": SA.num_shares, "threshold": SA.reconstruction_threshold, "clipping_range": SA.clipping_range,
                                 "target_range": SA.quantization_range, "max_weight": SA.max_weight})  # what SecAggPlusWorkflow sends for SA

    def _setup_from(cfg: ConfigRecord, kind: str, *, secure: bool) -> tuple[None, object]:
        req = request_from(cfg, OrderedDict(), site_cfg.name, needs_round=False)
        assert not isinstance(req, Refusal), req  # a well-formed request: the refusals under test are _check's
        return None, _check(site_cfg, cfg, req, kind=kind, secagg_setup=honest_setup if secure else None, needs_round=False)

    plain_plan = ConfigRecord({P.PLAN_YAML: tiny_experiment().to_yaml(), P.RUN_ID: "r", P.TOTAL_ROUNDS: 1})
    _, query = _setup_from(plain_plan, MessageType.QUERY, secure=False)
    _, train = _setup_from(plain_plan, MessageType.TRAIN, secure=False)
    assert isinstance(query, Refusal) and query.code == "no-secagg" and "require_secure_aggregation" in query.reason
    assert isinstance(train, Refusal) and train.code == "no-secagg"
    secure_plan = ConfigRecord({P.PLAN_YAML: secure_experiment(SA, rounds=1, min_nodes=3).to_yaml(), P.RUN_ID: "r", P.TOTAL_ROUNDS: 1})
    _, ok = _setup_from(secure_plan, MessageType.QUERY, secure=False)
    _, ok_train = _setup_from(secure_plan, MessageType.TRAIN, secure=True)
    assert not isinstance(ok, Refusal) and not isinstance(ok_train, Refusal)


def test_refusing_site_takes_part_with_weight_zero_and_its_reason_arrives() -> None:
    from flwr.app import ConfigRecord

    from client.app import _fitres
    from server.bench import LoopbackGrid, bench_client_app, get_arrays_of
    from server.secure_round import secure_train_round
    from server.strategy import PatientFedAvg
    from shared import secure_records
    from shared.params import layout, pack, unpack

    sent: list[list[np.ndarray]] = []

    def refuse_site0(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if ctxt.node_config["partition-id"] == 0 and P.LEGACY_FITINS_ARRAYS in msg.content.array_records:
            incoming = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content.array_records[P.LEGACY_FITINS_ARRAYS], keep_input=True))
            sent.append(incoming)
            return _fitres(msg, [np.zeros_like(a) for a in incoming], 0, secure_records.encode(site_name="site0", metrics=None, refusal_code="budget", refusal_reason="Site site0: over its cap."))
        return call_next(msg, ctxt)

    sa = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=50.0)
    exp = tiny_experiment()
    exp = replace(exp, federation=replace(exp.federation, min_nodes=4, secure_aggregation=sa), training=replace(exp.training, local_steps=1))
    weights = [40, 12, 30, 49]
    grid = LoopbackGrid(bench_client_app(exp, weights=weights, inner_mods=(refuse_site0,)), len(weights))
    as_grid = cast(Grid, grid)  # duck-typed: the strategy and the SecAgg+ workflow call only get_node_ids and send_and_receive
    shapes = layout(get_arrays_of(exp))
    arrays = pack(get_arrays_of(exp), shapes)
    cfg = ConfigRecord({P.RUN_ID: "loopback", P.TOTAL_ROUNDS: 1})

    def new() -> PatientFedAvg:
        s = PatientFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=4, node_wait_timeout_s=5)
        s.expected = shapes
        return s

    plain = {int(m.metadata.src_node_id) - 1001: unpack(m.content[P.ARRAYS], shapes, what="plain") for m in grid.send_and_receive(new().configure_train(1, arrays, cfg, as_grid))}
    strategy = new()
    result = secure_train_round(as_grid, strategy=strategy, sa=sa, server_round=1, arrays=arrays, config=cfg)
    assert result.arrays is not None and result.metrics is not None
    # SecAgg+ carried the model as one float32 vector of the model's length (fitins.parameters)
    assert [[(a.dtype, a.shape) for a in s] for s in sent] == [[(np.dtype(np.float32), (sum(int(np.prod(v)) for v in shapes.values()),))]]
    survivors = (1, 2, 3)
    total = sum(weights[i] for i in survivors)
    tol = quantisation_tolerance(sa, 4, total)
    for name, value in unpack(result.arrays, shapes, what="secure").items():
        expected = sum(weights[i] * plain[i][name].astype(np.float64) for i in survivors) / total
        assert float(np.abs(value - expected).max()) <= tol, name
    assert result.metrics["num-patients"] == total
    refused = [r for r in strategy.log[1].train if r.refusal_code]
    assert [(r.site, r.refusal_code, r.refusal_reason) for r in refused] == [("site0", "budget", "Site site0: over its cap.")]


# --- SecAgg+ site reports: named by the run's one node -> name map, errors kept to one line ---


def secure_reply(node: int, **report: Any) -> Message:
    """A masked-vector stage reply from ``node`` as the coordinator reads it (its fitres.metrics)."""
    from flwr.app import RecordDict

    from shared import secure_records

    msg = Message(content=RecordDict({P.LEGACY_FITRES_METRICS: secure_records.encode(**report)}), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


@pytest.mark.usefixtures("task_identity")
def test_a_secure_round_error_keeps_only_its_last_line_and_names_the_site_from_the_preflight(tmp_path: Path) -> None:
    from flwr.app import Error

    from server.federation import preflight
    from server.secure_round import _reports
    from server.strategy import PatientFedAvg
    from tests.conftest import ScriptedGrid, scripted_experiment, scripted_site

    strategy = PatientFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=3, node_wait_timeout_s=2)
    exp = scripted_experiment()
    preflight(ScriptedGrid({1001: scripted_site("site0"), 1002: scripted_site("site1"), 1003: scripted_site("site2")}), strategy, exp, "r", exp.to_yaml(), Console(quiet=True))  # type: ignore[arg-type]
    trace = ("\x1b[36mray::ClientAppActor.run()\x1b[39m\nTraceback (most recent call last):\n  File \"/srv/hospital-oslo/client/site.py\", line 412, in train\n"
             "    x = features[patient_id='P-00417']\nValueError: has 0 frames'>")
    crashed = Message(Error(code=0, reason=trace), reply_to=secure_reply(1, site_name="x", metrics=None))
    crashed.metadata.__dict__["_src_node_id"] = 1003

    reports = _reports([secure_reply(1001, site_name="site0", metrics={"num-patients": 20.0}), crashed], [1001, 1002, 1003], strategy.node_names)

    by_site = {r.site: r for r in reports}
    assert set(by_site) == {"site0", "site1", "site2"}
    assert by_site["site2"].error == "dropped out of secure aggregation: ValueError: has 0 frames" and by_site["site2"].node == 1003


@pytest.mark.usefixtures("task_identity")
def test_a_secure_round_report_under_another_nodes_name_or_with_a_bad_ledger_head_is_that_nodes_error() -> None:
    from server.secure_round import _reports

    names = {1001: "site0", 1002: "site1", 1003: "site2"}
    replies = [
        secure_reply(1001, site_name="site0", metrics={"num-patients": 20.0, "epsilon-run": 1.0}, ledger_head="b" * 64),
        secure_reply(1002, site_name="site1", metrics={"num-patients": 20.0}, ledger_head="h" * 4096),
        secure_reply(1003, site_name="site0", metrics={"num-patients": 20.0, "epsilon-run": 0.01}),
        secure_reply(1004, site_name="x" * 5000, metrics=None, refusal_code="budget", refusal_reason="R" * 9000),
    ]

    reports = {r.site: r for r in _reports(replies, [1001, 1002, 1003, 1004], names)}

    assert reports["site0"].metrics["epsilon-run"] == 1.0 and reports["site0"].error is None
    assert "ledger head (4096 characters) is not a SHA-256 in hex" in error_of(reports["site1"]) and not reports["site1"].metrics
    assert error_of(reports["site2"]).endswith("node 1003 is site 'site2' in this run and now claims the name 'site0', which is node 1001's in this run")
    assert not reports["site2"].metrics
    assert "its site name has 5000 characters" in error_of(reports["node-1004"]) and len(error_of(reports["node-1004"])) < 200
    assert names == {1001: "site0", 1002: "site1", 1003: "site2"}


@pytest.mark.usefixtures("task_identity")
def test_a_secure_round_refusal_reason_is_one_clean_line_of_bounded_length() -> None:
    from server.secure_round import _reports

    reports = _reports([secure_reply(1001, site_name="site0", metrics=None, refusal_code="budget", refusal_reason="over\x1b[2J [/] cap\n" + "R" * 9000)], [1001], {})

    assert reports[0].refusal_reason == "over [/] cap " + "R" * 487 + "… (cut from 9013 characters)"


# --- in-process, fake training: what the coordinator accepts into the sum -------------------

FAKE = {"w": (50,)}  # a 50-value model: the checks, not the training, are under test
FAKE_SA = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=1000.0, clipping_range=8.0)
DP = {"epsilon-run": 1.0, "epsilon-total": 2.0, "delta": 1e-5, "noise-multiplier": 1.1}


def fake_sites(specs: list[dict[str, Any]]) -> Any:
    """A ClientApp of sites that skip their own checks: each spec may set ``weight``
    (fitres.num_examples), ``value`` (every value of its update), ``metrics`` (its clear-text
    report), ``evaluation`` and ``refuse``; the update goes through Flower's real secaggplus_mod."""
    from flwr.clientapp import ClientApp

    from client.app import _fitres, secure_aggregation_mod
    from shared import secure_records

    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        spec = specs[int(context.node_config["partition-id"])]
        incoming = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content.array_records[P.LEGACY_FITINS_ARRAYS], keep_input=True))
        name = f"site{context.node_config['partition-id']}"
        if spec.get("refuse"):
            return _fitres(msg, [np.zeros_like(incoming[0])], spec.get("weight", 0), secure_records.encode(site_name=name, metrics=None, refusal_code="budget", refusal_reason="over its cap"))
        weight = spec.get("weight", 20)
        metrics = spec.get("metrics", {"num-patients": float(weight), "train-loss": 0.5, **DP})
        report = secure_records.encode(site_name=name, metrics=metrics, evaluation=spec.get("evaluation"))
        return _fitres(msg, [np.full_like(incoming[0], spec.get("value", 1.0))], weight, report)

    return app


def fake_round(specs: list[dict[str, Any]], *, wrap: Any = None, sa: SecureAggregationConfig = FAKE_SA, move_bound: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """One SecAgg+ round over ``specs``: (SecureRoundResult, the strategy with its log);
    ``move_bound``: the plan's training, for the strategy's move check (none without it)."""
    from flwr.app import ConfigRecord

    from server.bench import LoopbackGrid
    from server.secure_round import secure_train_round
    from server.strategy import PatientFedAvg
    from shared.params import pack

    grid = cast(Grid, LoopbackGrid(fake_sites(specs), len(specs)))  # duck-typed: the SecAgg+ workflow calls only get_node_ids and send_and_receive
    strategy = PatientFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=len(specs), node_wait_timeout_s=5)
    strategy.expected = FAKE
    if move_bound is not None:
        strategy.set_move_bound(**move_bound)
    arrays = pack({"w": np.zeros(50, np.float32)}, FAKE)
    result = secure_train_round(wrap(grid) if wrap else grid, strategy=strategy, sa=sa, server_round=1, arrays=arrays, config=ConfigRecord({P.RUN_ID: "fake", P.TOTAL_ROUNDS: 1}))
    return result, strategy


def model_values(result: Any) -> np.ndarray:
    from shared.params import PACKED

    return result.arrays[PACKED].numpy()


def errors(strategy: Any) -> dict[str, str | None]:
    return {r.site: r.error for r in strategy.log[1].train}


@pytest.mark.parametrize(("metrics", "why"), [
    ({"num-patients": 20.0, "train-loss": float("nan"), **DP}, "'metric.train-loss' is NaN"),
    ({"num-patients": 20.0, "train-loss": 0.5, **DP, "epsilon-run": float("nan")}, "'metric.epsilon-run' is NaN"),
    ({"num-patients": 20.0, "train-loss": -1.0, **DP}, "metric 'train-loss' is -1.0"),
    ({"num-patients": 20.0, "train-loss": 0.5, "epsilon-run": 1.0}, "privacy figure(s) ['epsilon-total', 'delta', 'noise-multiplier'] missing"),
    ({"num-patients": 20.0, "train-loss": 0.5, **DP, "delta": 0.0}, "metric 'delta' is 0.0"),
    ({"num-patients": 1e9, "train-loss": 0.5, **DP}, "clear-text num-patients (1000000000.0) is not its weight in the sum (fitres.num_examples 20)"),
])
def test_a_secure_report_failing_a_plain_reply_check_is_left_out_of_the_sum(metrics: dict[str, float], why: str) -> None:
    # Arrange: two honest sites (value 1) and one whose clear-text report is implausible (value 7)
    specs: list[dict[str, Any]] = [{"value": 1.0}, {"value": 1.0}, {"value": 7.0, "metrics": metrics}]

    # Act
    result, strategy = fake_round(specs)

    # Assert: its masked vector never entered the sum; it is named with why
    assert result.halted is None and result.metrics["num-patients"] == 40
    np.testing.assert_allclose(model_values(result), 1.0, atol=1e-3)
    bad = [e for e in errors(strategy).values() if e]
    assert len(bad) == 1 and "rejected by the coordinator" in bad[0] and why in bad[0]


def test_a_secure_evaluation_out_of_range_is_dropped_as_an_eval_error() -> None:
    from server.strategy import evaluation_reports

    specs: list[dict[str, Any]] = [{"evaluation": {"suppressed": 0.0, "num-patients": 10.0, "auroc": 0.7}}, {"evaluation": {"suppressed": 0.0, "num-patients": 10.0, "auroc": 0.7}},
             {"evaluation": {"suppressed": 0.0, "num-patients": 1e9, "auroc": 7.0}}]
    result, strategy = fake_round(specs)

    out = strategy.aggregate_evaluation(0, evaluation_reports(strategy.log[1].train))

    assert result.arrays is not None  # the update is fine: only the evaluation is dropped
    assert out is not None and out["auroc"] == pytest.approx(0.7) and out["num-patients"] == 20
    dropped = [r for r in strategy.log[0].evaluate if r.error]
    assert [r.site for r in dropped] == ["site2"] and "metric 'num-patients' is 1000000000.0" in dropped[0].error and not dropped[0].metrics


@pytest.mark.parametrize("weight", [10**6, 1001])
def test_a_weight_above_max_weight_never_enters_the_sum(weight: int) -> None:
    # Arrange: the site's weight would be clipped inside the sum (every parameter → ≈ 0.008 before)
    specs: list[dict[str, Any]] = [{"value": 1.0}, {"value": 1.0}, {"value": 7.9, "weight": weight, "metrics": {"num-patients": float(weight), "train-loss": 0.5, **DP}}]

    result, strategy = fake_round(specs)

    assert result.halted is None
    np.testing.assert_allclose(model_values(result), 1.0, atol=1e-3)
    assert "it must be a whole number from 0 to 1000 (`federation.secure_aggregation.max_weight`)" in (errors(strategy)["node-1003"] or "")


def test_an_average_that_moved_further_than_the_plans_training_can_halts_the_round() -> None:
    """A poisoning site is hidden in the sum, but the average of models the plan's training made
    moves no parameter further than each of them can: 10 Adam steps at 0.01, at most 0.1017."""
    plan = {"optimizer": "adam", "learning_rate": 0.01, "local_steps": 10}

    honest, _ = fake_round([{"value": 0.1}, {"value": -0.1}, {"value": 0.1}], move_bound=plan)
    poisoned, strategy = fake_round([{"value": 0.1}, {"value": 0.1}, {"value": 5.0}], move_bound=plan)

    assert honest.halted is None
    np.testing.assert_allclose(model_values(honest), 0.1 / 3, atol=1e-3)
    assert poisoned.arrays is None and poisoned.halted == (
        "the unmasked sum failed the coordinator's check: parameter 'w' moved 1.733 from the round's global model; "
        "the plan's training (10 Adam step(s) at learning rate 0.01) moves a parameter by at most 0.1017."
    )


def test_a_refusal_with_a_non_zero_weight_is_left_out() -> None:
    result, strategy = fake_round([{"value": 1.0}, {"value": 1.0}, {"refuse": True, "weight": 20}])

    np.testing.assert_allclose(model_values(result), 1.0, atol=1e-3)
    assert "a refusal's weight is 0" in (errors(strategy)["node-1003"] or "")


def tamper_node(node: int, change: Any) -> Any:
    """A Grid wrapper that lets ``change`` edit node ``node``'s replies before the coordinator reads them."""
    class Tampering:
        def __init__(self, grid: Any) -> None:
            self._grid = grid

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            for r in replies:
                if not r.has_error() and r.metadata.src_node_id == node:
                    change(r)
            return replies

        def __getattr__(self, name: str) -> Any:
            return getattr(self._grid, name)

    return Tampering


def _short_vector(r: Message) -> None:
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    cfg = r.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is not None and Key.MASKED_PARAMETERS in cfg:
        cfg[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(np.zeros(3, dtype=np.int64))]


def _no_vector(r: Message) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    cfg = r.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is not None and Key.MASKED_PARAMETERS in cfg:
        del cfg[Key.MASKED_PARAMETERS]


def _report_on_unmask_reply(r: Message) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from shared import secure_records

    cfg = r.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is not None and Key.NODE_ID_LIST in cfg:
        r.content.config_records[P.LEGACY_FITRES_METRICS] = secure_records.encode(site_name="site2", metrics={"num-patients": 20.0})


@pytest.mark.parametrize(("change", "why"), [
    (_short_vector, "its masked vector has arrays of shapes [(3,)]"),
    (_no_vector, "reply's 'masked_params' is missing"),
    (_report_on_unmask_reply, None),
])
def test_a_malformed_stage_reply_is_that_sites_dropout_not_a_coordinator_crash(change: Any, why: str | None) -> None:
    result, strategy = fake_round([{"value": 1.0}, {"value": 1.0}, {"value": 1.0}], wrap=tamper_node(1003, change))

    assert result.halted is None and result.arrays is not None
    np.testing.assert_allclose(model_values(result), 1.0, atol=1e-3)
    if why is None:  # the unmask stage is known by the coordinator's message, so an extra record there changes nothing
        assert result.metrics["num-patients"] == 60 and not any(errors(strategy).values())
    else:
        assert result.metrics["num-patients"] == 40 and why in (errors(strategy)["node-1003"] or "")


def test_an_exception_inside_the_secagg_workflow_halts_the_round_with_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.secure_round as secure_round

    class Broken:
        def __init__(self, **_: Any) -> None:
            pass

        def __call__(self, grid: Any, context: Any) -> None:
            raise KeyError("fitres.metrics")

    monkeypatch.setattr(secure_round, "SecAggPlusWorkflow", Broken)
    result, strategy = fake_round([{}, {}, {}])

    assert result.arrays is None and result.halted is not None
    assert result.halted.startswith("secure aggregation failed on a reply it could not process (KeyError: 'fitres.metrics')")
    assert len(strategy.log[1].train) == 3 and all(r.error for r in strategy.log[1].train)


def test_a_sum_with_a_single_contributor_is_not_applied() -> None:
    # Arrange: two of three sites refuse (weight 0): the 'sum' would be site0's own update
    result, strategy = fake_round([{"value": 1.0}, {"refuse": True}, {"refuse": True}])

    assert result.arrays is None
    assert result.halted is not None and result.halted.startswith("only 1 site(s) contributed a non-zero weight to the secure sum")
    assert "max(2, `federation.secure_aggregation.reconstruction_threshold`)" in result.halted
    # with t = 3 of 5 shares, a sum of two contributors is not applied either; three are
    sa = replace(FAKE_SA, num_shares=5, reconstruction_threshold=3)
    two, _ = fake_round([{"value": 1.0}, {"value": 1.0}, {"refuse": True}, {"refuse": True}, {"refuse": True}], sa=sa)
    three, _ = fake_round([{"value": 1.0}, {"value": 1.0}, {"value": 1.0}, {"refuse": True}, {"refuse": True}], sa=sa)
    assert two.arrays is None and two.halted is not None and two.halted.startswith("only 2 site(s)")
    assert three.halted is None and three.arrays is not None


# --- the SecAgg+ setup the coordinator sends must be the approved plan's ---------------------


class TamperedSetup:
    """A coordinator's Grid that rewrites the SecAgg+ SETUP stage's parameters on the way out."""

    def __init__(self, grid: Any, values: dict[str, int | float]) -> None:
        self._grid, self.values = grid, values

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

        messages = list(messages)
        for msg in messages:
            cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and cfg.get(Key.STAGE) == Stage.SETUP:
                cfg.update(self.values)
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("plan_sa", "tamper", "why"), [
    (SA, {}, None),  # what an honest coordinator sends for this plan: accepted
    (SA, {"threshold": 1}, "threshold = 1, but the plan's `federation.secure_aggregation.reconstruction_threshold` is 2"),
    (SA, {"share_num": 5}, "share_num = 5, but the plan's `federation.secure_aggregation.num_shares` is 3"),
    (SA, {"clipping_range": 1e6}, "clipping_range = 1000000.0, but the plan's `federation.secure_aggregation.clipping_range` is 8.0"),
    (SA, {"max_weight": 1e9}, "max_weight = 1000000000.0, but the plan's `federation.secure_aggregation.max_weight` is 20.0"),
    (SA, {"target_range": 2**20}, "target_range = 1048576, but the plan's `federation.secure_aggregation.quantization_range` is 4194304"),
    (replace(SA, enabled=False), {}, "this round is a SecAgg+ round, but the plan has `federation.secure_aggregation.enabled` = false"),
])
def test_a_site_refuses_secagg_setup_values_other_than_its_plans(
    tiny_cohort: Path, tmp_path: Path, plan_sa: SecureAggregationConfig, tamper: dict[str, int | float], why: str | None,
) -> None:
    """With threshold 1 the coordinator and any one neighbour could unmask a site; the site
    learns the setup values only from the SETUP stage (which carries no plan) and holds them
    against the plan when the round's plan arrives, before it trains: a mismatch is a
    plan-mismatch refusal with weight 0 that reaches the researcher, nothing is charged."""
    from flwr.app import ConfigRecord

    from client.app import build_client_app
    from server.bench import LoopbackGrid
    from server.secure_round import secure_train_round
    from server.strategy import PatientFedAvg
    from shared.params import get_arrays, layout, pack

    sites = []
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(tiny_cohort / name, tmp_path / name, ignore=shutil.ignore_patterns("ledger", "keys", "noise-seed.key", "approved-plans.json"))
        cfg = yaml.safe_load((tmp_path / name / "site.yaml").read_text())
        cfg.pop("coordinator_public_key", None)  # unsigned models: this coordinator has no signing key
        (tmp_path / name / "site.yaml").write_text(yaml.safe_dump(cfg))
        sites.append(str(tmp_path / name / "site.yaml"))
    exp = secure_experiment(plan_sa, rounds=1, min_nodes=3)
    grid = LoopbackGrid(build_client_app(tuple(sites)), len(sites))
    shapes = layout(get_arrays(build_model(exp)))
    strategy = PatientFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=3, node_wait_timeout_s=5)
    strategy.expected = shapes
    config = ConfigRecord({P.RUN_ID: "secagg-setup", P.TOTAL_ROUNDS: 1, P.PLAN_YAML: exp.to_yaml()})
    result = secure_train_round(TamperedSetup(grid, tamper), strategy=strategy, sa=SA, server_round=1, arrays=pack(get_arrays(build_model(exp)), shapes), config=config)  # type: ignore[arg-type]
    reports = strategy.log[1].train
    assert sorted(r.site for r in reports) == ["alpha", "beta", "gamma"]
    if why is None:
        assert [(r.site, r.refusal_code, r.error) for r in reports if r.refusal_code or r.error] == []
        assert result.arrays is not None and result.halted is None
        return
    for r in reports:
        assert r.refusal_code == "plan-mismatch", (r.site, r.refusal_code, r.refusal_reason, r.error)
        assert why in str(r.refusal_reason)
    assert result.arrays is None
    assert not any((tmp_path / name / "state" / "ledger" / "privacy-ledger.jsonl").exists() for name in ("alpha", "beta", "gamma"))
