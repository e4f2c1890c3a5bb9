"""A run resumes only from an intact, signed checkpoint of the same run and plan (no simulation)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open
from safetensors.numpy import save_file
from typer.testing import CliRunner

from server.app import DEPLOY_INFO, resume_from_run_config
from server.cli import app
from server.resume import load_resume_point
from server.run_folder import RUN_INFO, RunFolder, checkpoint_path
from server.simulate import SIM_INFO
from server.strategy import RoundLog, SiteReport
from shared import metrics as M  # noqa: N812
from shared import signing
from shared.config import load_experiment
from shared.errors import ConfigError, CryptoError, FederationError
from shared.model_signing import model_digest
from shared.models import build_model
from shared.params import get_arrays
from tests.conftest import tiny_experiment


def crashed_run(tmp_path: Path, rounds_done: int = 2, *, with_site: bool = False) -> tuple[Path, Ed25519PrivateKey]:
    """A run folder as a coordinator leaves it when it dies after ``rounds_done`` rounds
    (``with_site``: each round trained by site alpha, ε and all)."""
    data = tmp_path / "data"
    key = signing.generate(data / "consortium" / "model-signing.key", data / "consortium" / "model-signing.pub.pem")
    exp = replace(tiny_experiment(), federation=replace(tiny_experiment().federation, rounds=3))
    run = tmp_path / "run"
    folder = RunFolder(run, exp, "run-x", signing_key=key)
    (run / SIM_INFO).write_text(json.dumps({"engine": "simulation", "data": str(data)}))
    arrays = dict(get_arrays(build_model(exp)))
    for rnd in range(1, rounds_done + 1):
        arrays = {k: v + 0.01 * rnd for k, v in arrays.items()}
        log = RoundLog(train=[SiteReport(site="alpha", metrics={M.NUM_PATIENTS: 10.0, M.EPSILON_RUN: 1.0 * rnd, M.DELTA: 1e-5, M.NOISE_MULTIPLIER: 1.1})]) if with_site else RoundLog()
        folder.record_round(rnd, log, {}, {}, arrays, True)
    return run, key


def rewrite_checkpoint(path: Path, change: dict[str, str] | None = None, bump: bool = False) -> None:
    with safe_open(str(path), framework="np") as fh:
        meta = dict(fh.metadata())
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    if bump:
        first = sorted(arrays)[0]
        arrays[first] = arrays[first] + np.float32(1e-3)
    meta.update(change or {})
    save_file(arrays, str(path), metadata=meta)


def test_an_intact_checkpoint_resumes_at_the_next_round_with_its_weights(tmp_path: Path) -> None:
    run, key = crashed_run(tmp_path)
    point = load_resume_point(run, public_key=key.public_key())
    assert (point.run_id, point.next_round, [r.round for r in point.rounds]) == ("run-x", 3, [1, 2])
    assert list(point.arrays) == list(get_arrays(build_model(point.exp)))  # the model's parameter order
    with safe_open(str(checkpoint_path(run, 2)), framework="np") as fh:
        assert model_digest(point.arrays) == fh.metadata()["digest"]


def test_a_run_that_crashed_before_round_one_restarts_from_the_initial_model(tmp_path: Path) -> None:
    run, key = crashed_run(tmp_path, rounds_done=0)
    point = load_resume_point(run, public_key=key.public_key())
    assert point.next_round == 1 and point.rounds == ()


@pytest.mark.parametrize(("tamper", "why"), [
    ("weights", "do not match the digest"),
    ("weights-and-digest", "signature does not verify"),
    ("other-round", "round="),
    ("garbage", "cannot be read"),
    ("missing", "is missing"),
])
def test_a_tampered_checkpoint_is_refused(tmp_path: Path, tamper: str, why: str) -> None:
    run, key = crashed_run(tmp_path)
    path = checkpoint_path(run, 2)
    if tamper == "weights":
        rewrite_checkpoint(path, bump=True)
    elif tamper == "weights-and-digest":  # an attacker who recomputes the digest still cannot sign
        rewrite_checkpoint(path, bump=True)
        with safe_open(str(path), framework="np") as fh:
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        ordered = {k: arrays[k] for k in get_arrays(build_model(load_experiment(run / "config.yaml")))}
        rewrite_checkpoint(path, change={"digest": model_digest(ordered)})
    elif tamper == "other-round":  # round 1's checkpoint renamed into round 2's place
        checkpoint_path(run, 1).replace(path)
    elif tamper == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif tamper == "missing":
        path.unlink()
    with pytest.raises(CryptoError, match=why):
        load_resume_point(run, public_key=key.public_key())


def test_a_checkpoint_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    run, _ = crashed_run(tmp_path)
    mallory = signing.generate(tmp_path / "m.key", tmp_path / "m.pub")
    with pytest.raises(CryptoError, match="signature does not verify"):
        load_resume_point(run, public_key=mallory.public_key())


def test_a_changed_plan_is_refused(tmp_path: Path) -> None:
    run, key = crashed_run(tmp_path)
    config = run / "config.yaml"
    other = replace(tiny_experiment(), training=replace(tiny_experiment().training, learning_rate=0.5))
    with pytest.raises(ConfigError, match="not the plan run run-x started with"):
        load_resume_point(run, exp=other, public_key=key.public_key())
    config.write_text(config.read_text().replace("learning_rate: 0.01", "learning_rate: 0.5"))
    with pytest.raises(ConfigError, match="was changed after run run-x started"):
        load_resume_point(run, public_key=key.public_key())


def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    run, key = crashed_run(tmp_path)
    (run / "summary.json").write_text(json.dumps({"run_id": "run-x", "status": "completed"}))
    with pytest.raises(FederationError, match="already finished"):
        load_resume_point(run, public_key=key.public_key())


def test_cli_refuses_a_tampered_checkpoint_with_the_crypto_exit_code(tmp_path: Path) -> None:
    from server.cli import app

    run, _ = crashed_run(tmp_path)
    rewrite_checkpoint(checkpoint_path(run, 2), bump=True)
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == CryptoError.exit_code, result.output
    assert "do not match the digest" in " ".join(result.output.split())
    assert not (run / "summary.json").exists()


def test_cli_needs_a_run_folder(tmp_path: Path) -> None:
    from server.cli import app

    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == ConfigError.exit_code
    assert "not a run folder" in " ".join(result.output.split())


def deployed(run: Path, key_path: Path) -> None:
    """Make ``run`` look like a deployed run folder (what the ServerApp writes in deployment)."""
    (run / SIM_INFO).unlink()
    (run / DEPLOY_INFO).write_text(json.dumps({"engine": "deployment", "run_id": "run-x", "signing_key": str(key_path)}))


def test_the_resume_run_config_key_continues_the_run_in_its_folder_with_its_id(tmp_path: Path) -> None:
    run, _ = crashed_run(tmp_path)
    key_path = tmp_path / "data" / "consortium" / "model-signing.key"
    point = resume_from_run_config(str(run), out="", run_id="", experiment="", key_path=key_path)
    assert (point.run_id, point.next_round) == ("run-x", 3)


@pytest.mark.parametrize(("override", "why"), [({"out": "elsewhere"}, "continues in its own folder"), ({"run_id": "new-id"}, "keeps its run id")])
def test_the_resume_run_config_key_refuses_another_folder_or_run_id(tmp_path: Path, override: dict[str, str], why: str) -> None:
    run, _ = crashed_run(tmp_path)
    args: dict[str, Any] = {"out": "", "run_id": "", "experiment": "", "key_path": tmp_path / "data" / "consortium" / "model-signing.key"} | override
    with pytest.raises(ConfigError, match=why):
        resume_from_run_config(str(run), **args)


def test_resuming_a_signed_deployed_run_without_the_coordinator_key_is_refused(tmp_path: Path) -> None:
    run, _ = crashed_run(tmp_path)
    with pytest.raises(CryptoError, match="is signed"):
        resume_from_run_config(str(run), out="", run_id="", experiment="", key_path=None)


def test_the_cli_asks_for_the_superlink_to_resume_a_deployed_run_and_checks_before_submitting(tmp_path: Path) -> None:
    run, _ = crashed_run(tmp_path)
    key_path = tmp_path / "data" / "consortium" / "model-signing.key"
    deployed(run, key_path)
    no_link = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert no_link.exit_code != 0 and "--superlink" in " ".join(no_link.output.split())
    (tmp_path / "keys" / "ca").mkdir(parents=True)
    (tmp_path / "keys" / "ca" / "ca.pem").write_text("not used: the checks fail first")
    rewrite_checkpoint(checkpoint_path(run, 2), bump=True)  # altered weights: refused here, before any `flwr run`
    altered = CliRunner().invoke(app, ["run", "--resume", str(run), "--superlink", "127.0.0.1:1", "--keys", str(tmp_path / "keys")])
    assert altered.exit_code == CryptoError.exit_code and "do not match the digest" in " ".join(altered.output.split())


def edit_metrics(run: Path, change: object) -> None:
    """Apply ``change`` (a function of the loaded list) to metrics.json and write it back."""
    path = run / "metrics.json"
    rounds = json.loads(path.read_text(encoding="utf-8"))
    rounds[0]["sites"] = {"alpha": {"epsilon-run": 1.0, "delta": 1e-5, "noise-multiplier": 1.1, "ledger_head": "a" * 64}}
    change(rounds)  # type: ignore[operator]
    path.write_text(json.dumps(rounds), encoding="utf-8")


@pytest.mark.parametrize(("change", "why"), [
    (lambda m: m[0].__setitem__("sites", []), "field `sites` is a list, expected an object"),
    (lambda m: m[0].__setitem__("evaluation_pending", "yes"), "field `evaluation_pending` is a string, expected true or false"),
    (lambda m: m[0].__setitem__("round", "1"), "field `round` is a string, expected a whole number"),
    (lambda m: m[0].__setitem__("auroc", "0.9"), "field `auroc` is a string, expected a number"),
    (lambda m: m[0].__setitem__("extra", 1), r"unknown field\(s\) \['extra'\]"),
    (lambda m: m[0]["sites"].__setitem__("alpha", "x"), "`sites.alpha`: it is a string, expected an object"),
    (lambda m: m[0]["sites"]["alpha"].__setitem__("epsilon-run", "0.5"), "`sites.alpha`: `epsilon-run` is a string, expected a number"),
    (lambda m: m[0]["sites"]["alpha"].pop("delta"), "`sites.alpha`: `epsilon-run` is given without `delta`"),
    (lambda m: m[0]["sites"]["alpha"].__setitem__("refused", {"code": "budget"}), "`sites.alpha`: `refused` is not an object with a string `code` and `reason`"),
])
def test_a_metrics_file_with_a_mistyped_round_is_refused_naming_the_field(tmp_path: Path, change: object, why: str) -> None:
    run, key = crashed_run(tmp_path)
    edit_metrics(run, change)
    with pytest.raises(ConfigError, match=rf"metrics.json: its round record 1 is not one this version writes \({why}"):
        load_resume_point(run, public_key=key.public_key())


@pytest.mark.parametrize("name", ["metrics.json", "run.json"])
def test_a_run_file_that_is_not_utf8_is_refused_cleanly(tmp_path: Path, name: str) -> None:
    run, key = crashed_run(tmp_path)
    (run / name).write_bytes(b"\xff\xfe[]")
    with pytest.raises(ConfigError, match=rf"{name} is not"):
        load_resume_point(run, public_key=key.public_key())
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == ConfigError.exit_code and name in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("text", "why"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was RecursionError, a traceback
    ('[{"round": ' + "9" * 5_000 + "}]", "digits"),  # was ValueError, a traceback
    ("[{not json", "not valid JSON"),
])
def test_a_metrics_json_that_cannot_be_read_is_refused_cleanly_like_a_summary(tmp_path: Path, text: str, why: str) -> None:
    """metrics.json and summary.json are read by one function: what summary.json was refused for
    (507132d) crashed the resume when metrics.json held it."""
    run, key = crashed_run(tmp_path)
    (run / "metrics.json").write_text(text)

    with pytest.raises(ConfigError, match=rf"metrics.json is not a metrics file this version wrote: .*{why}"):
        load_resume_point(run, public_key=key.public_key())
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])

    assert result.exit_code == ConfigError.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("text", "why"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was RecursionError, a traceback
    ('{"run_id": ' + "9" * 5_000 + "}", "digits"),  # was ValueError, a traceback
    ("[1, 2]", "no text field run_id, plan_hash"),
    ('{"run_id": "r", "plan_hash": 7}', "no text field plan_hash"),
])
def test_a_run_description_that_cannot_be_read_is_refused_cleanly(tmp_path: Path, text: str, why: str) -> None:
    """run.json is read like summary.json and metrics.json: a damaged one is a sentence naming it (exit 2)."""
    run, key = crashed_run(tmp_path)
    (run / RUN_INFO).write_text(text)

    with pytest.raises(ConfigError, match=rf"{RUN_INFO} is not a run description this version wrote: .*{why}"):
        load_resume_point(run, public_key=key.public_key())
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])

    assert result.exit_code == ConfigError.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def finished_summary_of(run: Path) -> dict:
    return {
        "run_id": "run-x", "experiment": "tiny", "status": "completed", "rounds_completed": 2, "rounds_planned": 3,
        "final_federated_auroc": 0.7, "final_federated_auprc": 0.5, "privacy": {"enabled": True, "target_epsilon": 8.0, "target_delta": 1e-5},
        "sites": {"alpha": {"epsilon": 2.0, "delta": 1e-5, "noise_multiplier": 1.1}}, "refusals": [], "rounds_not_updated": [], "wall_time_s": 3.0,
    }


@pytest.mark.parametrize(("change", "why"), [
    (lambda s: [1, 2], "it holds a list, expected an object"),
    (lambda s: {k: v for k, v in s.items() if k != "sites"}, "field `sites` is missing, expected an object of sites"),  # was "is null"
    (lambda s: s | {"sites": None}, "field `sites` is null, expected an object of sites"),
    (lambda s: {k: v for k, v in s.items() if k != "status"}, "field `status` is missing, expected a string"),
    (lambda s: {k: v for k, v in s.items() if k != "wall_time_s"}, "field `wall_time_s` is missing, expected a number"),
    (lambda s: s | {"final_federated_auroc": "0.99"}, "field `final_federated_auroc` is a string, expected a number or null"),
    (lambda s: s | {"sites": {"alpha": {"epsilon": "2"}}}, "`sites.alpha.epsilon` is a string"),
    (lambda s: s | {"refusals": [{"site": "a"}]}, "field `refusals` is not a list of objects"),
    (lambda s: s | {"wall_time_s": 10**400}, "field `wall_time_s` is an integer of 401 digits (too large)"),  # was OverflowError
    (lambda s: s | {"sites": {"alpha": {"epsilon": 10**400}}}, "`sites.alpha.epsilon` is an integer of 401 digits"),
])
def test_resuming_a_finished_run_with_a_damaged_summary_is_refused_naming_the_field(tmp_path: Path, change: object, why: str) -> None:
    run, _ = crashed_run(tmp_path)
    (run / "summary.json").write_text(json.dumps(finished_summary_of(run)))
    assert CliRunner().invoke(app, ["run", "--resume", str(run)]).exit_code == 0  # intact: reported, exit code of its status
    (run / "summary.json").write_text(json.dumps(change(finished_summary_of(run))))  # type: ignore[operator]

    result = CliRunner().invoke(app, ["run", "--resume", str(run)])

    assert result.exit_code == ConfigError.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "summary.json is not a summary this version wrote" in " ".join(result.output.split()) and why in " ".join(result.output.split())


@pytest.mark.parametrize(("text", "why"), [
    ('{"x":' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),  # was RecursionError
    ('{"wall_time_s":' + "9" * 5_000 + "}", "digits"),  # was ValueError
])
def test_a_summary_json_nested_too_deeply_or_with_a_5000_digit_number_is_refused_cleanly(tmp_path: Path, text: str, why: str) -> None:
    run, _ = crashed_run(tmp_path)
    (run / "summary.json").write_text(text)
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "summary.json is not a summary this version wrote" in " ".join(result.output.split()) and why in " ".join(result.output.split())


@pytest.mark.parametrize(("change", "shown"), [
    ({"status": "completed [/bold]"}, "status: completed [/bold]"),  # was MarkupError
    ({"status": "[blink red]completed[/]"}, "status: [blink red]completed[/]"),  # was shown as "status: completed" with exit code 6
    ({"baselines": {"k": "[/]"}}, "baseline k: [/]"),  # was MarkupError
])
def test_a_finished_run_s_summary_text_is_printed_as_written_never_as_markup(tmp_path: Path, change: dict, shown: str) -> None:
    run, _ = crashed_run(tmp_path)
    (run / "summary.json").write_text(json.dumps(finished_summary_of(run) | change))
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert shown in result.output, result.output
    assert result.exit_code == (0 if change.get("status", "completed") == "completed" else 6), result.output


def signed_digest_rewritten(run: Path, server_round: int) -> None:
    """What an editor of metrics.json who also rewrites the checkpoint's records digest does."""
    from server.run_folder import RECORDS_DIGEST, records_digest

    rows = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    rewrite_checkpoint(checkpoint_path(run, server_round), change={RECORDS_DIGEST: records_digest(rows, last_pending=False)})


