"""Human-readable output (rich tables). Scripts use ``--json`` instead.

Whatever a peer chose (names, descriptions, regions, capabilities, reasons,
details) goes through :func:`safe_text` before it reaches a terminal, here and
in every plain listing: a name must not be able to clear the screen, recolour
or hide text (rich markup, ANSI escapes) or reorder what follows it (bidi
overrides).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshjobs.discovery import PeerInfo
from meshjobs.infra.mesh import MeshHealth

#: C0 controls (ESC, CR, BS, ...), DEL and C1 controls (CSI is 0x9b): shown as \xNN.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
#: Bidi embeddings, overrides and isolates, direction marks, line and paragraph separators: shown as \uNNNN.
_INVISIBLE = (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES = {**_CONTROLS, **{c: f"\\u{c:04x}" for c in _INVISIBLE}}


def safe_text(value: object, *, markup: bool = True) -> str:
    """Peer-supplied text made safe to print: controls and bidi marks as visible escapes (``\\x1b``,
    ``\\u202e``), and with *markup* (text headed for rich) rich markup escaped too.

    Use ``markup=False`` for plain ``click.echo`` output, where brackets are just brackets.
    """
    text = str(value).translate(_ESCAPES)
    return escape(text) if markup else text


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
        cells = [safe_text(short_key(r["peer"]))] + [
            safe_text(r[c] or "-") for c in ("name", "kind", "region", "community")
        ]
        if scored:
            state = "quarantined" if r.get("quarantined") else "auto-quarantined" if r.get("auto_quarantined") else "ok"
            cells += [f"{r['score']:.2f}", state]
        table.add_row(*cells, ", ".join(safe_text(c) for c in r["capabilities"]))
    console.print(table)


def mesh_table(health: MeshHealth, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title_justify="left", title=f"JetStream meta leader: {safe_text(health.meta_leader or 'none')}")
    for column in ("server", "role", "region", "status", "routes", "gateways", "leaf links", "clients"):
        table.add_column(column)
    for s in health.servers:
        status = "[green]ok[/]" if s.up and not s.problems else f"[red]{safe_text('; '.join(s.problems))}[/]"
        table.add_row(
            safe_text(s.name) + (" ★" if s.name == health.meta_leader else ""),
            safe_text(s.role),
            safe_text(s.region),
            status,
            safe_text(", ".join(s.routes) or "-"),
            safe_text(", ".join(s.gateways) or "-"),
            str(s.leafnodes),
            str(s.connections),
        )
    console.print(table)
