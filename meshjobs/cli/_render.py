"""Human-readable output (rich tables). Scripts use ``--json`` instead."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshjobs.discovery import PeerInfo
from meshjobs.infra.mesh import MeshHealth


def short_key(key: str) -> str:
    """Enough of a peer key to tell peers apart in a table; ``--json`` has it whole."""
    return key[:12] + "…" if len(key) > 12 else key


def peers_table(peers: Iterable[PeerInfo | dict[str, Any]], console: Console | None = None) -> None:
    """One row per worker process; reputation columns when the rows carry them."""
    console = console or Console()
    rows = [p.as_dict() if isinstance(p, PeerInfo) else p for p in peers]
    if not rows:
        console.print("no peers answered discovery")
        return
    scored = any("score" in r for r in rows)
    table = Table(title=f"{len(rows)} worker process(es)", title_justify="left")
    columns = (
        ["peer", "name", "kind", "region", "community"] + (["score", "state"] if scored else []) + ["capabilities"]
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in rows:
        cells = [short_key(r["peer"]), r["name"], r["kind"], r["region"] or "-", r["community"] or "-"]
        if scored:
            state = "quarantined" if r.get("quarantined") else "auto-quarantined" if r.get("auto_quarantined") else "ok"
            cells += [f"{r['score']:.2f}", state]
        table.add_row(*cells, ", ".join(r["capabilities"]))
    console.print(table)


def mesh_table(health: MeshHealth, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title_justify="left", title=f"JetStream meta leader: {health.meta_leader or 'none'}")
    for column in ("server", "role", "region", "status", "routes", "gateways", "leaf links", "clients"):
        table.add_column(column)
    for s in health.servers:
        status = "[green]ok[/]" if s.up and not s.problems else f"[red]{escape('; '.join(s.problems))}[/]"
        table.add_row(
            s.name + (" ★" if s.name == health.meta_leader else ""),
            s.role,
            s.region,
            status,
            ", ".join(s.routes) or "-",
            ", ".join(s.gateways) or "-",
            str(s.leafnodes),
            str(s.connections),
        )
    console.print(table)
