"""``meshjobs jobs ...``: the state, results and dead letters of durable jobs."""

from __future__ import annotations

import json
from typing import Any

import click

from meshjobs.cli._common import WEEK_S, Seconds, guarded, identity_for_use, print_value, run, server_option, servers
from meshjobs.cli._render import safe_text


async def _open(server: str) -> Any:
    from meshjobs._nats import connect
    from meshjobs.durable import Durable

    nc = await connect(servers(server), identity_for_use(), name="meshjobs-jobs")
    try:
        return nc, await Durable.open(nc)
    except BaseException:
        await nc.close()
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
    """Where a durable job is: queued, running, done, failed or dead."""
    from meshjobs.errors import UsageError

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            state = await durable.state(job_id)
        finally:
            await nc.close()
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
        nc, durable = await _open(server)
        try:
            found = await durable.wait(job_id, wait_s)
        finally:
            await nc.close()
        print_value(found, as_json, job_id)

    run(go())


@jobs.command("wait")
@click.argument("job_ids", nargs=-1, required=True)
@click.option(
    "--timeout", type=Seconds(max=WEEK_S), default=300.0, show_default=True, help="Seconds to wait for all of them."
)
@server_option
@guarded
def wait(job_ids: tuple[str, ...], timeout: float, server: str) -> None:
    """Wait for many durable jobs, with progress; exits 4 if some have no result in time."""
    import asyncio

    from rich.progress import Progress

    from meshjobs.errors import JobTimeout

    async def go() -> None:
        nc, durable = await _open(server)
        pending = set(job_ids)
        try:
            with Progress(transient=False) as progress:
                bar = progress.add_task("jobs done", total=len(job_ids))
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while pending and loop.time() < deadline:
                    for job_id in list(pending):
                        if await durable.results.get(job_id) is not None:
                            pending.discard(job_id)
                            progress.advance(bar)
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()
        if pending:
            raise JobTimeout(f"{len(pending)} of {len(job_ids)} job(s) have no result after {timeout:g} s")

    run(go())


@jobs.command("list")
@click.option("--state", "only", type=click.Choice(["queued", "running", "done", "failed", "dead"]))
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def list_jobs(only: str | None, limit: int, as_json: bool, server: str) -> None:
    """Recent durable jobs, newest last (job ids sort by time)."""

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            states = await durable.list_states(limit=limit * 4 if only else limit)
        finally:
            await nc.close()
        rows = [s for s in states if only is None or s.state == only][-limit:]
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in rows], indent=2))
            return
        for s in rows:
            detail = safe_text(s.detail, markup=False)
            click.echo(f"{s.job_id}  {s.state:<8} {s.capability:<24} attempts={s.attempts} {detail}")
        if not rows:
            click.echo("no durable jobs")

    run(go())


@jobs.command("dlq")
@click.option("--redrive", "redrive_id", help="Queue this dead job again (as its submitter).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def dlq(redrive_id: str | None, as_json: bool, server: str) -> None:
    """The dead-letter queue: jobs that failed every attempt, with the reason."""

    async def go() -> None:
        nc, durable = await _open(server)
        try:
            if redrive_id:
                await durable.redrive(identity_for_use(), redrive_id)
                click.echo(f"re-queued {redrive_id}")
                return
            dead = await durable.dead_letters()
        finally:
            await nc.close()
        if as_json:
            click.echo(json.dumps([{k: v for k, v in d.items() if k != "envelope"} for d in dead], indent=2))
            return
        for d in dead:
            what = safe_text(f"{d['job_id']}  {d['capability']:<24}", markup=False)
            click.echo(f"{what} attempts={d['attempts']} {safe_text(d['reason'], markup=False)}")
        if not dead:
            click.echo("the dead-letter queue is empty")

    run(go())
