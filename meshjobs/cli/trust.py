"""Judging peers: ``reputation``, ``quarantine``, ``release``."""

from __future__ import annotations

import json

import click

from meshjobs.cli._common import guarded, home, identity_for_use, local_policy, open_router, run, server_option, servers
from meshjobs.client import Client
from meshjobs.errors import UsageError
from meshjobs.trust.policy import TRUST_FILE


@click.command()
@click.argument("peer")
@click.option("--evidence", "show", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="How many pieces of recent evidence to list.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def reputation(peer: str, show: int, as_json: bool, server: str) -> None:
    """A peer's score, explained from its signed evidence."""
    from meshjobs.cli._render import safe_text
    from meshjobs.identity import is_public_key
    from meshjobs.trust.reputation import summary

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
            q = quarantined
            click.echo(f"{q.action} by operator {q.operator[:12]}… (seq {q.seq}): {safe_text(q.reason, markup=False)}")
        elif record.auto_quarantined():
            click.echo("automatically quarantined: score below 0.3 with at least 3 pieces of bad evidence")
        for item in items:
            if not item["valid"]:
                click.echo(f"  INVALID evidence: {safe_text(item['problem'], markup=False)}")
                continue
            who, what = item["submitter"][:12], safe_text(f"job {item['job_id']} {item['capability']}", markup=False)
            detail = safe_text(item["detail"], markup=False)
            click.echo(f"  {safe_text(item['kind'], markup=False):<9} {what} by {who}… {detail}")

    run(go())


def _order(peer: str, action: str, reason: str, server: str) -> None:
    from meshjobs._nats import connect
    from meshjobs.cli._render import safe_text
    from meshjobs.trust.quarantine import issue_order

    identity = identity_for_use()
    operators = local_policy().operators
    if identity.public_key not in operators:
        raise UsageError(
            f"this key ({identity.public_key[:12]}…) is not an operator: list it as [[operator]] in "
            f"{home() / TRUST_FILE} on every peer that should honour its orders"
        )

    async def go() -> None:
        nc = await connect(servers(server), identity, name="meshjobs-operator")
        try:
            order = await issue_order(nc, identity, peer, action, reason, operators=operators)
        finally:
            await nc.close()
        click.echo(f"{action}: {peer} (seq {order.seq}; {safe_text(reason, markup=False) or 'no reason given'})")

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
