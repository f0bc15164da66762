"""Submitting: ``submit`` and ``peers``."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from meshjobs.cli._common import (
    DAY_S,
    WEEK_S,
    Bounded,
    Fraction,
    Seconds,
    guarded,
    home,
    identity_for_use,
    local_policy,
    open_router,
    print_value,
    refuse_quarantined,
    run,
    server_option,
    servers,
    wait_showing_attempts,
)
from meshjobs.cli._render import safe_text
from meshjobs.client import Client
from meshjobs.durable import JOURNAL_FILE, Durable, Journal
from meshjobs.errors import MeshError, UsageError
from meshjobs.identity import is_public_key
from meshjobs.runtime.app import PEER_KINDS

log = logging.getLogger("meshjobs.cli")


@click.command()
@click.argument("capability")
@click.argument("json_args", required=False)
@click.option("--timeout", type=Seconds(max=DAY_S, positive=True), default=30.0, show_default=True,
              help="Seconds to wait for the result, retries and fallbacks included.")  # fmt: skip
@click.option("--peer", help="Only this peer (its public key).")
@click.option("--min-trust", type=Fraction(), help="Only peers whose reputation score is at least this.")
@click.option("--region", help="Only peers an operator attested in this region: fallback and checks included.")
@click.option("--prefer-region", help="Peers attested in this region first; others only when none there answers.")
@click.option("--kind", type=click.Choice(PEER_KINDS), help="Only peers an operator attested as this kind.")
@click.option("--max-price", type=Bounded(0.0, 1e9), help="Only peers whose signed manifest asks at most this per job.")
@click.option("--replicas", type=click.IntRange(1, 15), default=1, show_default=True,
              help="Run on this many distinct peers, compare results (deterministic capabilities).")  # fmt: skip
@click.option(
    "--quorum", type=click.IntRange(1, 15), help="Agreeing results needed [default: a majority of --replicas]."
)
@click.option("--verify", default="auto", show_default=True, metavar="auto|off|quorum:N/M",
              help="Check deterministic results: adaptively (auto), never, or on M peers, N agreeing.")  # fmt: skip
@click.option("--approve-result", is_flag=True, help="Hold the verified result until an approver signs it off.")
@click.option("--result-approver", "result_approvers", multiple=True, metavar="KEY",
              help="Who may approve the result (repeatable) [default: the trust file's operators or you].")  # fmt: skip
@click.option("--approve-timeout", type=Seconds(max=7 * DAY_S, positive=True), default=3600.0, show_default=True,
              help="Seconds to wait for the result's approval.")  # fmt: skip
@click.option("--escalate", metavar="KIND,KIND,...",
              help="Try peers of these kinds in order (like ai,hybrid,human), moving on when one fails.")  # fmt: skip
@click.option("--tag", "tags", multiple=True, help="Only peers whose capability carries this tag (repeatable).")
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

    A deterministic capability is routed to a qualified peer (ranked by trust
    and load, never a quarantined one) and its result is checked adaptively
    on an independent peer (--verify auto). Other capabilities go to the
    capability's queue group unless routing options (--min-trust, --region,
    --prefer-region, --kind, --max-price, --tag, --replicas, --trace) are
    given. --region and --kind count only what an operator attested (see
    `meshjobs attest`): with --region eu no peer outside eu ever sees the job. Every outcome becomes signed
    evidence for the reputation of the peer.

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
        constraints=Constraints(
            opts["min_trust"],
            opts["region"],
            opts["kind"],
            tags=tuple(opts["tags"]),
            prefer_region=opts["prefer_region"],
            max_price=opts["max_price"],
        ),
        replicas=opts["replicas"],
        quorum=opts["quorum"],
        trace=opts["trace"],
        verify=opts["verify"],
        escalate=tuple(k.strip() for k in (opts["escalate"] or "").split(",") if k.strip()),
        approve_result=_result_approvers(opts) if opts["approve_result"] else (),
        approve_timeout=opts["approve_timeout"],
    )
    if opts["durable"] and (options.routed or opts["peer"]):
        raise UsageError("--durable goes through the capability's queue; routing options do not apply")
    urls = servers(opts["server"])  # a mistyped URL is refused before an identity is made
    identity = identity_for_use()

    async def go() -> None:
        async with await Client.connect(urls, identity) as client:
            if opts["durable"]:
                # This home's journal: `jobs result/wait/list` check against the frame signed here.
                durable = await Durable.open(client.nc, journal=Journal(home() / JOURNAL_FILE))
                job_id = await durable.submit(identity, capability, args, job_id=opts["job_id"])
                if opts["wait_s"] is None:
                    click.echo(job_id)
                    return
                found = await wait_showing_attempts(durable, job_id, opts["wait_s"])
                await refuse_quarantined(client, job_id, found)
                print_value(found, opts["as_json"], job_id)
                return
            async with Submitter(client, await open_router(client)) as submitter:
                try:
                    done = await submitter.submit(capability, args, options)
                except MeshError as exc:
                    if opts["trace"]:
                        show_trace(exc.trace)
                    raise
        if opts["trace"]:
            show_trace(done.trace)
        if opts["as_json"]:
            click.echo(json.dumps(done.outcome.record(), indent=2))
        else:
            click.echo(json.dumps(done.outcome.value, ensure_ascii=False))

    run(go())


@click.command()
@click.option("--timeout", type=Seconds(max=DAY_S, positive=True), default=1.0, show_default=True,
              help="Seconds to collect answers.")  # fmt: skip
@click.option("--capability", help="Only peers offering this capability.")
@click.option("--tag", "tags", multiple=True, help="Only peers with a capability carrying this tag (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def peers(timeout: float, capability: str | None, tags: tuple[str, ...], as_json: bool, server: str) -> None:
    """Who offers what, from discovery ($SRV.INFO), with reputation and quarantine state."""
    from meshjobs.cli._render import peers_table
    from meshjobs.trust.reputation import summary

    urls = servers(server)
    identity = identity_for_use()

    async def go() -> None:
        async with await Client.connect(urls, identity) as client:
            found = await client.peers(timeout=timeout, capability=capability, operators=local_policy().operators)
            if tags:
                wanted = set(tags)
                found = [p for p in found if any(wanted <= set(p.tags_of(cap)) for cap in p.capabilities)]
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


def show_trace(trace: list[Any]) -> None:
    """Each peer tried, on stderr, with peer-supplied text escaped."""
    for attempt in trace:
        detail = safe_text(attempt.detail, markup=False)
        click.echo(f"trace: {attempt.peer[:12]}… {attempt.outcome} {attempt.ms:.1f} ms {detail}", err=True)


def _result_approvers(opts: dict[str, Any]) -> tuple[str, ...]:
    keys = tuple(opts["result_approvers"]) or tuple(sorted(local_policy().operators))
    for key in keys:
        if not is_public_key(key):
            raise UsageError(f"--result-approver {key[:16]!r}: not a peer key")
    return keys or (identity_for_use().public_key,)