@pytest.mark.parametrize(("change", "rewrite_digest", "why"), [
    (lambda m: m[0].__setitem__("updated", False), False, "rounds 1-2 are not as recorded when"),
    (lambda m: m[0]["sites"]["alpha"].__setitem__("refused", {"code": "budget", "reason": "forged"}), False, "rounds 1-2 are not as recorded when"),
    (lambda m: m[1].__setitem__("patients_trained", 999.0), False, "rounds 1-2 are not as recorded when"),
    (lambda m: m[0]["sites"]["alpha"].__setitem__("epsilon-run", 0.001), True, "signature does not verify"),
])
def test_an_edited_round_record_is_refused_by_the_signed_checkpoint(tmp_path: Path, change: object, rewrite_digest: bool, why: str) -> None:
    # Arrange: a signed run folder whose round 1 named a site, then one figure edited
    run, key = crashed_run(tmp_path, with_site=True)
    path = run / "metrics.json"
    rounds = json.loads(path.read_text(encoding="utf-8"))
    change(rounds)  # type: ignore[operator]
    path.write_text(json.dumps(rounds), encoding="utf-8")
    if rewrite_digest:
        signed_digest_rewritten(run, 2)

    with pytest.raises(CryptoError, match=why):
        load_resume_point(run, public_key=key.public_key())


