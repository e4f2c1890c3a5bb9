"""Shared fixtures: a tiny synthetic cohort (real espeak-ng speech) and WAV helpers."""

from __future__ import annotations

import contextlib
import csv
import itertools
import re
import shlex
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import soundfile as sf
from flwr.app import Message, RecordDict

from shared.config import ExperimentConfig, FederationConfig, TrainingConfig, load_experiment
from shared.synth.config import CohortConfig

if TYPE_CHECKING:
    from server.strategy import SiteReport

ROOT = Path(__file__).resolve().parents[1]


def tiny_cohort_config() -> CohortConfig:
    """3 hospitals, few short sessions: seconds to synthesise, same code path as the demo
    (the cohort `fedrelapse bench all --quick` makes, so tests and the CI smoke bench agree)."""
    from server.bench_fl import quick_cohort_config

    return quick_cohort_config()


def tiny_experiment() -> ExperimentConfig:
    exp = load_experiment(ROOT / "configs" / "experiment.yaml")
    return replace(
        exp,
        federation=replace(exp.federation, rounds=2, min_nodes=3, min_patients_metric=2, node_wait_timeout_s=60),
        training=replace(exp.training, local_steps=3, batch_patients=3),
        features=replace(exp.features, max_seconds=4.0, baseline_sessions=2),
    )


