"""``meshjobs sim``: the adversary simulation against the real runtime (see :mod:`meshjobs.sim`)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from meshjobs.cli._common import DAY_S, Bounded, Fraction, Seconds, fail, guarded
from meshjobs.sim.scenarios import MAX_PRETRUSTED, SCENARIOS

_LABELS = {"starting": "starting peers", "jobs": "jobs", "settling": "settling reputation", "stopping": "stopping"}


@click.command()
@click.option("--peers", type=click.IntRange(2, 200), default=40, show_default=True, help="Simulated peers.")
@click.option("--malicious", type=Fraction(), default=0.3, show_default=True, help="Fraction of peers that cheat.")
@click.option("--jobs", type=click.IntRange(1, 100_000), default=300, show_default=True, help="Jobs to submit.")
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Chooses the cheaters and the jobs' arguments.",
)
@click.option("--scenario", type=click.Choice(SCENARIOS), default="always-wrong", show_default=True,
              help="How cheaters behave.")  # fmt: skip
@click.option("--pretrusted", type=click.IntRange(0, MAX_PRETRUSTED), default=None,
              help="Honest peers the operator attests ([[pretrusted]] anchors): trust grows from them; "
                   "0 leaves the mesh without a root of trust.  [default: 3 per 40 peers, at least 1]")  # fmt: skip
@click.option("--p", "p", type=Fraction(), default=0.3, show_default=True,
              help="camouflage: how often a cheater answers wrong.")  # fmt: skip
@click.option("--k", "k", type=click.IntRange(0, 1_000_000), default=5, show_default=True,
              help="long-con: jobs a cheater answers honestly before it turns.")  # fmt: skip
@click.option("--collude", is_flag=True,
              help="camouflage, long-con: the cheaters act as one, returning one wrong value per job "
                   "(camouflage: cheating on the same jobs), so checks between two of them agree.")  # fmt: skip
@click.option("--role-aware", is_flag=True,
              help="Cheaters answer honestly whenever a request looks like a check (less validity left than a "
                   "job's first request), cheating only where they guess they are the first peer asked.")  # fmt: skip
@click.option("--verify", default="auto", show_default=True, help="The submitter's --verify: auto, off or quorum:N/M.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True, help="Jobs in flight.")
@click.option("--rate", type=Bounded(0.0, 100_000.0), default=0.0, show_default=True,
              help="Jobs started per second at most; 0: as fast as they finish. A slower pace lets the "
                   "trust service's records keep up with the evidence.")  # fmt: skip
@click.option("--processes", "hosts", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Worker processes the peers are spread over.")  # fmt: skip
@click.option("--communities", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Communities the peers are spread over.")  # fmt: skip
@click.option("--timeout", type=Seconds(max=DAY_S, positive=True), default=600.0, show_default=True,
              help="Seconds for the whole run; unfinished jobs are left out and the exit code is 4.")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the run's directory (logs, execution log) and print its path.")
@click.option("--check", is_flag=True, help="Exit 1 when the run misses an acceptance target (issue 11).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@guarded
def sim(as_json: bool, check: bool, **opts: Any) -> None:
    """Adversary simulation: real workers, trust service and submit path on a private embedded broker.

    Cheaters return correctly signed wrong values (--scenario): always-wrong;
    camouflage (wrong with probability --p); collective (all the same wrong
    value); long-con (honest for --k jobs, then wrong); forge (always wrong,
    and forging reputation records and evidence with fresh keys). With
    --collude, camouflage and long-con cheaters act as one; with --role-aware,
    cheaters answer honestly whenever they guess they are checking.
    Every process and file of the run is gone when it ends, Ctrl-C included.
    """
    from meshjobs.sim import SimConfig, run_sim
    from meshjobs.sim.report import check as missed_targets

    config = SimConfig(**opts)
    with _sigterm_as_interrupt(), _progress(enabled=sys.stderr.isatty()) as progress:
        try:
            report = run_sim(config, progress)
        except KeyboardInterrupt:
            fail("interrupted; every process of the run was stopped", 130)
    missed = missed_targets(report)
    if as_json:
        click.echo(json.dumps({**report, "missed_targets": missed}))
    else:
        _table(report, missed)
    if report["timed_out"]:
        fail(f"the run timed out after {config.timeout:g} s: {report['jobs_finished']} of {config.jobs} jobs", 4)
    if check and missed:
        fail("missed: " + "; ".join(missed), 1)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM stops the run like a Ctrl-C: cleanly, children and files included."""

    def forward(signum: int, frame: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _progress(*, enabled: bool) -> Iterator[Any]:
    """A progress callback: a rich progress bar on a terminal (stderr), nothing otherwise."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                for task in tasks.values():
                    bar.stop_task(task)
                tasks[phase] = bar.add_task(_LABELS.get(phase, phase), total=total or None)
            bar.update(tasks[phase], completed=done, total=total or None)

        yield update


def _table(report: dict[str, Any], missed: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from meshjobs.sim.report import TARGETS, label

    targets = {name: f"{op} {bound:g}" for name, op, bound in TARGETS}
    title = (
        f"meshjobs sim: {label(report)}, "
        f"seed {report['seed']}, {report['peers']} peers "
        f"({report['malicious']} malicious, {report['pretrusted']} pre-trusted), {report['jobs']} jobs, "
        f"{report['seconds']:g} s"
    )
    table = Table()
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target")
    rows: list[tuple[str, Any]] = [
        ("wrong_rate", report["wrong_rate"]),
        ("failed_rate", report["failed_rate"]),
        ("executions_per_job", report["executions_per_job"]),
        ("executions_per_answered_job", report["executions_per_answered_job"]),
        ("executions_reported_per_job", report["executions_reported_per_job"]),
        ("execution_count_mismatches", report["execution_count_mismatches"]),
        ("honest_work_share", report["honest_work_share"]),
        ("pretrusted_work_share", report["pretrusted_work_share"]),
        ("honest_peers_used", report["honest_peers_used"]),
        ("malicious_quarantined", f"{report['malicious_quarantined']} of {report['malicious']}"),
        ("honest_quarantined", f"{report['honest_quarantined']} of {report['honest']}"),
    ]
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value), targets.get(name, ""))
    console = Console()
    console.print(title, markup=False)
    console.print(table)
    if report["errors"]:
        console.print("failed jobs: " + ", ".join(f"{n} {k}" for k, n in report["errors"].items()), markup=False)
    for note in report["adapters"]:
        console.print(f"note: {note}", markup=False)
    if report["forged"]:
        console.print("forged: " + ", ".join(f"{k} {n}" for k, n in report["forged"].items()), markup=False)
    console.print("all targets met" if not missed else "missed: " + "; ".join(missed), markup=False)
