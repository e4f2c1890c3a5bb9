"""What a site sends when something goes wrong there: never an exception's text or a local path.

An IsADirectoryError on ``transcripts/PATX0005-SESSX0005-1.txt`` once reached the coordinator's
console and the run folder's summary.json through Flower's error reply. These tests look at the
Message the site actually sends.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.site import Site
from client.site_errors import PATH_WITHHELD, without_paths
from shared import protocol as P  # noqa: N812
from shared.models import build_model
from shared.params import get_arrays, layout, pack
from tests.conftest import run_failing_worker_task, tiny_experiment

pytestmark = pytest.mark.usefixtures("task_identity")

PATIENT = "PATX0005"
LEAKY = f"[Errno 21] Is a directory: '/tmp/site-data/transcripts/{PATIENT}-SESSX0005-1.txt'"


def _message(kind: str, plan: str) -> Message:
    arrays = dict(get_arrays(build_model(tiny_experiment())))
    content = RecordDict({
        P.ARRAYS: pack(arrays, layout(arrays)),
        P.CONFIG: ConfigRecord({P.RUN_ID: "r-err", P.SERVER_ROUND: 1, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: plan}),
    })
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(tiny_cohort: Path, tmp_path: Path, extra: str = "") -> Context:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n{extra}")
    return Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})


def _everything_sent(reply: Message) -> str:
    """Every text the reply carries: its error, and every config record (refusal reasons)."""
    parts = [str(reply.error.reason)] if reply.has_error() else []
    if reply.has_content():
        parts += [repr(dict(v)) for v in reply.content.config_records.values()]
    return " ".join(parts)


@pytest.mark.usefixtures("alpha_state")
@pytest.mark.parametrize(("kind", "method"), [("train", "train"), ("evaluate", "evaluate"), ("query", "plan")])
def test_an_exception_at_the_site_is_answered_without_its_text_and_logged_here_without_it_too(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kind: str, method: str,
) -> None:
    def leaky(*args: Any, **kwargs: Any) -> Any:
        raise IsADirectoryError(LEAKY)

    monkeypatch.setattr(Site, method, leaky)
    if method == "evaluate":  # as in a run this site has trained in (client.releases): the evaluation itself runs
        monkeypatch.setattr(Site, "reserve_evaluation", lambda *args, **kwargs: None)
    app = build_client_app()

    with caplog.at_level(logging.ERROR, logger="fedrelapse.site"):
        reply = app(_message(kind, tiny_experiment().to_yaml()), _context(tiny_cohort, tmp_path))

    sent = _everything_sent(reply)
    assert reply.has_error()
    assert PATIENT not in sent and "/tmp/" not in sent and "Errno" not in sent
    assert "IsADirectoryError" in sent and "Site alpha" in sent
    ref = re.search(r"reference ([0-9a-f]{8})", sent)
    assert ref is not None
    logged = [logging.Formatter().format(r) for r in caplog.records if ref.group(1) in r.getMessage()]
    assert logged and "IsADirectoryError" in logged[0] and "in leaky" in logged[0]  # IT finds the kind of error and where it was raised
    assert PATIENT not in logged[0] and "/tmp/site-data" not in logged[0]  # the SuperNode log names no patient and no data path (docs/STYLE, "Logs")


@pytest.mark.usefixtures("alpha_state")
def test_a_missing_coordinator_key_is_refused_without_the_sites_path(tiny_cohort: Path, tmp_path: Path) -> None:
    ctx = _context(tiny_cohort, tmp_path, extra="coordinator_public_key: consortium/model-signing.pub.pem\n")

    reply = build_client_app()(_message("train", tiny_experiment().to_yaml()), ctx)

    info = reply.content[P.SITE]
    assert info[P.REFUSAL_CODE] == "signature"
    assert str(tmp_path) not in _everything_sent(reply) and "model-signing.pub.pem" not in _everything_sent(reply)
    assert "coordinator_public_key" in str(info[P.REFUSAL_REASON]) and "reference" in str(info[P.REFUSAL_REASON])


def test_a_site_data_problem_is_refused_without_the_sites_path(tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tmp_path / 'no-such' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})

    reply = build_client_app()(_message("query", tiny_experiment().to_yaml()), ctx)

    info = reply.content[P.SITE]
    assert info[P.REFUSAL_CODE] == "invalid"
    assert str(tmp_path) not in _everything_sent(reply) and "DataError" in str(info[P.REFUSAL_REASON])


def test_absolute_paths_are_withheld_from_a_reason_and_the_rest_kept() -> None:
    text = "Ledger /srv/site/state/ledger/privacy-ledger.jsonl line 3: bad hash; ε=1.2/δ=1e-5 (see 'a/b')."
    assert without_paths(text) == f"Ledger {PATH_WITHHELD} line 3: bad hash; ε=1.2/δ=1e-5 (see 'a/b')."


def test_the_site_worker_sends_only_the_class_and_a_reference_when_a_task_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    pushed, details = run_failing_worker_task(monkeypatch, _message("train", "plan"), IsADirectoryError(LEAKY))

    assert len(pushed) == 1 and pushed[0].has_error()
    for text in (pushed[0].error.reason, *details):
        assert PATIENT not in text and "/tmp/" not in text and "IsADirectoryError" in text and "reference" in text


@pytest.mark.parametrize("kind", ["query", "train"])
def test_a_ledger_that_fails_its_check_is_refused_with_code_ledger_naming_the_line_not_the_path(tiny_cohort: Path, tmp_path: Path, kind: str) -> None:
    state = tmp_path / "hospital data" / "state"  # a space in the site's folder: the path must still be withheld whole
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {state}\n")
    ctx = Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})
    ledger_file = state / "ledger" / "privacy-ledger.jsonl"
    ledger_file.parent.mkdir(parents=True)
    ledger_file.write_text("42\n")  # not an entry: the site must refuse, and the researcher must learn why
    from client.site import site_key_paths
    from shared import signing

    signing.generate(*site_key_paths(state))

    reply = build_client_app()(_message(kind, tiny_experiment().to_yaml()), ctx)

    info = reply.content[P.SITE]
    assert info[P.REFUSAL_CODE] == "ledger"
    assert "line 1: not a valid ledger entry" in str(info[P.REFUSAL_REASON]) and "fedrelapse audit verify" in str(info[P.REFUSAL_REASON])
    assert str(tmp_path) not in _everything_sent(reply) and "hospital data" not in _everything_sent(reply) and PATH_WITHHELD in str(info[P.REFUSAL_REASON])


def test_a_home_relative_path_is_withheld_too() -> None:
    assert without_paths("see ~/state/ledger/x.jsonl line 1") == f"see {PATH_WITHHELD} line 1"


def test_a_path_right_after_an_arrow_is_withheld_and_the_state_placeholder_is_not_touched() -> None:
    """Only the `<state_dir>` placeholder may stand before a kept path: `a->/srv/...` named the file."""
    assert without_paths("copy failed: a->/srv/data/PAT0001.wav") == f"copy failed: a->{PATH_WITHHELD}"
    assert without_paths("<state_dir>/ledger/privacy-ledger.jsonl line 3") == "<state_dir>/ledger/privacy-ledger.jsonl line 3"
