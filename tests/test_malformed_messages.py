"""A malformed message from the coordinator gets a structured refusal from the site, not a
traceback, and nothing is trained or charged."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import build_client_app
from shared import protocol as P  # noqa: N812
from shared.models import build_model
from shared.params import PACKED, get_arrays, layout, pack
from tests.conftest import tiny_experiment

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: Flower stamps new messages with a task identity


def context(tiny_cohort: Path, tmp_path: Path) -> Context:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: alpha\nmanifest: {tiny_cohort / 'alpha' / 'manifest.csv'}\nstate_dir: {tmp_path / 'state'}\n")
    return Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})


N_VALUES = sum(int(v.size) for v in get_arrays(build_model(tiny_experiment())).values())


def message(case: str) -> Message:
    arrays = dict(get_arrays(build_model(tiny_experiment())))
    shapes = layout(arrays)
    cfg = ConfigRecord({P.RUN_ID: "r-bad", P.SERVER_ROUND: 1, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: tiny_experiment().to_yaml()})
    content = RecordDict({P.ARRAYS: pack(arrays, shapes), P.CONFIG: cfg})
    if case == "no-config":
        del content[P.CONFIG]
    elif case == "config-as-metrics":
        content[P.CONFIG] = MetricRecord({"server-round": 1})
    elif case == "round-is-text":
        cfg[P.SERVER_ROUND] = "one"
    elif case == "round-beyond-total":
        cfg[P.SERVER_ROUND] = 3
    elif case == "total-below-plan":  # σ would be calibrated for 1 round: less noise than the approved plan's
        cfg[P.TOTAL_ROUNDS] = 1
    elif case == "rounds-beyond-plan":  # rounds 3..50 of a 2-round plan would be trained and charged
        cfg[P.TOTAL_ROUNDS], cfg[P.SERVER_ROUND] = 50, 3
    elif case == "no-plan":
        del cfg[P.PLAN_YAML]
    elif case == "plan-not-yaml":
        cfg[P.PLAN_YAML] = "name: [unclosed"
    elif case == "run-id-5MB":  # it became a 5 MB line of the site's signed ledger
        cfg[P.RUN_ID] = "x" * 5_000_000
    elif case == "run-id-129":
        cfg[P.RUN_ID] = "r" * 129
    elif case == "run-id-newline":  # a forged log line after it
        cfg[P.RUN_ID] = 'a"\n{"kind":"policy"}'
    elif case == "run-id-rtl-override":  # reverses how the rest of a log line reads
        cfg[P.RUN_ID] = "run-\u202e1-dliab"
    elif case == "seed-beyond-torch":  # it passed the pre-flight, then every train and evaluate failed
        cfg[P.PLAN_YAML] = tiny_experiment().to_yaml().replace("seed: 0", f"seed: {2**64}")
    elif case == "no-model":
        del content[P.ARRAYS]
    elif case == "wrong-length":
        flat = content.array_records[P.ARRAYS][PACKED].numpy()
        content[P.ARRAYS] = ArrayRecord({PACKED: Array(flat[:-5])})
    elif case == "float64-model":
        content[P.ARRAYS] = ArrayRecord({PACKED: Array(content.array_records[P.ARRAYS][PACKED].numpy().astype(np.float64))})
    elif case == "one-array-per-parameter":
        content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    elif case == "nan-model":
        first = next(iter(arrays))
        arrays[first] = np.full_like(arrays[first], np.nan)
        content[P.ARRAYS] = pack(arrays, shapes)
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize(("case", "code", "why"), [
    ("no-config", "malformed", "no 'config' config record"),
    ("config-as-metrics", "malformed", "no 'config' config record"),
    ("round-is-text", "malformed", "'server-round'] must be a whole number from 1 to 2, got 'one'"),
    ("round-beyond-total", "malformed", "from 1 to 2, got 3"),
    ("total-below-plan", "plan-mismatch", "config['total-rounds'] = 1, but the plan has `federation.rounds` = 2"),
    ("rounds-beyond-plan", "plan-mismatch", "config['total-rounds'] = 50, but the plan has `federation.rounds` = 2"),
    ("no-plan", "malformed", "'plan-yaml'] must be a non-empty string"),
    ("run-id-5MB", "malformed", "config['run-id'] is 5000000 characters long; at most 128 are allowed; nothing was trained or charged."),
    ("run-id-129", "malformed", "config['run-id'] is 129 characters long; at most 128 are allowed"),
    ("run-id-newline", "malformed", "config['run-id'] holds the non-printable character U+000A at position 3; only printable characters are allowed"),
    ("run-id-rtl-override", "malformed", "config['run-id'] holds the non-printable character U+202E at position 5"),
    ("plan-not-yaml", "invalid", "is not valid YAML"),
    ("seed-beyond-torch", "invalid", "training plan from the coordinator: `seed` is 18446744073709551616; it must be <= 9223372036854775807."),
    ("no-model", "malformed", "no 'arrays' array record"),
    ("wrong-length", "invalid-model", f"The global model of round 1 holds {N_VALUES - 5} values; the plan's model has {N_VALUES}."),
    ("float64-model", "malformed", "The global model of round 1 is a float64 array of shape"),
    ("one-array-per-parameter", "malformed", "a packed model is one array named 'model'"),
    ("nan-model", "invalid-model", "NaN or infinite"),
])
@pytest.mark.usefixtures("alpha_state")
def test_a_malformed_request_is_refused_with_a_reason_and_nothing_is_charged(tiny_cohort: Path, tmp_path: Path, case: str, code: str, why: str) -> None:
    reply = build_client_app()(message(case), context(tiny_cohort, tmp_path))
    info = reply.content[P.SITE]
    assert info[P.SITE_NAME] == "alpha"
    assert info[P.REFUSAL_CODE] == code, info[P.REFUSAL_REASON]
    assert why in str(info[P.REFUSAL_REASON])
    assert P.ARRAYS not in reply.content
    assert not (tmp_path / "state" / "ledger" / "privacy-ledger.jsonl").exists()


@pytest.mark.usefixtures("alpha_state")
@pytest.mark.parametrize("kind", ["query", "train", "evaluate"])
def test_a_round_count_other_than_the_plans_is_refused_before_any_sigma_search(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """total-rounds = 100000 under a PRV plan kept a site busy for a minute and GBs in its σ
    search; the plan's federation.rounds is the only round count the site may use."""
    from dataclasses import replace

    from client import site as site_module

    searched: list[int] = []

    def sigma_search(*_: object, **k: Any) -> float:
        searched.append(k.get("steps", 0))
        return 1.0

    monkeypatch.setattr(site_module, "calibrated_sigma", sigma_search)
    exp = tiny_experiment()
    plan = replace(exp, privacy=replace(exp.privacy, accountant="prv")).to_yaml()
    msg = message("ok")
    msg.content.config_records[P.CONFIG][P.PLAN_YAML] = plan
    msg.content.config_records[P.CONFIG][P.TOTAL_ROUNDS] = 100_000
    reply = build_client_app()(Message(content=msg.content, dst_node_id=1, message_type=kind), context(tiny_cohort, tmp_path))
    info = reply.content[P.SITE]
    assert info[P.REFUSAL_CODE] == "plan-mismatch", info[P.REFUSAL_REASON]
    assert "100000" in str(info[P.REFUSAL_REASON]) and "`federation.rounds` = 2" in str(info[P.REFUSAL_REASON])
    assert searched == []
    assert P.ARRAYS not in reply.content and P.METRICS not in reply.content
    assert not (tmp_path / "state" / "ledger" / "privacy-ledger.jsonl").exists()


