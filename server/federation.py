"""The federated round loop the ServerApp runs (Flower Message API, FedAvg by patients).

We drive the strategy's configure/aggregate steps ourselves rather than ``Strategy.start``
so that every round is checkpointed, printed and written to the run folder as it ends, and
a round in which every site refused is reported as not updating the model.

Evaluation (``federation.evaluation``): ``separate`` sends an evaluate message after each
round's training (two message exchanges per round). ``with-next-round`` (Fed-BioMed's
"test on global updates") asks, in round r's train message, each site to evaluate the model
it carries (round r-1's) before training; the reports come back in the train replies and
complete round r-1's record, whose row prints then. The last round's model is evaluated by
one evaluate message, timed in that round. R rounds cost R + 1 exchanges instead of 2R.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.aggregation import make_server_optimizer, server_step
from server.resume import ResumePoint
from server.run_folder import RoundRecord, RunFolder, why_no_auroc
from server.secure_round import secure_train_round
from server.strategy import PatientFedAvg, SiteReport, evaluation_reports, scalar_metrics, site_reports, wait_for_nodes
from shared import metrics as M  # noqa: N812
from shared import protocol as P  # noqa: N812
from shared.config import ExperimentConfig
from shared.console import output_console
from shared.model_signing import sign_model
from shared.models import build_model
from shared.params import get_arrays, layout, pack, unpack

log = logging.getLogger("fedrelapse.server")


def run_federation(
    grid: Grid, exp: ExperimentConfig, out: Path, run_id: str, console: Console | None = None, signing_key: Ed25519PrivateKey | None = None,
    *, resume: ResumePoint | None = None, after_round: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run all rounds; return the summary written to ``out/summary.json``.

    With ``signing_key``, every global model sent is signed (sites with the coordinator's
    public key refuse anything unsigned or altered) and so is every checkpoint. With
    ``resume`` (see :mod:`server.resume`), the run continues from its last recorded round.
    ``after_round`` is called once each round is recorded (fault-injection tests).
    """
    console = console or output_console()
    run = RunFolder(out, exp, run_id, signing_key=signing_key, previous=resume.rounds if resume else ())
    f = exp.federation
    strategy = PatientFedAvg(
        fraction_train=f.fraction_train, fraction_evaluate=f.fraction_evaluate, min_nodes=f.min_nodes, node_wait_timeout_s=f.node_wait_timeout_s,
        round_timeout_s=f.round_timeout_s, private=exp.privacy.enabled, min_patients_metric=f.min_patients_metric, max_weight=f.secure_aggregation.max_weight,
        metrics_noise_multiplier=exp.privacy.metrics_noise_multiplier if exp.privacy.noised_metrics else 0.0, eval_fraction=exp.training.eval_fraction,
    )
    strategy.summary()
    initial = get_arrays(build_model(exp))
    strategy.expected = shapes = layout(initial)  # the packed wire format's layout (never sent: sites build it from the plan)
    strategy.set_move_bound(optimizer=exp.training.optimizer, learning_rate=exp.training.learning_rate, local_steps=exp.training.local_steps)
    model: dict[str, np.ndarray] = resume.arrays if resume else initial  # the global model, name -> array
    arrays = pack(model, shapes)  # ... and as it travels: one float32 vector
    first_round = resume.next_round if resume else 1
    if resume:
        console.print(f"resuming run {escape(run_id)} at round {first_round} of {f.rounds} from its verified checkpoint; sites refuse to be charged again for any round they already accounted.", soft_wrap=True)
    plan = exp.to_yaml()
    status = "completed"
    if exp.privacy.enabled:
        refusals = preflight(grid, strategy, exp, run_id, plan, console, resumed_at=first_round if resume else None)
        if refusals:
            console.print("[red]The run was not started: these sites would refuse it (their privacy policy decides, not the coordinator):[/red]", soft_wrap=True)
            for r in refusals:
                console.print(f"  [red]{escape(r.site)}: {escape(r.refusal_reason or r.error or '')}[/red]", soft_wrap=True)
            return run.finish(status="refused before start", extra={"preflight_refusals": [{"site": r.site, "code": r.refusal_code, "reason": r.refusal_reason or r.error} for r in refusals]})
    phash = exp.plan_hash()

    def config(rnd: int, current: dict[str, np.ndarray]) -> ConfigRecord:
        cfg = ConfigRecord({P.RUN_ID: run_id, P.TOTAL_ROUNDS: f.rounds, P.PLAN_YAML: plan})
        if signing_key is not None:  # over the unpacked name -> array dict, so the signature binds the names too
            cfg[P.MODEL_SIGNATURE] = sign_model(signing_key, current, run_id=run_id, server_round=rnd, plan_hash=phash)
        return cfg

    sa = f.secure_aggregation
    if sa.enabled:
        console.print(f"Secure aggregation (SecAgg+) on: the coordinator sees only the weighted sum; {sa.num_shares} shares, threshold {sa.reconstruction_threshold}.", soft_wrap=True)
    if exp.privacy.noised_metrics:
        console.print(f"Noised metrics (privacy.metrics_noise_multiplier {exp.privacy.metrics_noise_multiplier:g}): each AUROC is read from the sites' noised score histograms, "
                      "each release charged to the site's ledger; with few held-out patients a site it is mostly noise (`fedrelapse bench metrics-noise`).", soft_wrap=True)
    if f.evaluates_with_next_round:
        console.print("Evaluation with the next round: each round's row prints when the next round's replies bring its AUROC; the final model is evaluated by one last evaluate message.", soft_wrap=True)
    # FedAdam; None = FedAvg. A resumed run restarts the server moments from zero.
    server_opt = make_server_optimizer(f.server_optimizer, lr=f.server_learning_rate)
    def evaluated_by_message(server_round: int, arrays: ArrayRecord, model: dict[str, np.ndarray]) -> dict[str, float]:
        """The sites' evaluation of the model after ``server_round``, asked by an evaluate message,
        averaged by patients (the reports are kept in the strategy's log of that round)."""
        replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, config(server_round, model), grid), timeout=f.round_timeout_s)
        return scalar_metrics(strategy.aggregate_evaluate(server_round, replies))

    pending = pending_evaluation(run.rounds)  # the round whose model the next train message has the sites evaluate
    rows = RoundPrinter(console)  # the round table's header goes with the first row this process prints (a resumed run's too)
    for rnd in range(first_round, f.rounds + 1):
        started = time.perf_counter()
        cfg = config(rnd, model)
        if pending is not None:
            cfg[P.EVALUATE_FIRST] = True
        new_arrays, train_metrics, halted = train_round(grid, strategy, exp, rnd, arrays, cfg)
        if pending is not None:  # the previous round's evaluation rode in these replies
            if any(r.evaluation is not None for r in strategy.log[rnd].train):
                evaluated = record_evaluation_from_train(run, strategy, pending, rnd)
            else:  # none did (no site reached, or all silent or failed): evaluate that model by its own message, as `separate` does
                evaluated = run.record_evaluation(pending, strategy.log[pending], evaluated_by_message(pending, arrays, model))
            rows.show(evaluated)
            pending = None
        updated = new_arrays is not None
        if new_arrays is not None:
            average = unpack(new_arrays, shapes, what="the aggregated model")
            model = server_step(server_opt, model, average)
            arrays = pack(model, shapes) if server_opt else new_arrays
        if f.evaluates_with_next_round and rnd < f.rounds:
            rec = run.record_round(
                rnd, strategy.log[rnd], scalar_metrics(train_metrics), {}, dict(model), updated, note=halted or "",
                wall_s=round(time.perf_counter() - started, 4), evaluation_pending=True,
            )
            pending = rnd
        else:
            eval_metrics = evaluated_by_message(rnd, arrays, model)
            rec = run.record_round(
                rnd, strategy.log[rnd], scalar_metrics(train_metrics), eval_metrics, dict(model), updated, note=halted or "",
                wall_s=round(time.perf_counter() - started, 4),
            )
            rows.show(rec)
        if halted:
            status = "incomplete: a round had no usable update"
            log.error("run=%s round=%d: %s", run_id, rnd, halted)
            console.print(f"  [bold red]round {rnd} FAILED: {escape(halted)} The global model was NOT updated; the next round starts from round {rnd - 1}'s model.[/bold red]", soft_wrap=True)
        elif not updated:
            status = "incomplete: a round had no usable update"
            console.print(f"  [red]round {rnd}: no site sent a usable update; the global model was not updated.[/red]", soft_wrap=True)
        if after_round is not None:
            after_round(rnd)
    if any(not r.updated for r in run.rounds):
        status = "incomplete: a round had no usable update"
    return run.finish(status=status, extra={"resumed_at_round": first_round} if resume else None)


