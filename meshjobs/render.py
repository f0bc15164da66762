"""Human-readable output (rich tables). Scripts use ``--json`` instead."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from .discovery import PeerInfo


def short_key(key: str) -> str:
    """Enough of a peer key to tell peers apart in a table; ``--json`` has it whole."""
    return key[:12] + "…" if len(key) > 12 else key


def peers_table(peers: Iterable[PeerInfo], console: Console | None = None) -> None:
    console = console or Console()
    rows = list(peers)
    if not rows:
        console.print("no peers answered discovery")
        return
    table = Table(title=f"{len(rows)} worker process(es)", title_justify="left")
    for column in ("peer", "name", "kind", "region", "community", "capabilities"):
        table.add_column(column)
    for p in rows:
        table.add_row(short_key(p.peer), p.name, p.kind, p.region or "-", p.community or "-", ", ".join(p.capabilities))
    console.print(table)
