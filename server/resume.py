"""Resume a run after a coordinator crash, from the last recorded round's signed checkpoint.

Before anything is sent to a site, the run folder is checked: ``config.yaml`` still has the
plan hash the run was started with (``run.json``), a plan given on the command line is the
same plan, and the checkpoint of the last round in ``metrics.json`` carries this run's id,
that round and that plan hash, its weights match the stored digest, the rounds in
metrics.json are those it was written with (its records digest: earlier rounds whole, its own
round's training part while its evaluation is pending) and the coordinator's signature over
all that verifies; checkpoints/ holds exactly the recorded rounds. Any mismatch refuses the
resume with a sentence saying what and where.

Privacy does not depend on the coordinator getting this right: each site's ledger holds one
signed entry per (run, round) and a site refuses (``replay``) to train or be charged for a
round it has already accounted, so a resumed run never spends a site's budget twice. If the
coordinator crashed in the middle of round k+1, the sites that had trained in it refuse it
on resume and the round is reported without their update.

With ``federation.evaluation: with-next-round`` the last recorded round may still await its
evaluation (``evaluation_pending`` in metrics.json): the resumed run's first train message
asks the sites to evaluate that round's model (the checkpoint it resumes from) first.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import SafetensorError, safe_open

from server.run_folder import LAST_PENDING, RECORDS_DIGEST, RUN_INFO, RoundRecord, checkpoint_path, records_digest
from shared import metrics as M  # noqa: N812
from shared.config import ExperimentConfig, load_experiment
from shared.errors import ConfigError, CryptoError, FederationError
from shared.model_signing import model_digest, verify_checkpoint
from shared.models import build_model
from shared.params import get_arrays


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: same run id and plan, the next round and its model."""

    run_id: str
    exp: ExperimentConfig
    next_round: int  # first round still to run (rounds + 1 when only the summary is missing)
    arrays: OrderedDict[str, np.ndarray]  # the global model after round next_round - 1
    rounds: tuple[RoundRecord, ...]  # rounds already recorded in metrics.json


def read_run(run: Path) -> tuple[str, ExperimentConfig]:
    """The run id and experiment of a run folder; refuse one whose config.yaml was edited."""
    info_path, config_path = run / RUN_INFO, run / "config.yaml"
    if not info_path.is_file() or not config_path.is_file():
        raise ConfigError(f"{run} is not a run folder that can be resumed (no {RUN_INFO} or config.yaml); give the folder a run was started in.")
    info = _written_json(info_path, "a run description", "the run cannot be resumed; restore the file from a backup.")
    missing = [key for key in ("run_id", "plan_hash") if not isinstance(info, dict) or not isinstance(info.get(key), str)]
    if missing:
        raise ConfigError(f"{info_path} is not a run description this version wrote: it has no text field {', '.join(missing)}. "
                          "It was edited or damaged; the run cannot be resumed; restore the file from a backup.")
    run_id, started_hash = info["run_id"], info["plan_hash"]
    exp = load_experiment(config_path)
    if exp.plan_hash() != started_hash:
        raise ConfigError(
            f"{config_path} was changed after run {run_id} started (plan hash {exp.plan_hash()[:16]}, started with {started_hash[:16]}); "
            "a run resumes only with the plan it started with. Restore the file, or start a new run."
        )
    return run_id, exp


def finished_summary(run: Path) -> dict[str, Any] | None:
    """The run's summary.json if the run has finished (then there is nothing to resume),
    checked to have the shape the run folder writes (:func:`summary_problem`)."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    summary = _written_json(path, "a summary", "restore it from a backup.")
    problem = summary_problem(summary)
    if problem:
        raise ConfigError(f"{path} is not a summary this version wrote: {problem}. It was edited or damaged; restore it from a backup.")
    return dict(summary)


def _written_json(path: Path, what: str, remedy: str) -> Any:
    """The JSON in ``path``, a file the run folder writes (UTF-8, atomically); a ConfigError naming
    it as not ``what`` this version wrote, with why and ``remedy``, when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        why = "it is not UTF-8 text (the coordinator writes UTF-8 JSON)"
    except json.JSONDecodeError as exc:
        why = f"it is not valid JSON ({exc})"
    except RecursionError:
        why = "it is nested too deeply to read"
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        why = str(exc)
    raise ConfigError(f"{path} is not {what} this version wrote: {why}. It was edited or damaged; {remedy}")