def train_round(
    grid: Grid, strategy: PatientFedAvg, exp: ExperimentConfig, rnd: int, arrays: ArrayRecord, cfg: ConfigRecord,
) -> tuple[ArrayRecord | None, MetricRecord | None, str | None]:
    """One training exchange, plain or SecAgg+: (new model or None, train metrics, why SecAgg+ halted or None)."""
    f = exp.federation
    if f.secure_aggregation.enabled:
        result = secure_train_round(grid, strategy=strategy, sa=f.secure_aggregation, server_round=rnd, arrays=arrays, config=cfg)
        return result.arrays, result.metrics, result.halted
    replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, cfg, grid), timeout=f.round_timeout_s)
    new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
    return new_arrays, train_metrics, None


class RoundPrinter:
    """Prints the round table one row at a time, as rounds end: the header with the first row
    printed (round 1, or the first round of a resumed run), each row then its site problems."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.header_printed = False

    def show(self, rec: RoundRecord) -> None:
        """A round's row (with-next-round: once its evaluation has arrived), then its site problems."""
        show_round(self.console, rec, header=not self.header_printed)
        self.header_printed = True


def show_round(console: Console, rec: RoundRecord, *, header: bool) -> None:
    """A round's row of the round table (``header``: with the column names), then its site problems."""
    table = round_table(rec, header)
    console.print(table, crop=False)  # never cut a site's ε column: a narrow terminal wraps the line instead
    print_site_problems(console, rec)