STOPPED_BETWEEN = "stopped between writing round"


@pytest.mark.parametrize(("tamper", "why", "stop_hint"), [
    # several checkpoints ahead of the records: no stop leaves that, so no "move round-00k out" hint (it offered round 1's)
    ("emptied", r"holds the checkpoints of rounds \[1, 2, 3\] but .*metrics.json lists no round; .*edited or replaced", False),
    ("first-two-rounds-dropped", r"holds the checkpoints of rounds \[2, 3\] but .*metrics.json lists round 1; .*edited or replaced", False),
    # exactly the next round's checkpoint ahead: also what a stop between a checkpoint and its record leaves
    ("last-round-dropped", r"holds the checkpoint of round 3 but .*metrics.json lists rounds 1-2\. Either metrics.json was edited .*round-003.safetensors out", True),
    ("metrics-deleted-after-round-one", r"holds the checkpoint of round 1 but .*metrics.json lists no round\. Either .*round-001.safetensors out", True),
    ("checkpoint-deleted", r"lists rounds 1-3 but .*checkpoints has no checkpoint of round\(s\) \[1\]", False),
])
def test_checkpoints_and_metrics_listing_different_rounds_are_refused(tmp_path: Path, tamper: str, why: str, stop_hint: bool) -> None:
    run, key = crashed_run(tmp_path, rounds_done=1 if tamper == "metrics-deleted-after-round-one" else 3)
    rounds = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    if tamper == "emptied":
        (run / "metrics.json").write_text("[]")
    elif tamper == "first-two-rounds-dropped":
        (run / "metrics.json").write_text(json.dumps(rounds[:1]))
    elif tamper == "last-round-dropped":
        (run / "metrics.json").write_text(json.dumps(rounds[:2]))
    elif tamper == "metrics-deleted-after-round-one":
        (run / "metrics.json").unlink()
    else:
        checkpoint_path(run, 1).unlink()
    with pytest.raises(CryptoError, match=why) as caught:
        load_resume_point(run, public_key=key.public_key())
    assert (STOPPED_BETWEEN in str(caught.value)) == stop_hint, str(caught.value)


