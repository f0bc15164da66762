"""Submitting and judging peers: ``submit``, ``peers``, ``reputation``, ``quarantine``, ``release``."""

from __future__ import annotations

import json
import logging
from typing import Any

import click
import nats.errors

from .app import PEER_KINDS
from .cli import guarded, home, identity_for_use, run, server_option, servers
from .client import Client
from .errors import MeshError, UsageError
from .policy import TRUST_FILE, TrustPolicy, load_trust

log = logging.getLogger("meshjobs.cli")


def local_policy() -> TrustPolicy:
    return load_trust(home() / TRUST_FILE, required=False)


async def open_router(client: Client) -> Any:
    """A router with reputation and quarantine, or None where JetStream is not reachable."""
    from .router import Router

    try:
        return await Router.open(client, local_policy().operators)
    except (MeshError, nats.errors.Error, TimeoutError) as exc:
        click.echo(f"meshjobs: warning: reputation and quarantine unavailable: {exc}", err=True)
        return None


@click.command()
@click.argument("capability")
@click.argument("json_args", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds to wait for the result, retries and fallbacks included.")  # fmt: skip
@click.option("--peer", help="Only this peer (its public key).")
@click.option("--min-trust", type=click.FloatRange(0, 1), help="Only peers whose reputation score is at least this.")
@click.option("--region", help="Only peers in this region.")
@click.option("--kind", type=click.Choice(PEER_KINDS), help="Only peers of this kind.")
@click.option("--replicas", type=click.IntRange(1, 15), default=1, show_default=True,
              help="Run on this many distinct peers, compare results (deterministic capabilities).")  # fmt: skip
@click.option(
    "--quorum", type=click.IntRange(1, 15), help="Agreeing results needed [default: a majority of --replicas]."
)
@click.option("--trace", is_flag=True, help="Show every peer tried, on stderr.")
@click.option("--job-id", help="Job id to use (retries with the same id never run twice on a peer).")
@click.option("--peer-wait", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds to keep trying while no peer offers the capability.")  # fmt: skip
@click.option("--durable", is_flag=True, help="Queue on JetStream: survives crashes; prints the job id.")
@click.option(
    "--wait", "wait_s", type=float, help="With --durable: wait this many seconds for the result and print it."
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
    from .client import parse_args
    from .router import Constraints
    from .subjects import check_capability

    ctx.meta["json"] = opts["as_json"]
    check_capability(capability)
    args = parse_args(json_args)
    replicas, quorum = opts["replicas"], opts["quorum"] or opts["replicas"] // 2 + 1
    if quorum > replicas:
        raise UsageError(f"--quorum {quorum} cannot exceed --replicas {replicas}")
    constraints = Constraints(opts["min_trust"], opts["region"], opts["kind"], opts["peer"])
    routed = (
        replicas > 1 or opts["trace"] or any(v is not None for v in (opts["min_trust"], opts["region"], opts["kind"]))
    )
    identity = identity_for_use()
    if opts["durable"]:
        if routed or opts["peer"]:
            raise UsageError("--durable goes through the capability's queue; routing options do not apply")
        run(_durable_submit(identity, capability, args, opts))
        return

    async def go() -> None:
        async with await Client.connect(servers(opts["server"]), identity) as client:
            router = await open_router(client)
            try:
                if routed and router is None:
                    raise UsageError("routing options need reputation, which needs JetStream on the broker")
                if routed:
                    if replicas > 1:
                        done = await router.submit_redundant(capability, args, replicas=replicas, quorum=quorum,
                                                             constraints=constraints, timeout=opts["timeout"],
                                                             job_id=opts["job_id"])  # fmt: skip
                    else:
                        done = await router.submit(capability, args, constraints=constraints,
                                                   timeout=opts["timeout"], job_id=opts["job_id"])  # fmt: skip
                    outcome = done.outcome
                    if opts["trace"]:
                        for attempt in done.trace:
                            click.echo(
                                f"trace: {attempt.peer[:12]}… {attempt.outcome} {attempt.ms:.1f} ms {attempt.detail}",
                                err=True,
                            )
                else:
                    outcome = await _queue_submit(client, router, capability, args, opts)
            finally:
                if router is not None:
                    await router.close()
        if opts["as_json"]:
            click.echo(json.dumps(outcome.record(), indent=2))
        else:
            click.echo(json.dumps(outcome.value, ensure_ascii=False))

    run(go())


async def _durable_submit(identity: Any, capability: str, args: dict[str, Any], opts: dict[str, Any]) -> None:
    from ._nats import connect
    from .cli_durable import print_value
    from .durable import Durable

    nc = await connect(servers(opts["server"]), identity, name="meshjobs-submit")
    try:
        durable = await Durable.open(nc)
        job_id = await durable.submit(identity, capability, args, job_id=opts["job_id"])
        if opts["wait_s"] is None:
            click.echo(job_id)
            return
        found = await durable.wait(job_id, opts["wait_s"])
    finally:
        await nc.close()
    print_value(found, opts["as_json"], job_id)


async def _queue_submit(
    client: Client, router: Any, capability: str, args: dict[str, Any], opts: dict[str, Any]
) -> Any:
    """The plain path: the queue group (or --peer), with the outcome reported as evidence."""
    from .envelope import new_job_id
    from .errors import HandlerError, Rejected

    job_id = opts["job_id"] or new_job_id()
    try:
        outcome = await client.submit(
            capability, args, timeout=opts["timeout"], peer=opts["peer"], job_id=job_id, peer_wait=opts["peer_wait"]
        )
    except HandlerError as exc:
        if router is not None and exc.result is not None:
            router.report("failure", exc.result.worker, exc.result, job_id, capability, detail=str(exc))
        raise
    if router is not None:
        if router.board.is_quarantined(outcome.worker):
            raise Rejected("quarantined", f"the result came from quarantined peer {outcome.worker[:12]}…")
        router.report("success", outcome.worker, outcome, job_id, capability)
    return outcome


@click.command()
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Seconds to collect answers.")  # fmt: skip
@click.option("--capability", help="Only peers offering this capability.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def peers(timeout: float, capability: str | None, as_json: bool, server: str) -> None:
    """Who offers what, from discovery ($SRV.INFO), with reputation and quarantine state."""
    from .render import peers_table
    from .reputation import summary

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


@click.command()
@click.argument("peer")
@click.option("--evidence", "show", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="How many pieces of recent evidence to list.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def reputation(peer: str, show: int, as_json: bool, server: str) -> None:
    """A peer's score, explained from its signed evidence."""
    from .identity import is_public_key
    from .reputation import summary

    if not is_public_key(peer):
        raise UsageError(f"{peer[:16]!r} is not a peer key")
    identity = identity_for_use()

    async def go() -> None:
        async with await Client.connect(servers(server), identity) as client:
            router = await open_router(client)
            if router is None:
                raise UsageError("reputation needs JetStream on the broker")
            try:
                record = await router.book.record(peer)
                evidence = await router.book.evidence(peer, limit=show) if show else []
                quarantined = router.board.orders.get(peer)
            finally:
                await router.close()
        items = [
            {"valid": e is not None, "problem": problem, **(e.model_dump(exclude={"result"}) if e else {})}
            for e, problem in evidence
        ]
        if as_json:
            order = quarantined.model_dump() if quarantined else None
            click.echo(json.dumps({"peer": peer, **summary(record), "quarantine": order, "evidence": items}, indent=2))
            return
        click.echo(f"peer {peer}")
        click.echo(record.explain())
        if quarantined is not None:
            click.echo(f"{quarantined.action} by operator {quarantined.operator[:12]}…: {quarantined.reason}")
        elif record.auto_quarantined():
            click.echo("automatically quarantined: score below 0.3 with at least 3 pieces of bad evidence")
        for item in items:
            if not item["valid"]:
                click.echo(f"  INVALID evidence: {item['problem']}")
                continue
            who = item["submitter"][:12]
            click.echo(f"  {item['kind']:<9} job {item['job_id']} {item['capability']} by {who}… {item['detail']}")

    run(go())


def _order(peer: str, action: str, reason: str, server: str) -> None:
    from ._nats import connect
    from .quarantine import issue_order

    identity = identity_for_use()
    if identity.public_key not in local_policy().operators:
        raise UsageError(
            f"this key ({identity.public_key[:12]}…) is not an operator: list it as [[operator]] in "
            f"{home() / TRUST_FILE} on every peer that should honour its orders"
        )

    async def go() -> None:
        nc = await connect(servers(server), identity, name="meshjobs-operator")
        try:
            await issue_order(nc, identity, peer, action, reason)
        finally:
            await nc.close()
        click.echo(f"{action}: {peer} ({reason or 'no reason given'})")

    run(go())


@click.command()
@click.argument("peer")
@click.option("--reason", required=True, help="Why; shown to everyone who checks the peer.")
@server_option
@guarded
def quarantine(peer: str, reason: str, server: str) -> None:
    """Shut a peer out everywhere: routers skip it, submitters refuse its results, workers its envelopes."""
    _order(peer, "quarantine", reason, server)


@click.command()
@click.argument("peer")
@click.option("--reason", default="", help="Why the quarantine ends.")
@server_option
@guarded
def release(peer: str, reason: str, server: str) -> None:
    """End a peer's quarantine."""
    _order(peer, "release", reason, server)