def print_site_problems(console: Console, rec: RoundRecord) -> None:
    """One line per site that refused or failed a round's training or sent no evaluation of its
    model, printed under the round's row; and, when every evaluation was a noised release and
    their sum gave no AUROC, why."""
    if rec.auroc is None and not rec.evaluation_pending and why_no_auroc(rec.sites).startswith("the sites' noised statistics"):
        console.print(f"  [yellow]round {rec.round}: no federated AUROC: {escape(why_no_auroc(rec.sites))}[/yellow]", soft_wrap=True)
    for site, entry in sorted(rec.sites.items()):
        if "refused" in entry:
            console.print(f"  [yellow]site {escape(site)} refused round {rec.round}: {escape(str(entry['refused']['reason']))}[/yellow]", soft_wrap=True)
        if "error" in entry:
            console.print(f"  [red]site {escape(site)} failed in round {rec.round}: {escape(str(entry['error']))}[/red]", soft_wrap=True)
        elif "eval_error" in entry:
            console.print(f"  [yellow]site {escape(site)} sent no evaluation of round {rec.round}'s model: {escape(str(entry['eval_error']))}[/yellow]", soft_wrap=True)


def pending_evaluation(rounds: list[RoundRecord]) -> int | None:
    """The last recorded round when its model still awaits its evaluation (with-next-round, and a
    resumed run whose coordinator stopped before the next round's replies), else None."""
    return rounds[-1].round if rounds and rounds[-1].evaluation_pending else None


def record_evaluation_from_train(run: RunFolder, strategy: PatientFedAvg, evaluated: int, rnd: int) -> RoundRecord:
    """Round ``evaluated``'s evaluation from round ``rnd``'s train replies: kept in the strategy's
    log of round ``evaluated``, aggregated as an evaluate phase is, and added to its record."""
    reports = evaluation_reports(strategy.log[rnd].train)
    metrics = strategy.aggregate_evaluation(evaluated, reports)
    return run.record_evaluation(evaluated, strategy.log[evaluated], scalar_metrics(metrics))


