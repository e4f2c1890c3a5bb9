"""The coordinator's Flower ServerApp (Message API).

Run config (``pyproject.toml`` [tool.flwr.app.config], overridable with ``--run-config``):
``experiment`` (path to the experiment YAML), ``out`` (run folder), ``run-id``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from server.resume import ResumePoint
from shared import protocol as P  # noqa: N812
from shared import signing
from shared.config import ExperimentConfig, load_experiment
from shared.faults import FaultPlan


def new_run_id(name: str) -> str:
    return f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


def build_server_app(
    exp: ExperimentConfig | None = None, out: Path | None = None, run_id: str = "", signing_key: Path | None = None,
    *, resume: ResumePoint | None = None, faults: FaultPlan | None = None, wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """The ServerApp. Simulation passes the experiment directly; deployment reads run config.

    ``resume`` continues a run (checked by :func:`server.resume.load_resume_point`);
    ``faults`` is for fault-injection tests in the Simulation Engine only; ``wrap_grid``
    (simulation only) wraps the Grid: benchmarks count bytes through it.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        cfg = exp or load_experiment(Path(str(rc[P.RC_EXPERIMENT])))
        folder = out or Path(str(rc[P.RC_OUT]))
        rid = run_id or str(rc.get(P.RC_RUN_ID, "")) or new_run_id(cfg.name)
        key_path = signing_key or (Path(str(rc[P.RC_SIGNING_KEY])) if rc.get(P.RC_SIGNING_KEY) else None)
        run_federation(
            wrap_grid(grid) if wrap_grid else grid, cfg, folder, rid, signing_key=signing.load_private(key_path) if key_path else None,
            resume=resume, after_round=faults.after_round if faults else None,
        )

    return server_app


app = build_server_app()  # the Deployment Engine's entry point
