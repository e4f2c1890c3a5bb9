"""The coordinator's Flower ServerApp (Message API).

Run config (``pyproject.toml`` [tool.flwr.app.config], overridable with ``--run-config``):
``experiment`` (path to the experiment YAML), ``out`` (run folder), ``run-id``,
``signing-key`` (the coordinator's model-signing private key) and ``resume`` (the run folder
of a deployed run that stopped: the run continues there with its own run id and plan, from
its last recorded round's verified checkpoint; see :mod:`server.resume`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from server.reply_poll import PromptGrid, prompt_reply_pulls
from server.resume import ResumePoint, load_resume_point
from server.run_folder import write_json
from server.sim_wake import reply_signal
from shared import protocol as P  # noqa: N812
from shared import signing
from shared.config import ExperimentConfig, load_experiment
from shared.errors import ConfigError
from shared.faults import FaultPlan

log = logging.getLogger("fedrelapse.server")

DEPLOY_INFO = "deployment.json"  # in a deployed run's folder: what `fedrelapse run --resume` submits again
FLOWER_LOG_ENV = "FEDRELAPSE_FLOWER_LOG"  # in the ServerApp's environment: Flower's log level there (e.g. INFO, DEBUG); default WARNING


def flower_log_level(environ: Mapping[str, str] | None = None) -> int:
    """The level of Flower's own logger in a deployed ServerApp: WARNING (its per-round INFO
    lines, with raw colour codes, would interleave with the round table in `flwr run`'s
    output), or the level named by ``FEDRELAPSE_FLOWER_LOG`` (INFO, DEBUG, ...) to see them."""
    name = (os.environ if environ is None else environ).get(FLOWER_LOG_ENV, "").strip().upper()
    level = logging.getLevelName(name) if name else logging.WARNING
    return level if isinstance(level, int) else logging.WARNING


def resume_from_run_config(folder: str, *, out: str, run_id: str, experiment: str, key_path: Path | None) -> ResumePoint:
    """The checked resume point of a deployed run named by the ``resume`` run-config key.

    ``out``, ``run-id`` and ``experiment``, when given too, must name that same run and plan;
    the checkpoint is verified with the public half of ``key_path`` (the coordinator's key).
    """
    run = Path(folder)
    if out and Path(out).resolve() != run.resolve():
        raise ConfigError(f"Run config asks to resume {run} but to write to {out}; a resumed run continues in its own folder. Leave `out` empty or give the same folder.")
    public_key = signing.load_private(key_path).public_key() if key_path else None
    point = load_resume_point(run, exp=load_experiment(Path(experiment)) if experiment else None, public_key=public_key)
    if run_id and run_id != point.run_id:
        raise ConfigError(f"Run config asks to resume {run} (run {point.run_id}) under run id {run_id!r}; a resumed run keeps its run id. Leave `run-id` empty.")
    return point


def new_run_id(name: str) -> str:
    """``<name>-<UTC time>``: at most 117 characters for a valid experiment name (shared.config)."""
    return f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


def check_run_id(run_id: str) -> str:
    """The run id, if every site will accept it (:func:`shared.protocol.run_id_problem`); else a
    ConfigError before any site is contacted."""
    problem = P.run_id_problem(run_id)
    if problem is not None:
        raise ConfigError(
            f"The run id (run config `{P.RC_RUN_ID}`, or the experiment `name` plus the time) {problem}; every site would refuse it. "
            f"Give a `{P.RC_RUN_ID}` of at most {P.MAX_RUN_ID_CHARS} printable characters."
        )
    return run_id


# In simulation the Grid is in-process: a look for replies costs microseconds, so look often
# (a backstop: a stored reply also wakes the coordinator at once, see server.sim_wake).
SIMULATION_POLL_S = 0.02


def build_server_app(
    exp: ExperimentConfig | None = None, out: Path | None = None, run_id: str = "", signing_key: Path | None = None,
    *, resume: ResumePoint | None = None, faults: FaultPlan | None = None, wrap_grid: Callable[[Grid], Grid] | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """The ServerApp. Simulation passes the experiment directly; deployment reads run config.

    ``resume`` continues a run (checked by :func:`server.resume.load_resume_point`);
    ``faults`` is for fault-injection tests in the Simulation Engine only; ``wrap_grid``
    (simulation only) wraps the Grid: benchmarks count bytes through it. ``stop`` (simulation:
    set by Ctrl-C or SIGTERM, see :mod:`server.interrupt`) ends the run at its next wait.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if exp is None:  # deployed: only Flower's warnings and errors (simulate quiets it itself)
            logging.getLogger("flwr").setLevel(flower_log_level())
        rc = context.run_config
        key_path = signing_key or (Path(str(rc[P.RC_SIGNING_KEY])) if rc.get(P.RC_SIGNING_KEY) else None)
        point, resume_dir = resume, str(rc.get(P.RC_RESUME, "")) if exp is None else ""
        if resume_dir:  # a deployed run continues: checked before any site is contacted
            point = resume_from_run_config(
                resume_dir, out=str(rc.get(P.RC_OUT, "")), run_id=str(rc.get(P.RC_RUN_ID, "")), experiment=str(rc.get(P.RC_EXPERIMENT, "")), key_path=key_path,
            )
            cfg, folder, rid = point.exp, Path(resume_dir), point.run_id
        else:
            cfg = exp or load_experiment(Path(str(rc[P.RC_EXPERIMENT])))
            folder = out or Path(str(rc[P.RC_OUT]))
            rid = run_id or str(rc.get(P.RC_RUN_ID, "")) or new_run_id(cfg.name)
        check_run_id(rid)
        if exp is None:  # deployed: record how to submit this run again if the coordinator stops
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / DEPLOY_INFO, {"engine": "deployment", "run_id": rid, "signing_key": str(key_path.resolve()) if key_path else ""})
        poll = cfg.federation.reply_poll_s if exp is None else min(cfg.federation.reply_poll_s, SIMULATION_POLL_S)
        if exp is None and (why := prompt_reply_pulls()) is not None:
            log.warning("run=%s: %s; a reply may wait 1 s for its objects (Flower's own first retry)", rid, why)
        # simulation: a reply stored in the in-process LinkState ends the wait at once (deployment: None)
        grid = PromptGrid(grid, poll_s=poll, wake=reply_signal(grid), stop=stop)  # type: ignore[assignment]  # replies seen within reply_poll_s, not Flower's 3 s
        run_federation(
            wrap_grid(grid) if wrap_grid else grid, cfg, folder, rid, signing_key=signing.load_private(key_path) if key_path else None,
            resume=point, after_round=faults.after_round if faults else None,
        )

    return server_app


app = build_server_app()  # the Deployment Engine's entry point
