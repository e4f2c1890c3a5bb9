"""A coordinator that dies in the middle of a round, after the sites trained: the resumed run
re-asks that round and every site refuses it as a replay, so nothing is charged twice.

The round loop runs in-process against the real ClientApp through a small Grid that delivers
messages directly (no Ray), so the crash can be placed between the sites' training and the
coordinator recording the round.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from rich.console import Console

from client.app import build_client_app
from client.site import ledger_path
from server.federation import run_federation
from server.resume import load_resume_point
from server.simulate import consortium_signing_key
from shared import protocol as P  # noqa: N812
from shared.config import ExperimentConfig, load_site
from shared.faults import InjectedCrash
from shared.privacy import ledger
from shared.privacy.accounting import SubsampledGaussian, epsilon
from tests.conftest import tiny_experiment

SITES = ("alpha", "beta")
RUN_ID = "mid-round-crash"


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


class InProcessGrid(Grid):
    """Hands each message to the real ClientApp with that site's context, in this process.

    ``crash_in_round``: the coordinator dies once the sites have answered that round's
    training messages, before it can record the round.
    """

    def __init__(self, site_yamls: list[Path], crash_in_round: int | None = None) -> None:
        self.app = build_client_app()
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={P.NC_SITE_CONFIG: str(p)}, state=RecordDict(), run_config={})
            for n, p in enumerate(site_yamls, start=101)
        }
        self.crash_in_round = crash_in_round

    def set_run(self, run: object) -> None:
        del run

    @property
    def run(self) -> Run:
        raise AssertionError("run_federation does not read grid.run")

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise AssertionError("run_federation builds its messages itself")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise AssertionError("run_federation uses send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise AssertionError("run_federation uses send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = []
        for m in messages:
            reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        rounds = {m.content[P.CONFIG].get(P.SERVER_ROUND) for m in messages if m.metadata.message_type == "train"}
        if self.crash_in_round in rounds:
            raise InjectedCrash(f"the coordinator died after the sites trained round {self.crash_in_round}")
        return replies


def experiment() -> ExperimentConfig:
    exp = tiny_experiment()
    return replace(exp, federation=replace(exp.federation, rounds=2, min_nodes=2, fraction_evaluate=0.0))


@pytest.fixture
def cohort(tiny_cohort: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cohort"
    for name in SITES:
        shutil.copytree(tiny_cohort / name, dst / name, ignore=shutil.ignore_patterns("ledger", "approved-plans.json"))
    return dst


def entries(cohort: Path, site: str) -> list[ledger.LedgerEntry]:
    return [e for e in ledger.read_entries(ledger_path(load_site(cohort / site / "site.yaml").state_dir)) if e.run_id == RUN_ID]


def test_a_round_interrupted_after_training_is_refused_as_a_replay_on_resume(cohort: Path, tmp_path: Path) -> None:
    key_path = consortium_signing_key(cohort)  # the synthetic sites trust <cohort>/consortium
    from shared import signing

    key = signing.load_private(key_path)
    yamls = [cohort / s / "site.yaml" for s in SITES]
    out = tmp_path / "run"
    with pytest.raises(InjectedCrash):
        run_federation(InProcessGrid(yamls, crash_in_round=2), experiment(), out, RUN_ID, Console(quiet=True), signing_key=key)
    assert {s: [e.round for e in entries(cohort, s)] for s in SITES} == {s: [1, 2] for s in SITES}  # round 2 was charged
    ledgers_before = {s: ledger_path(load_site(cohort / s / "site.yaml").state_dir).read_bytes() for s in SITES}

    point = load_resume_point(out, public_key=key.public_key())
    assert point.next_round == 2
    summary = run_federation(InProcessGrid(yamls), point.exp, out, point.run_id, Console(quiet=True), signing_key=key, resume=point)

    assert {s: ledger_path(load_site(cohort / s / "site.yaml").state_dir).read_bytes() for s in SITES} == ledgers_before  # nothing charged again
    assert sorted((r["site"], r["round"], r["code"]) for r in summary["refusals"]) == [("alpha", 2, "replay"), ("beta", 2, "replay")]
    assert summary["status"] == "incomplete: a round had no usable update" and summary["rounds_completed"] == 1
    for s in SITES:  # ε of the run = that of one uninterrupted 2-round mechanism with the same σ and q
        mine = entries(cohort, s)
        whole = SubsampledGaussian(mine[0].noise_multiplier, mine[0].sample_rate, sum(e.steps for e in mine))
        uninterrupted = epsilon([whole], delta=mine[0].delta, accountant=mine[0].accountant)
        assert mine[-1].epsilon_run == pytest.approx(uninterrupted, rel=1e-6)
        assert summary["sites"][s]["epsilon"] == mine[-1].epsilon_run  # the replayed round's ε, reported with the refusal: not round 1's
