"""Judging peers: ``reputation``, ``quarantine``, ``release``, ``attest``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from meshjobs.cli._common import (
    DAY_S,
    Seconds,
    guarded,
    home,
    identity_for_use,
    local_policy,
    run,
    server_option,
    servers,
)
from meshjobs.client import Client
from meshjobs.errors import UsageError
from meshjobs.runtime.app import PEER_KINDS
from meshjobs.trust.policy import TRUST_FILE, TrustPolicy
from meshjobs.trust.reputation import summary


@click.command()
@click.argument("peer")
@click.option(
    "--evidence",
    "with_evidence",
    is_flag=True,
    help="Show the chain behind the score: each piece of evidence, its proof checked, who vouched.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="With --evidence: how many of the latest pieces.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def reputation(peer: str, with_evidence: bool, limit: int, as_json: bool, server: str) -> None:
    """A peer's score as the trust service signed it, explained; --evidence for the verified chain behind it."""
    from meshjobs.identity import is_public_key

    if not is_public_key(peer):
        raise UsageError(f"{peer[:16]!r} is not a peer key")
    identity = identity_for_use()
    policy = local_policy()

    async def go() -> None:
        async with await Client.connect(servers(server), identity) as client:
            record, chain, order, accepted = await _look_up(client, policy, peer, limit if with_evidence else 0)
        if as_json:
            shown = {"peer": peer, **summary(record), "accepted_services": sorted(accepted)}
            shown |= {"quarantine": order.model_dump() if order else None, "evidence": chain}
            click.echo(json.dumps(shown, indent=2))
            return
        _print(peer, record, chain, order, accepted, with_evidence)

    run(go())


async def _look_up(client: Client, policy: TrustPolicy, peer: str, limit: int) -> tuple[Any, list[Any], Any, Any]:
    """The peer's record, its evidence chain (*limit* pieces), the operators' order and the accepted services."""
    import nats.errors

    from meshjobs.errors import MeshError
    from meshjobs.trust.quarantine import QuarantineBoard
    from meshjobs.trust.reputation import ReputationBook

    try:
        book = await ReputationBook.open(client.nc, client.identity, trust_services=policy.trust_services)
        board = await QuarantineBoard.open(client.nc, policy.operators)
    except (MeshError, nats.errors.Error, TimeoutError) as exc:
        raise UsageError(f"reputation needs JetStream on the broker: {exc}") from None
    try:
        record = await book.record(peer)
        chain = await book.audit(peer, policy.operators | policy.pretrusted, limit) if limit else []
        return record, chain, board.orders.get(peer), book.accepted
    finally:
        await board.close()
        await book.close()


def _print(peer: str, record: Any, chain: list[dict[str, Any]], order: Any, accepted: Any, chained: bool) -> None:
    from meshjobs.cli._render import safe_text

    click.echo(f"peer {peer}")
    click.echo(safe_text(record.explain(), markup=False))
    if record.service:
        click.echo(f"signed by trust service {record.service} (record seq {record.seq})")
    else:
        names = ", ".join(k[:12] + "…" for k in sorted(accepted))
        click.echo(f"no record signed by a trust service this peer accepts ({names}; [[trust_service]] in trust.toml)")
    if order is not None:
        q = order
        click.echo(f"{q.action} by operator {q.operator[:12]}… (seq {q.seq}): {safe_text(q.reason, markup=False)}")
    if chained:
        click.echo(f"evidence, oldest first ({len(chain)}; standing and trust as of now):")
    for item in chain:
        click.echo("  " + _chain_line(item))


def _chain_line(item: dict[str, Any]) -> str:
    from meshjobs.cli._render import safe_text

    if "kind" not in item:
        return f"INVALID  {safe_text(item['problem'], markup=False)}"
    job = safe_text(f"job {item['job_id']} {item['capability']}", markup=False)
    who = f"by {item['submitter'][:12]}… (standing {item['standing']:.2f})"
    proof = "proof verified" if item["proof_verified"] else "no proof"
    if not item["valid"]:
        return f"{item['kind']:<9} {job} {who}: INVALID, {safe_text(item['problem'], markup=False)}"
    text = f"{item['kind']:<9} {job} {who}, {proof}; {safe_text(item['weighs'], markup=False)}"
    if item["agreeing"]:
        text += " [" + ", ".join(f"{a['worker'][:12]}… {a['trust']:.2f}" for a in item["agreeing"]) + "]"
    return text


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
    """End a peer's quarantine: an operator's order, or the trust service's automatic one (the service honours it)."""
    _order(peer, "release", reason, server)


@click.command()
@click.argument("peer")
@click.option("--kind", type=click.Choice(PEER_KINDS), help="What the peer is: system, ai, human or hybrid.")
@click.option("--region", help="The region the peer runs in (submit --region then counts it as there).")
@click.option("--community", help="The community the peer belongs to.")
@click.option("--valid-for", type=Seconds(max=10 * 365 * DAY_S, positive=True), default=365 * DAY_S,
              show_default=True, help="Seconds until the attestation expires.")  # fmt: skip
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write it to this new file [default: print]."
)
@guarded
def attest(
    peer: str, kind: str | None, region: str | None, community: str | None, valid_for: float, out: Path | None
) -> None:
    """Sign, as an operator, what PEER is: its kind, region and/or community.

    The worker carries it in its signed discovery manifest (`meshjobs worker
    --attestation FILE`). Submitters whose trust file lists your key under
    [[operator]] then route `--kind` and `--region` to it; to everyone else it
    stays a claim. The attestation holds public facts only.
    """
    from meshjobs.manifest import attest as sign_attestation

    frame = sign_attestation(
        identity_for_use(), peer, kind=kind, region=region, community=community, valid_for_s=valid_for
    )
    if out is None:
        click.echo(frame.decode())
        return
    try:
        with open(out, "xb") as f:  # a new file: never overwrite another peer's attestation by mistake
            f.write(frame + b"\n")
    except FileExistsError:
        raise UsageError(f"{out} exists; choose another file or remove it first") from None
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"attestation for {peer[:12]}… written to {out}", err=True)
