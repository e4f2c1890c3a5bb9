"""Run a whole consortium on one machine with Flower's Simulation Engine.

Each hospital folder under ``--data`` holds a ``site.yaml``; sites first check their data
and fill their feature caches (what each hospital's IT does with ``fedrelapse site check``),
then the same ServerApp and ClientApp that the Deployment Engine runs are simulated.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from client.audio import TOO_SHORT
from server.interrupt import StopRequested, interrupted, stop_on_signals
from server.resume import ResumePoint, finished_summary, load_resume_point, read_run
from shared.config import ExperimentConfig, FeatureConfig, SiteConfig, load_experiment, load_site
from shared.console import output_console
from shared.errors import ConfigError, DataError, FederationError
from shared.faults import FaultPlan
from shared.flower_env import disable_flower_telemetry_here

SIM_INFO = "simulation.json"  # where the cohort is, so `fedrelapse run --resume` can find it

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod
    from flwr.serverapp import Grid

    from client.prepare import SiteData


SYNTH_HINT = "fedrelapse synth --config configs/cohort.yaml --out {data}"


def discover_sites(data: Path) -> list[Path]:
    """site.yaml files of the hospitals under ``data`` (``data/<hospital>/site.yaml``, or
    ``data/site.yaml`` for one hospital); two with the same site ``name`` are a
    :class:`ConfigError` naming both files. A folder without them is a ConfigError that says
    what ``data`` is instead (missing, empty, a run folder, something else)."""
    if not data.exists():
        raise ConfigError(
            f"The cohort folder {data} does not exist; check the path, or make a synthetic cohort there with `{SYNTH_HINT.format(data=data)}`."
        )
    if not data.is_dir():
        raise ConfigError(f"{data} is a file, not a cohort folder; --data wants the folder that holds one <hospital>/site.yaml per hospital.")
    if (data / "site.yaml").is_file():
        return [data / "site.yaml"]
    found = sorted(data.glob("*/site.yaml"))
    if not found:
        raise ConfigError(_no_sites_message(data))
    named: dict[str, Path] = {}
    for path in found:
        name = load_site(path).name
        if name in named:
            raise ConfigError(
                f"{named[name]} and {path} both name their site {name!r}; each site needs its own `name` in site.yaml "
                f"(the coordinator tells sites, their metrics and refusals apart by it). Rename one of them."
            )
        named[name] = path
    return found


def too_few_sites(data: Path, n_sites: int, min_nodes: int) -> str | None:
    """Why a simulated run over the ``n_sites`` sites under ``data`` cannot start (rounds wait
    for ``federation.min_nodes`` sites), or None; `simulate` refuses with it and `plan` says it."""
    if n_sites >= min_nodes:
        return None
    return (
        f"{data} has {n_sites} site(s) but `federation.min_nodes` is {min_nodes}, so a run could not start; "
        f"give --data a folder with at least {min_nodes} hospital folders, or lower `federation.min_nodes` in the experiment YAML."
    )


def _no_sites_message(data: Path) -> str:
    """Why ``data`` (an existing folder) holds no ``<hospital>/site.yaml``, and what to give instead."""
    layout = f"--data wants the cohort folder, with one <hospital>/site.yaml per hospital (e.g. {data / 'bergen' / 'site.yaml'})"
    if (data / "run.json").is_file():
        cohort = ""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            cohort = str(json.loads((data / SIM_INFO).read_text(encoding="utf-8"))["data"])
        return f"{data} is a run folder (it has run.json), not a cohort; {layout}" + (f": this run's cohort is {cohort}." if cohort else ".")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in data.iterdir() if not p.name.startswith("."))
    if not entries:
        return f"The cohort folder {data} is empty; make a synthetic cohort there with `{SYNTH_HINT.format(data=data)}`, or give the folder that holds your hospitals' folders."
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    return f"No <hospital>/site.yaml under {data} (it holds {shown}); {layout}, or one hospital's folder with its site.yaml."


RUN_MARKERS = ("run.json", "summary.json", "metrics.json", "config.yaml", SIM_INFO, "checkpoints")


def refuse_existing_run(out: Path) -> None:
    """A :class:`ConfigError` when ``out`` already holds a run: a second run there would
    overwrite some of its files and mix the two runs' checkpoints and metrics."""
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found:
        raise ConfigError(
            f"The run folder {out} already holds a run ({', '.join(found)}); a new run there would overwrite it and mix the two. "
            f"Give --out a new folder, or, to continue that run after it stopped, use `fedrelapse run --resume {out}`."
        )


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
            data = prepare_site(site.manifest, exp.features, site.state_dir / "features", language=exp.language, speech=exp.speech,
                                progress=functools.partial(_advance, bar, task))
            require_usable_sessions(site, data, exp.features)
            reports.append({"site": site.name, **data.report()})
    return reports


def _advance(bar: Progress, task: TaskID, done: int, total: int) -> None:
    bar.update(task, completed=done, total=total)


