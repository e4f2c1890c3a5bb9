"""Run a whole consortium on one machine with Flower's Simulation Engine.

Each hospital folder under ``--data`` holds a ``site.yaml``; sites first check their data
and fill their feature caches (what each hospital's IT does with ``fedrelapse site check``),
then the same ServerApp and ClientApp that the Deployment Engine runs are simulated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.config import ExperimentConfig, SiteConfig, load_site
from shared.errors import ConfigError, FederationError

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod
    from flwr.serverapp import Grid


def discover_sites(data: Path) -> list[Path]:
    """site.yaml files of the hospitals under ``data`` (``data/<hospital>/site.yaml``)."""
    if (data / "site.yaml").is_file():
        return [data / "site.yaml"]
    found = sorted(data.glob("*/site.yaml"))
    if not found:
        raise ConfigError(f"No hospital folder with a site.yaml under {data}; run `fedrelapse synth --out {data}` first.")
    return found


def consortium_signing_key(data: Path) -> Path:
    """The simulated coordinator's model-signing key (``data/consortium/``), made on first use.
    Synthetic sites' site.yaml point their ``coordinator_public_key`` at its public half."""
    from shared import signing

    key = data / "consortium" / "model-signing.key"
    if not key.exists():
        signing.generate(key, data / "consortium" / "model-signing.pub.pem")
    return key


def prepare_sites(sites: list[SiteConfig], exp: ExperimentConfig, console: Console) -> list[dict[str, Any]]:
    """Check each site's data and fill its feature cache, with a progress bar."""
    from client.prepare import prepare_site

    reports = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as bar:
        for site in sites:
            task = bar.add_task(f"site {site.name}: checking data, extracting features", total=None)
            data = prepare_site(site.manifest, exp.features, site.state_dir / "features", progress=lambda d, t, task=task: bar.update(task, completed=d, total=t))
            reports.append({"site": site.name, **data.report()})
    return reports


def simulate(
    exp: ExperimentConfig, data: Path, out: Path, *, run_id: str, console: Console | None = None, cpus: int | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None, client_mods: tuple[Mod, ...] = (),
) -> dict[str, Any]:
    """Prepare the sites, run the federation, return ``summary.json``'s content.

    ``wrap_grid`` wraps the coordinator's Grid (benchmarks count bytes, tests record every
    reply); ``client_mods`` run inside the sites' SecAgg+ mod (tests inject faults there).
    """
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    console = console or Console()
    paths = discover_sites(data)
    sites = [load_site(p) for p in paths]
    if len(sites) < exp.federation.min_nodes:
        raise ConfigError(f"{data} has {len(sites)} site(s) but `federation.min_nodes` is {exp.federation.min_nodes}.")
    prepare_sites(sites, exp, console)
    signing_key = consortium_signing_key(data)
    out.mkdir(parents=True, exist_ok=True)
    cpus = cpus or max(1, min(len(sites), os.cpu_count() or 1))
    ray_tmp = Path(os.environ.get("FEDRELAPSE_RAY_TMP", "/tmp/fedrelapse-ray"))
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False, "_temp_dir": str(ray_tmp)},
    }
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # run_simulation's deprecation banner is noise here
    run_simulation(
        server_app=build_server_app(exp, out, run_id, signing_key, wrap_grid=wrap_grid),
        client_app=build_client_app(tuple(str(p.resolve()) for p in paths), client_mods),
        num_supernodes=len(sites),
        backend_name="ray",
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise FederationError(f"The simulation ended without writing {summary_path}; see the log above for the failing round.")
    return json.loads(summary_path.read_text())