class RecordingGrid:
    """Wraps a Grid; keeps every message sent and every reply (in ``sent``/``replies``, or in the lists given)."""

    def __init__(self, grid: Any, sent: list[Message] | None = None, replies: list[Message] | None = None) -> None:
        self._grid = grid
        self.sent: list[Message] = [] if sent is None else sent
        self.replies: list[Message] = [] if replies is None else replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def count(self, kind: str) -> int:
        """How many of the messages sent are of this message type."""
        return sum(m.metadata.message_type == kind for m in self.sent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class ScriptedGrid:
    """A Grid whose nodes are functions (message -> reply content or Flower ``Error``; None: no
    reply): drives ``server.federation.run_federation`` in-process against scripted sites."""

    def __init__(self, sites: dict[int, Callable[[Message], Any]]) -> None:
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from flwr.app import Error

        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            content = self.sites[node](m)
            if content is None:
                continue
            reply = Message(content, reply_to=m) if isinstance(content, Error) else Message(content=content, reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out


def scripted_site(name: str, *, patients: int = 20, epsilon_per_round: float = 1.0) -> Callable[[Message], RecordDict]:
    """An honest scripted site: answers the pre-flight query, trains (returns the model it got
    plus a little noise) and evaluates, with the aggregate figures a site reports."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord

    from shared import metrics as M  # noqa: N812
    from shared import protocol as P  # noqa: N812
    from shared.params import PACKED, packed_vector

    rng = np.random.default_rng(len(name))

    def behave(msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return RecordDict({P.SITE: ConfigRecord({P.SITE_NAME: name}), P.METRICS: MetricRecord({M.EPSILON_RUN: 8.0, M.EPSILON_REMAINING: 22.0, M.NOISE_MULTIPLIER: 1.1, M.DELTA: 1e-5})})
        site = ConfigRecord({P.SITE_NAME: name, P.LEDGER_HEAD: "a" * 64})
        evaluation = MetricRecord({M.NUM_PATIENTS: patients // 3, M.AUROC: 0.7, M.AUPRC: 0.5, M.EVAL_LOSS: 0.6, M.SUPPRESSED: 0.0})
        if kind == MessageType.EVALUATE:
            return RecordDict({P.SITE: site, P.METRICS: evaluation})
        rnd = cast(int, msg.content.config_records[P.CONFIG][P.SERVER_ROUND])
        flat = packed_vector(msg.content.array_records[P.ARRAYS], what="the global model")
        update = (flat + 0.01 * rng.standard_normal(flat.shape)).astype(np.float32)
        eps = epsilon_per_round * rnd
        metrics = MetricRecord({M.NUM_PATIENTS: patients, M.TRAIN_LOSS: 0.6, M.EPSILON_RUN: eps, M.EPSILON_TOTAL: eps, M.DELTA: 1e-5, M.NOISE_MULTIPLIER: 1.1})
        out = RecordDict({P.SITE: site, P.ARRAYS: ArrayRecord({PACKED: Array(update)}), P.METRICS: metrics})
        if msg.content[P.CONFIG].get(P.EVALUATE_FIRST):
            out[P.EVALUATION] = evaluation
        return out

    return behave


def error_of(report: SiteReport) -> str:
    """The error of a site's report that a test expects to be there (a rejected or failed reply)."""
    assert report.error is not None, f"site {report.site} has no error: {report}"
    return report.error


def scripted_experiment(*, rounds: int = 2, privacy: bool = True) -> ExperimentConfig:
    """A plan small enough to run in-process against :class:`ScriptedGrid` sites in seconds."""
    exp = load_experiment(ROOT / "configs" / "experiment.yaml")
    return replace(
        exp,
        federation=replace(exp.federation, rounds=rounds, min_nodes=3, node_wait_timeout_s=2, round_timeout_s=5),
        privacy=replace(exp.privacy, enabled=privacy),
        model=replace(exp.model, hidden=4, conv_channels=4, groups=1),
        language=replace(exp.language, encoder="none"),
    )


@pytest.fixture
def task_identity() -> None:
    """Flower stamps new messages with the running task's identity; give tests that build messages one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("espeakng_loader")
    from shared.synth.cohort import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(tiny_cohort_config(), out, seed=3, workers=1)
    return out


@pytest.fixture(scope="session")
def warm_features(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Site alpha's feature cache (``<state_dir>/features``) for :func:`tiny_experiment`'s settings, filled once."""
    from client.site import Site
    from shared.config import load_site

    state = tmp_path_factory.mktemp("warm-alpha") / "state"
    Site(replace(load_site(tiny_cohort / "alpha" / "site.yaml"), state_dir=state), tiny_experiment())
    return state / "features"


@pytest.fixture
def alpha_state(tmp_path: Path, warm_features: Path) -> Path:
    """``tmp_path / "state"``: a fresh state folder for site alpha (no ledger, no keys, no noise
    secret) whose feature cache already holds the tiny cohort's features, as after a `site check`.

    A test that only needs a new ledger then skips extracting the recordings again (2–14 s a
    test on a loaded 2-core machine, ~0.1 s with the cache filled); the cache is content
    addressed, so the features are the ones extraction would give."""
    state = tmp_path / "state"
    shutil.copytree(warm_features, state / "features")
    return state


def small_site(tiny_cohort: Path, folder: Path, n_rows: int = 14, edit: Callable[[list[dict[str, str]]], None] | None = None) -> Path:
    """A copy of the first ``n_rows`` sessions of site alpha (two patients: short extraction),
    rows optionally changed by ``edit``; returns the new manifest."""
    src = tiny_cohort / "alpha" / "manifest.csv"
    rows = list(csv.DictReader(src.open()))[:n_rows]
    if edit is not None:
        edit(rows)
    m = folder / "manifest.csv"
    with m.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for sub in ("audio", "transcripts"):
        shutil.copytree(tiny_cohort / "alpha" / sub, folder / sub)
    return m


def dry_run_command(stdout: str) -> list[str]:
    """The SuperNode's argv in `site start --dry-run`'s first line (one shell command:
    ``env PATH=… KEY=… program args``), without the ``env`` and its assignments."""
    words = shlex.split(stdout.splitlines()[0])
    assert words[0] == "env", words[:2]
    return list(itertools.dropwhile(lambda w: re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w) is not None, words[1:]))


def write_tone(path: Path, *, sr: int = 16000, seconds: float = 3.0, amp: float = 0.3, silent_gaps: bool = True) -> Path:
    """A voiced-like test signal: 150 Hz harmonic tone bursts separated by pauses."""
    t = np.arange(int(sr * seconds)) / sr
    x = amp * (np.sin(2 * np.pi * 150 * t) + 0.5 * np.sin(2 * np.pi * 300 * t)) / 1.5
    if silent_gaps:
        x = x * (np.sin(2 * np.pi * 0.7 * t) > -0.3)
    x = x + 0.001 * np.random.default_rng(0).standard_normal(x.shape)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
    return path


__all__ = ["ROOT", "dry_run_command", "small_site", "tiny_cohort_config", "tiny_experiment", "write_tone", "FederationConfig", "TrainingConfig"]


def run_failing_worker_task(monkeypatch: pytest.MonkeyPatch, message: Any, error: BaseException) -> tuple[list[Any], list[str]]:
    """Run one site-worker task (``client.site_worker.run_task``, Flower's runtime stubbed out)
    whose ClientApp raises ``error`` on ``message``; the replies pushed and the task details
    reported to the SuperNode."""
    from flwr.app import Context, RecordDict
    from flwr.supernode.runtime import run_clientapp

    from client import site_worker

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    pushed: list[Any] = []
    details: list[str] = []

    class Client:
        def close(self) -> None:
            pass

    class Heartbeat:
        def __init__(self, *_: Any) -> None:
            pass

        start = stop = lambda self: None  # noqa: E731

    def raising(*_: Any) -> Any:
        raise error

    monkeypatch.setattr(site_worker, "_task_args", lambda argv: (object(), "token"))
    monkeypatch.setattr(site_worker, "_runtime_client", lambda args, token: Client())
    monkeypatch.setattr(site_worker, "execute", raising)
    monkeypatch.setattr("flwr.supercore.heartbeat.HeartbeatSender", Heartbeat)
    monkeypatch.setattr("flwr.supercore.heartbeat.make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda client: (message, context, None, type("Fab", (), {"content": b""})()))
    monkeypatch.setattr(run_clientapp, "push_message", lambda client, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda **kw: details.append(str(kw["details"])))
    site_worker.run_task([], lambda header: None, lambda ctx: contextlib.nullcontext())
    return pushed, details