def _number(value: Any, *, none: bool = True) -> bool:
    """A finite JSON number (not a boolean; an integer below 2**53 in magnitude, so it converts
    to a float exactly and never overflows one), or null when ``none``."""
    if value is None:
        return none
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)


def _kind(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return f"an integer of {len(str(abs(value)))} digits (too large)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (not finite)"
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), f"a {type(value).__name__}")


def _field(obj: dict[str, Any], key: str) -> str:
    """``field `key` is <kind>``, or ``is missing`` when ``obj`` has no ``key``."""
    return f"field `{key}` is " + (_kind(obj[key]) if key in obj else "missing")


def summary_problem(summary: Any) -> str | None:
    """Why ``summary`` (summary.json, loaded) is not what :meth:`RunFolder.finish` writes, as far
    as `run --resume` reads it to report a finished run; None if it is."""
    if not isinstance(summary, dict):
        return f"it holds {_kind(summary)}, expected an object"
    for key in ("run_id", "status"):
        if not isinstance(summary.get(key), str):
            return f"{_field(summary, key)}, expected a string"
    for key in ("rounds_completed", "rounds_planned"):
        if not isinstance(summary.get(key), int) or isinstance(summary.get(key), bool):
            return f"{_field(summary, key)}, expected a whole number"
    for key, none in (("final_federated_auroc", True), ("final_federated_auprc", True), ("wall_time_s", False)):
        if not _number(summary.get(key), none=none):
            return f"{_field(summary, key)}, expected a number" + (" or null" if none else "")
    sites = summary.get("sites")
    if not isinstance(sites, dict):
        return f"{_field(summary, 'sites')}, expected an object of sites"
    for site, entry in sites.items():
        if not isinstance(entry, dict):
            return f"`sites.{site}` is {_kind(entry)}, expected an object"
        for key in ("epsilon", "delta", "noise_multiplier"):
            if not _number(entry.get(key)):
                return f"`sites.{site}.{key}` is {_kind(entry.get(key))}, expected a number or null"
    refusals = summary.get("refusals", [])
    if not isinstance(refusals, list) or not all(isinstance(r, dict) and {"round", "site", "reason"} <= set(r) for r in refusals):
        return "field `refusals` is not a list of objects with `round`, `site` and `reason`"
    if not isinstance(summary.get("baselines", {}), dict):
        return f"field `baselines` is {_kind(summary.get('baselines'))}, expected an object"
    return None


TEXT_ENTRIES = ("error", "ledger_head", "eval", "eval_error", "eval_ledger_head")  # a site's entry in a round: these are strings, `refused` an object, the rest numbers (or null)