def preflight(grid: Grid, strategy: PatientFedAvg, exp: ExperimentConfig, run_id: str, plan: str, console: Console, *, resumed_at: int | None = None) -> list[SiteReport]:
    """Ask every connected site what the run would cost it; return the sites that would refuse.
    ``resumed_at``: the run is resumed at this round (the sites quote the whole run's ε, part of
    it already charged; the printed line says so)."""
    nodes = wait_for_nodes(grid, exp.federation.min_nodes, exp.federation.node_wait_timeout_s)
    cfg = ConfigRecord({P.RUN_ID: run_id, P.TOTAL_ROUNDS: exp.federation.rounds, P.PLAN_YAML: plan})
    msgs = [Message(content=RecordDict({P.CONFIG: cfg}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    # The first message a freshly started site client handles (it loads its data first): it
    # gets the joining allowance when that is longer than a round's.
    replies = list(grid.send_and_receive(msgs, timeout=max(exp.federation.round_timeout_s, exp.federation.node_wait_timeout_s)))
    reports = site_reports(replies, strategy.node_names)
    answered = {m.metadata.src_node_id for m in replies}
    reports += [SiteReport(site=strategy.node_names.get(n, f"node-{n}"), node=n, error="no reply to the pre-flight plan query") for n in nodes if n not in answered]
    for r in reports:
        if r.metrics:
            console.print(preflight_line(r.site, r.metrics, resumed_at), soft_wrap=True)
    return [r for r in reports if r.refusal_code or r.error]


def preflight_line(site: str, metrics: dict[str, Any], resumed_at: int | None = None) -> str:
    """The pre-flight line of one site: the ε the whole run costs it (on a resume: rounds before
    ``resumed_at`` are already charged, and a round the site accounted is never charged again)."""
    eps, sigma, left = metrics.get(M.EPSILON_RUN, 0), metrics.get(M.NOISE_MULTIPLIER, 0), metrics.get(M.EPSILON_REMAINING, 0)
    if resumed_at is None or resumed_at <= 1:
        return f"  plan: site {escape(site)} would spend ε={eps:.2f} (σ={sigma:.2f}), all-time budget left {left:.2f}"
    charged = "round 1 already charged" if resumed_at == 2 else f"rounds 1–{resumed_at - 1} already charged"
    return (f"  plan: site {escape(site)}: this run's total ε={eps:.2f} (σ={sigma:.2f}; {charged}, none charged twice), "
            f"all-time budget left {left:.2f}")


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def round_table(rec: RoundRecord, header: bool) -> Table:
    """One row of the per-round table (round, train loss, federated AUROC, ε per site)."""
    sites = sorted(rec.sites)
    widths = [5, 10, 10, *(max(8, len(s) + 2) for s in sites)]
    # as wide as its columns whatever the console's width: a site's name is never shortened
    # (two sites `alpha-0…` could not be told apart); each row is its own table, so fixed widths align them
    table = Table(show_header=header, box=None, pad_edge=False, width=sum(widths) + 2 * (len(widths) - 1))
    table.add_column("round", justify="right", width=widths[0], no_wrap=True)
    table.add_column("train loss", justify="right", width=widths[1], no_wrap=True)
    table.add_column("fed AUROC", justify="right", width=widths[2], no_wrap=True)
    for s, w in zip(sites, widths[3:], strict=True):
        table.add_column(f"ε {escape(s)}", justify="right", width=w, no_wrap=True)
    eps = [_fmt(rec.sites[s].get(M.EPSILON_RUN), ".2f") if "refused" not in rec.sites[s] else "refused" for s in sites]
    suppressed = rec.auroc is None and why_no_auroc(rec.sites).startswith("suppressed")
    table.add_row(str(rec.round), _fmt(rec.train_loss), "suppressed" if suppressed else _fmt(rec.auroc), *eps)
    return table
