"""The one `fedrelapse` command, grouped by role (see docs/runbooks).

researcher: synth, simulate, bench · hospital IT: site check · DPO: (ledger in site state).
User mistakes end with a one-paragraph message and the domain's exit code, not a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from server.interrupt import RunInterrupted, stop_on_signals
from shared.console import output_console
from shared.errors import FedrelapseError

if TYPE_CHECKING:
    from server.node_registry import NodeRegistry
    from shared.config import SiteConfig


def _typer(**kwargs: Any) -> typer.Typer:
    """A command group whose crash report never prints local variables: on an unexpected error
    typer would otherwise show every frame's locals (manifest rows, transcripts, keys)."""
    return typer.Typer(pretty_exceptions_show_locals=False, **kwargs)


app = _typer(help="fedrelapse: federated, differentially private speech relapse models.", no_args_is_help=True, add_completion=False)
site_app = _typer(help="Hospital IT and DPO: check data, keys, privacy budget.", no_args_is_help=True)
app.add_typer(site_app, name="site")
console = output_console()  # wide when stdout is not a terminal (files, CI logs): see shared.console
err_console = Console(stderr=True)  # progress bars: stdout stays clean for --json
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn FedrelapseError into a clear message on standard error and its exit code (standard
    output stays for results: `site check --json > report.json` holds JSON or nothing)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunInterrupted as exc:  # Ctrl-C or SIGTERM: not an error, a report of where the run stands
            err_console.print(f"[yellow]{escape(str(exc))}[/yellow]", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except FedrelapseError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except PermissionError as exc:  # a file of another user that no check above named: still a sentence, not a traceback
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            err_console.print(
                f"[bold red]error:[/bold red] {escape(what)}. Run fedrelapse as the user that owns these files (e.g. the site's "
                "service user), or let this user read and write them.", soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


RUN_EXIT_CODES = (
    "Exit codes (as in docs/runbook-researcher.md): 0 the run completed; 2 a YAML file or option is wrong, or --out already holds a run; "
    "3 a site's data cannot be used (missing manifest, no usable session); 4 a site's privacy policy refused the run before start; "
    "5 a key, signature or checkpoint digest does not verify; 6 the run could not start or finish (e.g. --ray-address unreachable), or ended incomplete (a round had no usable update); "
    "130 stopped by Ctrl-C or SIGTERM (the run folder is kept: continue with `fedrelapse run --resume RUN`)."
)


def _run_exit_codes_in_help(fn: F) -> F:
    """Append :data:`RUN_EXIT_CODES` to a command's help (its docstring) as its last paragraph:
    `simulate` and `run` say the same, from one text."""
    fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n{RUN_EXIT_CODES}"
    return fn


@app.command()
@friendly
def synth(
    config: Annotated[Path, typer.Option(help="Cohort YAML (configs/cohort.yaml).")],
    out: Annotated[Path, typer.Option(help="Folder to write one sub-folder per hospital into.")],
    seed: Annotated[int | None, typer.Option(help="Override the YAML's seed.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
) -> None:
    """Synthesise a multi-hospital speech cohort with espeak-ng (optional GPL extra)."""
    from shared.synth.cohort import synthesize_cohort
    from shared.synth.config import load_cohort

    cohort = load_cohort(config)
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        raise typer.BadParameter("`synth` needs the optional extra: pip install 'fedrelapse[synth]'.") from None
    with _progress() as bar:
        task = bar.add_task("synthesising patients", total=sum(h.n_patients for h in cohort.hospitals))
        manifests = synthesize_cohort(cohort, out, seed=seed, workers=workers, progress=lambda d, t: bar.update(task, completed=d))
    for name, path in manifests.items():
        console.print(f"  {name}: {path}")


@app.command()
@_run_exit_codes_in_help
@friendly
def simulate(
    config: Annotated[Path, typer.Option(help="Experiment YAML (configs/experiment.yaml).")],
    data: Annotated[Path, typer.Option(help="Cohort folder with one <hospital>/site.yaml each.")],
    out: Annotated[Path, typer.Option(help="Run folder to create.")],
    centralised: Annotated[bool, typer.Option("--centralised", help="Also train the pooled, non-private baseline and the one-feature baseline.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Join an existing Ray cluster (auto, or ray://head:10001; RAY_ADDRESS works too) instead of starting one here.")] = None,
    gpus_per_site: Annotated[float, typer.Option(help="Share of a GPU each simulated site gets (0.25: four sites per GPU).", min=0.0, max=1.0)] = 0.0,
) -> None:
    """Run the federation in Flower's Simulation Engine and print a summary."""
    from server.app import new_run_id
    from server.simulate import simulate as run_sim
    from shared.config import load_experiment

    exp = load_experiment(config)
    summary = run_sim(exp, data, out, run_id=new_run_id(exp.name), console=console, ray_address=ray_address, gpus_per_site=gpus_per_site)
    if centralised:
        from server.baselines import run_baselines

        base = run_baselines(exp, data)
        summary["baselines"] = base
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    _exit_with_run_status(summary)


@app.command("run")
@_run_exit_codes_in_help
@friendly
def run_cmd(
    resume: Annotated[Path, typer.Option("--resume", help="Run folder of a run that stopped (coordinator crash) to continue.")],
    config: Annotated[Path | None, typer.Option(help="Experiment YAML; if given, it must be the plan the run started with.")] = None,
    superlink: Annotated[str | None, typer.Option(help="Deployed runs: the SuperLink's HOST:PORT (its Control API) to submit the resumed run to.")] = None,
    keys: Annotated[Path | None, typer.Option(help="Deployed runs: the `fedrelapse keys` folder (its ca/ca.pem reaches the SuperLink over TLS).")] = None,
    timeout_s: Annotated[float, typer.Option(help="Deployed runs: give up waiting for the resumed run after this many seconds.")] = 24 * 3600.0,
) -> None:
    """Continue a run after a coordinator crash, from its last verified checkpoint (same run id).

    The checkpoint's digest and the coordinator's signature are checked and the plan must be unchanged. Sites refuse to train or be charged again for a round they already accounted, so no privacy budget is spent twice. Works for runs made by `fedrelapse simulate` and for deployed runs (the run folder has deployment.json; give --superlink and --keys: the run is submitted again with `flwr run`).

    A finished run is reported and left as it is; the command then ends with that run's code (0 completed, 4 refused before start, 6 incomplete).
    """
    from server.app import DEPLOY_INFO
    from server.resume import finished_summary, read_run
    from server.simulate import resume_simulation

    done = finished_summary(resume)
    if done is not None:
        run_id, _ = read_run(resume)
        console.print(f"run {escape(run_id)} has already finished (status: {escape(str(done.get('status')))}); nothing to resume, nothing was changed.")
        print_summary(done, resume)
        _exit_with_run_status(done)
        return
    if (resume / DEPLOY_INFO).is_file():
        summary = _resume_deployed(resume, config=config, superlink=superlink, keys=keys, timeout_s=timeout_s)
    else:
        if superlink or keys:
            raise typer.BadParameter(f"{resume} has no {DEPLOY_INFO}: it is not a deployed run, so --superlink/--keys do not apply.")
        summary = resume_simulation(resume, config=config, console=console)
    print_summary(summary, resume)
    _exit_with_run_status(summary)


def _resume_deployed(run: Path, *, config: Path | None, superlink: str | None, keys: Path | None, timeout_s: float) -> dict[str, Any]:
    """Check the run folder here, then `flwr run` the app bundle with ``resume=RUN`` at ``superlink``."""
    import os
    import subprocess
    import tempfile

    from server.app import DEPLOY_INFO
    from server.deployment import APP_DIR, flwr_run_argv
    from server.node_registry import write_connection
    from server.resume import finished_summary, load_resume_point
    from shared import protocol as P  # noqa: N812
    from shared import signing
    from shared.config import load_experiment
    from shared.errors import ConfigError, FederationError
    from shared.flower_env import without_flower_telemetry

    if not superlink or keys is None:
        raise typer.BadParameter(f"{run} is a deployed run: give --superlink HOST:PORT (the running SuperLink) and --keys (the consortium keys folder) to resume it.")
    ca = keys / "ca" / "ca.pem"
    if not ca.is_file():
        raise typer.BadParameter(f"{ca} does not exist; give the keys folder made by `fedrelapse keys ca`.")
    try:
        key_text = str(json.loads((run / DEPLOY_INFO).read_text(encoding="utf-8"))["signing_key"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{run / DEPLOY_INFO} is not readable ({exc}); the run cannot be resumed.") from None
    key = Path(key_text) if key_text else None
    if key is not None and not key.is_file():
        raise ConfigError(f"The coordinator's signing key {key} (named in {run / DEPLOY_INFO}) is gone; the run's checkpoints cannot be verified, so it is not resumed.")
    # every check before any site is contacted; the ServerApp repeats them where it runs
    point = load_resume_point(run, exp=load_experiment(config) if config else None, public_key=signing.load_private(key).public_key() if key else None)
    values = {P.RC_EXPERIMENT: config, P.RC_OUT: None, P.RC_RUN_ID: "", P.RC_SIGNING_KEY: key, P.RC_RESUME: run}
    console.print(
        f"resuming run {escape(point.run_id)} at round {point.next_round} of {point.exp.federation.rounds} on SuperLink {escape(superlink)} (flwr run); "
        f"each round's row prints when the coordinator records it in {escape(str(run / 'metrics.json'))}.", soft_wrap=True,
    )
    with tempfile.TemporaryDirectory(prefix="fedrelapse-flwr-home-") as home:  # the researcher's ~/.flwr is left alone
        write_connection(Path(home), address=superlink, ca=ca, name="coordinator")
        env = without_flower_telemetry({**os.environ, "FLWR_HOME": home})
        with (Path(home) / "flwr-run.log").open("w+", encoding="utf-8", errors="replace") as output:
            proc = subprocess.Popen(flwr_run_argv(APP_DIR, "coordinator", values), env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
            try:
                with stop_on_signals():  # not deferred: SIGINT and SIGTERM raise KeyboardInterrupt here
                    code = _follow_rounds(proc, run, first=point.next_round if not point.rounds or not point.rounds[-1].evaluation_pending else point.rounds[-1].round,
                                          timeout_s=timeout_s)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop `flwr run` (and leave no temporary FLWR_HOME), say so
                _stop(proc)
                raise RunInterrupted(
                    f"Interrupted while following the resumed run in {run}; `flwr run` was stopped (the run may go on at the SuperLink). "
                    f"Once it has stopped, continue with `fedrelapse run --resume {run} --superlink {superlink} --keys {keys}`."
                ) from None
            output.seek(0)
            tail = output.read()[-2000:]
    summary = finished_summary(run)
    if code is None:
        raise FederationError(f"The resumed run in {run} did not finish within --timeout-s {timeout_s:g} s; `flwr run` was stopped (the run may go on at the SuperLink). Its last output:\n{tail}")
    if code != 0 or summary is None:
        raise FederationError(f"The resumed run in {run} did not finish (flwr run exited {code}); its last output:\n{tail}")
    return summary


FOLLOW_POLL_S = 1.0  # how often a deployed `run --resume` looks at metrics.json for new rounds


def _follow_rounds(proc: Any, run: Path, *, first: int, timeout_s: float) -> int | None:
    """Wait for ``proc`` (`flwr run` of a resumed deployed run), printing each round's row (with
    the header first) as the ServerApp records it in ``run``/metrics.json, from round ``first``.
    Its exit code, or None (and ``proc`` killed) after ``timeout_s`` seconds."""
    import time

    from server.federation import RoundPrinter

    rows, shown = RoundPrinter(console), first
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        shown = _show_recorded_rounds(rows, run / "metrics.json", shown)
        if code is not None:
            return int(code)
        if time.monotonic() > deadline:
            _stop(proc)
            return None
        time.sleep(FOLLOW_POLL_S)


def _stop(proc: Any, grace_s: float = 10.0) -> None:
    """End ``proc`` (`flwr run`): asked first (SIGTERM), killed after ``grace_s`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _show_recorded_rounds(rows: Any, metrics: Path, first: int) -> int:
    """Print the rounds from ``first`` on that metrics.json holds with their evaluation; the
    first round not printed yet. An unreadable file (not written yet) prints nothing."""
    from server.run_folder import RoundRecord

    try:
        records = [RoundRecord(**r) for r in json.loads(metrics.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        return first
    for rec in records:
        if rec.round < first:
            continue
        if rec.evaluation_pending:  # with-next-round: its row comes with its evaluation
            break
        rows.show(rec)
        first = rec.round + 1
    return first


@app.command()
@friendly
def plan(
    config: Annotated[Path, typer.Option(help="Experiment YAML.")],
    data: Annotated[Path | None, typer.Option(help="Cohort folder with <hospital>/site.yaml (simulated consortium); not needed with --hash-only.")] = None,
    hash_only: Annotated[bool, typer.Option("--hash-only", help="Print only the plan hash (SHA-256 of the plan's canonical JSON: what run.json, checkpoints, ledgers and approvals record) and exit.")] = False,
) -> None:
    """Before a run: the ε each site would spend, its remaining budget, and any refusal.

    A deployed coordinator asks the same question of every connected site before round 1 (pre-flight) and does not start a run that a site would refuse. A site with fewer than k training patients shows refuse (no-data): it would refuse every round, which the pre-flight does not ask. The plan hash is printed under the table (or alone, with --hash-only).

    Exit codes: 0 every site would accept; 4 a site would refuse (the reason is printed under the table); 2 a YAML file or option is wrong, or --data holds fewer sites than federation.min_nodes (simulate would not start); 3 a site's data cannot be used.
    """
    from client.site import Site, load_site_data
    from server.simulate import discover_sites, require_usable_sessions, too_few_sites
    from shared.config import load_experiment, load_site
    from shared.errors import ConfigError, PolicyError
    from shared.privacy.accounting import FullSamplingWarning, full_sampling_message

    exp = load_experiment(config)
    if hash_only:
        print(exp.plan_hash())
        return
    if data is None:
        raise typer.BadParameter("give --data (the cohort folder), or --hash-only to print only the plan hash.", param_hint="--data")
    table = Table(title=f"plan: {exp.federation.rounds} rounds x {exp.training.local_steps} steps, target ε={exp.privacy.target_epsilon:g}")
    for col in ("site", "training patients", "q", "σ", "ε this run", "ε spent so far", "all-time ε after", "all-time left now", "verdict"):
        table.add_column(col, justify="left" if col in ("site", "verdict") else "right")
    refused, notes, reasons = False, [], []
    paths = discover_sites(data)
    for path in paths:
        site_cfg = load_site(path)
        require_usable_sessions(site_cfg, load_site_data(site_cfg, exp.features, exp.language, exp.speech), exp.features)  # memoised: Site reuses it
        site = Site(site_cfg, exp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FullSamplingWarning)  # said below, naming the site
                p = site.plan(run_id="plan-preview", total_rounds=exp.federation.rounds)
        except PolicyError as exc:  # e.g. an ε no noise can reach: the site's refusal, not a crash
            p = {"code": getattr(exc, "refusal_code", "ledger"), "reason": f"Site {site.cfg.name}: {exc}"}
        too_few = site.data_refusal()  # fewer than k training patients: the site refuses every round (checked first there too)
        if too_few:
            p.update(code=too_few.code, reason=too_few.reason)
        if site.sample_rate >= 1.0:
            notes.append(full_sampling_message(site.cfg.name))
        if not site_cfg.policy.release_metrics or (site_cfg.policy.require_noised_metrics and not exp.privacy.noised_metrics):
            why = "release_metrics: false" if not site_cfg.policy.release_metrics else "require_noised_metrics: true, and this plan's metrics are exact (set privacy.metrics_noise_multiplier above 0)"
            notes.append(f"Site {site.cfg.name} will train but send no evaluation and no train loss (its policy has {why}); the federated metrics will cover the other sites only.")
        if float(p.get("noise_multiplier", 0.0)) > NOISY_SIGMA:
            notes.append(f"Site {site.cfg.name}: σ={float(p['noise_multiplier']):.0f} at ε={exp.privacy.target_epsilon:g}: the noise drowns the clipped gradients, so the model will learn almost nothing; raise `privacy.target_epsilon`.")
        ok = p["code"] == "ok"
        refused |= not ok
        if not ok:
            reasons.append(f"refuse ({p['code']}): {p['reason']}")
        table.add_row(site.cfg.name, str(site.train_set.n_patients), f"{site.sample_rate:.3f}", _num(p, "noise_multiplier", ".3f"), _num(p, "epsilon_run", ".2f"),
                      _num(p, "epsilon_spent", ".2f"), _num(p, "epsilon_after", ".2f"), _num(p, "epsilon_remaining", ".2f"), "ok" if ok else f"refuse ({p['code']})")
    console.print(table)
    for reason in reasons:  # under the table, one line each: in the verdict cell a reason wrapped one word per line
        console.print(f"[red]{escape(reason)}[/red]", soft_wrap=True)
    for note in notes:
        console.print(f"[yellow]warning: {escape(note)}[/yellow]", soft_wrap=True)
    if exp.privacy.noised_metrics and exp.federation.fraction_evaluate > 0:
        console.print(f"metrics: noised (privacy.metrics_noise_multiplier {exp.privacy.metrics_noise_multiplier:g}): each site's ε this run includes one charged release a round "
                      "(σ is calibrated with them); no train loss or exact per-site metric leaves a site. `fedrelapse bench metrics-noise` shows the trade-off.", soft_wrap=True)
    elif exp.privacy.noised_metrics:
        console.print("metrics: none (federation.fraction_evaluate is 0): no evaluation is released or charged, and no train loss leaves a site (privacy.metrics_noise_multiplier is set).", soft_wrap=True)
    console.print(f"plan_hash: {exp.plan_hash()}")
    too_few_here = too_few_sites(data, len(paths), exp.federation.min_nodes)
    if too_few_here:  # `simulate` refuses to start (exit 2) with the same sentence
        raise ConfigError(too_few_here)
    if refused:
        raise typer.Exit(4)


NOISY_SIGMA = 100.0
"""σ above which `plan` notes that the model will learn almost nothing (ε far too small)."""


EXIT_REFUSED = 4  # PolicyError's code: a site's policy refused the run before round 1 (as `plan` exits)
EXIT_INCOMPLETE = 6  # FederationError's code: the run ended, but some round had no usable update


def run_exit_code(summary: dict[str, Any]) -> int:
    """The exit code of `simulate` and `run` for a run that ended with ``summary``: 0 completed,
    4 refused before start, 6 incomplete (see the researcher runbook's exit-code table)."""
    status = str(summary.get("status", ""))
    if status == "completed":
        return 0
    return EXIT_REFUSED if status == "refused before start" else EXIT_INCOMPLETE


def _exit_with_run_status(summary: dict[str, Any]) -> None:
    code = run_exit_code(summary)
    if code:
        raise typer.Exit(code)


def _num(values: dict[str, Any], key: str, fmt: str) -> str:
    """``values[key]`` formatted, or "-" when the site gave no such number (it refused first)."""
    return format(float(values[key]), fmt) if key in values else "-"


def _final_auroc(summary: dict[str, Any], out: Path) -> str:
    """The final federated AUROC, or why there is none (from the last evaluated round's sites in metrics.json)."""
    from server.run_folder import why_no_auroc

    auc = summary.get("final_federated_auroc")
    if auc is not None:
        privacy = summary.get("privacy")
        z = privacy.get("metrics_noise_multiplier") if isinstance(privacy, dict) else None
        return format(auc, ".3f") + (f" (noised, z = {z:g})" if isinstance(z, (int, float)) else "")
    try:
        rounds = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rounds = []
    evaluated = [r for r in rounds if isinstance(r, dict) and not r.get("evaluation_pending")] if isinstance(rounds, list) else []
    if not evaluated:
        return "none (no round was evaluated)"
    sites = evaluated[-1].get("sites") or {}
    if not isinstance(sites, dict) or not all(isinstance(e, dict) for e in sites.values()):
        return "none (metrics.json does not say why: its last evaluated round's `sites` is not an object of site entries)"
    return f"none: {why_no_auroc(sites)}"


def print_summary(summary: dict[str, Any], out: Path) -> None:
    if summary["sites"]:
        table = Table(title=f"run {escape(str(summary['run_id']))}", show_header=True)
        table.add_column("site", no_wrap=True)
        table.add_column("ε spent (this run)", justify="right")
        table.add_column("δ", justify="right")
        table.add_column("σ", justify="right")
        for site, e in sorted(summary["sites"].items()):
            eps = "∞ (no DP)" if e.get("epsilon") is None else f"{e['epsilon']:.2f}"
            delta = "-" if not e.get("delta") else f"{e['delta']:.0e}"
            table.add_row(escape(site), eps, delta, f"{e.get('noise_multiplier') or 0:.2f}")
        console.print(table)
    else:  # refused before start, or every round refused: a table of headers only says nothing
        console.print(f"run {escape(str(summary['run_id']))}: no site trained in this run", soft_wrap=True)
    # one line each, whatever the width: grep-able in a log
    console.print(f"status: {escape(str(summary['status']))} · rounds {summary['rounds_completed']}/{summary['rounds_planned']} · final federated AUROC {_final_auroc(summary, out)} · wall time {summary['wall_time_s']:.1f} s", soft_wrap=True)
    for key, value in summary.get("baselines", {}).items():
        console.print(f"baseline {escape(str(key))}: {escape(str(value))}", soft_wrap=True)
    for r in summary.get("refusals", []):
        console.print(f"[yellow]refusal: round {r['round']} site {escape(str(r['site']))}: {escape(str(r['reason']))}[/yellow]", soft_wrap=True)
    console.print(f"run folder: [bold]{escape(str(out.resolve()))}[/bold]", soft_wrap=True)


bench_app = _typer(help="Researcher: benchmarks (ratios in one run; results for BENCHMARKS.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("dp-step")
@friendly
def bench_dp_step(
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).", min=0)] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repeats (CI smoke).")] = False,
) -> None:
    """Time per patient-level DP-SGD step / non-private step, per gradient strategy, where a DP step's time goes, and the same ratio on a step of 2 tiny patients (host_bound: host work only, the regime of a GPU at small batches).

    --quick is a smoke test: its figures are noisy (its JSON says so); use the full command for numbers.
    """
    from server.bench import dp_step_host_bound, dp_step_profile, dp_step_ratio, machine, quick_marked, set_threads
    from shared.config import load_experiment

    set_threads(threads)
    exp = load_experiment(config)
    result = {"machine": machine(), **dp_step_ratio(exp, device=device, repeats=2 if quick else 20, steps=3 if quick else 10),
              "profile": dp_step_profile(exp, device=device, repeats=3 if quick else 20),
              "host_bound": dp_step_host_bound(exp, repeats=2 if quick else 60, steps=3 if quick else 10)}
    print(json.dumps(quick_marked(result, quick), indent=2))


@bench_app.command("all")
@friendly
def bench_all(
    out: Annotated[Path, typer.Option(help="Folder for results.json and the benchmark's runs.")],
    data: Annotated[Path | None, typer.Option(help="Cohort folder (from `fedrelapse synth`); --quick makes a tiny one when omitted.")] = None,
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
    quick: Annotated[bool, typer.Option("--quick", help="Tiny cohort, fewer repeats and rounds (CI smoke, a few minutes).")] = False,
    speech_encoder: Annotated[Path | None, typer.Option(help="Local wav2vec2/HuBERT-style folder: feature cache, update size and site memory also measure it (see `bench speech-encoder`).")] = None,
    parts: Annotated[str, typer.Option(help="Comma-separated parts to run (default: all), e.g. feature_cache,update_size,site_memory.")] = "",
    evaluation: Annotated[str | None, typer.Option(help="For the simulated rounds parts: " + EVALUATION_HELP)] = None,
) -> None:
    """Every benchmark in one run: DP step, feature cache, update size, site memory, round overhead (results.json)."""
    from server.bench_fl import with_evaluation, with_speech_encoder
    from server.bench_suite import run_all
    from shared.config import load_experiment

    exp = with_evaluation(load_experiment(config), evaluation)
    if speech_encoder is not None:
        exp = with_speech_encoder(exp, speech_encoder)
    only = tuple(p.strip() for p in parts.split(",") if p.strip())
    result = run_all(exp, out, data=data, quick=quick, only=only, say=lambda m: err_console.print(m))
    print(json.dumps(result, indent=2))
    failed = [k for k, v in result["parts"].items() if "error" in v]
    if failed:
        err_console.print(f"[red]benchmark parts failed: {', '.join(failed)} (their errors are in {out / 'results.json'})[/red]")
        raise typer.Exit(1)


@bench_app.command("speech-encoder")
@friendly
def bench_speech_encoder(
    out: Annotated[Path, typer.Option(help="Folder to write the encoder to (save_pretrained).")],
    size: Annotated[str, typer.Option(help="base (wav2vec2-base-sized, ~94 M parameters) or tiny (the tests' hidden-16 encoder).")] = "base",
) -> None:
    """Write a randomly initialised wav2vec2 encoder, built offline, for `bench all --speech-encoder` (timing and memory only)."""
    from server.bench_fl import encoder_parameters, make_random_speech_encoder

    path = make_random_speech_encoder(out, size=size)
    print(json.dumps({"path": str(path), "size": size, "parameters": encoder_parameters(path)}))


EVALUATION_HELP = "separate: an evaluate message after each round's training; with-next-round: each train message also has the sites evaluate the model it carries (one exchange per round); default: the plan's `federation.evaluation`."


def _site_counts(sites: str, *, what: str = "--sites") -> tuple[int, ...]:
    """``--sites`` of the bench commands (consortium sizes such as ``3,10,30``), or another
    comma-separated list of positive whole numbers named by ``what``."""
    from shared.errors import ConfigError

    try:
        counts = tuple(int(x) for x in sites.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise ConfigError(f"{what} must be comma-separated positive whole numbers such as 3,10,30; got {sites!r}.")
    return counts


@bench_app.command("scale")
@friendly
def bench_scale(
    data: Annotated[Path, typer.Option(help="Cohort folder; its hospitals are re-used round-robin.")],
    out: Annotated[Path, typer.Option(help="Folder for scale.json and the runs.")],
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
    sites: Annotated[str, typer.Option(help="Comma-separated consortium sizes.")] = "10,30,100",
    rounds: Annotated[int, typer.Option(help="Rounds per run (the first includes start-up).", min=2)] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="Experiment scaled to the quick cohort of `bench all --quick` (4-s inputs, 3 local steps).")] = False,
    evaluation: Annotated[str | None, typer.Option(help=EVALUATION_HELP)] = None,
) -> None:
    """Time per round and peak memory vs number of simulated sites."""
    from server.bench_suite import scale
    from shared.config import load_experiment

    sizes = _site_counts(sites)
    from server.bench_fl import quick_experiment, with_evaluation

    exp = with_evaluation(quick_experiment(load_experiment(config)) if quick else load_experiment(config), evaluation)
    print(json.dumps(scale(exp, data, out, sites=sizes, rounds=rounds, quick=quick, say=lambda m: err_console.print(m)), indent=2))


@bench_app.command("gpu")
@friendly
def bench_gpu(
    out: Annotated[Path, typer.Option(help="Folder for gpu.json (rewritten after every part).")] = Path("/tmp/fedrelapse-bench-gpu"),
    data: Annotated[Path | None, typer.Option(help="Cohort folder: also run a simulated round with sites sharing the GPU, and the same round on the CPU.")] = None,
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
    round_config: Annotated[Path | None, typer.Option(help="Experiment YAML for the simulated rounds, if --data needs another than --config (e.g. a small cohort).")] = None,
    batches: Annotated[str | None, typer.Option(help="Comma-separated patients per step to sweep (default: the experiment's, 64 and 256).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repeats, the experiment's batch only.")] = False,
) -> None:
    """GPU: DP vs non-DP step throughput (fp32, bf16 autocast, a batch sweep, vs this CPU), and sites sharing the GPU in a simulated round."""
    from server.bench_gpu import gpu_bench
    from shared.config import load_experiment

    sweep = _site_counts(batches, what="--batches") if batches else None
    result = gpu_bench(load_experiment(config), data=data, out=out, quick=quick, batches=sweep,
                       round_exp=load_experiment(round_config) if round_config else None, say=lambda m: err_console.print(m))
    if result["gpu"] is None:
        err_console.print(f"[yellow]{result['message']}[/yellow]")
    print(json.dumps(result, indent=2))


@bench_app.command("secagg")
@friendly
def bench_secagg(
    config: Annotated[Path, typer.Option(help="Experiment YAML (model and local training).")] = Path("configs/experiment.yaml"),
    sites: Annotated[str, typer.Option(help="Comma-separated numbers of simulated sites.")] = "3,10,30",
    rounds: Annotated[int, typer.Option(help="Timed training rounds per setting (after one warm-up round).")] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="3 and 10 sites, 1 timed round, 2 local steps (CI smoke).")] = False,
) -> None:
    """Training-round time and bytes per site with SecAgg+ vs plain aggregation, side by side."""
    import logging
    from dataclasses import replace

    from server.bench import SECAGG_QUICK_READ, machine, quick_marked, secagg_overhead
    from shared.config import load_experiment
    from shared.errors import ConfigError

    exp = load_experiment(config)
    counts = _site_counts(sites)
    if any(n < 2 for n in counts):
        raise ConfigError(f"--sites: SecAgg+ needs at least 2 sites per setting; got {sites!r}.")
    if quick:
        counts, rounds, exp = tuple(n for n in counts if n <= 10) or (3,), 1, replace(exp, training=replace(exp.training, local_steps=2))
    import flwr.server.workflow  # noqa: F401  (sets Flower's logger to DEBUG on import; quiet it after)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(json.dumps(quick_marked({"machine": machine(), **secagg_overhead(exp, sites=counts, rounds=rounds)}, quick, read=SECAGG_QUICK_READ), indent=2))


@bench_app.command("deployment")
@friendly
def bench_deployment(
    data: Annotated[Path, typer.Option(help="Cohort folder; its hospitals are re-used round-robin (read only: the bench writes under --out).")],
    out: Annotated[Path, typer.Option(help="Folder for deployment.json and the consortia.")],
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
    sites: Annotated[str, typer.Option(help="Comma-separated consortium sizes, e.g. 3,10.")] = "3",
    rounds: Annotated[int, typer.Option(help="Rounds per run (the first includes start-up and is left out of the ratios).", min=2)] = 3,
    clientapp: Annotated[str, typer.Option(help="both: a fresh ClientApp process per message, then the site worker, back to back; or only one of worker, per-message.")] = "both",
    site_threads: Annotated[int | None, typer.Option(help="torch threads per site (site.yaml `threads`); default: this machine's cores ÷ sites, at least 1; 0: torch's default (every site uses every core).", min=0)] = None,
    evaluation: Annotated[str | None, typer.Option(help=EVALUATION_HELP)] = None,
) -> None:
    """Deployment Engine round overhead (TLS, node auth): a fresh ClientApp process per message vs the site worker, back to back."""
    import os

    from server.bench import machine
    from server.bench_fl import deployment_rounds, with_evaluation
    from shared.config import load_experiment

    modes = {"both": (False, True), "per-message": (False,), "worker": (True,)}
    if clientapp not in modes:
        raise typer.BadParameter(f"--clientapp is {clientapp!r}; choose one of {', '.join(modes)}.")
    sizes = _site_counts(sites)
    exp = with_evaluation(load_experiment(config), evaluation)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    result: dict[str, object] = {"machine": machine(), "load_average_at_start": os.getloadavg(), "evaluation": exp.federation.evaluation, "runs": runs}
    table = Table(title=f"round overhead, Deployment Engine (rounds 2+, median; evaluation: {exp.federation.evaluation})")
    for col in ("sites", "ClientApp", "threads / site", "s / round", "wall ÷ Σ site compute", "wall ÷ slowest site", "wall − slowest per phase (s)", "objects / train message", "load after"):
        table.add_column(col)
    for n in sizes:
        for worker in modes[clientapp]:
            err_console.print(f"{n} sites, {'site worker' if worker else 'a process per message'}: {rounds} rounds ...")
            run = {**deployment_rounds(exp, data, out, n_sites=n, rounds=rounds, site_worker=worker, site_threads=site_threads), "load_average_after": os.getloadavg()}
            runs.append(run)
            (out / "deployment.json").write_text(json.dumps(result, indent=2))
            table.add_row(str(n), str(run["clientapp"]), str(run["site_threads"]), f"{run['wall_per_round_after_round_1_s']:.1f}", f"{run['round_overhead_ratio_after_round_1']:.3f}",
                          f"{run['wall_over_slowest_site_after_round_1']:.3f}", f"{run['wall_minus_critical_path_after_round_1_s']:.2f}",
                          str(run["objects_per_message"]["train_message_packed"]), " ".join(f"{x:.1f}" for x in run["load_average_after"]))
    err_console.print(table)
    print(json.dumps(result, indent=2))


@bench_app.command("idle-poll")
@friendly
def bench_idle_poll(
    out: Annotated[Path, typer.Option(help="Folder for idle-poll.json and the consortia.")],
    sites: Annotated[int, typer.Option(help="Idle SuperNodes (TLS, node auth) polling one SuperLink.", min=1)] = 10,
    seconds: Annotated[float, typer.Option(help="How long to measure each setting.", min=1.0)] = 20.0,
    polls: Annotated[str, typer.Option(help="Comma-separated idle waits in seconds; 'flower' = plain flower-supernode (3 s).")] = "flower,0.25,0.1",
) -> None:
    """What idle SuperNodes cost the SuperLink: its CPU per look for work, for each idle wait."""
    import os

    from server.bench import machine
    from server.bench_fl import idle_poll_load
    from shared.errors import ConfigError

    try:
        waits = [None if p.strip() == "flower" else float(p) for p in polls.split(",")]
    except ValueError:
        raise ConfigError(f"--polls must be comma-separated seconds or 'flower', such as flower,0.25,0.1; got {polls!r}.") from None
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    result: dict[str, object] = {"machine": machine(), "load_average_at_start": os.getloadavg(), "runs": runs}
    for wait in waits:
        run = {**idle_poll_load(out, n_sites=sites, seconds=seconds, idle_poll_s=wait), "load_average_after": os.getloadavg()}
        runs.append(run)
        err_console.print(f"idle wait {run['idle_poll_s']}: {run['looks_per_s']} looks/s, SuperLink {run['superlink_cores']:.3f} cores, "
                          f"one SuperNode {run['one_supernode_cores']:.3f} cores")
    base = next((r for r in runs if r["idle_poll_s"] == "flower"), None)
    if base is not None:
        for r in runs:
            extra = r["looks_per_s"] - base["looks_per_s"]
            r["superlink_ms_per_extra_look"] = round(1000 * (r["superlink_cores"] - base["superlink_cores"]) / extra, 2) if extra > 0 else None
    (out / "idle-poll.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


@bench_app.command("ledger")
@friendly
def bench_ledger(
    entries: Annotated[int, typer.Option(help="Entries to append, then verify.")] = 10000,
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path("/tmp/fedrelapse-bench-ledger"),
    accountant: Annotated[str, typer.Option(help="rdp: every entry records ε = 0 (flagged from PLD floors); prv: an honest PRV ledger, ε = 8 per 50-round run "
                                                 "(about 0.4 s an entry to build, not timed; verification checks most entries against PLD, so use hundreds of entries).")] = "rdp",
) -> None:
    """Signed, fsync'd ledger appends per second and full verification per second."""
    from server.bench import ledger_throughput, machine
    from shared.privacy.accounting import ACCOUNTANTS

    if accountant not in ACCOUNTANTS:
        raise typer.BadParameter(f"choose one of {', '.join(ACCOUNTANTS)}", param_hint="--accountant")
    workdir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"machine": machine(), **ledger_throughput(workdir, entries, accountant)}, indent=2))


@bench_app.command("metrics-noise")
@friendly
def bench_metrics_noise(
    config: Annotated[Path, typer.Option(help="Experiment YAML whose training (rounds, local steps, batch, ε) the cost table uses.")] = Path("configs/experiment.yaml"),
    noise: Annotated[str, typer.Option(help="Metrics noise multipliers z to compare, comma-separated.")] = "0.5,1,2,4,8",
    patients: Annotated[str, typer.Option(help="Held-out patients a site, comma-separated (utility table).")] = "25,100,400",
    sites: Annotated[int, typer.Option(help="Sites whose statistics are pooled.", min=1)] = 3,
    draws: Annotated[int, typer.Option(help="Noise draws per setting.", min=10)] = 400,
    training_patients: Annotated[int, typer.Option(help="Training patients a site (cost table: sets q).", min=1)] = 40,
) -> None:
    """Noised metric releases (privacy.metrics_noise_multiplier): AUROC error against z and cohort size, and the training σ and ε they cost."""
    from server.bench import machine
    from server.bench_metrics import release_cost, release_utility
    from shared.config import load_experiment

    def numbers(text: str, what: str, cast: type[float] | type[int]) -> tuple[Any, ...]:
        try:
            values = tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter(f"give {what} as numbers separated by commas, got {text!r}", param_hint=f"--{what}") from None
        if not values or any(v <= 0 for v in values):
            raise typer.BadParameter(f"give one or more {what} above 0, got {text!r}", param_hint=f"--{what}")
        return values

    zs, ns = numbers(noise, "noise", float), numbers(patients, "patients", int)
    exp = load_experiment(config)
    with _progress() as bar:
        task = bar.add_task("noise draws", total=None)
        utility_rows = release_utility(sites=sites, patients=ns, noise=zs, draws=draws)
        bar.update(task, description="σ calibrations")
        cost_rows = release_cost(exp, noise=zs, training_patients=training_patients)
    print(json.dumps({"machine": machine(), "utility": utility_rows, "cost": cost_rows}, indent=2))


@bench_app.command("utility")
@friendly
def bench_utility(
    data: Annotated[Path, typer.Option(help="Cohort folder (from `fedrelapse synth`).")],
    out: Annotated[Path, typer.Option(help="Folder for the benchmark's runs and results.json.")],
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
) -> None:
    """FL+DP vs FL without DP vs centralised non-private vs one-feature AUROC."""
    from server.bench import machine, sigma_table, utility
    from shared.config import load_experiment

    exp = load_experiment(config)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), **utility(exp, data, out), "sigma_for_target": sigma_table(exp)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