def round_problem(raw: Any) -> str | None:
    """Why one element of metrics.json is not a round record as :class:`RunFolder` writes it
    (field names and types, each site's entry), or None."""
    if not isinstance(raw, dict):
        return f"it is {_kind(raw)}, expected an object"
    names = [f.name for f in fields(RoundRecord)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        return f"unknown field(s) {unknown}"
    missing = [n for n in names if n not in raw]
    if missing:
        return f"field(s) {missing} are missing"
    if not isinstance(raw["round"], int) or isinstance(raw["round"], bool):
        return f"field `round` is {_kind(raw['round'])}, expected a whole number"
    for key in ("train_loss", "auroc", "auprc", "eval_loss", "wall_s", "patients_trained"):
        if not _number(raw[key], none=key != "patients_trained"):
            return f"field `{key}` is {_kind(raw[key])}, expected a number"
    for key in ("updated", "evaluation_pending"):
        if not isinstance(raw[key], bool):
            return f"field `{key}` is {_kind(raw[key])}, expected true or false"
    if not isinstance(raw["note"], str):
        return f"field `note` is {_kind(raw['note'])}, expected a string"
    if not isinstance(raw["sites"], dict):
        return f"field `sites` is {_kind(raw['sites'])}, expected an object of site entries"
    for site, entry in raw["sites"].items():
        problem = _site_entry_problem(entry)
        if problem:
            return f"`sites.{site}`: {problem}"
    return None


def _site_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"it is {_kind(entry)}, expected an object"
    for key, value in entry.items():
        if key == "refused":
            if not (isinstance(value, dict) and isinstance(value.get("code"), str) and "reason" in value and isinstance(value["reason"], (str, type(None)))):
                return "`refused` is not an object with a string `code` and `reason`"
        elif key in TEXT_ENTRIES:
            if not isinstance(value, str):
                return f"`{key}` is {_kind(value)}, expected a string"
        elif not _number(value):
            return f"`{key}` is {_kind(value)}, expected a number or null"
    if M.EPSILON_RUN in entry and not {M.DELTA, M.NOISE_MULTIPLIER} <= set(entry):
        return f"`{M.EPSILON_RUN}` is given without `{M.DELTA}` and `{M.NOISE_MULTIPLIER}`"
    return None


def recorded_rounds(run: Path, planned: int) -> tuple[RoundRecord, ...]:
    """The rounds in metrics.json, checked to be 1..k with k <= the planned rounds."""
    path = run / "metrics.json"
    if not path.is_file():
        return ()
    raw = _written_json(path, "a metrics file", "restore it (the run cannot be resumed from it).")
    if not isinstance(raw, list):
        raise ConfigError(f"{path} holds {_kind(raw)}, expected a list of rounds; it was edited or damaged. Restore it; the run cannot be resumed from it.")
    for i, r in enumerate(raw, start=1):
        problem = round_problem(r)
        if problem:
            raise ConfigError(f"{path}: its round record {i} is not one this version writes ({problem}); it was edited or damaged. Restore it; the run cannot be resumed from it.")
    rounds = tuple(RoundRecord(**r) for r in raw)
    numbers = [r.round for r in rounds]
    if numbers != list(range(1, len(numbers) + 1)) or len(numbers) > planned:
        raise ConfigError(f"{path} lists rounds {numbers}; expected 1..k with k <= {planned}. It was edited; the run cannot be resumed.")
    return rounds


def load_checkpoint_checked(
    run: Path, *, run_id: str, server_round: int, exp: ExperimentConfig, public_key: Ed25519PublicKey | None, rounds: tuple[RoundRecord, ...] | None = None,
) -> OrderedDict[str, np.ndarray]:
    """The global model after ``server_round``, only if intact, signed and of this run and plan;
    with ``rounds`` (metrics.json's rounds 1..server_round), only if they are the rounds the
    checkpoint was written with (:func:`server.run_folder.records_digest`)."""
    path = checkpoint_path(run, server_round)
    if not path.is_file():
        raise CryptoError(f"{path} is missing: round {server_round} is recorded in metrics.json but its checkpoint is not; the run cannot be resumed.")
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            loaded = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError, ValueError) as exc:
        raise CryptoError(f"{path} cannot be read as a checkpoint ({exc}); it is damaged or was altered.") from None
    expected = get_arrays(build_model(exp))
    if set(loaded) != set(expected) or any(loaded[k].shape != v.shape or loaded[k].dtype != v.dtype for k, v in expected.items()):
        raise CryptoError(f"{path} does not hold the parameters of the plan's model (names, shapes or dtypes differ); it was altered or belongs to another plan.")
    arrays = OrderedDict((k, loaded[k]) for k in expected)  # the model's order, which the digest covers
    plan_hash = exp.plan_hash()
    for key, want in (("run_id", run_id), ("round", str(server_round)), ("plan_hash", plan_hash)):
        if meta.get(key) != want:
            raise CryptoError(f"{path} records {key}={meta.get(key)!r}, expected {want!r}; it belongs to another run, round or plan.")
    if meta.get("digest") != model_digest(arrays):
        raise CryptoError(f"{path}: the weights do not match the digest stored with them; the checkpoint was altered or damaged.")
    bound = meta.get(RECORDS_DIGEST)  # None: written before round records were bound (its signature has the older form)
    if rounds is not None and bound is not None:
        pending = meta.get(LAST_PENDING) == "true"
        if records_digest([asdict(r) for r in rounds], last_pending=pending) != bound:
            raise CryptoError(
                f"{run / 'metrics.json'}: {'round 1 is' if server_round == 1 else f'rounds 1-{server_round} are'} not as recorded when {path} was written (its {RECORDS_DIGEST} differs); "
                "metrics.json was edited (a refusal, an ε, `updated` or another figure). Restore it; the run is not resumed from an altered record."
            )
    if public_key is None:
        if "signature" in meta:
            raise CryptoError(f"{path} is signed; give the coordinator's model-signing key so the signature can be checked before resuming.")
        return arrays
    if not verify_checkpoint(public_key, arrays, meta.get("signature", ""), run_id=run_id, server_round=server_round, plan_hash=plan_hash, records_digest=bound):
        raise CryptoError(f"{path}: the coordinator's signature does not verify (unsigned, altered, or signed with another key); the run is not resumed from it.")
    return arrays