@pytest.mark.parametrize("name", ["relapse-demo", "Bærum – relapse study (pilot 2)", "n" * 100])
def test_every_run_id_the_coordinator_makes_is_one_sites_accept(name: str) -> None:
    """Run ids are "<experiment name>-<UTC time>" (benchmarks add a suffix to the name); an
    experiment name the plan accepts (at most 100 printable characters) always makes one."""
    from dataclasses import replace

    from client.app import Request, request_from
    from server.app import check_run_id, new_run_id
    from shared.config import experiment_from_yaml_text

    exp = experiment_from_yaml_text(replace(tiny_experiment(), name=name).to_yaml(), source="plan")
    for run_id in (new_run_id(exp.name), new_run_id(f"{exp.name}-bench-nodp")):
        cfg = ConfigRecord({P.RUN_ID: run_id, P.SERVER_ROUND: 1, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: exp.to_yaml()})
        assert isinstance(request_from(cfg, OrderedDict(), "alpha", needs_round=True), Request), run_id
        assert check_run_id(run_id) == run_id


def test_a_run_id_sites_would_refuse_stops_the_coordinator_before_any_site_is_asked() -> None:
    from server.app import check_run_id
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=r"The run id \(run config `run-id`, or the experiment `name` plus the time\) is 129 characters long; at most 128 are allowed; every site would refuse it"):
        check_run_id("r" * 129)
    with pytest.raises(ConfigError, match="non-printable character U\\+000A"):
        check_run_id("run\n1")


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedrelapse.clientapp" and " refused round " in r.getMessage()]


@pytest.mark.usefixtures("alpha_state")
@pytest.mark.parametrize("kind", ["train", "evaluate", "query"])
@pytest.mark.parametrize(("case", "code", "shown"), [
    ("no-config", "malformed", "?"),
    ("round-is-text", "malformed", "?"),
    ("total-below-plan", "plan-mismatch", "1"),
    ("plan-not-yaml", "invalid", "1"),
    ("nan-model", "invalid-model", "1"),
    ("unapproved", "unapproved-plan", "1"),
])
def test_every_refusal_decided_in_the_message_setup_is_logged_once_at_the_site(
    tiny_cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, case: str, code: str, shown: str,
) -> None:
    """Only training's own refusals were logged (`site=oslo refused round 3: budget`); a site
    that refused every message as unsigned or malformed left nothing in IT's log."""
    msg = message(case)
    if kind == "query":
        if case in ("round-is-text", "nan-model"):
            pytest.skip("the pre-flight query reads no round and no model")
        shown = "0"  # the pre-flight query belongs to no round
    caplog.set_level("WARNING", logger="fedrelapse.clientapp")

    ctx = context(tiny_cohort, tmp_path)
    if case == "unapproved":  # a site that trains approved plans only, and approved none
        with (tmp_path / "site.yaml").open("a") as f:
            f.write("require_approved_plans: true\n")

    reply = build_client_app()(Message(content=msg.content, dst_node_id=1, message_type=kind), ctx)

    assert reply.content[P.SITE][P.REFUSAL_CODE] == code
    assert _refusal_lines(caplog) == [f"site=alpha refused round {shown}: {code} ({kind})"]


@pytest.mark.usefixtures("alpha_state")
def test_a_training_refusal_is_logged_once_per_reply(tiny_cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import app as app_module
    from client.site import Refusal

    monkeypatch.setattr(app_module, "_train", lambda *a, **k: (Refusal("budget", "Site alpha: the budget is spent."), 0.0))
    caplog.set_level("WARNING", logger="fedrelapse.clientapp")

    reply = build_client_app()(message("ok"), context(tiny_cohort, tmp_path))

    assert reply.content[P.SITE][P.REFUSAL_CODE] == "budget"
    assert _refusal_lines(caplog) == ["site=alpha refused round 1: budget (train)"]