def require_usable_sessions(site: SiteConfig, data: SiteData, features: FeatureConfig) -> None:
    """A :class:`DataError` when ``site`` has no usable session, saying when recordings were
    skipped for being shorter than ``features.min_seconds`` (counts only: this message is
    shown where the site's data is, on the machine that prepared it)."""
    if data.sessions:
        return
    short = sum(p.field == "audio_path" and TOO_SHORT in p.message for p in data.problems)
    why = (
        f" {short} of its {data.manifest.total_rows} recordings are shorter than `features.min_seconds` ({features.min_seconds:g} s) "
        f"of the experiment YAML and were skipped; lower features.min_seconds below the recordings' length."
        if short else ""
    )
    raise DataError(
        f"Site {site.name}: no usable session in {site.manifest}.{why} "
        f"Run `fedrelapse site check --manifest {site.manifest} --experiment <this experiment YAML>` for each row's reason."
    )


def ray_backend_config(*, n_sites: int, cpus: int | None = None, ray_address: str | None = None, gpus_per_site: float = 0.0) -> dict[str, Any]:
    """Flower's Ray backend config: a local Ray instance, or an existing cluster at ``ray_address``.

    With an address (``auto`` or ``ray://head:10001``; also taken from ``RAY_ADDRESS``),
    Flower's ``ray.init(**init_args)`` joins that cluster and its resources decide how many
    sites run at once; otherwise a private instance with ``cpus`` CPUs (default: one per site,
    at most this machine's cores) is started. ``gpus_per_site`` lets sites share GPUs
    (0.25: four sites per GPU).
    """
    if not 0.0 <= gpus_per_site <= 1.0:
        raise ConfigError(f"gpus_per_site is {gpus_per_site}; use a share of one GPU between 0 and 1 (0.25 puts four sites on a GPU).")
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    resources = {"num_cpus": 1, "num_gpus": gpus_per_site}
    if address:
        return {"client_resources": resources, "init_args": {"address": address, "logging_level": "ERROR", "log_to_driver": False}}
    n_cpus = cpus or max(1, min(n_sites, os.cpu_count() or 1))
    ray_tmp = Path(os.environ.get("FEDRELAPSE_RAY_TMP", "/tmp/fedrelapse-ray"))
    n_gpus = 1 if gpus_per_site > 0 else 0
    return {
        "client_resources": resources,
        "init_args": {"num_cpus": n_cpus, "num_gpus": n_gpus, "include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False, "_temp_dir": str(ray_tmp)},
    }


def simulate(
    exp: ExperimentConfig, data: Path, out: Path, *, run_id: str, console: Console | None = None, cpus: int | None = None,
    resume: ResumePoint | None = None, faults: FaultPlan | None = None, ray_address: str | None = None, gpus_per_site: float = 0.0,
    wrap_grid: Callable[[Grid], Grid] | None = None, client_mods: tuple[Mod, ...] = (),
) -> dict[str, Any]:
    """Prepare the sites, run the federation, return ``summary.json``'s content.

    ``resume``: continue the run in ``out`` (use :func:`resume_simulation`). ``faults``: inject
    site and coordinator faults (tests only; see :mod:`shared.faults`). ``ray_address``: run
    on an existing Ray cluster (see :func:`ray_backend_config`). ``wrap_grid`` wraps the
    coordinator's Grid (benchmarks count bytes, tests record every reply); ``client_mods``
    run inside the sites' SecAgg+ mod (tests inject faults there).
    """
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from server.sim_dispatch import linear_dispatch

    console = console or output_console()
    if resume is None:
        refuse_existing_run(out)
    paths = discover_sites(data)
    sites = [load_site(p) for p in paths]
    too_few = too_few_sites(data, len(sites), exp.federation.min_nodes)
    if too_few:
        raise ConfigError(too_few)
    backend_config = ray_backend_config(n_sites=len(sites), cpus=cpus, ray_address=ray_address, gpus_per_site=gpus_per_site)
    if "address" in backend_config["init_args"]:  # before the run folder is written: a cluster that is not there leaves nothing behind
        check_ray_address(str(backend_config["init_args"]["address"]))
    created = not out.exists()  # an interrupted new run removes only a folder it made itself
    with stop_on_signals() as stopper:
        try:
            prepare_sites(sites, exp, console)
            signing_key = consortium_signing_key(data)
            out.mkdir(parents=True, exist_ok=True)
            if resume is None:
                (out / SIM_INFO).write_text(json.dumps({"engine": "simulation", "data": str(data.resolve())}, indent=2) + "\n", encoding="utf-8")
            # every actor keeps all the sites it serves loaded (inherited by the local Ray's workers)
            os.environ["FEDRELAPSE_SITE_CACHE"] = str(max(4, len(sites)))
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            disable_flower_telemetry_here()  # run_simulation and its Ray workers post no usage events
            logging.getLogger("flwr").setLevel(logging.ERROR)  # run_simulation's deprecation banner is noise here
            stopper.deferred = True  # from here a signal asks the coordinator to stop at its next wait (server.interrupt)
            # Flower's own dispatch costs N² per 0.1 s (see server.sim_dispatch)
            with linear_dispatch(), stopper.reclaimed_after_ray_init():
                run_simulation(
                    server_app=build_server_app(exp, out, run_id, signing_key, resume=resume, faults=faults, wrap_grid=wrap_grid, stop=stopper.stop),
                    client_app=build_client_app(tuple(str(p.resolve()) for p in paths), faults, client_mods),
                    num_supernodes=len(sites),
                    backend_name="ray",
                    backend_config=backend_config,
                )
        except BaseException as exc:
            # Ray's driver replaces the SIGTERM handler with sys.exit(15) once it has started
            by_sigterm = isinstance(exc, SystemExit) and exc.code == signal.SIGTERM
            interrupted_now = stopper.stop.is_set() or by_sigterm or isinstance(exc, (KeyboardInterrupt, StopRequested))
            stopper.stop.set()  # the coordinator's thread, if it still waits for sites or replies, ends now (Python waits for it at exit)
            if interrupted_now:
                raise interrupted(out, folder_written=_keep_interrupted_folder(out, new_run=resume is None, created=created)) from None
            raise
        if stopper.stop.is_set() and not (out / "summary.json").exists():  # stopped while Flower was shutting down
            raise interrupted(out, folder_written=_keep_interrupted_folder(out, new_run=resume is None, created=created))
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise FederationError(f"The simulation ended without writing {summary_path}; see the log above for the failing round.")
    return json.loads(summary_path.read_text())


def _keep_interrupted_folder(out: Path, *, new_run: bool, created: bool) -> bool:
    """Whether a run stopped by a signal left a run folder to resume. A new run stopped before
    its coordinator wrote run.json has nothing to resume: what this run wrote (simulation.json,
    and the folder itself when this run ``created`` it and it is then empty) is removed, so the
    same --out can be used again; a folder that was there before the run is left in place."""
    if not new_run or (out / "run.json").exists():
        return True
    (out / SIM_INFO).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty
    return False


RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A :class:`FederationError` (one sentence naming the address) when no Ray cluster answers
    at ``address``: ``ray://host:port`` (Ray Client, port 10001 by default) or ``host:port`` (the
    head's GCS) must accept a TCP connection within ``timeout_s``; ``auto`` must find a running
    cluster by Ray's own lookup (``ray start``'s address file, then the local GCS processes)."""
    what = "leave out --ray-address (and RAY_ADDRESS) to run on a private Ray on this machine"
    if address in ("local",):
        return
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FederationError(f"--ray-address auto found no running Ray cluster on this machine ({first}); start one with `ray start --head`, or {what}.") from None
    else:
        target = address.removeprefix("ray://")
    default_port = 10001 if address.startswith("ray://") else 6379
    try:
        parsed = urllib.parse.urlsplit(f"//{target}")  # host:port, [::1]:10001, [::1], host
        host, port = parsed.hostname, parsed.port or default_port
        if not host or parsed.path or parsed.query or parsed.fragment:
            raise ValueError(target)
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ValueError:
        raise ConfigError(f"--ray-address {address} is not an address; give `auto`, `ray://HOST:PORT` (Ray Client, usually port 10001) or HOST:PORT of the head's GCS.") from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            why = f"no answer within {timeout_s:g} s"
        raise FederationError(
            f"Cannot reach the Ray cluster at {address} ({why}); start it there with `ray start --head` (Ray Client listens on port 10001), "
            f"check the address, or {what}. Nothing was written."
        ) from None


def resume_simulation(run: Path, *, config: Path | None = None, console: Console | None = None, cpus: int | None = None, faults: FaultPlan | None = None) -> dict[str, Any]:
    """Continue a simulated run that stopped before its summary was written (same run id).

    ``config``, when given, must be the plan the run started with. The checkpoint is checked
    with the simulated coordinator's signing key (``<data>/consortium``) before any round runs.
    """
    from shared import signing

    read_run(run)  # a run folder at all, with an unedited config.yaml
    info_path = run / SIM_INFO
    if not info_path.is_file():
        raise ConfigError(f"{run} has no {SIM_INFO}: it was not started by `fedrelapse simulate` (or predates resume support); it cannot be resumed here.")
    if finished_summary(run) is not None:
        raise FederationError(f"The run in {run} has already finished (summary.json exists); there is nothing to resume.")
    try:
        data = Path(json.loads(info_path.read_text(encoding="utf-8"))["data"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{info_path} is not readable ({exc}); the run cannot be resumed.") from None
    key = data / "consortium" / "model-signing.key"
    if not key.is_file():
        raise ConfigError(f"The simulated coordinator's signing key {key} is gone; the checkpoints of {run} cannot be verified, so the run is not resumed.")
    point = load_resume_point(run, exp=load_experiment(config) if config else None, public_key=signing.load_private(key).public_key())
    return simulate(point.exp, data, run, run_id=point.run_id, console=console, cpus=cpus, resume=point, faults=faults)