def check_checkpoints_listed(run: Path, recorded: int) -> None:
    """A CryptoError unless checkpoints/ holds exactly rounds 1..``recorded`` (every round
    recorded in metrics.json writes its checkpoint just before its record)."""
    found = sorted(int(m.group(1)) for f in (run / "checkpoints").glob("round-*.safetensors") if (m := re.fullmatch(r"round-(\d+)\.safetensors", f.name)))
    listed = {0: "no round", 1: "round 1"}.get(recorded, f"rounds 1-{recorded}")
    beyond = [n for n in found if n > recorded]
    if beyond == [recorded + 1]:  # one checkpoint ahead: also what a stop between a checkpoint and its record leaves
        raise CryptoError(
            f"{run / 'checkpoints'} holds the checkpoint of round {recorded + 1} but {run / 'metrics.json'} lists {listed}. Either metrics.json "
            f"was edited (restore it), or the coordinator stopped between writing round {recorded + 1}'s checkpoint and its record: then move "
            f"{checkpoint_path(run, recorded + 1)} out of checkpoints/ and resume again (that round runs again; sites that trained in it refuse it as a replay)."
        )
    if beyond:  # a stop leaves at most one checkpoint without its record, and only the next round's
        ahead = f"the checkpoint of round {beyond[0]}" if len(beyond) == 1 else f"the checkpoints of rounds {beyond}"
        raise CryptoError(
            f"{run / 'checkpoints'} holds {ahead} but {run / 'metrics.json'} lists {listed}; each round's record is "
            "written right after its checkpoint, so metrics.json was edited or replaced (or checkpoints/ is another run's). Restore it; the run cannot be resumed."
        )
    missing = [n for n in range(1, recorded + 1) if n not in found]
    if missing:
        raise CryptoError(
            f"{run / 'metrics.json'} lists {listed} but {run / 'checkpoints'} has no checkpoint of round(s) {missing}; each recorded round "
            "writes one, so they were deleted or the folder is not this run's. Restore them; the run cannot be resumed."
        )


def load_resume_point(run: Path, *, exp: ExperimentConfig | None = None, public_key: Ed25519PublicKey | None = None) -> ResumePoint:
    """Everything a resumed run needs, after every check in the module docstring."""
    run_id, stored = read_run(run)
    if exp is not None and exp.plan_hash() != stored.plan_hash():
        raise ConfigError(
            f"The experiment given ({exp.name}, plan hash {exp.plan_hash()[:16]}) is not the plan run {run_id} started with "
            f"({stored.plan_hash()[:16]}, {run / 'config.yaml'}); a run resumes only with its own plan. Start a new run for a new plan."
        )
    if (run / "summary.json").is_file():  # whatever it holds (`run --resume` checks it before reporting it)
        raise FederationError(f"Run {run_id} in {run} has already finished (summary.json exists); there is nothing to resume.")
    rounds = recorded_rounds(run, stored.federation.rounds)
    if rounds:
        arrays = load_checkpoint_checked(run, run_id=run_id, server_round=len(rounds), exp=stored, public_key=public_key, rounds=rounds)
    else:  # crashed before round 1 was recorded: the plan's seeded initial model
        arrays = get_arrays(build_model(stored))
    check_checkpoints_listed(run, len(rounds))
    return ResumePoint(run_id=run_id, exp=stored, next_round=len(rounds) + 1, arrays=arrays, rounds=rounds)
