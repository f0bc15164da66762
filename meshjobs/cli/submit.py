"""Submitting: ``submit`` and ``peers``."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from meshjobs.cli._common import (
    DAY_S,
    WEEK_S,
    Fraction,
    Seconds,
    guarded,
    identity_for_use,
    open_router,
    print_value,
    run,
    server_option,
    servers,
)
from meshjobs.client import Client
from meshjobs.durable import Durable
from meshjobs.errors import UsageError
from meshjobs.runtime.app import PEER_KINDS

log = logging.getLogger("meshjobs.cli")


@click.command()
@click.argument("capability")
@click.argument("json_args", required=False)
@click.option("--timeout", type=Seconds(max=DAY_S, positive=True), default=30.0, show_default=True,
              help="Seconds to wait for the result, retries and fallbacks included.")  # fmt: skip
@click.option("--peer", help="Only this peer (its public key).")
@click.option("--min-trust", type=Fraction(), help="Only peers whose reputation score is at least this.")
@click.option("--region", help="Only peers in this region.")
@click.option("--kind", type=click.Choice(PEER_KINDS), help="Only peers of this kind.")
@click.option("--replicas", type=click.IntRange(1, 15), default=1, show_default=True,
              help="Run on this many distinct peers, compare results (deterministic capabilities).")  # fmt: skip
@click.option(
    "--quorum", type=click.IntRange(1, 15), help="Agreeing results needed [default: a majority of --replicas]."
)
@click.option("--trace", is_flag=True, help="Show every peer tried, on stderr.")
@click.option("--job-id", help="Job id to use (retries with the same id never run twice on a peer).")
@click.option("--peer-wait", type=Seconds(max=DAY_S), default=2.0, show_default=True,
              help="Seconds to keep trying while no peer offers the capability.")  # fmt: skip
@click.option("--durable", is_flag=True, help="Queue on JetStream: survives crashes; prints the job id.")
@click.option(
    "--wait",
    "wait_s",
    type=Seconds(max=WEEK_S),
    help="With --durable: wait this many seconds for the result and print it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full signed record as JSON.")
@server_option
@click.pass_context
@guarded
def submit(ctx: click.Context, /, capability: str, json_args: str | None, **opts: Any) -> None:
    """Sign a command, send it, wait, verify the signed result and print its value.

    Without routing options the command goes to the capability's queue group.
    With --min-trust, --region, --kind, --replicas or --trace it is routed:
    to the most trusted qualified peer, falling back to the next on failure.
    Every outcome becomes signed evidence for the reputation of the peer.

    \b
    Exit codes: 0 done; 1 the handler failed; 2 usage or bad input;
    3 no capable peer (or no broker); 4 timed out; 5 rejected.
    """
    from meshjobs.client import parse_args
    from meshjobs.router import Constraints
    from meshjobs.subjects import check_capability
    from meshjobs.submit import SubmitOptions, Submitter

    ctx.meta["json"] = opts["as_json"]
    check_capability(capability)
    args = parse_args(json_args)
    if opts["wait_s"] is not None and not opts["durable"]:
        raise UsageError("--wait applies to --durable jobs; use --timeout to bound a plain submit")
    options = SubmitOptions(
        timeout=opts["timeout"],
        peer=opts["peer"],
        job_id=opts["job_id"],
        peer_wait=opts["peer_wait"],
        constraints=Constraints(opts["min_trust"], opts["region"], opts["kind"]),
        replicas=opts["replicas"],
        quorum=opts["quorum"],
        trace=opts["trace"],
    )
    if opts["durable"] and (options.routed or opts["peer"]):
        raise UsageError("--durable goes through the capability's queue; routing options do not apply")
    identity = identity_for_use()

    async def go() -> None:
        async with await Client.connect(servers(opts["server"]), identity) as client:
            if opts["durable"]:
                submitter = Submitter(client, None)
                job_id = await submitter.enqueue(capability, args, job_id=opts["job_id"])
                if opts["wait_s"] is None:
                    click.echo(job_id)
                    return
                found = await (await Durable.open(client.nc)).wait(job_id, opts["wait_s"])
                print_value(found, opts["as_json"], job_id)
                return
            async with Submitter(client, await open_router(client)) as submitter:
                done = await submitter.submit(capability, args, options)
        if opts["trace"]:
            for attempt in done.trace:
                click.echo(
                    f"trace: {attempt.peer[:12]}… {attempt.outcome} {attempt.ms:.1f} ms {attempt.detail}", err=True
                )
        if opts["as_json"]:
            click.echo(json.dumps(done.outcome.record(), indent=2))
        else:
            click.echo(json.dumps(done.outcome.value, ensure_ascii=False))

    run(go())


@click.command()
@click.option("--timeout", type=Seconds(max=DAY_S, positive=True), default=1.0, show_default=True,
              help="Seconds to collect answers.")  # fmt: skip
@click.option("--capability", help="Only peers offering this capability.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def peers(timeout: float, capability: str | None, as_json: bool, server: str) -> None:
    """Who offers what, from discovery ($SRV.INFO), with reputation and quarantine state."""
    from meshjobs.cli._render import peers_table
    from meshjobs.trust.reputation import summary

    identity = identity_for_use()

    async def go() -> None:
        async with await Client.connect(servers(server), identity) as client:
            found = await client.peers(timeout=timeout, capability=capability)
            router = await open_router(client)
            rows = [p.as_dict() for p in found]
            if router is not None:
                records = await router.book.records(sorted({p.peer for p in found}))
                for row in rows:
                    record = records[row["peer"]]
                    row.update(summary(record))
                    row["quarantined"] = router.board.is_quarantined(row["peer"])
                await router.close()
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            peers_table(rows)

    run(go())