@app.command()
@friendly
def evaluate(
    data: Annotated[Path, typer.Option(help="Synthetic cohort folder (from `fedrelapse synth`).")],
    out: Annotated[Path, typer.Option(help="Folder for evaluation.json, evaluation.md and plots.")],
    config: Annotated[Path, typer.Option(help="Experiment YAML.")] = Path("configs/experiment.yaml"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller grid for smoke tests: local, FedAvg and centralised at ε 8 and ∞, plus three FedAvg ε=8 ablations (acoustic only, language only, no personal baseline); at most 3 rounds, 200 bootstrap resamples.")] = False,
) -> None:
    """The evaluation protocol: local-only, FedAvg, FedProx, FedAdam and centralised at ε ∈ {1, 3, 8, ∞}, plus ablations; AUROC/AUPRC with patient-bootstrap CIs, calibration, early-warning lead time and false alarms. Synthetic cohorts only (it sees every site)."""
    from server.evaluate import run_evaluation
    from shared.config import load_experiment

    exp = load_experiment(config)
    report = run_evaluation(exp, data, out, quick=quick, progress=lambda line: err_console.print(f"  {line}"))
    console.print((out / "evaluation.md").read_text(encoding="utf-8"))
    console.print(f"{len(report['results'])} settings; results in [bold]{out}[/bold]")


def _checkpoint_plan_hash(path: Path) -> str:
    """The plan_hash a run's checkpoint records in its metadata ("" if it records none or cannot be read here; loading reports that)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as fh:
            return (fh.metadata() or {}).get("plan_hash", "")
    except Exception:  # noqa: BLE001 - not a safetensors file: load_checkpoint below says so with the model's name
        return ""


@site_app.command("timeline")
@friendly
def site_timeline(
    site: Annotated[Path, typer.Option(help="The site's site.yaml.")],
    patient: Annotated[str, typer.Option("--patient", help="Patient id as in the manifest.")],
    model: Annotated[Path, typer.Option(help="A global model checkpoint (RUN/checkpoints/round-NNN.safetensors).")],
    config: Annotated[Path | None, typer.Option(help="The experiment YAML the model was trained with (default: the run folder's config.yaml beside checkpoints/).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output path without suffix (default: <state_dir>/timelines/<patient>).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Alert threshold; default: chosen on this site's training patients to meet alerts.max_false_alarms_per_month.")] = None,
) -> None:
    """Clinician view of one patient's risk, alerts and markers over time (HTML + PNG), at the site only."""
    from client.early_warning import choose_threshold
    from client.site import Site
    from client.timeline import patient_timeline, render_timeline, site_timelines, timeline_name
    from shared.config import load_experiment, load_site
    from shared.errors import DataError
    from shared.models import build_model
    from shared.params import load_checkpoint, set_arrays

    if config is None:
        config = model.resolve().parent.parent / "config.yaml"  # RUN/checkpoints/round-NNN.safetensors -> RUN/config.yaml
        if not config.is_file():
            raise typer.BadParameter(f"{model} is not in a run folder with its config.yaml ({config} does not exist); pass the experiment YAML the model was trained with as --config.")
    exp, cfg = load_experiment(config), load_site(site)
    trained_with = _checkpoint_plan_hash(model)
    if trained_with and trained_with != exp.plan_hash():
        raise typer.BadParameter(f"{model} was trained with plan {trained_with[:16]}, but {config} is plan {exp.plan_hash()[:16]}; pass the run's own config.yaml (RUN/config.yaml) as --config.")
    net = build_model(exp)
    try:
        set_arrays(net, load_checkpoint(model))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(f"{model} is not a checkpoint of the model {config} describes ({exc}); pass the run's own experiment YAML.") from None
    s = Site(cfg, exp)
    try:
        tl, sessions = patient_timeline(s, net, patient)
    except KeyError as exc:
        raise DataError(str(exc.args[0])) from None
    a, n0 = exp.alerts, exp.features.baseline_sessions
    if threshold is None:
        threshold = choose_threshold(site_timelines(s, net, which="train"), baseline_n=n0, slack=a.slack, lookback_days=a.lookback_days, grace_days=a.grace_days, max_false_alarms_per_month=a.max_false_alarms_per_month).threshold
    if out is None:  # the site's own folder for them: the owner's only (0700), tightened if an older version made it 0755
        from client.site_launcher import private_dir

        private_dir(str(cfg.state_dir / "timelines"))
    target = out or cfg.state_dir / "timelines" / timeline_name(patient)  # never another patient's file, never outside the folder
    png, page = render_timeline(tl, sessions, threshold=threshold, alert_cfg=a, baseline_n=n0, out=target, site_name=cfg.name)
    console.print(f"wrote {escape(str(page))} and {escape(str(png))} (personal data: keep them at the site)")


@site_app.command("init")
@friendly
def site_init(site: Annotated[Path, typer.Option(help="The site's site.yaml.")]) -> None:
    """Create the site's state folder and its ledger signing key; print the public key path."""
    from client.site import new_ledger_key, site_key_paths
    from client.startup_checks import check_private_key_mode
    from shared import signing
    from shared.config import load_site

    cfg = load_site(site)
    priv, pub = site_key_paths(cfg.state_dir)
    check_private_key_mode(priv, "The site's ledger signing key")
    if priv.exists():
        console.print(f"ledger key already exists: {escape(str(priv))}")
        if not pub.exists():
            signing.write_public(signing.load_private(priv), pub)
            console.print(f"its public key file was missing: rebuilt {escape(str(pub))} from the private key")
    else:
        new_ledger_key(cfg.state_dir)  # refused where the ledger holds entries: the old key must be restored
        console.print(f"created ledger signing key {escape(str(priv))} (0600; never copy it off this host)")
    console.print(f"give this public key to your DPO for `fedrelapse audit verify`: [bold]{escape(str(pub))}[/bold] (id {signing.fingerprint(signing.load_public(pub))})")


@site_app.command("approve")
@friendly
def site_approve(
    site: Annotated[Path, typer.Option(help="The site's site.yaml.")],
    plan: Annotated[Path, typer.Option(help="The experiment (plan) YAML the coordinator will run.")],
    approved_by: Annotated[str, typer.Option(help="Who approves (recorded).")],
    yes: Annotated[bool, typer.Option("--yes", help="Approve without the interactive question.")] = False,
) -> None:
    """Hospital IT: read a plan's summary and approve its content hash for this site."""
    from client.approval import approve, summary
    from shared.config import load_experiment, load_site

    if not approved_by.strip():  # before the question: approve() refuses it too
        raise typer.BadParameter("--approved-by is empty; give the name (and role) of the person approving, e.g. --approved-by \"IT: Ola N.\".")
    cfg, exp = load_site(site), load_experiment(plan)
    table = Table(title=f"training plan for site {cfg.name}", show_header=False)
    for key, value in summary(exp, cfg):
        table.add_row(key, escape(value))
    console.print(table)
    if not yes and not typer.confirm("Approve this plan for this site?", default=False):
        raise typer.Exit(1)
    console.print(f"approved plan {approve(cfg, exp, approved_by=approved_by)} (recorded in {escape(str(cfg.state_dir / 'approved-plans.json'))})")


@site_app.command("budget")
@friendly
def site_budget(
    site: Annotated[Path, typer.Option(help="The site's site.yaml.")],
    set_total_cap: Annotated[float | None, typer.Option(help="DPO: new all-time ε cap (logged, signed, in the ledger).")] = None,
    set_run_cap: Annotated[float | None, typer.Option(help="DPO: new per-run ε cap (logged, signed, in the ledger).")] = None,
    reason: Annotated[str, typer.Option(help="Who changes the cap and why (required with --set-*).")] = "",
) -> None:
    """DPO: privacy budget spent and remaining per run; raise or lower the caps."""
    from client.budget import budget_status, change_caps
    from shared.config import load_site

    for option, value in (("--set-total-cap", set_total_cap), ("--set-run-cap", set_run_cap)):
        if value is not None and not (math.isfinite(value) and value > 0):  # a usage mistake, not a ledger problem (exit 4)
            raise typer.BadParameter(f"{option} is {value:g}; give a positive, finite ε (e.g. 10). Nothing was recorded.", param_hint=option)
    if reason.strip() and set_total_cap is None and set_run_cap is None:
        raise typer.BadParameter("--reason goes with --set-total-cap or --set-run-cap (the cap change it explains); nothing was recorded.", param_hint="--reason")
    cfg = load_site(site)
    if set_total_cap is not None or set_run_cap is not None:
        if not reason.strip():
            raise typer.BadParameter("Say who changes the cap and why with --reason; it is recorded in the ledger.")
        change_caps(cfg, cap_total=set_total_cap, cap_run=set_run_cap, note=reason)
        console.print("cap change recorded in the ledger (signed).")
    status = budget_status(cfg)
    table = Table(title=f"privacy budget of site {cfg.name} (δ={status['delta']:g})")
    table.add_column("run")
    table.add_column("rounds", justify="right")
    table.add_column("noised releases", justify="right")
    table.add_column("ε (run)", justify="right")
    for run in status["runs"]:
        table.add_row(escape(run["run_id"]), str(run["rounds"]), str(run["releases"]), f"{run['epsilon']:.3f}")
    console.print(table)
    console.print(f"all runs: ε spent {status['epsilon_spent']:.3f} of cap {status['cap_total']:g} (remaining {status['epsilon_remaining']:.3f}); per-run cap {status['cap_run']:g}")
    console.print(f"ledger: {escape(status['ledger'])} · {status['entries']} entries · head {status['head'][:16]}")


@site_app.command("check")
@friendly
def site_check(
    manifest: Annotated[Path, typer.Option(help="The site's manifest (CSV or JSONL).")],
    experiment: Annotated[Path | None, typer.Option(help="Experiment YAML whose feature settings to use.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where the feature cache lives (default: <manifest folder>/state).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also list informational notes.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Then remove from the state folder's caches and timelines what no usable session uses (patients whose consent was withdrawn, other feature settings); needs --experiment. Prints counts only.")] = False,
) -> None:
    """Validate every row and recording, fill the feature cache, print the site data report."""
    from client.prepare import prepare_site
    from shared.config import FeatureConfig, LanguageConfig, load_experiment

    if prune and experiment is None:  # the built-in feature settings would pass for current and the plan's features be removed
        raise typer.BadParameter("--prune needs --experiment: the plan's feature settings say which cached features are current.", param_hint="--prune")
    exp = load_experiment(experiment) if experiment else None
    features, language = (exp.features, exp.language) if exp else (FeatureConfig(), LanguageConfig())
    cache = (state_dir or manifest.resolve().parent / "state") / "features"
    with _progress() as bar:
        task = bar.add_task("checking recordings", total=None)
        data = prepare_site(manifest, features, cache, language=language, speech=exp.speech if exp else None, progress=lambda d, t: bar.update(task, completed=d, total=t))
    report = data.report()
    if prune:
        report |= _prune_report(data, features, cache)
    problems = [p.render(data.manifest.path) for p in data.problems]
    if as_json:  # "problems": the lines as printed; "issues": the same, structured, with their severity
        issues = [{"line": p.line, "field": p.field, "severity": p.severity, "problem": p.message} for p in data.problems]
        print(json.dumps({**report, "problems": problems, "issues": issues}, indent=2))
    else:
        table = Table(title="site data report", show_header=False)
        for k, v in report.items():
            table.add_row(k, escape(str(v)))  # paths as they are: `site [old]` is not markup
        console.print(table)
        colour = {"error": "red", "warning": "yellow", "info": "dim"}
        shown = [(p, line) for p, line in zip(data.problems, problems, strict=True) if verbose or p.severity != "info"]
        for p, line in shown:  # one line each, never wrapped (`site check > r.txt` is grepped by line number)
            console.print(f"[{colour[p.severity]}]{p.severity}: {escape(line)}[/]", soft_wrap=True)
        hidden = len(problems) - len(shown)
        if hidden:
            console.print(f"[dim]{hidden} informational note(s) (e.g. resampling) hidden; --verbose shows them.[/dim]", soft_wrap=True)
    if not data.sessions:
        raise typer.Exit(3)


def _prune_report(data: Any, features: Any, cache: Path) -> dict[str, int]:
    """``site check --prune``: remove what no usable session uses from the caches; the counts for the report (never ids)."""
    from dataclasses import asdict

    from client.cache_retention import prune_caches

    return {f"pruned_{k}": v for k, v in asdict(prune_caches(data, features, cache, timelines=cache.parent / "timelines")).items()}


audit_app = _typer(help="DPO: verify ledgers offline, independently of the site's software; attack a simulated site.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _finite(value: float) -> float | None:
    """``value``, or None (JSON null) where it is NaN or infinite: ``--json`` must print valid JSON."""
    return value if math.isfinite(value) else None


def _four(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@audit_app.command("verify")
@friendly
def audit_verify(
    ledgers: Annotated[list[Path], typer.Argument(help="Ledger JSONL file(s).")],
    public_key: Annotated[Path | None, typer.Option(help="The site's ledger public key (PEM).")] = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Allowed relative gap between recorded and independent ε (0.02 = 2 %).")] = 0.02,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check chain, signatures, order and every entry's ε (recomputed with dp-accounting RDP, and PLD at the newest entry).

    Exit code 0: every ledger verified; 1: a problem was found (each is listed).
    """
    from shared import signing
    from shared.privacy.audit import verify_ledger
    from shared.privacy.ledger import LEDGER_FILE

    key = signing.load_public(public_key) if public_key else None
    failed = False
    results: list[dict[str, Any]] = []
    for path in ledgers:
        if path.is_dir():  # a ledger folder or a state_dir: name the privacy ledger, never evaluation-releases.jsonl (another format)
            hint = next((p for p in (path / LEDGER_FILE, path / "ledger" / LEDGER_FILE) if p.is_file()), None)
            raise typer.BadParameter(f"{path} is a folder; give the ledger file itself" + (f", e.g. {hint}." if hint else f" (<state_dir>/ledger/{LEDGER_FILE})."))
        if not path.is_file():
            raise typer.BadParameter(f"{path} does not exist.")
        report = verify_ledger(path, key, tolerance=tolerance)
        failed |= not report.ok
        last = report.checks[-1] if report.checks else None
        results.append({
            "ledger": str(path), "ok": report.ok, "entries": len(report.entries),
            "issues": [{"line": i.line, "problem": i.message} for i in report.issues],
            "epsilon_recorded": _finite(last.recorded_total if last else 0.0), "epsilon_rdp_independent": _finite(last.rdp if last else 0.0),
            "epsilon_pld_independent": _finite(last.pld if last else 0.0),
        })
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            mark = "[green]verified[/green]" if r["ok"] else "[red]PROBLEMS FOUND[/red]"
            console.print(f"{escape(r['ledger'])}: {mark} · {r['entries']} entries · ε recorded {_four(r['epsilon_recorded'])}, independent RDP {_four(r['epsilon_rdp_independent'])}, PLD {_four(r['epsilon_pld_independent'])}")
            for i in r["issues"]:
                console.print(f"  [red]line {i['line']}: {escape(i['problem'])}[/red]")
    if failed:
        raise typer.Exit(1)


@audit_app.command("attack")
@friendly
def audit_attack(
    site: Annotated[Path, typer.Option(help="site.yaml of a simulated site or a copy you may attack (synthetic data).")],
    config: Annotated[Path, typer.Option(help="Experiment YAML (model, training, δ, accountant).")],
    epsilons: Annotated[str, typer.Option(help="Comma-separated target ε values for the DP settings.")] = "1,3,8",
    steps: Annotated[int | None, typer.Option(help="Training steps per setting (default: rounds x local_steps of the plan).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, sampling and noise (same seed, same result).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Empirical privacy audit: membership inference against models trained at one site.

    Trains a non-private model and one DP model per target ε from scratch on the site's training patients, attacks each with a loss-threshold membership-inference attack (training vs held-out patients) and prints the accounted ε next to the attack AUC, TPR at FPR ≤ 0.1 and an empirical ε lower bound (Clopper-Pearson, 95%).

    This is an audit on a simulated site or a copy: it trains at the site but never writes to the site's privacy ledger, so it spends no recorded budget and its output is not DP-protected. Do not run it on production patient data.
    """
    from client.attack import membership_audit
    from client.site import Site
    from shared.config import load_experiment, load_site
    from shared.errors import ConfigError

    try:
        targets = tuple(float(e) for e in epsilons.split(",") if e.strip())
    except ValueError:
        raise ConfigError(f"--epsilons must be comma-separated numbers such as 1,3,8; got {epsilons!r}.") from None
    exp = load_experiment(config)
    s = Site(load_site(site), exp, read_only=True)  # the audit writes nothing to the site's state
    n_steps = steps if steps is not None else exp.federation.rounds * exp.training.local_steps
    with err_console.status(f"site {s.cfg.name}: training {1 + len(targets)} models x {n_steps} steps and attacking each"):
        result = membership_audit(s, epsilons=targets, steps=n_steps, seed=seed)
    table = Table(title=f"membership audit of site {result['site']}: {result['members']} members vs {result['non_members']} non-members, {n_steps} steps, δ={result['delta']:g}")
    for col in ("setting", "σ", "accounted ε", "attack AUC", "TPR@FPR≤0.1", "empirical ε lower bound"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in result["settings"]:
        acc = "∞ (no DP)" if r["epsilon_accounted"] is None else f"{r['epsilon_accounted']:.2f}"
        table.add_row(r["setting"], f"{r['noise_multiplier']:.3f}", acc, f"{r['attack_auc']:.3f}", f"{r['tpr_at_fpr']:.3f}", f"{r['epsilon_lower_bound']:.3f}")
    console.print(table)
    console.print(f"with {result['members']} + {result['non_members']} patients even a perfect attack proves at most ε ≥ {result['epsilon_lower_bound_max']:.2f}; "
                  "a small lower bound here does not show the model is private. No ledger entry was written.")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"results: [bold]{escape(str(out))}[/bold]")


@audit_app.command("report")
@friendly
def audit_report(
    ledgers: Annotated[list[Path], typer.Argument(help="Ledger JSONL file(s).")],
    out: Annotated[Path, typer.Option(help="The HTML report to write (one self-contained file).")],
    pdf: Annotated[Path | None, typer.Option(help="Also write the report as a PDF here.")] = None,
    public_key: Annotated[Path | None, typer.Option(help="The site's ledger public key (PEM); without it signatures are not checked.")] = None,
    site: Annotated[Path | None, typer.Option(help="The site's site.yaml, to read the policy's caps.")] = None,
    title: Annotated[str, typer.Option(help="Title of the report.")] = "Privacy audit report",
    attack: Annotated[list[Path] | None, typer.Option(help="Results JSON of `fedrelapse audit attack` to include (repeatable).")] = None,
) -> None:
    """A report for the DPO: verification, ε over time, runs, mechanisms, cap changes, what remains.

    Exit code 0: every ledger verified, signatures included; 1: a problem, or no public key. The report is written in every case and says which.
    """
    from shared.config import load_site
    from shared.privacy.report import VERIFIED, build_report, check_attack, fmt_eps, render_html, render_pdf

    for path in ledgers:
        if not path.is_file():
            raise typer.BadParameter(f"{path} does not exist.")
    policy = load_site(site).policy if site else None
    attacks = []
    for path in attack or []:
        try:
            attacks.append(check_attack(json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(f"{path} is not a readable `audit attack` results file ({exc}).") from None
        except ValueError as exc:
            raise typer.BadParameter(f"{path} is not an `audit attack` results file: {exc}.") from None
    data = build_report(ledgers, public_key=public_key, policy=policy, title=title, attacks=attacks)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    if pdf:
        render_pdf(data, pdf)
    for led in data.ledgers:
        colour = "green" if led.status == VERIFIED else "red" if led.issues else "yellow"
        console.print(f"{escape(str(led.path))}: [{colour}]{led.status}[/{colour}] · {led.entries} entries · ε spent {fmt_eps(led.epsilon_spent)}"
                      f" · remaining {fmt_eps(led.epsilon_remaining)}")
        for i in led.issues:
            console.print(f"  [red]line {i.line}: {escape(i.message)}[/red]")
        for note in led.notes:
            console.print(f"  [yellow]please look at: {escape(note)}[/yellow]")
    console.print(f"report: [bold]{escape(str(out))}[/bold]" + (f" and [bold]{escape(str(pdf))}[/bold]" if pdf else ""))
    if not data.ok:
        raise typer.Exit(1)


server_app = _typer(help="Coordinator admin: run the SuperLink.", no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("start")
@friendly
def server_start(
    keys: Annotated[Path | None, typer.Option(help="Keys folder from `fedrelapse keys` (TLS).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="The SuperLink's one port (Fleet, Control, Runtime).")] = 9092,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS: only for a loopback test (needs --no-node-auth).")] = False,
    no_node_auth: Annotated[bool, typer.Option("--no-node-auth", help="Admit any SuperNode, registered or not: only for a loopback test.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Run the coordinator's SuperLink: TLS and SuperNode authentication (only registered site keys may join); runtime dependency installation off."""
    import os
    import shlex

    from server.deployment import scripts_first_on_path, superlink_argv
    from shared.flower_env import TELEMETRY_ENV

    if keys is None and not insecure:
        raise typer.BadParameter("Give --keys (TLS) or, for a loopback test only, --insecure --no-node-auth.")
    if insecure and not no_node_auth:
        raise typer.BadParameter("SuperNode authentication needs TLS; with --insecure (loopback test only) add --no-node-auth.")
    argv = superlink_argv(keys=None if insecure else keys, host=host, port=port, node_auth=not no_node_auth)
    env = scripts_first_on_path(dict(os.environ))  # the SuperLink starts flower-superexec by name; telemetry off
    if dry_run:  # one line a shell runs as server start would
        print(shlex.join(["env", f"{TELEMETRY_ENV}={env[TELEMETRY_ENV]}", *argv]))
    if no_node_auth:
        err_console.print("[yellow]warning: SuperNode authentication is OFF: any node that trusts the CA may join. Use this for a loopback test only.[/yellow]")
    else:
        k = keys or Path("keys")
        err_console.print(
            "SuperNode authentication is on: only registered site keys may join. Once the SuperLink is up, register each site's public key:\n"
            f"  fedrelapse server register-site NAME --keys {k} --superlink 127.0.0.1:{port}\n"
            f"and revoke a site with `fedrelapse server revoke-site NAME --keys {k} --superlink 127.0.0.1:{port}` (docs/runbook-hospital-it.md).",
            soft_wrap=True,
        )
    if dry_run:
        return
    os.execve(argv[0], argv, env)


@contextlib.contextmanager
def _registry(keys: Path, superlink: str) -> Iterator[NodeRegistry]:
    """The node registry of the SuperLink at ``superlink``, reached over TLS with the consortium
    CA through a throw-away Flower configuration (the admin's ~/.flwr is left alone)."""
    import tempfile

    from server.node_registry import NodeRegistry, write_connection

    ca = keys / "ca" / "ca.pem"
    if not ca.is_file():
        raise typer.BadParameter(f"{ca} does not exist; give the keys folder made by `fedrelapse keys ca`.")
    with tempfile.TemporaryDirectory(prefix="fedrelapse-flwr-home-") as home:
        write_connection(Path(home), address=superlink, ca=ca)
        yield NodeRegistry(Path(home))


def _site_pub(keys: Path, name: str) -> Path:
    pub = keys / "sites" / name / "node.pub"
    if not pub.is_file():
        raise typer.BadParameter(f"{pub} does not exist; create the site's key with `fedrelapse keys site {name} --keys {keys}`.")
    return pub


@server_app.command("register-site")
@friendly
def server_register_site(
    name: Annotated[str, typer.Argument(help="Site name (its key is keys/sites/NAME/node.pub).")],
    keys: Annotated[Path, typer.Option(help="Keys folder.")] = Path("keys"),
    superlink: Annotated[str, typer.Option(help="The running SuperLink's HOST:PORT as seen from here.")] = "127.0.0.1:9092",
) -> None:
    """Admit a site: register its node public key with the running SuperLink (idempotent)."""
    pub = _site_pub(keys, name)
    with _registry(keys, superlink) as registry:
        known = registry.find(pub)
        if known:
            console.print(f"site {name}: key {pub} is already registered (node {', '.join(map(str, known))}); nothing to do.")
            return
        console.print(f"site {name}: key registered as node {registry.register(pub)}; the site may now join.")


@server_app.command("revoke-site")
@friendly
def server_revoke_site(
    name: Annotated[str, typer.Argument(help="Site name.")],
    keys: Annotated[Path, typer.Option(help="Keys folder.")] = Path("keys"),
    superlink: Annotated[str, typer.Option(help="The running SuperLink's HOST:PORT as seen from here.")] = "127.0.0.1:9092",
    public_key: Annotated[Path | None, typer.Option(help="Revoke this public key instead of keys/sites/NAME/node.pub (e.g. a node.pub.retired-* one).")] = None,
) -> None:
    """Revoke a site: unregister the node holding its key; that key can no longer join."""
    pub = public_key or _site_pub(keys, name)
    with _registry(keys, superlink) as registry:
        ids = registry.revoke(pub)
    console.print(f"site {name}: key {pub} revoked (node {', '.join(map(str, ids))} unregistered); it can no longer join.")


@site_app.command("start")
@friendly
def site_start(
    site: Annotated[Path, typer.Option(help="The site's site.yaml.")],
    superlink: Annotated[str, typer.Option(help="Coordinator address HOST:PORT.")],
    ca: Annotated[Path | None, typer.Option(help="The consortium CA certificate (ca.pem).")] = None,
    node_key: Annotated[Path | None, typer.Option(help="This site's node private key (node.key from the coordinator admin, 0600).")] = None,
    port: Annotated[int, typer.Option(help="Local port of the SuperNode's ClientApp API.")] = 9094,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS and no node key: only for a loopback test.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
    clientapp: Annotated[str, typer.Option(help="worker: one long-lived site process runs every message (data stays loaded); per-message: a fresh process per message (Flower's default, slower).")] = "worker",
) -> None:
    """Run this site's SuperNode (TLS, node key) with the pinned, installed ClientApp.

    The SuperNode's ClientApp process is client/pinned_app.py: it never installs or imports code from a submitted app bundle, and refuses a bundle that carries any. In worker mode (default) each message's process hands its task to the site worker (client/site_worker.py, socket under state_dir/worker, 0700/0600), which keeps the site's data loaded. When idle, the SuperNode asks the coordinator for work every site.yaml idle_poll_s (client/supernode_main.py).
    """
    import os
    import shlex

    from client.pinned_app import CLIENTAPP_MODES, LAUNCHER, SUPEREXEC_POLL_ENV, launcher_env, write_launcher
    from server.deployment import supernode_argv
    from shared.config import load_site
    from shared.flower_env import TELEMETRY_ENV

    if ca is None and not insecure:
        raise typer.BadParameter("Give --ca (the consortium ca.pem) or, for a loopback test only, --insecure.")
    if node_key is None and not insecure:
        raise typer.BadParameter("Give --node-key (this site's node.key); the coordinator admits only registered site keys.")
    if clientapp not in CLIENTAPP_MODES:
        raise typer.BadParameter(f"--clientapp is {clientapp!r}; choose one of {', '.join(CLIENTAPP_MODES)}.")
    cfg = load_site(site)
    _check_site_files(cfg, site, ca=None if insecure else ca, node_key=None if insecure else node_key)
    argv = supernode_argv(site_yaml=site, superlink=superlink, ca=None if insecure else ca, port=port, node_key=None if insecure else node_key,
                          idle_poll_s=cfg.idle_poll_s, idle_poll_growth=cfg.idle_poll_growth)
    state_dir = cfg.state_dir
    bin_dir = state_dir / "bin"
    launcher = write_launcher(bin_dir, worker_dir=state_dir / "worker" if clientapp == "worker" else None)
    env = launcher_env(bin_dir)
    if dry_run:  # one line a shell runs as site start would: the pinned launcher first on PATH
        print(shlex.join(["env", *(f"{k}={env[k]}" for k in ("PATH", SUPEREXEC_POLL_ENV, TELEMETRY_ENV)), *argv]))
        print(f"{LAUNCHER}: {launcher} ({clientapp})")
        return
    os.execve(argv[0], argv, env)


def _check_site_files(cfg: SiteConfig, site_yaml: Path, *, ca: Path | None, node_key: Path | None) -> None:
    """Before a SuperNode starts (and with --dry-run): the CA and node key parse and the node key
    and the site's own secrets are owner-only; site.yaml's coordinator key is the right kind of
    key (a warning when it is not set: global models are then not verified)."""
    from client.site import site_key_paths
    from client.startup_checks import check_ca, check_node_key, check_private_key_mode, coordinator_key

    if ca is not None:
        check_ca(ca)
    if node_key is not None:
        check_node_key(node_key)
    check_private_key_mode(site_key_paths(cfg.state_dir)[0], "The site's ledger signing key")
    check_private_key_mode(cfg.state_dir / "noise-seed.key", "The site's noise seed")
    if coordinator_key(cfg, str(site_yaml)) is None:
        err_console.print(
            f"[yellow]warning: {escape(str(site_yaml))} sets no coordinator_public_key: this site will train on global models "
            "without checking that the coordinator signed them. Set it to the coordinator's model-signing.pub.pem.[/yellow]", soft_wrap=True,
        )


keys_app = _typer(help="Coordinator admin: consortium CA, TLS certificate, model-signing and site node keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("ca")
@friendly
def keys_ca(keys: Annotated[Path, typer.Option(help="Keys folder.")] = Path("keys")) -> None:
    """Create the consortium CA (keep ca.key offline; give ca.pem to every site)."""
    from server.keys import make_ca

    console.print(f"CA certificate: {make_ca(keys)}  → copy to every site (root certificate)")
    console.print(f"CA private key: {keys / 'ca' / 'ca.key'}  → keep offline")


@keys_app.command("server")
@friendly
def keys_server(
    keys: Annotated[Path, typer.Option(help="Keys folder.")] = Path("keys"),
    host: Annotated[list[str] | None, typer.Option(help="DNS name or IP the sites connect to (repeatable; an international name is IDNA-encoded).")] = None,
    ask_ca_passphrase: Annotated[bool, typer.Option("--ask-ca-passphrase", help="ca.key is encrypted: ask for its passphrase (not stored).")] = False,
) -> None:
    """Coordinator TLS certificate (signed by the CA) and the model-signing key."""
    from server.keys import certificate_names, make_server, names_in

    hosts = tuple(host or ["localhost", "127.0.0.1"])
    certificate_names(hosts)  # a bad --host is refused before the passphrase is asked for
    passphrase = typer.prompt("Passphrase of ca.key", hide_input=True).encode() if ask_ca_passphrase else None
    cert = make_server(keys, hosts=hosts, ca_passphrase=passphrase)
    console.print(f"TLS certificate: {cert} and key {keys / 'server' / 'server.key'}  → stay on the coordinator")
    console.print(f"names in the certificate: {', '.join(names_in(cert))}  → the sites give one of these as --superlink HOST:PORT", soft_wrap=True)
    console.print(f"model-signing public key: {keys / 'server' / 'model-signing.pub.pem'}  → copy to every site")


@keys_app.command("site")
@friendly
def keys_site(
    name: Annotated[str, typer.Argument(help="Site name.")],
    keys: Annotated[Path, typer.Option(help="Keys folder.")] = Path("keys"),
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the site's key pair; the old one is kept as node.*.retired-<UTC>.")] = False,
    superlink: Annotated[str | None, typer.Option(help="With --rotate: also register the new key and revoke the old one at this running SuperLink (HOST:PORT).")] = None,
) -> None:
    """A site's SuperNode key pair for node authentication (private key goes to that site only)."""
    from server.keys import make_site, rotate_site

    if superlink and not rotate:
        raise typer.BadParameter("--superlink goes with --rotate; to admit a new site run `fedrelapse server register-site NAME`.")
    if not rotate:
        priv, pub = make_site(keys, name)
        console.print(f"node private key: {priv}  → give to site {name} only (its IT installs it, 0600)")
        console.print(f"node public key: {pub}  → register at the coordinator: fedrelapse server register-site {name} --keys {keys}")
        return
    retired, pub = rotate_site(keys, name)
    console.print(f"retired key pair: {retired.with_name(retired.name.replace('node.pub', 'node.key'))} and {retired}")
    console.print(f"new node private key: {pub.with_name('node.key')}  → give to site {name} only (replace its node.key, restart its SuperNode)")
    if superlink is None:
        console.print(f"next, at the coordinator: fedrelapse server register-site {name} --keys {keys}, then "
                      f"fedrelapse server revoke-site {name} --keys {keys} --public-key {retired}", soft_wrap=True)
        return
    with _registry(keys, superlink) as registry:
        console.print(f"new key registered as node {registry.register(pub)}")
        revoked = registry.revoke(retired)
    console.print(f"old key revoked (node {', '.join(map(str, revoked))} unregistered): the site rejoins once it restarts with the new key.")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err_console)


def main() -> None:
    from shared.flower_env import disable_flower_telemetry_here

    disable_flower_telemetry_here()  # before anything imports Flower: simulations run it in this process
    app()


if __name__ == "__main__":
    main()