def test_a_round_evaluated_after_its_checkpoint_verifies_and_its_evaluation_is_bound_by_the_next(tmp_path: Path) -> None:
    # Arrange: with-next-round: round 1 recorded awaiting its evaluation, which round 2's replies bring
    data = tmp_path / "data"
    key = signing.generate(data / "consortium" / "model-signing.key", data / "consortium" / "model-signing.pub.pem")
    exp = replace(tiny_experiment(), federation=replace(tiny_experiment().federation, rounds=3))
    run = tmp_path / "run"
    folder = RunFolder(run, exp, "run-x", signing_key=key)
    arrays = dict(get_arrays(build_model(exp)))
    trained = RoundLog(train=[SiteReport(site="alpha", metrics={M.NUM_PATIENTS: 10.0, M.EPSILON_RUN: 1.0, M.DELTA: 1e-5, M.NOISE_MULTIPLIER: 1.1})])
    evaluated = [SiteReport(site="alpha", metrics={M.NUM_PATIENTS: 3.0, M.AUROC: 0.7}), SiteReport(site="beta", metrics={M.NUM_PATIENTS: 3.0, M.AUROC: 0.6})]
    folder.record_round(1, trained, {M.NUM_PATIENTS: 10.0}, {}, arrays, True, evaluation_pending=True)

    # Act / Assert: pending, then evaluated (the coordinator stopped before round 2's checkpoint): both verify
    assert load_resume_point(run, public_key=key.public_key()).rounds[0].evaluation_pending
    folder.record_evaluation(1, RoundLog(train=trained.train, evaluate=evaluated), {M.AUROC: 0.65})
    point = load_resume_point(run, public_key=key.public_key())
    assert not point.rounds[0].evaluation_pending and point.rounds[0].sites["beta"] == {"eval_auroc": 0.6}
    # ... but its training figures are bound by round 1's checkpoint
    rows = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    (run / "metrics.json").write_text(json.dumps([rows[0] | {"patients_trained": 99.0}]))
    with pytest.raises(CryptoError, match="round 1 is not as recorded"):
        load_resume_point(run, public_key=key.public_key())
    (run / "metrics.json").write_text(json.dumps(rows))
    # ... and once round 2 is recorded, its checkpoint binds round 1's evaluation too
    folder.record_round(2, RoundLog(train=trained.train), {M.NUM_PATIENTS: 10.0}, {}, arrays, True, evaluation_pending=True)
    rows = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    rows[0]["auroc"] = 0.99
    (run / "metrics.json").write_text(json.dumps(rows))
    with pytest.raises(CryptoError, match="rounds 1-2 are not as recorded"):
        load_resume_point(run, public_key=key.public_key())
