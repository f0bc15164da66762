"""``meshjobs jobs ...``: the state, results and dead letters of durable jobs."""

from __future__ import annotations

import json
from typing import Any

import click

from meshjobs._nats import close_quietly, connect
from meshjobs.cli._common import (
    WEEK_S,
    Seconds,
    guarded,
    home,
    identity_for_use,
    metrics_options,
    print_value,
    refuse_quarantined,
    run,
    server_option,
    servers,
    start_metrics,
    wait_showing_attempts,
)
from meshjobs.cli._render import dlq_table, jobs_table, safe_text


def journal() -> Any:
    """This home's journal of the durable jobs it submitted (0600, bounded)."""
    from meshjobs.durable import JOURNAL_FILE, Journal

    return Journal(home() / JOURNAL_FILE)


async def _open(server: str) -> Any:
    from meshjobs.durable import Durable

    nc = await connect(servers(server), identity_for_use(), name="meshjobs-jobs")
    try:
        return nc, await Durable.open(nc, journal=journal())
    except BaseException:
        await close_quietly(nc)
        raise


@click.group()
def jobs() -> None:
    """Durable jobs: status, results, waiting, the dead-letter queue."""


@jobs.command("status")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def status(job_id: str, as_json: bool, server: str) -> None:
    """Where a durable job of yours is: queued, running, done, failed or dead (operators: any job)."""
    from meshjobs.errors import UsageError

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            state = await durable.state(job_id)
        finally:
            await close_quietly(nc)
        if state is None:
            raise UsageError(f"no durable job {job_id}")
        if as_json:
            click.echo(json.dumps(state.as_dict(), indent=2))
        else:
            extra = f" ({safe_text(state.detail, markup=False)})" if state.detail else ""
            click.echo(f"{job_id} {state.state} {state.capability} attempts={state.attempts}{extra}")

    run(go())


@jobs.command("result")
@click.argument("job_id")
@click.option("--wait", "wait_s", type=Seconds(max=WEEK_S), default=0.0, help="Seconds to wait for the result.")
@click.option("--json", "as_json", is_flag=True, help="Print the signed record as JSON.")
@server_option
@guarded
def result(job_id: str, wait_s: float, as_json: bool, server: str) -> None:
    """A durable job's verified result (exit codes as for `submit`; 4 while there is none)."""

    async def go() -> None:
        from meshjobs.client import Client
        from meshjobs.durable import Durable

        async with await Client.connect(servers(server), identity_for_use()) as client:
            durable = await Durable.open(client.nc, journal=journal())
            found = await wait_showing_attempts(durable, job_id, wait_s) if wait_s else await durable.wait(job_id, 0)
            await refuse_quarantined(client, job_id, found)
        print_value(found, as_json, job_id)

    run(go())


@jobs.command("wait")
@click.argument("job_ids", nargs=-1, required=True)
@click.option(
    "--timeout", type=Seconds(max=WEEK_S), default=300.0, show_default=True, help="Seconds to wait for all of them."
)
@click.option("--json", "as_json", is_flag=True, help="Print each job's state as JSON at the end.")
@metrics_options
@server_option
@guarded
def wait(
    job_ids: tuple[str, ...], timeout: float, as_json: bool, metrics_port: int | None, metrics_host: str, server: str
) -> None:
    """Wait for many durable jobs, with a progress bar on a terminal; exits 4 if some have no result in time."""
    from meshjobs.errors import JobTimeout

    start_metrics(metrics_port, metrics_host)
    wanted = list(dict.fromkeys(job_ids))

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            pending = await _await_results(durable, wanted, timeout)
        finally:
            await close_quietly(nc)
        if as_json:
            click.echo(json.dumps([{"job_id": j, "done": j not in pending} for j in wanted], indent=2))
        else:
            click.echo(f"{len(wanted) - len(pending)} of {len(wanted)} job(s) done")
        if pending:
            raise JobTimeout(f"{len(pending)} of {len(wanted)} job(s) have no result after {timeout:g} s")

    run(go())


async def _await_results(durable: Any, job_ids: list[str], timeout: float) -> set[str]:
    """Poll until every job has a verified result or *timeout* passes; returns those without one."""
    import asyncio

    from meshjobs.cli._render import progress
    from meshjobs.observe.metrics import set_awaited

    pending = set(job_ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with progress("jobs done", total=len(job_ids)) as advance:
        while pending:
            for job_id in list(pending):
                if await durable.result(job_id) is not None:
                    pending.discard(job_id)
                    advance(1)
            set_awaited(len(pending), len(job_ids) - len(pending))
            if not pending or loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.2, max(deadline - loop.time(), 0)))
    return pending


@jobs.command("list")
@click.option("--state", "only", type=click.Choice(["queued", "running", "done", "failed", "dead"]))
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--all", "everyone", is_flag=True, help="Every submitter's jobs (operators only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def list_jobs(only: str | None, limit: int, everyone: bool, as_json: bool, server: str) -> None:
    """Your recent durable jobs (from this home's journal), newest last; --all: everyone's (operators)."""

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            states = await durable.list_states(limit=limit * 4 if only else limit, everyone=everyone)
        finally:
            await close_quietly(nc)
        rows = [s for s in states if only is None or s.state == only][-limit:]
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in rows], indent=2))
        else:
            jobs_table([s.as_dict() for s in rows])

    run(go())


@jobs.command("dlq")
@click.option("--redrive", "redrive_id", help="Queue this dead job again (as its submitter).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def dlq(redrive_id: str | None, as_json: bool, server: str) -> None:
    """The dead-letter queue with the reasons (operators: everyone's; others: their own dead jobs)."""
    from meshjobs.errors import Reason, Rejected

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            if redrive_id:
                await durable.redrive(identity_for_use(), redrive_id)
                click.echo(json.dumps({"requeued": redrive_id}) if as_json else f"re-queued {redrive_id}")
                return
            try:
                dead = await durable.dead_letters()
            except Rejected as exc:
                if exc.reason != Reason.DENIED:
                    raise
                # Not an operator: the dead letters of our own jobs, from their states.
                states = await durable.list_states(limit=10_000)
                dead = [
                    {"job_id": s.job_id, "capability": s.capability, "reason": s.detail, "attempts": s.attempts}
                    for s in states
                    if s.state == "dead"
                ]
        finally:
            await close_quietly(nc)
        rows = [{k: v for k, v in d.items() if k != "envelope"} for d in dead]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            dlq_table(rows)

    run(go())
