"""Approval gates: ``approvals`` lists what waits, ``approve`` and ``reject`` sign a decision."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from meshjobs._nats import close_quietly, connect
from meshjobs.cli._common import guarded, identity_for_use, run, server_option, servers
from meshjobs.cli._render import narrow_table, safe_text, short_key
from meshjobs.envelope import now_ms
from meshjobs.identity import Identity

T = TypeVar("T")
STAGES = click.Choice(["run", "result"])


async def _with_store(server: str, identity: Identity, work: Callable[[Any], Awaitable[T]]) -> T:
    from meshjobs.workflow.waiting import ApprovalStore

    nc = await connect(servers(server), identity, name="meshjobs-approvals")
    try:
        return await work(await ApprovalStore.open(nc))
    finally:
        await close_quietly(nc)


def _row(request: Any, me: str, now: int) -> dict[str, Any]:
    row: dict[str, Any] = request.as_dict()
    row["deadline_in_s"] = round(max(request.deadline_ms - now, 0) / 1000, 1)
    row["may_decide"] = me in request.approvers
    if request.state == "waiting" and request.deadline_ms <= now:
        row["state"] = "expired"  # nobody marked it: its waiting peer is gone
    return row


def _when(seconds: float) -> str:
    if seconds <= 0:
        return "passed"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _table(rows: list[dict[str, Any]], everything: bool) -> None:
    console = Console()
    if not rows:
        console.print("nothing waits for approval" if not everything else "no approval requests")
        return
    columns: list[tuple[str, int | None]] = [
        ("job", 32),
        ("stage", 6),
        ("capability", 20),
        ("submitter", 13),
        ("deadline", 8),
        ("you", 3),
    ]
    if everything:
        columns.append(("state", 8))
    cells = []
    for r in rows:
        shown = r["value"] if r["stage"] == "result" else r["args"]
        cell = [
            safe_text(r["job_id"]),
            safe_text(r["stage"]),
            safe_text(r["capability"]),
            safe_text(short_key(r["submitter"])),
            _when(r["deadline_in_s"]),
            "yes" if r["may_decide"] else "no",
        ]
        if everything:
            cell.append(safe_text(r["state"]))
        cells.append([*cell, safe_text(json.dumps(shown, ensure_ascii=False)[:500])])
    what = "request(s)" if everything else "waiting for approval"
    console.print(narrow_table(f"{len(rows)} {what}", [*columns, ("args / value", None)], cells, console.width))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field of each request).")
@click.option("--all", "everything", is_flag=True, help="Also requests already decided or expired.")
@server_option
@guarded
def approvals(as_json: bool, everything: bool, server: str) -> None:
    """Jobs and results waiting for a signed approval: capability, arguments, submitter, deadline."""
    identity = identity_for_use()

    async def go() -> list[dict[str, Any]]:
        requests = await _with_store(server, identity, lambda store: store.requests())
        now = now_ms()
        rows = [_row(r, identity.public_key, now) for r in requests]
        return rows if everything else [r for r in rows if r["state"] == "waiting"]

    rows = run(go())
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        _table(rows, everything)


def _decide(job: str, verb: str, reason: str, stage: str | None, as_json: bool, server: str) -> None:
    identity = identity_for_use()

    async def go() -> tuple[Any, bytes]:
        async def work(store: Any) -> tuple[Any, bytes]:
            request = await store.find(job, stage)
            return request, await store.decide(identity, request, verb, reason)

        result: tuple[Any, bytes] = await _with_store(server, identity, work)
        return result

    request, frame = run(go())
    if as_json:
        record = {"job_id": request.job_id, "stage": request.stage, "decision": verb, "signed_decision": frame.decode()}
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        done = "approved" if verb == "approve" else "rejected"
        what = "the result of " if request.stage == "result" else ""
        click.echo(f"{done} {what}{safe_text(request.capability, markup=False)} job {request.job_id}")


@click.command()
@click.argument("job")
@click.option("--reason", default="", help="Why (kept in the signed decision).")
@click.option("--stage", type=STAGES, help="Which request of the job: before it runs, or its result.")
@click.option("--json", "as_json", is_flag=True, help="Print the signed decision as JSON.")
@server_option
@guarded
def approve(job: str, reason: str, stage: str | None, as_json: bool, server: str) -> None:
    """Approve a waiting job (by job id) with this peer's key: its handler runs."""
    _decide(job, "approve", reason, stage, as_json, server)


@click.command()
@click.argument("job")
@click.option("--reason", required=True, help="Why (the submitter sees it).")
@click.option("--stage", type=STAGES, help="Which request of the job: before it runs, or its result.")
@click.option("--json", "as_json", is_flag=True, help="Print the signed decision as JSON.")
@server_option
@guarded
def reject(job: str, reason: str, stage: str | None, as_json: bool, server: str) -> None:
    """Reject a waiting job (by job id) with this peer's key: it ends as not_approved, never run."""
    _decide(job, "reject", reason, stage, as_json, server)
